"""linear: y = x @ W.T + b over the last axis. Inputs (x, W [out, in], b [out]?)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from boundflow.domains import fp
from boundflow.domains.interval import from_cr, to_cr
from boundflow.domains.linear import sound, sum_lead
from boundflow.domains.rounding import magnitude
from boundflow.ops.registry import Op, register


def forward(x, w, b=None, attrs=None):
    return F.linear(x, w, b)


def _weight_and_bias(graph, node) -> tuple[torch.Tensor, torch.Tensor]:
    ps = [graph.data(i) for i in node.inputs if not graph.is_variable(i)]
    w = ps[0]
    return w, ps[1] if len(ps) > 1 else torch.zeros(w.shape[0], dtype=w.dtype)


def interval_params(graph, node, dtype=torch.float32):
    """[stack(W.T, |W|.T), stack(b, 0)]: centre and radius in one batched matmul."""
    w, b = _weight_and_bias(graph, node)
    return [torch.stack((w.t(), w.abs().t())), torch.stack((b, torch.zeros_like(b))).unsqueeze(1)]


def interval(ins, ps, attrs):
    (s,) = ins
    w_cr, b_cr = ps                                   # [2, in, out], [2, 1, out]
    cr = to_cr(s)
    out = torch.baddbmm(b_cr, cr.reshape(2, -1, cr.shape[-1]), w_cr)
    return (from_cr(out).view(tuple(s.shape[:-1]) + (w_cr.shape[-1],)),)


def backward_params(graph, node, dtype=torch.float32):
    return list(_weight_and_bias(graph, node))


def backward(ins, ps, attrs):
    a, bias = ins
    w, b = ps
    return torch.matmul(a, w), bias + torch.matmul(sum_lead(a, 1), b)


def matrix(graph, node, dtype, max_bytes):
    """W and b themselves, when the leading axes of x are units (one row per output neuron)."""
    if math.prod(graph.shape(node.inputs[0])[:-1]) != 1:
        return None
    return _weight_and_bias(graph, node)


def fp_params(graph, node, dtype):
    weights = fp.weights(graph, node, dtype)
    if len(weights) == 1:                       # no bias: no error from one
        weights.append(torch.zeros(weights[0].shape[0], dtype=dtype))
    return weights


def fp_error(ins, ps, attrs):
    s, raw = ins
    w_err, b_err = ps                                      # gamma |W| + dW, gamma |b| + db
    return fp.finish(raw, F.linear(magnitude(s), w_err, b_err), attrs["n"])


LINEAR = register(Op("linear", forward, interval, sound(backward), fp_error, mixing=True, matrix=matrix,
                     interval_params=interval_params, backward_params=backward_params, fp_params=fp_params))
