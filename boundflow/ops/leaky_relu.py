"""leaky_relu: y = x for x >= 0, a x below, with a constant slope a (any value, broadcast to x).
ONNX LeakyRelu and PRelu, torch leaky_relu and prelu lower to it, and Abs (a = -1).

Relaxation over [l, u] with l < 0 < u (otherwise the op is linear there: slope 1 or a):

  a <= 1 (convex)   upper: the chord through (l, a l) and (u, u); lower: a line through 0 of
                    slope s in [a, 1]
  a > 1 (concave)   lower: the chord; upper: a line through 0 of slope s in [1, a]

alpha-CROWN optimises s per row of A and neuron (a fraction in [0, 1] of its range). CROWN's s
is auto_LiRPA's: for 0 <= a <= 1 its adaptive choice for leaky ReLUs (1 when the chord's slope
is above 1/2, else a; ReLU's rule at a = 0); for a < 0 its choice for Abs, s = 0 (the lower
line is never below the interval bound 0); for a > 1 the side with the smaller gap (1 when
u > -l, else a). Like ReLU, branch and bound may split its input at 0 (split multipliers as in
relu.backward_alpha).

The relaxation tensor holds rows (l, u, a) (the slope broadcast to the input), from which the
optimised rule builds its lines, then CROWN's lines (lower slope, lower intercept, upper slope,
upper intercept), which the plain rule reads.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from boundflow.domains import binds, fp, nonnegative
from boundflow.domains.linear import halves, sound, with_splits
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering
from boundflow.ops.relu import _alpha_magnitude
from boundflow.ops.s_shaped import _back

aten = torch.ops.aten


def forward(x, a, attrs=None):
    return torch.where(x >= 0, x, a * x)


@binds(writes=False)
def interval(ins, ps, attrs):
    """The range over [l, u]: at the ends, and at 0 inside (the kink): f at l, u and at the
    point of [l, u] nearest 0 (0 itself inside, else an end again). With slopes >= 0 (known at
    bind: a constant), f is increasing, in floating point too (x and a x round monotonically),
    and f(l), f(u) are that range in one call."""
    (s,) = ins
    (a,) = ps
    if nonnegative(a):
        return lambda: (forward(s, a),)

    def run():
        l, u = s
        values = forward(torch.stack((l, u, torch.maximum(l, u.clamp(max=0)))), a)
        return (torch.stack((values.amin(0), values.amax(0))),)
    return run


def _slope_range(a):
    return torch.minimum(a, torch.ones_like(a)), torch.maximum(a, torch.ones_like(a))


def crown_slope(l, u, a):
    """CROWN's slope of the line through 0 (module docstring)."""
    lr, ur = l.clamp(max=0), u.clamp(min=0)
    chord = (ur - a * lr) / (ur - lr).clamp(min=1e-30)
    one = torch.ones_like(chord)
    leaky = torch.where(chord > 0.5, one, a * one)
    steep = torch.where(u > -l, one, a * one)
    return torch.where(a < 0, torch.zeros_like(chord), torch.where(a > 1, steep, leaky))


def lines(l, u, a, alpha=None):
    """(lower slope, lower intercept, upper slope, upper intercept); the line through 0 has
    slope s = lo + alpha (hi - lo) over its range [lo, hi] (CROWN's s without alpha)."""
    crossing = (l < 0) & (u > 0)
    lr, ur = l.clamp(max=0), u.clamp(min=0)
    width = torch.where(crossing, ur - lr, 1.0)
    k = torch.where(crossing, (ur - a * lr) / width, 0.0)
    b = lr * (a - k)
    if alpha is None:
        s = crown_slope(l, u, a)
    else:
        s_lo, s_hi = _slope_range(a)
        s = s_lo + alpha * (s_hi - s_lo)
    linear = torch.where(l >= 0, 1.0, a).expand_as(k)                           # stable: one piece
    convex = a <= 1
    k_lo = torch.where(crossing, torch.where(convex, s, k), linear)
    b_lo = torch.where(crossing & ~convex, b, 0.0)
    k_up = torch.where(crossing, torch.where(convex, k, s), linear)
    b_up = torch.where(crossing & convex, b, 0.0)
    return k_lo, b_lo, k_up, b_up


def relax(ins, ps, attrs):
    """stack(l, u) and the slope ps[0] -> rows (l, u, slope, CROWN's four line coefficients)."""
    l, u = ins[0]
    slope = ps[0].expand_as(l)
    return (torch.stack((l, u, slope, *lines(l, u, slope))),)


def backward(ins, ps, attrs):
    a, bias, rows = ins
    return _back(a, bias, *rows[3:].unsqueeze(2), halves(a, attrs))


def backward_alpha(ins, ps, attrs):
    """backward with the slope of each row's line through 0 at a fraction alpha [B, R, *shape]
    of its range (None: CROWN's), and optional split multipliers m (beta-CROWN, as in
    relu.backward_alpha: lower rows subtract m, upper rows add it)."""
    a, bias, rows, alpha = ins[:4]
    beta = ins[4] if len(ins) > 4 else None
    l, u, slope = rows[:3].unsqueeze(2)
    s = halves(a, attrs)
    out, bias = _back(a, bias, *lines(l, u, slope, alpha), s)
    if beta is not None:
        out = with_splits(out, beta, s)
    return out, bias


def alpha_start(op, env) -> torch.Tensor:
    """CROWN's slopes as fractions of their ranges, one per row of A."""
    a, (l, u, slope) = env[op.inputs[0]], env[op.inputs[2]][:3]
    s_lo, s_hi = _slope_range(slope)
    width = s_hi - s_lo
    frac = torch.where(width > 0, (crown_slope(l, u, slope) - s_lo) / width.clamp(min=1e-30), torch.zeros_like(width))
    return frac.unsqueeze(1).expand(a.shape).clone()


def fp_interval(ins, ps, attrs):
    """a x rounds once: one unit of the result."""
    s, raw = ins
    return fp.finish(raw, unit_roundoff(raw.dtype) * magnitude(raw), attrs["n"])


def fp_lines(ins, ps, attrs):
    """e of the backward rules: with K = max(1, |a|) every slope is at most K and every
    intercept at most 2 K max|x|; the products A * slope, the intercept sums, and the chord's
    rounding (a few units of K max|x| at its ends, where f - chord is largest)."""
    s, rows = ins
    k = rows[2].abs().clamp(min=1)
    m = magnitude(s)
    eps = unit_roundoff(s.dtype)
    n = math.prod(s.shape[2:]) + 4
    return (2 * (2 * eps * k * m + gamma(n, s.dtype) * 2 * k * m + 16 * eps * k * m) + slack(n, s.dtype),)


LEAKY_RELU = register(Op(
    "leaky_relu", forward, interval, sound(backward), fp=fp_interval, fp_params=lambda graph, node, dtype: [],
    coordinatewise=True,                      # its interval rule is the exact range (ends and the kink)
    relaxation=Relaxation(relax, 7, fp_lines, sound(backward_alpha, _alpha_magnitude), alpha_start,
                          sparse_refine=True, splits_at_zero=True)))


# -- frontends ------------------------------------------------------------------------------------

def leaky_relu(b, x: str, slope) -> str:
    """The op with slope `slope` (a number or an array broadcasting to x without growing it)."""
    c = b.literal(slope) if not hasattr(slope, "value") else slope
    if c.value.err.any():
        b.unsupported("a slope computed at import with a rounding error (only exact slopes are supported)")
    xs = b.shape(x)
    try:
        full = tuple(np.broadcast_shapes(xs, c.shape))
    except ValueError:
        full = None
    if full != tuple(xs):
        b.unsupported(f"slope of shape {list(c.shape)} does not broadcast to the input of shape {list(xs)}")
    if not bool(torch.isfinite(c.value.value).all()):
        b.unsupported("a slope that is not finite")
    return b.emit("leaky_relu", [x, b.constant(c, "slope")], out=b.output)


@onnx_lowering("LeakyRelu")
def _onnx_leaky_relu(b) -> str:
    return leaky_relu(b, b.var(b.input(0)), float(b.attr("alpha", 0.01)))


@onnx_lowering("PRelu")
def _onnx_prelu(b) -> str:
    return leaky_relu(b, b.var(b.input(0)), b.const(b.input(1), "slope"))


@onnx_lowering("Abs")
def _onnx_abs(b) -> str:
    return leaky_relu(b, b.var(b.input(0)), -1.0)


def _number(b, v, what: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    b.unsupported(f"{what} must be a Python number")


@torch_lowering(aten.leaky_relu.default)
def _torch_leaky_relu(b) -> str:
    return leaky_relu(b, b.var(b.arg(0)), _number(b, b.arg(1, "negative_slope", 0.01), "negative_slope"))


@torch_lowering(aten.prelu.default, aten._prelu_kernel.default, keep_whole=True)
def _torch_prelu(b) -> str:
    """torch's PReLU weight is one slope per channel (axis 1), or a single one."""
    x = b.var(b.arg(0))
    w = b.const(b.arg(1), "weight")
    rank = len(b.shape(x))
    if math.prod(w.shape) > 1 and rank >= 2:
        w = w.map(lambda t: t.reshape((-1,) + (1,) * (rank - 2)))
    elif math.prod(w.shape) == 1:
        w = w.map(lambda t: t.reshape(()))
    return leaky_relu(b, x, w)


@torch_lowering(aten.abs.default)
def _torch_abs(b) -> str:
    return leaky_relu(b, b.var(b.arg(0)), -1.0)
