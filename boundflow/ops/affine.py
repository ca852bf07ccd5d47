"""affine: y = x * scale + shift, elementwise, the constants broadcast to x. Inputs (x, scale,
shift). Frontends lower additions, subtractions, multiplications and divisions by constants,
and BatchNorm at inference, to it."""
from __future__ import annotations

import torch

from boundflow.domains import fp
from boundflow.domains.interval import from_cr, to_cr
from boundflow.domains.linear import sound
from boundflow.domains.rounding import magnitude
from boundflow.ops.registry import Op, register


def forward(x, scale, shift, attrs=None):
    return x * scale + shift


def interval_params(graph, node, dtype=torch.float32):
    scale, shift = [graph.data(i) for i in node.inputs[1:]]
    return [scale, scale.abs(), shift]


def interval(ins, ps, attrs):
    (s,) = ins
    scale, scale_abs, shift = ps
    c, r = to_cr(s)
    return (from_cr(torch.stack((c * scale + shift, r * scale_abs.expand_as(r)))),)


def backward(ins, ps, attrs):
    a, bias = ins
    scale, shift = ps
    return a * scale, bias + (a * shift).flatten(2).sum(-1)


def fp_error(ins, ps, attrs):
    s, raw = ins
    scale_err, shift_err = ps
    return fp.finish(raw, magnitude(s) * scale_err + shift_err, attrs["n"])


AFFINE = register(Op("affine", forward, interval, sound(backward), fp_error, coordinatewise=True,
                     interval_params=interval_params, fp_params=fp.weights))
