"""clamp_min: y = max(x, c) for a constant c (broadcast to x): a ReLU whose kink sits at c.
ONNX Clip, Min and Max against a constant, torch clamp / clamp_min / clamp_max / hardtanh /
minimum / maximum lower to it (to relu where c is 0), a minimum through negations, which are
exact: min(x, c) = -max(-x, -c).

Why an op and not relu(x - c) + c: in floating point that identity is not exact (x - c and the
sum after it round relative to c, and the simplifier folds the shifts of neighbouring clamps
into one rounded constant), so where the exact value is c or x the identity's can be off by an
ulp of c; a step after it (Sign) turns that into a wrong bound. max(x, c) rounds nothing: its
forward and interval values are onnxruntime's bit for bit, and so are its lines' where the op
is linear over the interval (slope 1 and intercept 0 above c, slope 0 and intercept c below).

Relaxation over [l, u] with l < c < u: upper, the chord through (l, c) and (u, u); lower, a line
through the kink (c, c) of slope s in [0, 1]; CROWN's s is ReLU's adaptive choice (1 when the
chord's slope is above 1/2, else 0); alpha-CROWN optimises s per row of A and neuron. Branch and
bound cuts its input at c (Relaxation.kink), where the op is linear on both sides; no split
multiplier carries the cut back to the input (as for the other non-ReLU ops).

The relaxation tensor holds rows (l, u, c, CROWN's four line coefficients: lower slope, lower
intercept, upper slope, upper intercept).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from boundflow.domains import fp
from boundflow.domains.linear import halves, sound
from boundflow.domains.patches import fp_widen as patch_fp_widen
from boundflow.domains.patches import lines_back, row_windows, rows_view, selected_neurons
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.ops import select
from boundflow.ops.leaky_relu import backward          # the same rows: (l, u, constant, four line coefficients)
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering
from boundflow.ops.s_shaped import _back

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder, Constant

aten = torch.ops.aten


def forward(x, c, attrs=None):
    return torch.maximum(x, c)


def interval(ins, ps, attrs):
    """Monotone and exact in floating point: max(l, c), max(u, c)."""
    return (torch.maximum(ins[0], ps[0]),)


def crown_slope(l, u, c):
    return ((u - c) > (c - l)).to(l.dtype)


def lines(l, u, c, alpha=None):
    """(lower slope, lower intercept, upper slope, upper intercept); the lower line's slope is
    alpha (CROWN's choice without it) where l < c < u."""
    crossing = (l < c) & (c < u)
    above = l >= c                                                    # y = x on [l, u]
    width = torch.where(crossing, u - l, torch.ones_like(l))
    k = torch.where(crossing, (u - c) / width, above.to(l.dtype))
    s = torch.where(crossing, crown_slope(l, u, c) if alpha is None else alpha, k)
    c = c.expand_as(k)
    b_up = torch.where(crossing, c - k * l, torch.where(above, 0.0, c))
    b_lo = torch.where(above, 0.0, c - s * c)                        # through (c, c); exactly c where s = 0
    return s, b_lo, k, b_up


def relax(ins, ps, attrs):
    """stack(l, u) and the constant ps[0] -> rows (l, u, c, CROWN's four line coefficients)."""
    l, u = ins[0]
    c = ps[0].expand_as(l)
    return (torch.stack((l, u, c, *lines(l, u, c))),)


def backward_alpha(ins, ps, attrs):
    """backward with each row's lower slope alpha [B, R, *shape] (None: CROWN's lines)."""
    a, bias, rows, alpha = ins[:4]
    if alpha is None:
        return backward(ins[:3], ps, attrs)
    l, u, c = rows[:3].unsqueeze(2)
    return _back(a, bias, *lines(l, u, c, alpha), halves(a, attrs))


def alpha_start(op, env) -> torch.Tensor:
    """CROWN's lower slopes, one per row of A."""
    a, (l, u, c) = env[op.inputs[0]], env[op.inputs[2]][:3]
    return crown_slope(l, u, c).unsqueeze(1).expand(a.shape).clone()


def _patch_back(ins, attrs, optimised: bool):
    """backward on windows: each row reads the lines at its neuron's window; optimised: ins[3]
    holds alpha-CROWN's lower slopes, one per row and window position, as A (None: CROWN's).
    In a sound_fp plan the last input is the error vector (patches.fp_widen)."""
    ins, e = (ins[:-1], ins[-1]) if attrs.get("fp") else (ins, None)
    a, bias, rows = ins[:3]
    alpha = ins[3] if optimised else None
    idx = selected_neurons(ins, 4 if optimised else 3, attrs, a)
    win, groups = row_windows(rows, 2, idx, attrs, a)                  # [7, B, 1, 1, k / groups, C, ph, pw]
    lines_ = win[3:] if alpha is None else lines(*win[:3], rows_view(alpha, groups))
    new_a, new_bias = lines_back(rows_view(a, groups), bias, *lines_)
    return new_a, new_bias if e is None else patch_fp_widen(a, new_bias, e, idx, attrs)


def patch_backward(ins, ps, attrs):
    return _patch_back(ins, attrs, False)


def patch_backward_alpha(ins, ps, attrs):
    return _patch_back(ins, attrs, True)


def patch_alpha_start(op, env) -> torch.Tensor:
    """CROWN's lower slopes at each row's window, shaped like alpha (as A)."""
    ins = [env[b] for b in op.inputs]
    ins = ins[:-1] if op.attrs.get("fp") else ins
    a, rows = ins[0], ins[2]
    idx = selected_neurons(ins, 4, op.attrs, a)
    win, groups = row_windows(rows, 2, idx, op.attrs, a)
    return crown_slope(*win[:3]).expand(rows_view(a, groups).shape).flatten(1, 3).clone()


def fp_interval(ins, ps, attrs):
    """Exact: max rounds nothing."""
    s, raw = ins
    return fp.finish(raw, torch.zeros_like(raw[0]), attrs["n"])


def fp_lines(ins, ps, attrs):
    """e of the backward rules: slopes in [0, 1], intercepts at most M = max(|l|, |u|, |c|) in
    size where constant and 2 M on the chord; the products A * slope, the intercept sums, and the
    chord's and the lower line's own rounding (a few units of M at the interval's ends, where
    f minus a line is largest)."""
    s, rows = ins
    m = torch.maximum(magnitude(s), rows[2].abs())
    eps = unit_roundoff(s.dtype)
    n = math.prod(s.shape[2:]) + 4
    return (2 * (2 * eps * m + gamma(n, s.dtype) * 2 * m + 16 * eps * m) + slack(n, s.dtype),)


CLAMP_MIN = register(Op(
    "clamp_min", forward, interval, sound(backward), fp=fp_interval, fp_params=lambda graph, node, dtype: [],
    coordinatewise=True,                      # monotone: its interval rule is the exact range
    relaxation=Relaxation(relax, 7, fp_lines, sound(backward_alpha), alpha_start, patch_backward,
                          patch_backward_alpha, patch_alpha_start,
                          kink=lambda graph, node: graph.data(node.inputs[1]).expand(graph.shape(node.inputs[0])))))


# -- frontends: clamps, minimum and maximum against constants ---------------------------------------

def maximum(b: Builder, x: str, c: Constant, out: str | None = None) -> str:
    """max(x, c) for an exact, finite constant c (of a shape that may broadcast x to a larger
    one); relu where c is 0."""
    if c.value.err.any():
        b.unsupported("a bound computed at import with a rounding error (only exact bounds are supported)")
    if not bool(torch.isfinite(c.value.value).all()):
        b.unsupported("a bound that is not finite")
    full = tuple(np.broadcast_shapes(tuple(b.shape(x)), tuple(c.shape)))
    if full != tuple(b.shape(x)):
        x = select.broadcast(b, x, full)
    if not bool(c.value.value.any()):
        return b.emit("relu", [x], out=out)
    return b.emit("clamp_min", [x, b.constant(c, "bound")], out=out)


def minimum(b: Builder, x: str, c: Constant, out: str | None = None) -> str:
    """min(x, c) = -max(-x, -c): negations are exact."""
    return b.affine(maximum(b, b.affine(x, b.literal(-1.0)), c.scaled(-1.0)), b.literal(-1.0), out=out)


def clamp(b: Builder, x: str, lo: float | None, hi: float | None) -> str:
    """min(max(x, lo), hi) (None: no bound)."""
    if lo is None and hi is None:
        return x
    if lo is not None and hi is not None and lo > hi:
        b.unsupported(f"clamp with min {lo} > max {hi}")
    if lo is not None:
        x = maximum(b, x, b.literal(lo), out=b.output if hi is None else None)
    return x if hi is None else minimum(b, x, b.literal(hi), out=b.output)


_FLOAT_MAX = float(np.finfo(np.float32).max)


@onnx_lowering("Clip")
def _onnx_clip(b) -> str:
    """Clip(x, min, max): attributes before opset 11, optional constant inputs from 11 on. A
    bound at or beyond the float32 range (ONNX's defaults) is no bound."""
    x = b.var(b.input(0))
    if b.opset < 11:
        lo, hi = b.attr("min"), b.attr("max")
    else:
        lo, hi = (None if b.input(i) is None else _scalar(b, b.array(b.input(i), what))
                  for i, what in ((1, "min"), (2, "max")))
    lo = None if lo is None or lo <= -_FLOAT_MAX else float(lo)
    hi = None if hi is None or hi >= _FLOAT_MAX else float(hi)
    if not all(v is None or math.isfinite(v) for v in (lo, hi)):
        b.unsupported(f"clip bounds {lo}, {hi} (only finite bounds are supported)")
    return clamp(b, x, lo, hi)


def _scalar(b, arr) -> float:
    if np.size(arr) != 1:
        b.unsupported(f"a clip bound of shape {list(np.shape(arr))} (only scalars are supported)")
    return float(np.asarray(arr).reshape(-1)[0])


def _onnx_extreme(b, upper: bool) -> str:
    names = [n for n in b.inputs if n]
    variables = [n for n in names if not b.is_const(n)]
    consts = [n for n in names if b.is_const(n)]
    if len(variables) != 1 or len(consts) > 1:
        b.unsupported(f"{len(variables)} inputs that depend on the network input and {len(consts)} constants "
                      "(one variable and at most one constant are supported)")
    x = b.var(variables[0])
    if not consts:
        return b.affine(x, b.literal(1.0), out=b.output)
    return (minimum if upper else maximum)(b, x, b.const(consts[0], "bound"), out=b.output)


@onnx_lowering("Min")
def _onnx_min(b) -> str:
    return _onnx_extreme(b, upper=True)


@onnx_lowering("Max")
def _onnx_max(b) -> str:
    return _onnx_extreme(b, upper=False)


def _torch_number(b, v, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    b.unsupported(f"clamp {what} must be a Python number")


@torch_lowering(aten.clamp.default)
def _torch_clamp(b) -> str:
    lo, hi = _torch_number(b, b.arg(1, "min"), "min"), _torch_number(b, b.arg(2, "max"), "max")
    return clamp(b, b.var(b.arg(0)), lo, hi)


@torch_lowering(aten.clamp_min.default)
def _torch_clamp_min(b) -> str:
    return clamp(b, b.var(b.arg(0)), _torch_number(b, b.arg(1), "min"), None)


@torch_lowering(aten.clamp_max.default)
def _torch_clamp_max(b) -> str:
    return clamp(b, b.var(b.arg(0)), None, _torch_number(b, b.arg(1), "max"))


@torch_lowering(aten.hardtanh.default)
def _torch_hardtanh(b) -> str:
    lo, hi = _torch_number(b, b.arg(1, "min_val", -1.0), "min"), _torch_number(b, b.arg(2, "max_val", 1.0), "max")
    return clamp(b, b.var(b.arg(0)), lo, hi)


def _torch_extreme(b, upper: bool) -> str:
    p, q = b.arg(0), b.arg(1)
    if not b.is_const(p) and not b.is_const(q):
        b.unsupported("both operands depend on the network input (only a constant bound is supported)")
    x, c = (p, q) if b.is_const(q) else (q, p)
    return (minimum if upper else maximum)(b, b.var(x), b.const(c, "bound"), out=b.output)


@torch_lowering(aten.minimum.default)
def _torch_minimum(b) -> str:
    return _torch_extreme(b, upper=True)


@torch_lowering(aten.maximum.default)
def _torch_maximum(b) -> str:
    return _torch_extreme(b, upper=False)
