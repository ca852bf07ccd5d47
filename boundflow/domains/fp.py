"""Floating-point error vectors of the primal ops, for plans that are sound in floating point
(PlannerConfig(sound_fp=True); see domains/rounding.py for the error model).

For an op y = f(x) a sound plan computes once, from the interval bounds of its inputs, an error
vector e over y's shape, [B, *y], with two uses:

  forward   the rounded interval of y is widened by e, then rounded outward;
  backward  a backward pass through the op with coefficients A on y adds at most
            sum_j |A_rj| e_j of rounding error to the bound of row r (linear.fp_widen).

e covers the rounding of the op's own arithmetic (gamma(n) |W| max|x| + gamma(n) |b|, with n at
least every dot-product length the op's forward and backward rules compute), the error bounds of
its constants (Value.err), and for the ReLU the gap by which the rounded upper line may dip
below the ReLU. Ops that only move values (reshape, transpose, concat) make no error.
Kernel signature as everywhere: fn(inputs, params, attrs) -> tuple of tensors.
"""
from __future__ import annotations

import math

import torch

from boundflow.domains.concrete import conv2d
from boundflow.domains.rounding import down, gamma, magnitude, slack, unit_roundoff, up
from boundflow.errors import UnsupportedOpError
from boundflow.ir.primal import Graph, Node

# primal ops whose interval and backward rules round (the others are exact)
ROUNDING_OPS = ("linear", "conv2d", "affine", "add")


def widen(s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The interval s = stack(lower, upper) grown by e on both sides, rounded outward."""
    return torch.stack((down(s[0] - e), up(s[1] + e)))


def _finish(raw: torch.Tensor, e: torch.Tensor, n: int):
    """(widened interval, e): e doubled for its own rounding, plus underflow slack."""
    e = 2 * e + slack(n, e.dtype)
    return widen(raw, e), e


def _linear(ins, ps, attrs):
    s, raw = ins
    w_err, b_err = ps                                      # gamma |W| + dW, gamma |b| + db
    return _finish(raw, torch.nn.functional.linear(magnitude(s), w_err, b_err), attrs["n"])


def _conv2d(ins, ps, attrs):
    s, raw = ins
    w_err, b_err = ps
    return _finish(raw, conv2d(magnitude(s), w_err, b_err, attrs), attrs["n"])


def _affine(ins, ps, attrs):
    s, raw = ins
    scale_err, shift_err = ps
    return _finish(raw, magnitude(s) * scale_err + shift_err, attrs["n"])


def _add(ins, ps, attrs):
    s1, s2, raw = ins
    u = unit_roundoff(raw.dtype)
    return _finish(raw, u * (magnitude(s1) + magnitude(s2)), attrs["n"])


def relu(ins, ps, attrs):
    """e of a ReLU's backward rule, from the interval of its input and its relaxation (relu.relax):
    the products A * slope (|slope| <= 1), the intercept sums over the layer, and how far the
    rounded upper line s z + t may fall below relu(z) on [l, u] (relu minus a line is convex, so
    the worst is at an end)."""
    s, relax = ins
    lo, hi = s
    slope, intercept = relax[0], relax[1]
    m = magnitude(s)
    u = unit_roundoff(s.dtype)
    gap = torch.maximum(hi.clamp(min=0) - (slope * hi + intercept), lo.clamp(min=0) - (slope * lo + intercept))
    gap = gap.clamp(min=0) + 4 * u * (m + slope.abs() * m + intercept.abs())
    n = attrs["n"]
    e = 2 * (2 * u * m + gamma(n, s.dtype) * intercept.abs() + gap) + slack(n, s.dtype)
    return (e,)


RULES = {"linear": _linear, "conv2d": _conv2d, "affine": _affine, "add": _add, "relu": relu}


def prepare_params(graph: Graph, node: Node, dtype: torch.dtype) -> list[torch.Tensor]:
    """Plan-time error weights of a rounding op: gamma(n) |p| + err(p) per constant."""
    n = dot_length(graph, node)
    g = gamma(n, dtype)
    names = [i for i in node.inputs if not graph.is_variable(i)]
    consts = [graph.enclosed(i) for i in names]
    for name, c in zip(names, consts):
        if not bool(torch.isfinite(c.err).all()):
            raise UnsupportedOpError(f"sound_fp: constant {name!r} of node {node.name!r} ({node.op}) was computed "
                                     "at import by an op whose rounding error has no known bound")
    weights = [(g * c.value.abs() + c.err.expand_as(c.value)).to(dtype) for c in consts]
    if node.op in ("linear", "conv2d") and len(weights) == 1:          # no bias
        out_channels = consts[0].value.shape[0]
        weights.append(torch.zeros(out_channels, dtype=dtype))
    return weights


def dot_length(graph: Graph, node: Node) -> int:
    """An upper bound on the number of terms of any sum the op's rules compute per element:
    the weight's size (fan-in and fan-out alike) plus the output size (bias sums), plus a few."""
    out = graph.values[node.outputs[0]].type.numel
    consts = [graph.values[i].type.numel for i in node.inputs if not graph.is_variable(i)]
    return (consts[0] if node.op in ("linear", "conv2d") else 0) + out + 4


def relu_length(graph: Graph, node: Node) -> int:
    """The ReLU's backward rule sums its intercepts over the whole layer."""
    return math.prod(graph.shape(node.inputs[0])) + 4
