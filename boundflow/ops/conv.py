"""conv2d over the last three axes: inputs (x [..., C, H, W], W [co, ci/g, kh, kw], b [co]?),
attrs stride, padding (top, left, bottom, right), dilation, groups. Also its patch rules (A as
receptive-field windows, domains/patches.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from boundflow.domains import fp
from boundflow.domains.interval import from_cr, to_cr
from boundflow.domains.linear import sound, sum_lead
from boundflow.domains.patches import fp_widen as patch_fp_widen
from boundflow.domains.patches import selected_neurons
from boundflow.domains.rounding import down, magnitude, up
from boundflow.ops.registry import Op, register


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, attrs: dict) -> torch.Tensor:
    """conv2d over the last three axes; asymmetric padding via an explicit zero pad."""
    lead = tuple(x.shape[:-3])
    xs = x.reshape((-1,) + tuple(x.shape[-3:]))
    top, left, bottom, right = attrs["padding"]
    if (top, left) == (bottom, right):
        pad = (top, left)
    else:
        xs = F.pad(xs, (left, right, top, bottom))
        pad = (0, 0)
    y = F.conv2d(xs, w, b, stride=tuple(attrs["stride"]), padding=pad,
                 dilation=tuple(attrs["dilation"]), groups=attrs["groups"])
    return y.reshape(lead + tuple(y.shape[1:]))


def forward(x, w, b=None, attrs=None):
    return conv2d(x, w, b, attrs)


def interval_params(graph, node, dtype=torch.float32):
    ps = [graph.data(i) for i in node.inputs if not graph.is_variable(i)]
    return [ps[0], ps[0].abs(), ps[1] if len(ps) > 1 else None]


def interval(ins, ps, attrs):
    (s,) = ins
    w, w_abs, b = ps
    c, r = to_cr(s)
    return (from_cr(torch.stack((conv2d(c, w, b, attrs), conv2d(r, w_abs, None, attrs)))),)


def backward_params(graph, node, dtype=torch.float32):
    ps = [graph.data(i) for i in node.inputs if not graph.is_variable(i)]
    return [ps[0], ps[1] if len(ps) > 1 else None]


def backward(ins, ps, attrs):
    """A through the transposed convolution, cropped to the input (output_padding recovers the
    padded input extent the strided conv did not reach), and the bias term."""
    a, bias = ins
    w, b = ps
    c_in, h, wd = attrs["in_shape"][-3:]
    top, left, bottom, right = attrs["padding"]
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    c_out, h_out, w_out = a.shape[-3:]
    kh, kw = w.shape[-2:]
    op_h = h + top + bottom - ((h_out - 1) * sh + dh * (kh - 1) + 1)
    op_w = wd + left + right - ((w_out - 1) * sw + dw * (kw - 1) + 1)
    lead = tuple(a.shape[:-3])
    x = F.conv_transpose2d(a.reshape(-1, c_out, h_out, w_out), w, None, stride=(sh, sw),
                           output_padding=(op_h, op_w), groups=attrs["groups"], dilation=(dh, dw))
    x = x[:, :, top:top + h, left:left + wd]
    new_bias = bias.clone() if b is None else bias + sum_lead(a, 3).sum((-1, -2)) @ b
    return x.reshape(lead + (c_in, h, wd)), new_bias


def matrix(graph, node, dtype, max_bytes):
    """The conv as a dense matrix [out numel, in numel] and its bias per output element, when it
    takes at most max_bytes: its own backward rule run on the identity (each entry is one
    weight, exactly)."""
    out_shape, in_shape = graph.shape(node.outputs[0]), graph.shape(node.inputs[0])
    n_out, n_in = math.prod(out_shape), math.prod(in_shape)
    if 4 * n_out * n_in > max_bytes:
        return None
    w, b = [None if t is None else t.to(dtype) for t in backward_params(graph, node)]
    eye = torch.eye(n_out, dtype=dtype).reshape((1, n_out) + tuple(out_shape))
    rows, _ = backward([eye, torch.zeros(1, n_out, dtype=dtype)], [w, None], dict(node.attrs, in_shape=list(in_shape)))
    bias = torch.zeros(out_shape, dtype=dtype) if b is None else b.reshape(-1, 1, 1).expand(out_shape[-3:]).reshape(out_shape)
    return rows.reshape(n_out, -1), bias.reshape(-1)


def fp_params(graph, node, dtype):
    weights = fp.weights(graph, node, dtype)
    if len(weights) == 1:                       # no bias: no error from one
        weights.append(torch.zeros(weights[0].shape[0], dtype=dtype))
    return weights


def fp_error(ins, ps, attrs):
    s, raw = ins
    w_err, b_err = ps
    return fp.finish(raw, conv2d(magnitude(s), w_err, b_err, attrs), attrs["n"])


# -- patches ------------------------------------------------------------------------------------

def patch_start(ins, ps, attrs):
    """The selected neurons' rows of the target conv: its kernel, as a window on its input. In
    a sound_fp plan the last input is the conv's error vector: each row's bound takes its own
    neuron's error (as linear.start_rows)."""
    sel, e = (ins[:-1], ins[-1]) if attrs.get("fp") else (ins, None)
    idx = selected_neurons(sel, 0, attrs)
    w, b = ps
    c = (idx // (attrs["target"][1] * attrs["target"][2])).repeat(2)
    a = w[c].unsqueeze(0).expand((attrs["batch"],) + (c.numel(),) + tuple(w.shape[1:]))
    bias = (torch.zeros(c.numel(), dtype=w.dtype) if b is None else b[c]).unsqueeze(0).expand(attrs["batch"], -1)
    if e is not None:
        e = e.flatten(1)[:, idx]
        bias = torch.cat([down(bias[:, :len(idx)] - e), up(bias[:, len(idx):] + e)], 1)
    return a, bias


def patch_backward(ins, ps, attrs):
    """Back through a conv: the window grows to the kernel's reach (no cropping: what falls on
    the conv's padding is zeroed by the next window read). In a sound_fp plan the inputs end
    with the conv's error vector and the selected neurons (attrs "grid": the window geometry
    of A on the conv's output)."""
    a, bias = ins[:2]
    w, b = ps
    lead = a.shape[:2]
    x = F.conv_transpose2d(a.flatten(0, 1), w, None, stride=tuple(attrs["stride"]))
    new_bias = bias.clone() if b is None else bias + a.sum((-1, -2)) @ b
    if attrs.get("fp"):
        e, idx = ins[2], selected_neurons(ins, 3, attrs)
        new_bias = patch_fp_widen(a, new_bias, e, idx, attrs)
    return x.reshape(lead + x.shape[1:]), new_bias


CONV2D = register(Op("conv2d", forward, interval, sound(backward), fp_error, mixing=True, matrix=matrix,
                     interval_params=interval_params, backward_params=backward_params, fp_params=fp_params,
                     kernels={"linear.patch_start": patch_start, "linear.patch_conv": patch_backward}))
