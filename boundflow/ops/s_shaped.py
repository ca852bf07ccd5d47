"""S-shaped activations: sigmoid and tanh. Increasing, convex left of 0, concave right of it,
point-symmetric about (0, f(0)).

Linear relaxation over a pre-activation interval [l, u] (lines a x + b with f in between):

  u <= 0 (convex)   upper: the chord; lower: a tangent at t in [l, u] (CROWN: the midpoint)
  l >= 0 (concave)  lower: the chord; upper: a tangent at t in [l, u] (CROWN: the midpoint)
  l < 0 < u         lower: the chord when its slope is below f'(l) (it then stays under f), else a
                    tangent at t <= d(u), the point left of 0 whose tangent passes under f(u)
                    (precomputed on a grid of u; CROWN: t = d(u), or the midpoint when that is
                    further left and so tighter near u); the upper line by symmetry

alpha-CROWN optimises the tangent points: each line of each row of A has a parameter in [0, 1]
that moves its tangent point across the range where the tangent stays a bound (the chords have
none). Where u is beyond the grid no tangent passes under f(u) from a useful point, and the lower
line is the constant f(l) (the upper one f(u)).

The relaxation tensor ("<op>.relax") holds the CROWN lines and what the optimised rule needs:
rows (lower slope, lower intercept, upper slope, upper intercept, l, u, d(u), -d(-l)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from boundflow.domains import fp, writes_into
from boundflow.domains.linear import halves, sound
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering
from boundflow.runtime.device import constant

GRID_STEP = 0.01          # of the tangent-point table over u >= 0
GRID_LIMIT = 64.0         # beyond: the flat line (sigmoid and tanh are constant there to 1e-27)
# sound_fp: torch's float64 sigmoid, tanh and their derivatives are taken to be within this many
# units in the last place (libm-grade; the fp error vectors rest on it)
FUNCTION_ULPS = 8


@dataclass(frozen=True)
class SShape:
    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    df_of_f: Callable[[torch.Tensor], torch.Tensor]     # f' as a function of f's value
    f_max: float              # sup |f|
    df_max: float             # sup f' (at 0)
    centre: float             # f(0), the centre of symmetry
    table: torch.Tensor       # d(u_i), u_i = i GRID_STEP, float64
    lookup: torch.Tensor      # the table and -inf after it (beyond the grid)

    def df(self, x: torch.Tensor) -> torch.Tensor:
        return self.df_of_f(self.f(x))

    def tangent_point(self, u: torch.Tensor) -> torch.Tensor:
        """d(u) for u >= 0: a point <= 0 whose tangent passes under f on [d, u]: the table's entry
        at the grid point at or above u (valid for every smaller u too); -inf beyond the grid."""
        index = torch.ceil(u.clamp(min=0).double() / GRID_STEP).long().clamp_(max=len(self.table))
        return constant(self.lookup, self.lookup.dtype, u.device)[index].to(u.dtype)


def _tangent_table(f, df) -> torch.Tensor:
    """For each grid point U >= 0 the largest d <= 0 (to binary-search precision, then rounded
    down) whose tangent at d lies under f at U: f(d) + f'(d) (U - d) <= f(U)."""
    upper = GRID_STEP * torch.arange(int(GRID_LIMIT / GRID_STEP) + 2, dtype=torch.float64)

    def below(d):
        return f(d) + df(d) * (upper - d) <= f(upper)

    lo, hi = torch.full_like(upper, -1.0), torch.zeros_like(upper)
    while not bool(below(lo).all()):            # a valid start: double until the tangent passes under
        lo = torch.where(below(lo), lo, 2 * lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        ok = below(mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo - 1e-9                             # a margin against the search's own rounding


def _shape(name, f, df_of_f, f_max, df_max, centre) -> SShape:
    table = _tangent_table(f, lambda x: df_of_f(f(x)))
    return SShape(name, f, df_of_f, f_max, df_max, centre, table, torch.cat((table, table.new_full((1,), -math.inf))))


SIGMOID = _shape("sigmoid", torch.sigmoid, lambda s: s * (1 - s), 1.0, 0.25, 0.5)
TANH = _shape("tanh", torch.tanh, lambda t: 1 - t ** 2, 1.0, 1.0, 0.0)


# -- lines ----------------------------------------------------------------------------------------
# Only lower lines are computed: f(-x) = 2 f(0) - f(x), so the upper line k x + b of f on [l, u]
# is the lower line k y + 2 f(0) - b on [-u, -l]. Both sides run as one stacked computation
# (half the torch calls of two); an upper line's tangent point (and its alpha) is that of its
# mirror image.

def mirrored(l, u, d_lo, d_up):
    """[l, u] and [-u, -l] stacked on a new first axis, with their tangent-point limits d."""
    return torch.stack((l, -u)), torch.stack((u, -l)), torch.stack((d_lo, -d_up))


class Ranges(NamedTuple):
    """Per neuron, the lower line's choices on [l, u]: the chord, f(l) (the flat line), which
    of them is taken (neither: a tangent), and the range of tangent points whose tangent stays
    under f: [l, u] (convex), [min(l, d), d] (across 0)."""
    chord_slope: torch.Tensor
    chord_intercept: torch.Tensor
    fl: torch.Tensor
    chord: torch.Tensor
    flat: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor


def lower_ranges(shape: SShape, l, u, d) -> Ranges:
    """The Ranges of the lower lines on [l, u]; d = d(u)."""
    fl, fu = shape.f(l), shape.f(u)
    dfl = shape.df_of_f(fl)
    point = (u - l) <= 1e-12 * (1 + l.abs())
    kc = torch.where(point, dfl, (fu - fl) / torch.where(point, 1.0, u - l))
    convex = u <= 0
    # across 0 (l < 0 < u): the chord when it stays under f; (l >= 0 already takes it, and
    # d = -inf only for u beyond the grid, so ~chord & isinf(d) is across 0)
    chord = (l >= 0) | (~convex & (kc < dfl)) | point
    flat = ~chord & torch.isinf(d)
    return Ranges(kc, fl - kc * l, fl, chord, flat, torch.where(convex, l, torch.minimum(l, d)), torch.where(convex, u, d))


def crown_point(l, u, d):
    """CROWN's lower tangent point: the midpoint in the convex case, across 0 d (or the
    midpoint when that is further in); inside the range either way."""
    m = (l + u) / 2
    return torch.where(u <= 0, m, torch.minimum(m, d))


def crown_alpha(l, u, d, ranges: Ranges):
    """crown_point as a fraction of its range."""
    a, b = ranges.start, ranges.end
    t = crown_point(l, u, d)
    width = b - a
    return torch.where(width > 0, (t - a) / torch.where(width > 0, width, 1.0), 1.0).clamp(0, 1).nan_to_num(1.0)


def lower_lines(shape: SShape, r: Ranges, t):
    """(slope, intercept) of the lower lines, tangents at t where neither chord nor flat."""
    t = torch.nan_to_num(t)                  # (-inf where flat: finite, so no NaN gradient)
    ft = shape.f(t)
    k = shape.df_of_f(ft)
    return (torch.where(r.chord, r.chord_slope, torch.where(r.flat, 0.0, k)),
            torch.where(r.chord, r.chord_intercept, torch.where(r.flat, r.fl, ft - k * t)))


def lines_at(shape: SShape, ml, mu, md, alpha=None):
    """(lower slope, lower intercept, upper slope, upper intercept) on [l, u], given mirrored's
    stack; alpha: the tangent points as fractions of their ranges, stacked the same way (lower
    line, mirrored upper line); None: CROWN's."""
    ranges = lower_ranges(shape, ml, mu, md)
    t = crown_point(ml, mu, md) if alpha is None else ranges.start + alpha * (ranges.end - ranges.start)
    k, b = lower_lines(shape, ranges, t)
    return k[0], b[0], k[1], 2 * shape.centre - b[1]


# -- kernels --------------------------------------------------------------------------------------

def _relax(shape: SShape):
    def relax(ins, ps, attrs):
        """stack(lower, upper) -> the CROWN lines and (l, u, d(u), -d(-l)) (module docstring)."""
        l, u = ins[0]
        ml, mu = torch.stack((l, -u)), torch.stack((u, -l))
        md = shape.tangent_point(mu)                           # d(u), d(-l)
        return (torch.stack((*lines_at(shape, ml, mu, md), l, u, md[0], -md[1])),)
    return relax


def _back(a, bias, k_lo, b_lo, k_up, b_up, s: int):
    """Lower rows (the first s; all of them in a lower-only pass): positive coefficients take
    the lower line, negative ones the upper line; upper rows the other way round. The lines are
    [B, 1, ...] (shared by every row: both halves of A in one pass, as [B, h, S, ...]) or
    [B, rows, ...] (one per row). a- = a - a+ is exact, and one of the two terms is an exact
    zero (relu.py's _lines)."""
    if all(t.shape[1] == 1 for t in (k_lo, b_lo, k_up, b_up)):
        h = 1 if s == a.shape[1] else 2             # a lower-only pass has one half
        split = a.unflatten(1, (h, s))
        pos = split.clamp(min=0)
        neg = split - pos

        def pair(first, second):                  # [B, h, 1, ...]: per half, its line
            return (first if h == 1 else torch.cat((first, second), 1)).unsqueeze(2)
        out = torch.addcmul(pos * pair(k_lo, k_up), neg, pair(k_up, k_lo))
        icpt = torch.addcmul(pos * pair(b_lo, b_up), neg, pair(b_up, b_lo)).flatten(3).sum(-1)
        return out.flatten(1, 2), bias + icpt.flatten(1)

    def rows(t, lower):
        return t if t.shape[1] == 1 else (t[:, :s] if lower else t[:, s:])

    def side(a, lower):
        (k_pos, b_pos, k_neg, b_neg) = (k_lo, b_lo, k_up, b_up) if lower else (k_up, b_up, k_lo, b_lo)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        out = pos * rows(k_pos, lower) + neg * rows(k_neg, lower)
        return out, (pos * rows(b_pos, lower) + neg * rows(b_neg, lower)).flatten(2).sum(-1)

    lo, up = side(a[:, :s], True), side(a[:, s:], False)
    return torch.cat([lo[0], up[0]], 1), bias + torch.cat([lo[1], up[1]], 1)


def backward(ins, ps, attrs):
    a, bias, lines = ins
    k_lo, b_lo, k_up, b_up = lines[:4].unsqueeze(2)
    return _back(a, bias, k_lo, b_lo, k_up, b_up, halves(a, attrs))


def _backward_alpha(shape: SShape):
    def backward_alpha(ins, ps, attrs):
        """backward with each row's tangent points at fractions alpha [B, 2, R, *shape] (lower
        line, upper line) of their ranges; without alpha (None), CROWN's lines."""
        a, bias, lines, alpha = ins[:4]
        if alpha is None:
            return backward(ins[:3], ps, attrs)
        mirror = mirrored(*lines[4:8].unsqueeze(2))
        k_lo, b_lo, k_up, b_up = lines_at(shape, *mirror, alpha.movedim(1, 0))
        return _back(a, bias, k_lo, b_lo, k_up, b_up, halves(a, attrs))
    return backward_alpha


def _alpha_start(shape: SShape):
    def alpha_start(op, env) -> torch.Tensor:
        """CROWN's tangent points as fractions, one pair per row of A."""
        a, lines = env[op.inputs[0]], env[op.inputs[2]]
        ml, mu, md = mirrored(*lines[4:8])
        pair = crown_alpha(ml, mu, md, lower_ranges(shape, ml, mu, md)).movedim(0, 1).unsqueeze(2)   # [B, 2, 1, *shape]
        return pair.expand((a.shape[0], 2) + tuple(a.shape[1:])).clone()
    return alpha_start


def _interval(shape: SShape):
    @writes_into
    def interval(ins, ps, attrs, out=(None,)):
        return (shape.f(ins[0], out=out[0]),)             # increasing: f(lower), f(upper)
    return interval


def _fp_interval(shape: SShape):
    def fp_interval(ins, ps, attrs):
        """f rounded by the library: FUNCTION_ULPS units in the last place of f."""
        s, raw = ins
        u = unit_roundoff(raw.dtype)
        return fp.finish(raw, 2 * FUNCTION_ULPS * u * magnitude(raw), attrs["n"])
    return fp_interval


def _fp_lines(shape: SShape):
    def fp_lines(ins, ps, attrs):
        """e of the backward rules: the products A * slope (|slope| <= sup f'), the intercept
        sums over the layer, and how far a rounded line (any tangent point in its range) may
        cross f: FUNCTION_ULPS ulps of f and f' at the tangent point, carried along x - t."""
        s, lines = ins
        l, u, d_lo, d_up = lines[4:8]
        reach = torch.stack((l.abs(), u.abs(), d_lo.abs().nan_to_num(0, 0, 0), d_up.abs().nan_to_num(0, 0, 0))).amax(0)
        m = magnitude(s)
        eps = unit_roundoff(s.dtype)
        icpt = shape.f_max + shape.df_max * reach              # bounds |f(t) - f'(t) t|
        gap = 4 * FUNCTION_ULPS * eps * (shape.f_max + shape.df_max * (m + reach)) + 4 * eps * icpt
        n = math.prod(s.shape[2:]) + 4
        return (2 * (2 * eps * shape.df_max * m + gamma(n, s.dtype) * icpt + gap) + slack(n, s.dtype),)
    return fp_lines


def _register(shape: SShape) -> Op:
    return register(Op(
        shape.name, lambda x, attrs=None, f=shape.f: f(x), _interval(shape), sound(backward),
        fp=_fp_interval(shape), fp_params=lambda graph, node, dtype: [],
        relaxation=Relaxation(_relax(shape), 8, _fp_lines(shape), sound(_backward_alpha(shape)),
                              _alpha_start(shape), params=2)))


SIGMOID_OP = _register(SIGMOID)
TANH_OP = _register(TANH)


# -- frontends ------------------------------------------------------------------------------------

def _unary(name: str):
    def lower(b, x: str) -> str:
        return b.emit(name, [x], out=b.output)
    return lower


for _shape, _onnx, _aten in ((SIGMOID, "Sigmoid", torch.ops.aten.sigmoid.default), (TANH, "Tanh", torch.ops.aten.tanh.default)):
    onnx_lowering(_onnx)(lambda b, lower=_unary(_shape.name): lower(b, b.var(b.input(0))))
    torch_lowering(_aten)(lambda b, lower=_unary(_shape.name): lower(b, b.var(b.arg(0))))
