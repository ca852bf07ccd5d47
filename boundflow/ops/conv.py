"""conv2d over the last three axes: inputs (x [..., C, H, W], W [co, ci/g, kh, kw], b [co]?),
attrs stride, padding (top, left, bottom, right), dilation, groups. Also its patch rules (A as
receptive-field windows, domains/patches.py). Frontends lower convolutions and average pooling
(a depthwise conv2d with weights 1 / window size) to it, and a zero pad in front of one into
its padding. conv_transpose2d, its adjoint, is here too (ConvTranspose)."""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from boundflow.domains import binds, fp, shaped, writes_into
from boundflow.domains.interval import from_cr, to_cr
from boundflow.domains.linear import sound, sum_lead
from boundflow.domains.patches import fp_widen as patch_fp_widen
from boundflow.domains.patches import selected_neurons
from boundflow.domains.rounding import Enclosed, down, magnitude, up
from boundflow.ops import select
from boundflow.ops.linear import lu_blocks, lu_form, lu_interval
from boundflow.ops.registry import Op, onnx_lowering, register, torch_lowering

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder, Constant

aten = torch.ops.aten


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


# -- the transposed convolution (the adjoint of conv2d), the backward rules' main cost --------------

PHASE_MAX_PADDED = 16                 # see transposed
_PHASE_KERNELS: dict[int, tuple] = {}     # id(weight) -> (weakref to it, {stride: its phase kernel})


def _phase_kernel(w: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """conv2d weight [ci sh sw, co, ceil(kh/sh), ceil(kw/sw)] computing every output phase (y mod
    sh, x mod sw) of conv_transpose2d(., w, stride) at once: phase (ry, rx) takes the taps ry::sh,
    rx::sw (zero taps past the kernel's end), reversed. Cached per weight tensor (plan parameters
    live as long as their plan)."""
    hit = _PHASE_KERNELS.get(id(w))
    if hit is None or hit[0]() is not w:
        hit = _PHASE_KERNELS[id(w)] = (weakref.ref(w, lambda _, k=id(w): _PHASE_KERNELS.pop(k, None)), {})
    kernel = hit[1].get((sh, sw))
    if kernel is None:
        co, ci, kh, kw = w.shape
        jh, jw = -(-kh // sh), -(-kw // sw)
        with torch.inference_mode(False):    # (cached, maybe first in an executor's run: autograd may save it later)
            taps = F.pad(w.detach(), (0, jw * sw - kw, 0, jh * sh - kh)).reshape(co, ci, jh, sh, jw, sw).flip(2, 4)
            kernel = hit[1][sh, sw] = taps.permute(1, 3, 5, 0, 2, 4).reshape(ci * sh * sw, co, jh, jw).contiguous()
    return kernel


def transposed(x: torch.Tensor, w: torch.Tensor, stride, dilation=(1, 1), groups: int = 1,
               window: tuple[int, int, int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv_transpose2d(x, w, stride=stride, dilation=dilation, groups=groups), x [N, C, H, W]:
    the full ((H - 1) s + d (k - 1) + 1 rows) transposed conv, or its `window` (top, left,
    height, width), which may reach past the full result's end (zeros there: a conv's input rows
    its stride never read, ONNX's output_padding). out: a tensor of the result's shape to write
    it into (the arena's view), or None.

    A strided one runs as one stride-1 conv2d over all s x s output phases, gathered into the
    window after (_weave_index), when the stride divides the kernel or the result
    has at most PHASE_MAX_PADDED channels (the kernel then padded with zero taps, which add exact
    zeros): torch's own transposed conv spends most of its time on the zeros it inserts between
    inputs. Measured on this CPU (torch's time / ours): 2-5x on the oval21 nets' stride-2 4x4
    kernels, 2.2-5x on resnet_2b's 3x3 stride-2 kernels onto 3 and 8 channels (200-2048 rows),
    1.1-2.2x onto 16, 1.1x onto 32, 0.75-1x onto 64 (the padded taps' work then dominates: not
    taken); stride 1 gains nothing. A kernel smaller than its stride: _sparse_phases."""
    (sh, sw), (kh, kw) = stride, w.shape[-2:]
    n, _, h, wd = x.shape
    full_h, full_w = (h - 1) * sh + dilation[0] * (kh - 1) + 1, (wd - 1) * sw + dilation[1] * (kw - 1) + 1
    window = (0, 0, full_h, full_w) if window is None else tuple(window)
    divides = kh % sh == 0 and kw % sw == 0
    plain = groups == 1 and tuple(dilation) == (1, 1)
    if plain and kh <= sh and kw <= sw and not divides:
        return _sparse_phases(x, w, sh, sw, window, out)
    if not plain or (sh, sw) == (1, 1) or not (divides or w.shape[1] <= PHASE_MAX_PADDED):
        y = F.conv_transpose2d(x, w, None, stride=tuple(stride), dilation=tuple(dilation), groups=groups)
        return _into(_crop(y, window), out)
    jh, jw = -(-kh // sh), -(-kw // sw)
    z = F.conv2d(x, _phase_kernel(w, sh, sw), padding=(jh - 1, jw - 1))       # [N, ci sh sw, h+jh-1, wd+jw-1]
    ci, (mh, mw) = w.shape[1], z.shape[-2:]
    top, left, height, width = window
    idx = _weave_index(ci, sh, sw, mh, mw, full_h, full_w, window, z.device)
    y = torch.index_select(z.flatten(1), 1, idx, out=None if out is None else out.flatten(1))
    y = y.view(n, ci, height, width)
    if full_h - top < height:                      # past the full result's end: zeros
        y[:, :, max(full_h - top, 0):] = 0
    if full_w - left < width:
        y[:, :, :, max(full_w - left, 0):] = 0
    return y if out is None else out


@functools.lru_cache(maxsize=256)
def _weave_index(ci: int, sh: int, sw: int, mh: int, mw: int, full_h: int, full_w: int, window, device) -> torch.Tensor:
    """For each entry of a window (top, left >= 0) of the transposed conv, where it sits in the
    phase conv's result per sample, [ci, sh, sw, mh, mw] flattened: output row top + i is phase
    row (top + i) % sh, at (top + i) // sh. One gather then weaves and crops at once, writing
    the result contiguously (2-3x the four strided phase copies it replaced here). Entries past
    the full result's end point anywhere; the caller zeroes them."""
    top, left, height, width = window
    with torch.inference_mode(False):        # (cached: autograd may save it later)
        ys = torch.arange(top, top + height).clamp(max=full_h - 1)[:, None]
        xs = torch.arange(left, left + width).clamp(max=full_w - 1)[None, :]
        c = torch.arange(ci)[:, None, None]
        idx = (((c * sh + ys % sh) * sw + xs % sw) * mh + ys // sh) * mw + xs // sw
        return idx.reshape(-1).to(device)


def _landing(offset: int, step: int, count: int, start: int, length: int) -> tuple[int, int, int]:
    """Entries offset + step i (i < count) of a full axis seen through the window [start, start +
    length): (the first i inside, where it lands in the window, how many land)."""
    i0 = max(0, -((offset - start) // step))
    j0 = offset + step * i0 - start
    return i0, j0, max(0, min(count - i0, -(-(length - j0) // step)))


def _crop(y: torch.Tensor, window) -> torch.Tensor:
    top, left, height, width = window
    grow_h, grow_w = max(0, top + height - y.shape[-2]), max(0, left + width - y.shape[-1])
    if grow_h or grow_w:
        y = F.pad(y, (0, grow_w, 0, grow_h))
    return y[:, :, top:top + height, left:left + width]


def _into(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return y if out is None else out.copy_(y)


def _sparse_phases(x: torch.Tensor, w: torch.Tensor, sh: int, sw: int, window, out) -> torch.Tensor:
    """The transposed conv of a kernel no larger than its stride (a resnet's 1x1 stride-2
    shortcut): each output phase takes at most one tap, a 1x1 conv over channels, and the
    others are zero. 3-10x torch's conv_transpose2d on such kernels here."""
    n, _, h, wd = x.shape
    _, ci, kh, kw = w.shape
    top, left, height, width = window
    y = (x.new_empty(n, ci, height, width) if out is None else out).zero_()
    for ry in range(kh):
        rows = _landing(ry, sh, h, top, height)
        for rx in range(kw):
            cols = _landing(rx, sw, wd, left, width)
            (i0, y0, nr), (k0, x0, nc) = rows, cols
            if nr == 0 or nc == 0:
                continue
            tap = F.conv2d(x[:, :, i0:i0 + nr, k0:k0 + nc], w[:, :, ry, rx].t()[:, :, None, None])
            y[:, :, y0::sh, x0::sw][:, :, :nr, :nc] = tap
    return y


def forward(x, w, b=None, attrs=None):
    return conv2d(x, w, b, attrs)


# kernels at least this large (either side) get the pair form at batch 1, see interval
PAIR_MIN_KERNEL = 4
# dense matrices of at most this many entries get the lu_form at batch 1 (a conv's matrix is
# mostly zeros: it replaces convolutions, not a product of the same weights as linear's does)
LU_FORM_MAX = 1 << 16
# convs of at most this many multiply-adds (a forward at batch 1) get the lu conv at batch 1:
# four times the arithmetic of one conv in one call, where two convs and the centre/radius
# conversions are mostly fixed costs (this CPU, 3x3 onto 8 channels of 8x8: 14 us against 16
# for the two convs alone). Measured in whole IBP calls, where every extra call also meets
# caches its predecessor left cold: cifar_wide_kw's 16 -> 32 4x4 stride 2 (524K) 470 -> 430
# us a call against the pair form; two 3x3 convs of 590K (16 -> 16 on 16x16, 32 -> 32 on
# 8x8) 206 -> 178 and 184 -> 147 us against two convs; about even at 1.2M and 2.4M
LU_CONV_MAX_MACS = 1 << 20
# and from this many on, its weight is stored channels-last: torch then takes oneDNN's
# convolution rather than its im2col loop at batch 1, mostly faster even with the channels-last
# result copied back into the (NCHW) arena (this CPU, the lu convs of the benchmark's nets: 16 ->
# 32 channels 3x3 on 8x8, 29 -> 22 us; 16 -> 32 4x4 stride 2 on 16x16, 59 -> 47; but 16 -> 16 3x3
# on 16x16, 28 -> 30), slower below it (2 -> 8 channels 3x3 on 16x16: 7 -> 10)
LU_CONV_CHANNELS_LAST_MIN_MACS = 1 << 15


def _interval_params(adjoint, pair: bool):
    """The interval rule's params [W, |W|, b] and, in float32 plans, one form for a single
    region:
    - for conv2d's rule (`pair`) with one group and at most LU_CONV_MAX_MACS, the lu conv:
      [[W+, W-], [W-, W+]] over the channels and (b, b), so that stack(l, u) -> stack(l', u')
      is one conv (linear's lu_form with channels for rows; at least as fast as the dense
      matrix below on cnn_small's 3x3 convs, with 1/3000 of its bytes: a 1 MB matrix falls out
      of the 2 MB L2 between calls);
    - the op's lu_form (its dense matrix from `adjoint`, its backward rule) when that has at
      most LU_FORM_MAX entries: the whole rule one product, ~10 us against ~100-230 us of
      convolutions on small layers;
    - for conv2d's rule with kernels of PAIR_MIN_KERNEL or more, cat(W, |W|) and cat(b, 0):
      centre and radius through one conv of twice the groups."""
    def interval_params(graph, node, dtype=torch.float32):
        w, *rest = [graph.data(i) for i in node.inputs if not graph.is_variable(i)]
        b = rest[0] if rest else None
        ps = [w, w.abs(), b]
        if dtype != torch.float32:
            return ps
        bias = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
        macs = graph.values[node.outputs[0]].type.numel * math.prod(w.shape[1:])
        if pair and node.attrs["groups"] == 1 and macs <= LU_CONV_MAX_MACS:
            w_lu = lu_blocks(w)
            if macs >= LU_CONV_CHANNELS_LAST_MIN_MACS:
                w_lu = w_lu.contiguous(memory_format=torch.channels_last)
            return ps + [w_lu, torch.cat((bias, bias))]
        dense = dense_matrix(adjoint, graph, node, dtype, 4 * LU_FORM_MAX)
        if dense is not None:
            w_lu, b_lu = lu_form(*dense)
            ps += [w_lu, b_lu.view((2,) + tuple(graph.shape(node.outputs[0])))]
        elif pair and max(w.shape[-2:]) >= PAIR_MIN_KERNEL:
            ps += [torch.cat(ps[:2]), torch.cat((bias, torch.zeros_like(bias)))]
        return ps
    return interval_params


@binds
def interval(ins, ps, attrs, out=(None,)):
    """Centre and radius through W and |W|. One region: a form from _interval_params, the
    lu_form (a 2-d weight) of a small layer, the lu conv of a small conv, or with a large
    kernel the pair: one conv of twice the groups over the stacked (c, r) channels, which at
    batch 1 costs about what one conv does here (torch's default algorithm is slow on such
    kernels at batch 1: 4x4 stride 2 onto 8 channels, 87 us for the pair against 150 us for
    two convs); elsewhere two convs. Not in sound_fp plans (float64; fp_error bounds the two
    convs' rounding)."""
    (s,) = ins
    w, w_abs, b = ps[:3]
    c_in, h, wd = s.shape[-3:]
    form = ps[3] if len(ps) > 3 else None
    if form is not None and form.dim() == 2 and s.numel() == form.shape[0]:
        return _lu(s, ps, out)
    one_region = form is not None and form.dim() == 4 and s.numel() == 2 * c_in * h * wd
    if one_region and form.shape[1] == 2 * w.shape[1]:           # the lu conv: s is its one image
        return _lu_conv(s, form, ps[4], attrs, out[0])
    pair_attrs = dict(attrs, groups=2 * attrs["groups"])

    def run():
        cr = to_cr(s)
        if one_region:
            pair = conv2d(cr.view(1, 2 * c_in, h, wd), form, ps[4], pair_attrs)
            y = pair.view((2,) + tuple(s.shape[1:-3]) + (w.shape[0],) + tuple(pair.shape[-2:]))
        else:
            c, r = cr
            y = torch.stack((conv2d(c, w, b, attrs), conv2d(r, w_abs, None, attrs)))
        return (from_cr(y, shaped(out[0], y.shape)),)
    return run


def _lu_conv(s: torch.Tensor, w_lu: torch.Tensor, b_lu: torch.Tensor, attrs: dict, out: torch.Tensor | None):
    """run() for one region's stack(l, u) [2, 1, ..., C, H, W] through the lu conv: the input
    is one image of 2C channels, the output one of 2O, stack(l', u') (copied into out). With
    a planned view and symmetric padding, torch's conv is called with everything resolved
    here (conv2d's reshapes and attribute tuples cost as much as a small conv)."""
    top, left, bottom, right = attrs["padding"]
    if out is None or out.numel() == 0 or (top, left) != (bottom, right) or not s.is_contiguous():
        def run():
            image = conv2d(s.reshape((1, -1) + tuple(s.shape[-2:])), w_lu, b_lu, attrs)
            y = image.view(tuple(s.shape[:-3]) + (w_lu.shape[0] // 2,) + tuple(image.shape[-2:]))
            return (_into(y, shaped(out, y.shape)),)
        return run
    args = (s.view((1, -1) + tuple(s.shape[-2:])), w_lu, b_lu, tuple(attrs["stride"]), (top, left),
            tuple(attrs["dilation"]))
    image = out.view((1, -1) + tuple(out.shape[-2:]))

    def run():
        image.copy_(torch.conv2d(*args))
        return (out,)
    return run


def _lu(s: torch.Tensor, ps, out):
    """run() for one region through the lu_form params ps[3:5] (its bias shaped [2, *output])."""
    shape = tuple(s.shape[:2]) + tuple(ps[4].shape[1:])      # [2, B = 1, *output]
    return lu_interval(s, ps[3], ps[4], shape, shaped(out[0], shape))


def backward_params(graph, node, dtype=torch.float32):
    ps = [graph.data(i) for i in node.inputs if not graph.is_variable(i)]
    return [ps[0], ps[1] if len(ps) > 1 else None]


DENSE_BACKWARD_MAX_MACS = 1 << 23


def _bias(bias: torch.Tensor, term: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """bias + term (the conv's bias through A; None: no bias), written into out if given."""
    out = shaped(out, bias.shape)
    if term is None:
        return bias.clone() if out is None else out.copy_(bias)
    return torch.add(bias, term, out=out)


@writes_into
def backward(ins, ps, attrs, out=(None, None)):
    """A through the transposed convolution, cropped to the input (the input rows the strided
    conv never read are zero), and the bias term. With a third param, the conv's dense matrix
    [out numel, in numel] (small convs, PlannerConfig.dense_conv_backward_bytes): A through it as
    one product when that takes at most DENSE_BACKWARD_MAX_MACS (cnn_small's convs: ~15 us
    against ~150-230 us for the transposed conv; the product does every zero of the matrix too,
    so many rows, as in branch and bound's batches, go through the conv). Both write into the
    planned views: the transposed conv's phases land in the arena's rows directly."""
    a, bias = ins
    w, b = ps[:2]
    c_in, h, wd = attrs["in_shape"][-3:]
    lead = tuple(a.shape[:-3])
    new_bias = _bias(bias, None if b is None else sum_lead(a, 3).sum((-1, -2)) @ b, out[1])
    dest = shaped(out[0], lead + (c_in, h, wd))
    if len(ps) > 2 and a.numel() * ps[2].shape[1] <= DENSE_BACKWARD_MAX_MACS:
        rows = torch.mm(a.reshape(-1, ps[2].shape[0]), ps[2], out=None if dest is None else dest.view(-1, ps[2].shape[1]))
        return (rows.view(lead + (c_in, h, wd)) if dest is None else dest), new_bias
    top, left = attrs["padding"][:2]
    x = transposed(a.reshape((-1,) + tuple(a.shape[-3:])), w, attrs["stride"], attrs["dilation"], attrs["groups"],
                   window=(top, left, h, wd), out=None if dest is None else dest.view(-1, c_in, h, wd))
    return x.reshape(lead + (c_in, h, wd)) if dest is None else dest, new_bias


def dense_matrix(rule, graph, node, dtype, max_bytes):
    """A conv-like op as a dense matrix [out numel, in numel] and its bias per output element,
    when it takes at most max_bytes: its own backward `rule` run on the identity (each entry is
    one weight, exactly)."""
    out_shape, in_shape = graph.shape(node.outputs[0]), graph.shape(node.inputs[0])
    n_out, n_in = math.prod(out_shape), math.prod(in_shape)
    if 4 * n_out * n_in > max_bytes:
        return None
    w, b = [None if t is None else t.to(dtype) for t in backward_params(graph, node)]
    eye = torch.eye(n_out, dtype=dtype).reshape((1, n_out) + tuple(out_shape))
    rows, _ = rule([eye, torch.zeros(1, n_out, dtype=dtype)], [w, None], dict(node.attrs, in_shape=list(in_shape)))
    bias = torch.zeros(out_shape, dtype=dtype) if b is None else b.reshape(-1, 1, 1).expand(tuple(out_shape))
    return rows.reshape(n_out, -1), bias.reshape(-1)


def matrix(graph, node, dtype, max_bytes):
    return dense_matrix(backward, graph, node, dtype, max_bytes)


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
    idx = selected_neurons(sel, 0, attrs, ps[0])
    w, b = ps
    c = (idx // (attrs["target"][1] * attrs["target"][2])).repeat(2)
    a = w[c].unsqueeze(0).expand((attrs["batch"],) + (c.numel(),) + tuple(w.shape[1:]))
    bias = (w.new_zeros(c.numel()) if b is None else b[c]).unsqueeze(0).expand(attrs["batch"], -1)
    if e is not None:
        e = e.flatten(1)[:, idx]
        bias = torch.cat([down(bias[:, :len(idx)] - e), up(bias[:, len(idx):] + e)], 1)
    return a, bias


@writes_into
def patch_backward(ins, ps, attrs, out=(None, None)):
    """Back through a conv: the window grows to the kernel's reach (no cropping: what falls on
    the conv's padding is zeroed by the next window read). In a sound_fp plan the inputs end
    with the conv's error vector and the selected neurons (attrs "grid": the window geometry
    of A on the conv's output)."""
    a, bias = ins[:2]
    w, b = ps
    (sh, sw), (kh, kw) = attrs["stride"], w.shape[-2:]
    shape = tuple(a.shape[:2]) + (w.shape[1], (a.shape[-2] - 1) * sh + kh, (a.shape[-1] - 1) * sw + kw)
    dest = shaped(out[0], shape)
    x = transposed(a.flatten(0, 1), w, (sh, sw), out=None if dest is None else dest.flatten(0, 1))
    term = None if b is None else a.sum((-1, -2)) @ b
    if attrs.get("fp"):                      # (widened after: not into the planned view)
        new_bias = patch_fp_widen(a, _bias(bias, term, None), ins[2], selected_neurons(ins, 3, attrs, a), attrs)
    else:
        new_bias = _bias(bias, term, out[1])
    return (x.view(shape) if dest is None else dest), new_bias


CONV2D = register(Op("conv2d", forward, interval, sound(backward), fp_error, mixing=True, matrix=matrix,
                     interval_params=_interval_params(backward, pair=True), backward_params=backward_params, fp_params=fp_params,
                     error_of_inputs=True,
                     kernels={"linear.patch_start": patch_start, "linear.patch_conv": patch_backward}))


# -- conv_transpose2d: the adjoint of a conv2d ----------------------------------------------------
# inputs (x [..., C_in, H, W], W [C_in, C_out/g, kh, kw], b [C_out]?), attrs stride, padding (top,
# left, bottom, right), output_padding (h, w), dilation, groups (ONNX ConvTranspose semantics).
# The full transposed conv ((H - 1) s + d (kh - 1) + 1 rows) is cropped by the padding and grown by
# zeros at the end by output_padding: one F.pad whose negative widths crop.

def _transpose_margins(attrs) -> tuple[int, int, int, int]:
    """F.pad widths (left, right, top, bottom) taking the full transposed conv to the output."""
    top, left, bottom, right = attrs["padding"]
    op_h, op_w = attrs["output_padding"]
    return (-left, op_w - right, -top, op_h - bottom)


def _transpose_window(in_hw, kernel, attrs) -> tuple[int, int, int, int]:
    """The output as a window (top, left, height, width) of the full transposed conv."""
    (h, wd), (kh, kw) = in_hw, kernel
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    left, right, top, bottom = _transpose_margins(attrs)
    return (-top, -left, (h - 1) * sh + dh * (kh - 1) + 1 + top + bottom, (wd - 1) * sw + dw * (kw - 1) + 1 + left + right)


def conv_transpose2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, attrs: dict) -> torch.Tensor:
    lead = tuple(x.shape[:-3])
    y = transposed(x.reshape((-1,) + tuple(x.shape[-3:])), w, attrs["stride"], attrs["dilation"], attrs["groups"],
                   window=_transpose_window(x.shape[-2:], w.shape[-2:], attrs))
    if b is not None:
        y = y + b.reshape(-1, 1, 1)
    return y.reshape(lead + tuple(y.shape[1:]))


def transpose_forward(x, w, b=None, attrs=None):
    return conv_transpose2d(x, w, b, attrs)


@binds
def transpose_interval(ins, ps, attrs, out=(None,)):
    """As interval: the lu_form for one region of a small layer, else centre and radius."""
    (s,) = ins
    w, w_abs, b = ps[:3]
    if len(ps) > 3 and s.numel() == ps[3].shape[0]:
        return _lu(s, ps, out)

    def run():
        c, r = to_cr(s)
        y = torch.stack((conv_transpose2d(c, w, b, attrs), conv_transpose2d(r, w_abs, None, attrs)))
        return (from_cr(y, shaped(out[0], y.shape)),)
    return run


def transpose_backward(ins, ps, attrs):
    """A through the adjoint: undo the crop / output padding (F.pad with the opposite widths),
    then the conv2d with the same weight, which lands exactly on the input extent."""
    a, bias = ins
    w, b = ps
    lead = tuple(a.shape[:-3])
    full = F.pad(a.reshape((-1,) + tuple(a.shape[-3:])), tuple(-m for m in _transpose_margins(attrs)))
    x = F.conv2d(full, w, None, stride=tuple(attrs["stride"]), dilation=tuple(attrs["dilation"]),
                 groups=attrs["groups"])
    new_bias = bias.clone() if b is None else bias + sum_lead(a, 3).sum((-1, -2)) @ b
    return x.reshape(lead + tuple(x.shape[1:])), new_bias


def transpose_matrix(graph, node, dtype, max_bytes):
    return dense_matrix(transpose_backward, graph, node, dtype, max_bytes)


def transpose_fp_params(graph, node, dtype):
    weights = fp.weights(graph, node, dtype)
    if len(weights) == 1:                       # no bias: no error from one (C_out = W.shape[1] g)
        weights.append(torch.zeros(weights[0].shape[1] * node.attrs["groups"], dtype=dtype))
    return weights


def transpose_fp_error(ins, ps, attrs):
    s, raw = ins
    w_err, b_err = ps
    return fp.finish(raw, conv_transpose2d(magnitude(s), w_err, b_err, attrs), attrs["n"])


# not conv2d: the patch chains (planner/lower.py) stop at it and its passes run dense
CONV_TRANSPOSE2D = register(Op("conv_transpose2d", transpose_forward, transpose_interval, sound(transpose_backward),
                               transpose_fp_error, mixing=True, matrix=transpose_matrix,
                               interval_params=_interval_params(transpose_backward, pair=False), backward_params=backward_params,
                               fp_params=transpose_fp_params, error_of_inputs=True))


# -- frontends: convolution, average pooling, zero padding ----------------------------------------

def convolution(b: Builder, x: str, w: Constant, bias: Constant | None, stride, padding, dilation,
                groups: int) -> str:
    inputs = [x, b.constant(w, "weight", weight=True)]
    if bias is not None:
        inputs.append(b.constant(bias, "bias", weight=True))
    return b.emit("conv2d", inputs, _conv_attrs(stride, padding, dilation, groups), out=b.output)


def _conv_attrs(stride, padding, dilation, groups: int) -> dict:
    return {"stride": tuple(int(s) for s in stride), "padding": tuple(int(p) for p in padding),
            "dilation": tuple(int(d) for d in dilation), "groups": int(groups)}


def average_pool(b: Builder, x: str, kernel, stride, padding, dilation=(1, 1), divisor: float | None = None) -> str:
    """Average pooling over the last two axes, zero padding counted: a depthwise conv2d with
    weights 1 / divisor (the window size unless given)."""
    channels = b.shape(x)[-3]
    count = float(divisor if divisor else math.prod(kernel))
    w = Enclosed.exact(torch.full((channels, 1) + tuple(kernel), count, dtype=torch.float64)).reciprocal()
    return b.emit("conv2d", [x, b.constant(b.literal(w), "avg_weight", weight=True)],
                  _conv_attrs(stride, padding, dilation, channels), out=b.output)


@dataclass(frozen=True)
class ZeroPad:
    """Zero padding of the last two axes of `src`, not emitted yet: a conv2d or average pool that
    reads it takes it into its own padding (that is how torch decomposes padding='same' with
    even kernels); any other reader needs it as a node (materialise)."""
    src: str
    pads: tuple[int, int, int, int]       # (top, left, bottom, right), conv2d's order
    shape: tuple[int, ...]                # of the padded tensor


def zero_pad(b: Builder, x: str, pads: tuple[int, int, int, int]) -> ZeroPad:
    top, left, bottom, right = pads
    xs = b.shape(x)
    return ZeroPad(x, tuple(pads), xs[:-2] + (xs[-2] + top + bottom, xs[-1] + left + right))


def materialise(b: Builder, pad: ZeroPad, out: str | None) -> str:
    """A zero pad no conv2d took in, as a node of its own (a selection with zeros)."""
    top, left, bottom, right = pad.pads
    rank = len(b.shape(pad.src))
    before, after = [0] * (rank - 2) + [top, left], [0] * (rank - 2) + [bottom, right]
    return select.pad(b, pad.src, before, after, out=out)


def _same_pads(auto_pad: str, in_hw, kernel, strides, dilations) -> tuple[int, int, int, int]:
    """Explicit (top, left, bottom, right) for ONNX auto_pad SAME_UPPER / SAME_LOWER / VALID."""
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for n, k, s, d in zip(in_hw, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def onnx_window(b, x_shape, kernel) -> tuple[tuple, tuple, tuple]:
    """(stride, padding, dilation) of a 2-D ONNX Conv / AveragePool from its attributes."""
    strides = tuple(b.attr("strides", (1, 1)))
    dilations = tuple(b.attr("dilations", (1, 1)))
    auto_pad = b.attr("auto_pad", "NOTSET")
    if auto_pad in ("", "NOTSET"):
        pads = tuple(b.attr("pads", (0, 0, 0, 0)))
    elif auto_pad in ("VALID", "SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(auto_pad, x_shape[-2:], kernel, strides, dilations)
    else:
        b.unsupported(f"auto_pad {auto_pad!r}")
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        b.unsupported("only 2-D windows are supported")
    return strides, tuple(int(p) for p in pads), dilations


def _onnx_input_and_weight(b, what: str):
    """A 2-D (transposed) convolution's variable input and weight, checked against kernel_shape."""
    x = b.var(b.input(0))
    w = b.const(b.input(1), "weight")
    if len(w.shape) != 4 or len(b.shape(x)) != 4:
        b.unsupported(f"only 2-D {what} are supported (weight rank {len(w.shape)}, input rank "
                      f"{len(b.shape(x))})")
    if b.attr("kernel_shape") is not None and tuple(b.attr("kernel_shape")) != w.shape[2:]:
        b.unsupported(f"kernel_shape {b.attr('kernel_shape')} disagrees with the weight {list(w.shape)}")
    return x, w


@onnx_lowering("Conv")
def _onnx_conv(b) -> str:
    x, w = _onnx_input_and_weight(b, "convolutions")
    stride, padding, dilation = onnx_window(b, b.shape(x), w.shape[2:])
    bias = None if b.input(2) is None else b.const(b.input(2), "bias")
    return convolution(b, x, w, bias, stride, padding, dilation, b.attr("group", 1))


def transposed_convolution(b: Builder, x: str, w: Constant, bias: Constant | None, stride, padding,
                           output_padding, dilation, groups: int) -> str:
    inputs = [x, b.constant(w, "weight", weight=True)]
    if bias is not None:
        inputs.append(b.constant(bias, "bias", weight=True))
    attrs = dict(_conv_attrs(stride, padding, dilation, groups), output_padding=tuple(int(p) for p in output_padding))
    for n, k, s, d, p0, p1, extra in zip(b.shape(x)[-2:], w.shape[-2:], stride, dilation, padding[:2], padding[2:],
                                         output_padding):
        if (n - 1) * s + d * (k - 1) + 1 + extra - p0 - p1 <= 0:
            b.unsupported(f"the padding {list(padding)} leaves an empty output")
    return b.emit("conv_transpose2d", inputs, attrs, out=b.output)


@onnx_lowering("ConvTranspose")
def _onnx_conv_transpose(b) -> str:
    x, w = _onnx_input_and_weight(b, "transposed convolutions")
    if b.attr("output_shape") is not None:
        b.unsupported("attribute output_shape (give pads and output_padding instead)")
    auto_pad = b.attr("auto_pad", "NOTSET")
    if auto_pad not in ("", "NOTSET", "VALID"):
        b.unsupported(f"auto_pad {auto_pad!r} (only NOTSET with explicit pads, or VALID)")
    pads = (0, 0, 0, 0) if auto_pad == "VALID" else tuple(b.attr("pads", (0, 0, 0, 0)))
    stride, dilation = tuple(b.attr("strides", (1, 1))), tuple(b.attr("dilations", (1, 1)))
    output_padding = tuple(b.attr("output_padding", (0, 0)))
    if any(len(v) != 2 for v in (stride, dilation, output_padding)) or len(pads) != 4:
        b.unsupported("only 2-D windows are supported")
    groups = int(b.attr("group", 1))
    if w.shape[0] != b.shape(x)[1] or w.shape[0] % groups:
        b.unsupported(f"weight {list(w.shape)} does not fit {groups} groups of input channels {b.shape(x)[1]}")
    bias = None if b.input(2) is None else b.const(b.input(2), "bias")
    return transposed_convolution(b, x, w, bias, stride, pads, output_padding, dilation, groups)


@onnx_lowering("AveragePool")
def _onnx_average_pool(b) -> str:
    x = b.var(b.input(0))
    xs = b.shape(x)
    kernel = tuple(b.attr("kernel_shape", ()))
    if len(kernel) != 2 or len(xs) != 4:
        b.unsupported("only 2-D average pooling on [N, C, H, W] is supported")
    stride, padding, dilation = onnx_window(b, xs, kernel)
    if b.attr("count_include_pad", 0) == 0 and any(padding):
        b.unsupported("count_include_pad=0 with nonzero padding divides border windows by fewer "
                      "elements, which is not a convolution")
    if b.attr("ceil_mode", 0):
        for n, k, s, d, p0, p1 in zip(xs[-2:], kernel, stride, dilation, padding[:2], padding[2:]):
            if (n + p0 + p1 - d * (k - 1) - 1) % s:  # ceil would add a partial window at the border
                b.unsupported("ceil_mode=1 where it adds a partial window")
    return average_pool(b, x, kernel, stride, padding, dilation)


@onnx_lowering("GlobalAveragePool")
def _onnx_global_average_pool(b) -> str:
    x = b.var(b.input(0))
    xs = b.shape(x)
    if len(xs) != 4:
        b.unsupported("only [N, C, H, W] inputs are supported")
    return average_pool(b, x, xs[-2:], (1, 1), (0, 0, 0, 0))


def _pair(v) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


def _plus(padding: tuple[int, int], extra: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A symmetric (ph, pw) padding plus an absorbed zero pad (top, left, bottom, right)."""
    ph, pw = padding
    return (ph + extra[0], pw + extra[1], ph + extra[2], pw + extra[3])


@torch_lowering(aten.convolution.default)
def _torch_convolution(b) -> str:
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    w = b.const(b.arg(1), "convolution weight")
    if len(w.shape) != 4:
        b.unsupported(f"only 2-D convolutions are supported (weight has rank {len(w.shape)})")
    bias = None if b.arg(2) is None else b.const(b.arg(2), "convolution bias")
    if bool(b.arg(6)):          # a zero pad before it is not its padding: the pad becomes a node
        ph, pw = _pair(b.arg(4))
        return transposed_convolution(b, b.var(b.arg(0)), w, bias, _pair(b.arg(3)), (ph, pw, ph, pw),
                                      _pair(b.arg(7)), _pair(b.arg(5)), int(b.arg(8)))
    x, extra = b.var_and_pad(b.arg(0))
    return convolution(b, x, w, bias, _pair(b.arg(3)), _plus(_pair(b.arg(4)), extra), _pair(b.arg(5)),
                       int(b.arg(8)))


@torch_lowering(aten.constant_pad_nd.default)
def _torch_constant_pad_nd(b) -> ZeroPad | str:
    """A zero pad of the last two axes stays pending (a conv2d may take it in); any other
    constant pad is a node at once."""
    x = b.var(b.arg(0))
    widths = [int(p) for p in b.arg(1)]
    value = float(b.arg(2, "value", 0.0))
    if value != 0.0 or len(widths) > 4 or len(widths) % 2 or min(widths, default=0) < 0 or len(b.shape(x)) < 2:
        return select.torch_pad(b, x, widths, "constant", value)
    left, right, top, bottom = widths + [0] * (4 - len(widths))
    return zero_pad(b, x, (top, left, bottom, right))


@torch_lowering(aten.avg_pool2d.default)
def _torch_avg_pool2d(b) -> str:
    # avg_pool2d(x, kernel_size, stride=[], padding=0, ceil_mode=False, count_include_pad=True,
    #            divisor_override=None)
    x, extra = b.var_and_pad(b.arg(0))
    kernel = _pair(b.arg(1))
    stride = _pair(b.arg(2, "stride")) if b.arg(2, "stride") else kernel
    padding = _pair(b.arg(3, "padding", 0))
    if not b.arg(5, "count_include_pad", True) and any(padding):
        b.unsupported("avg_pool2d with count_include_pad=False and non-zero padding")
    if len(b.shape(x)) < 3:
        b.unsupported("avg_pool2d needs a [..., C, H, W] input")
    out = average_pool(b, x, kernel, stride, _plus(padding, extra), divisor=b.arg(6, "divisor_override"))
    if b.arg(4, "ceil_mode", False) and b.shape(out) != b.expected_shape():
        # ceil mode adds partial windows with a different divisor: not a fixed convolution
        b.unsupported("avg_pool2d with ceil_mode=True where it changes the output shape")
    return out
