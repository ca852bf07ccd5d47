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
rows (lower slope, lower intercept, upper slope, upper intercept, l, u, range start and end of
the lower and of the upper tangent point, whether each has a range (else chord or constant)).
Lines are computed in float64 and returned in the plan's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from boundflow.domains import fp
from boundflow.domains.linear import halves, sound
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering
from boundflow.ops.s_shaped import FUNCTION_ULPS, _back, backward
from boundflow.runtime.device import constant

TWO_PI = 2 * math.pi
HALF_PI = math.pi / 2
GRID_STEP = 1e-3          # of the table T(v)
GRID_LIMIT = 2.5 * math.pi + 0.01    # beyond: T = 0 (the flat tangent at the minimum), never reached
ROWS = 12


@dataclass(frozen=True)
class Wave:
    """g(x) = -cos(x - phase), evaluated as the sin / cos it is."""
    phase: float
    f: Callable[[torch.Tensor], torch.Tensor]
    df: Callable[[torch.Tensor], torch.Tensor]


SIN_LOWER = Wave(1.5 * math.pi, torch.sin, torch.cos)
SIN_UPPER = Wave(0.5 * math.pi, lambda x: -torch.sin(x), lambda x: -torch.cos(x))    # of -sin
COS_LOWER = Wave(math.pi, torch.cos, lambda x: -torch.sin(x))
COS_UPPER = Wave(0.0, lambda x: -torch.cos(x), torch.sin)                            # of -cos


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

def tangent_range(w: Wave, l: torch.Tensor, u: torch.Tensor):
    """(start, end, whether non-empty) of the tangent points in [l, u] whose tangent bounds g
    from below on [l, u]: in the first trough meeting [l, u] that has any, else none."""
    first = torch.ceil((l - w.phase - HALF_PI) / TWO_PI)
    last = torch.floor((u - w.phase + HALF_PI) / TWO_PI)
    out = None
    for n in (first, last):
        centre = w.phase + TWO_PI * n
        yl, yu = l - centre, u - centre
        a = torch.maximum(yl, -tangent_limit(-yl)) + centre
        b = torch.minimum(yu, tangent_limit(yu)) + centre
        found = a <= b
        out = (a, b, found) if out is None else tuple(torch.where(out[2], o, x) for o, x in zip(out, (a, b, found)))
    a, b, found = out
    found = found & (u - l < TWO_PI)
    return torch.where(found, a, l), torch.where(found, b, l), found


def _fallback(w: Wave, l, u):
    """The line without a tangent: the chord (u - l < 2 pi; its slope in [-1, 1] as every chord
    of g is; g' at l for a point), else the constant -1."""
    width = u - l
    point = width <= 1e-12 * (1 + l.abs())
    k = torch.where(point, w.df(l), (w.f(u) - w.f(l)) / torch.where(point, torch.ones_like(u), width)).clamp(-1, 1)
    b = w.f(l) - k * l
    long = width >= TWO_PI
    return torch.where(long, torch.zeros_like(k), k), torch.where(long, -torch.ones_like(b), b)


def lower_shift(w: Wave, k, b, l, u):
    """The intercept b lowered by the line's largest violation of g on [l, u] (u - l < 2 pi, or
    k = 0): g - line is smallest at l, u or at its local minimum p + asin(k) + 2 pi n in [l, u]
    (the point is only a place to evaluate at: no gradient through asin)."""
    with torch.no_grad():
        c = w.phase + torch.asin(k.clamp(-1, 1))
        x = (c + TWO_PI * torch.floor((u - c) / TWO_PI)).clamp(min=l, max=u)
    gap = torch.stack([w.f(p) - (k * p + b) for p in (l, u, x)]).amin(0)
    return b + gap.clamp(max=0)


def tangent_line(w: Wave, l, u, a, e, has, alpha):
    """(slope, intercept) of the lower line of g before its shift: the tangent at
    a + alpha (e - a) where the range is non-empty, else the fallback."""
    t = a + alpha * (e - a)
    k_t = w.df(t)
    k_f, b_f = _fallback(w, l, u)
    return torch.where(has, k_t, k_f), torch.where(has, w.f(t) - k_t * t, b_f)


def crown_alpha(l, u, a, e):
    """CROWN's tangent point as a fraction of its range: the midpoint of [l, u], clamped in."""
    width = e - a
    frac = ((l + u) / 2 - a) / torch.where(width > 0, width, torch.ones_like(width))
    return torch.where(width > 0, frac.clamp(0, 1), torch.full_like(frac, 0.5))


# -- kernels --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Periodic:
    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    lower: Wave
    upper: Wave             # the lower wave of -f


SIN = Periodic("sin", torch.sin, SIN_LOWER, SIN_UPPER)
COS = Periodic("cos", torch.cos, COS_LOWER, COS_UPPER)


def _lines(op: Periodic, l, u, ranges, alpha_lo, alpha_up):
    """(lower slope, lower intercept, upper slope, upper intercept), float64."""
    a_lo, e_lo, a_up, e_up, has_lo, has_up = ranges
    k_lo, b_lo = tangent_line(op.lower, l, u, a_lo, e_lo, has_lo > 0, alpha_lo)
    k_up, b_up = tangent_line(op.upper, l, u, a_up, e_up, has_up > 0, alpha_up)
    return k_lo, lower_shift(op.lower, k_lo, b_lo, l, u), -k_up, -lower_shift(op.upper, k_up, b_up, l, u)


def _relax(op: Periodic):
    def relax(ins, ps, attrs):
        """stack(lower, upper) -> the CROWN lines, l, u and the tangent ranges (module docstring)."""
        l, u = ins[0].double()
        (a_lo, e_lo, has_lo), (a_up, e_up, has_up) = tangent_range(op.lower, l, u), tangent_range(op.upper, l, u)
        ranges = (a_lo, e_lo, a_up, e_up, has_lo.double(), has_up.double())
        lines = _lines(op, l, u, ranges, crown_alpha(l, u, a_lo, e_lo), crown_alpha(l, u, a_up, e_up))
        return (torch.stack((*lines, l, u, *ranges)).to(ins[0].dtype),)
    return relax


def _backward_alpha(op: Periodic):
    def backward_alpha(ins, ps, attrs):
        """backward with each row's tangent points at fractions alpha [B, 2, R, *shape] (lower
        line, upper line) of their ranges; without alpha (None), CROWN's lines."""
        a, bias, lines, alpha = ins[:4]
        if alpha is None:
            return backward(ins[:3], ps, attrs)
        rows = lines[4:].double().unsqueeze(2)
        l, u, ranges = rows[0], rows[1], tuple(rows[2:])
        k_lo, b_lo, k_up, b_up = (t.to(a.dtype) for t in _lines(op, l, u, ranges, alpha[:, 0].double(), alpha[:, 1].double()))
        return _back(a, bias, k_lo, b_lo, k_up, b_up, halves(a, attrs))
    return backward_alpha


def _alpha_start(op, env) -> torch.Tensor:
    """CROWN's tangent points as fractions, one pair per row of A."""
    a, lines = env[op.inputs[0]], env[op.inputs[2]]
    l, u, a_lo, e_lo, a_up, e_up = lines[4:10]
    pair = torch.stack((crown_alpha(l, u, a_lo, e_lo), crown_alpha(l, u, a_up, e_up)), 1).unsqueeze(2)
    return pair.expand((a.shape[0], 2) + tuple(a.shape[1:])).clone()


def contains(w: Wave, l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Whether [l, u] may hold a minimum p + 2 pi n of the wave; when rounding leaves it in
    doubt, yes (the bound -1 is then merely loose)."""
    l, u = l.double(), u.double()
    doubt = 1e-14 * (1 + l.abs() + u.abs())
    return torch.floor((u - w.phase) / TWO_PI + doubt) >= torch.ceil((l - w.phase) / TWO_PI - doubt)


def _interval(op: Periodic):
    def interval(ins, ps, attrs):
        """The exact range: f at the ends, -1 / 1 where [l, u] holds a minimum / maximum."""
        l, u = ins[0]
        fl, fu = op.f(l), op.f(u)
        lo = torch.where(contains(op.lower, l, u), -torch.ones_like(fl), torch.minimum(fl, fu))
        hi = torch.where(contains(op.upper, l, u), torch.ones_like(fl), torch.maximum(fl, fu))
        return (torch.stack((lo, hi)),)
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
