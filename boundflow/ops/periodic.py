"""Sin and cos: periodic, each piece of length pi alternately convex (a trough around a minimum)
and concave (a crest around a maximum).

Every bound here is a lower line of a "wave" g(x) = -cos(x - p), whose minima (-1) lie at
p + 2 pi n and whose convex troughs are [p - pi/2, p + pi/2] + 2 pi n: sin's lower line is that
of the wave with p = 3 pi / 2, its upper line minus the lower line of -sin (p = pi / 2), and cos
is the same with p = pi and p = 0. The wave's value and slope are evaluated as the plain
sin / cos they are (no phase shift, so no rounding of x - p).

The best lower lines over [l, u] (u - l < 2 pi) touch the lower convex envelope of g there: it
meets g only inside one trough (a line touching g twice below it has its contacts 2 pi apart),
so they are the tangents at the points t of [l, u] in that trough whose tangent stays under g on
all of [l, u], or, where there are none, the chord. In trough coordinates y = x - centre, the
tangent at y0 in [0, pi/2] stays under g on (-inf, R(y0)] (R decreasing from +inf to pi/2),
and by symmetry the one at -y0 on [-R(y0), inf): the valid points are [-T(-y_l), T(y_u)] with
T = R^-1, precomputed on a grid (conservatively: at the grid point above). Intervals of length
2 pi or more get the constant -1.

alpha-CROWN optimises the tangent point across that range (CROWN: the midpoint of [l, u],
clamped into it, as auto_LiRPA's table lookup does). Every line, whatever its tangent point, is
finally lowered by its largest violation of g on [l, u], computed exactly: g - line is smallest
at l, at u or at the one local minimum p + asin(k) + 2 pi n inside (u - l < 2 pi), so table and
decision rounding can never make a line unsound (the shift is 0 in exact arithmetic).

The relaxation tensor ("<op>.relax") holds the CROWN lines and what the optimised rule needs:
rows (lower slope, lower intercept, upper slope, upper intercept, l, u, the starts of the lower
and of the upper tangent point's range, their ends, whether each range is non-empty (else chord
or constant)).
Lines are computed in float64 and returned in the plan's dtype.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from boundflow.domains import binds, fp, native
from boundflow.domains.interval import extremes
from boundflow.domains.linear import halves, sound
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering
from boundflow.ops.s_shaped import FUNCTION_ULPS, _back, backward
from boundflow.runtime.device import constant

TWO_PI = 2 * math.pi
HALF_PI = math.pi / 2
TURNS = (-1 / TWO_PI, 1 / TWO_PI)       # per end of [l, u]: (phase - l) and (u - phase) in turns
GRID_STEP = 1e-3          # of the table T(v)
GRID_LIMIT = 2.5 * math.pi + 0.01    # beyond: T = 0 (the flat tangent at the minimum), never reached
ROWS = 12


def _reach_ok(y0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether the tangent of -cos at y0 in [0, pi/2] stays under -cos on (-inf, v]: h = -cos -
    tangent rises from 0 on [y0, pi - y0], falls on [pi - y0, 2 pi + y0] (to below 0), so it
    is >= 0 up to v iff v is in the rise, or in the fall with h(v) >= 0."""
    h = -torch.cos(v) + torch.cos(y0) - torch.sin(y0) * (v - y0)
    return (v <= math.pi - y0) | ((v <= TWO_PI + y0) & (h >= 0))


def _table() -> torch.Tensor:
    """T(v_i), v_i = i GRID_STEP: the largest y0 in [0, pi/2] (bisection, then a margin down)
    whose tangent stays under -cos up to v_i. R is decreasing, so [0, T(v)] are all valid."""
    v = GRID_STEP * torch.arange(int(GRID_LIMIT / GRID_STEP) + 2, dtype=torch.float64)
    lo, hi = torch.zeros_like(v), torch.full_like(v, HALF_PI)
    done = _reach_ok(hi, v)
    for _ in range(60):
        mid = (lo + hi) / 2
        ok = _reach_ok(mid, v)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(done, hi, (lo - 1e-9).clamp(min=0))


TABLE = _table()


def tangent_limit(v: torch.Tensor) -> torch.Tensor:
    """T(v): the table's entry at the grid point at or above v (T decreases, so it is valid
    for v too); 0 beyond the grid (the tangent at the minimum is valid everywhere)."""
    index = torch.ceil(v.clamp(min=0) / GRID_STEP).long()
    inside = index < len(TABLE)
    t = constant(TABLE, TABLE.dtype, v.device)[index.clamp(max=len(TABLE) - 1)]
    return torch.where(inside, t, torch.zeros_like(t))


# -- lines (float64) ------------------------------------------------------------------------------
# Both waves of an op (that of f, for its lower lines, and that of -f, for its upper lines) run as
# one computation over tensors stacked on a new first axis, the waves' phases and signs broadcast
# along it: half the torch calls of two passes.

@dataclass(frozen=True)
class Periodic:
    """f = sin or cos; phases: those of the waves of f and of -f (their minima)."""
    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    df: Callable[[torch.Tensor], torch.Tensor]
    phases: tuple[float, float]

    @functools.cached_property
    def offsets(self) -> tuple[float, ...]:
        """Per wave and end, -phase * TURNS + 1e-14 (contains)."""
        return tuple(-p * t + 1e-14 for p in self.phases for t in TURNS)


SIN = Periodic("sin", torch.sin, torch.cos, (1.5 * math.pi, 0.5 * math.pi))
COS = Periodic("cos", torch.cos, lambda x: -torch.sin(x), (math.pi, 0.0))


def _waves(values: tuple[float, float], like: torch.Tensor) -> torch.Tensor:
    """A pair of per-wave constants, shaped to broadcast against `like` along a new first axis."""
    return constant(values, torch.float64, like.device).view((2,) + (1,) * like.dim())


def tangent_range(op: Periodic, l: torch.Tensor, u: torch.Tensor):
    """Per wave, (start, end, whether non-empty) of the tangent points in [l, u] whose tangent
    bounds the wave from below on [l, u]: in the first trough meeting [l, u] that has any, else
    none. l, u: unstacked; the results: [2, *l.shape]."""
    phase = _waves(op.phases, l)
    first = torch.ceil((l - phase - HALF_PI) / TWO_PI)
    last = torch.floor((u - phase + HALF_PI) / TWO_PI)
    centre = phase + TWO_PI * torch.stack((first, last))                  # [trough, wave, ...]
    yl, yu = l - centre, u - centre
    limit = tangent_limit(torch.stack((-yl, yu)))
    a = torch.maximum(yl, -limit[0]) + centre
    b = torch.minimum(yu, limit[1]) + centre
    found = a <= b
    use_first = found[0]
    a, b, found = (torch.where(use_first, t[0], t[1]) for t in (a, b, found))
    found = found & (u - l < TWO_PI)
    return torch.where(found, a, l), torch.where(found, b, l), found


def _fallback(sign, fl, fu, dfl, l, u):
    """The line without a tangent: the chord (u - l < 2 pi; its slope in [-1, 1] as every chord
    of a wave is; the wave's slope at l for a point), else the constant -1. fl, fu, dfl: f(l),
    f(u), f'(l)."""
    width = u - l
    point = width <= 1e-12 * (1 + l.abs())
    k = (sign * torch.where(point, dfl, (fu - fl) / torch.where(point, torch.ones_like(u), width))).clamp(-1, 1)
    b = sign * fl - k * l
    long = width >= TWO_PI
    return torch.where(long, torch.zeros_like(k), k), torch.where(long, -torch.ones_like(b), b)


def lower_shift(op: Periodic, sign, k, b, l, u, fl, fu):
    """The intercepts b lowered by each line's largest violation of its wave g = sign f on
    [l, u] (u - l < 2 pi, or k = 0): g - line is smallest at l, u or at its local minimum
    phase + asin(k) + 2 pi n in [l, u] (the point is only a place to evaluate at: no gradient
    through asin). fl, fu: f(l), f(u)."""
    with torch.no_grad():
        c = _waves(op.phases, l) + torch.asin(k.clamp(-1, 1))
        x = (c + TWO_PI * torch.floor((u - c) / TWO_PI)).clamp(min=l, max=u)
    gap = torch.stack([sign * fp - (k * p + b) for fp, p in ((fl, l), (fu, u), (op.f(x), x))]).amin(0)
    return b + gap.clamp(max=0)


def crown_alpha(l, u, a, e):
    """CROWN's tangent point as a fraction of its range: the midpoint of [l, u], clamped in."""
    width = e - a
    frac = ((l + u) / 2 - a) / torch.where(width > 0, width, torch.ones_like(width))
    return torch.where(width > 0, frac.clamp(0, 1), torch.full_like(frac, 0.5))


def lines(op: Periodic, l, u, a, e, has, alpha, shift=True):
    """(lower slope, lower intercept, upper slope, upper intercept): per wave the tangent at
    a + alpha (e - a) where its range is non-empty, else the fallback; then (shift) lowered by
    its violation. a, e, has, alpha: stacked per wave (tangent_range's)."""
    sign = _waves((1.0, -1.0), l)
    fl, fu, dfl = op.f(l), op.f(u), op.df(l)
    t = a + alpha * (e - a)
    k_t = sign * op.df(t)
    k_f, b_f = _fallback(sign, fl, fu, dfl, l, u)
    k, b = torch.where(has, k_t, k_f), torch.where(has, sign * op.f(t) - k_t * t, b_f)
    if shift:
        b = lower_shift(op, sign, k, b, l, u, fl, fu)
    return k[0], b[0], -k[1], -b[1]


# -- kernels --------------------------------------------------------------------------------------

def _relax(op: Periodic):
    def relax(ins, ps, attrs):
        """stack(lower, upper) -> the CROWN lines, l, u and the tangent ranges (module docstring)."""
        l, u = ins[0].double()
        a, e, has = tangent_range(op, l, u)
        k_lo, b_lo, k_up, b_up = lines(op, l, u, a, e, has, crown_alpha(l, u, a, e))
        return (torch.cat((torch.stack((k_lo, b_lo, k_up, b_up, l, u)), a, e, has.double())).to(ins[0].dtype),)
    return relax


def _backward_alpha(op: Periodic):
    def backward_alpha(ins, ps, attrs):
        """backward with each row's tangent points at fractions alpha [B, 2, R, *shape] (lower
        line, upper line) of their ranges; without alpha (None), CROWN's lines."""
        a, bias, rows, alpha = ins[:4]
        if alpha is None:
            return backward(ins[:3], ps, attrs)
        rows = rows[4:].double().unsqueeze(2)
        l, u, start, end, has = rows[0], rows[1], rows[2:4], rows[4:6], rows[6:8] > 0
        k_lo, b_lo, k_up, b_up = (t.to(a.dtype) for t in lines(op, l, u, start, end, has, alpha.movedim(1, 0).double()))
        return _back(a, bias, k_lo, b_lo, k_up, b_up, halves(a, attrs))
    return backward_alpha


def _alpha_start(op, env) -> torch.Tensor:
    """CROWN's tangent points as fractions, one pair per row of A."""
    a, rows = env[op.inputs[0]], env[op.inputs[2]]
    pair = crown_alpha(rows[4], rows[5], rows[6:8], rows[8:10]).movedim(0, 1).unsqueeze(2)     # [B, 2, 1, *shape]
    return pair.expand((a.shape[0], 2) + tuple(a.shape[1:])).clone()


def contains(op: Periodic, s: torch.Tensor) -> torch.Tensor:
    """Per wave (of f, of -f), whether [l, u] (s = stack(l, u)) may hold one of its minima
    phase + 2 pi n; when rounding leaves it in doubt, yes (the bound is then merely loose).
    Such an n exists iff floor((u - phase) / 2 pi) >= ceil((l - phase) / 2 pi), that is
    floor((u - phase) / 2 pi) + floor((phase - l) / 2 pi) >= 0: one computation over [wave,
    end] in float64, x turns + (the wave's offset + the doubt), each end moved towards yes by
    the doubt 1e-14 (1 + 2 max |x|) (max over the tensor: one reduction; at least 1e-14 (1 +
    |l| + |u|), far above the float64 rounding of these few operations)."""
    x = s.double()
    lead = (1,) * (s.dim() - 1)
    offset = constant(op.offsets, torch.float64, s.device).view((2, 2) + lead)
    most = torch.linalg.vector_norm(x, math.inf) if x.numel() else 0.0
    base = torch.add(offset, most, alpha=2e-14)
    return torch.addcmul(base, x, constant(TURNS, torch.float64, s.device).view((2,) + lead)).floor_().sum(1) >= 0


def _interval(op: Periodic):
    @binds
    def interval(ins, ps, attrs, out=(None,)):
        """The exact range: f at the ends, -1 / 1 where [l, u] holds a minimum / maximum."""
        (s,) = ins
        peaks = constant((-1.0, 1.0), s.dtype, s.device).view((2,) + (1,) * (s.dim() - 1))
        ends = extremes(out[0])

        def run():
            at_ends = ends(op.f(s))                   # (into out: where then writes over it)
            return (torch.where(contains(op, s), peaks, at_ends, out=out[0]),)
        # (f, then one compiled call for the rest: native.py)
        return native.elementwise_run(native._periodic_range, (s,), out[0], run, lambda into: op.f(s, out=into),
                                      (np.array(op.offsets), np.array(TURNS))) or run
    return interval


def fp_interval(ins, ps, attrs):
    """sin / cos rounded by the library: FUNCTION_ULPS units in the last place (+-1 is exact)."""
    s, raw = ins
    return fp.finish(raw, 2 * FUNCTION_ULPS * unit_roundoff(raw.dtype) * magnitude(raw), attrs["n"])


def fp_lines(ins, ps, attrs):
    """e of the backward rules: the products A * slope (|slope| <= 1), the intercept sums over
    the layer (|intercept| <= 3 + 3 max|x|, the violation shift included), and how far a rounded
    line may cross f after its shift: the shift's evaluation (f to FUNCTION_ULPS ulps, the line
    at x), the shifted intercept's rounding, and the second-order miss of the local minimum from
    the rounding of its place (|g''| <= 1)."""
    s, lines = ins
    eps = unit_roundoff(s.dtype)
    m = magnitude(s)
    icpt = 3 + 3 * m
    miss = 16 * eps * (m + 8) + 4 * FUNCTION_ULPS * eps
    gap = 2 * FUNCTION_ULPS * eps + 10 * eps * icpt + miss ** 2
    n = math.prod(s.shape[2:]) + 4
    return (2 * (2 * eps * m + gamma(n, s.dtype) * icpt + 2 * gap) + slack(n, s.dtype),)


def _register(op: Periodic) -> Op:
    return register(Op(
        op.name, lambda x, attrs=None, f=op.f: f(x), _interval(op), sound(backward),
        fp=fp_interval, fp_params=lambda graph, node, dtype: [],
        relaxation=Relaxation(_relax(op), ROWS, fp_lines, sound(_backward_alpha(op)), _alpha_start, params=2)))


SIN_OP = _register(SIN)
COS_OP = _register(COS)


# -- frontends ------------------------------------------------------------------------------------

for _op, _onnx, _aten in ((SIN, "Sin", torch.ops.aten.sin.default), (COS, "Cos", torch.ops.aten.cos.default)):
    onnx_lowering(_onnx)(lambda b, name=_op.name: b.emit(name, [b.var(b.input(0))], out=b.output))
    torch_lowering(_aten)(lambda b, name=_op.name: b.emit(name, [b.var(b.arg(0))], out=b.output))
