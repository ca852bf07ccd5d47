"""GELU, exact (x Phi(x)) or with tanh (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))).

Both are concave on (-inf, p], convex on [p, q], concave on [q, inf) (p = -q, q = sqrt(2) for the
exact one, 1.4185 for tanh's), decrease to their minimum at m (f' = 0, about -0.75), approach
0 on the left and x on the right, with slopes in [-0.129, 1.129].

Linear relaxation over [l, u]; the best lines touch the convex envelope (lower) or the concave
envelope (upper) of f on [l, u]:

  lower  the envelope meets f only inside [p, q]: the tangents at t in [p, q] n [l, u] that stay
         under f at l and at u (one crossing on each side: [start(l), end(u)], by bisection;
         tangents at t in [m, 1-point] are valid everywhere), else the chord
  upper  it meets f only in one concave tail (no line touches both: their slopes differ): the
         tangents at t in [l, u] n (-inf, p] that stay above f at u, or in [q, inf) n [l, u]
         that stay above f at l, else the chord

alpha-CROWN optimises the tangent point across its range (CROWN: the midpoint of [l, u] clamped
in). Every line is finally moved by its largest violation of f on [l, u], computed exactly: f -
line has its extremes at l, u, p, q and at the points where f' equals the slope on each piece
where f' is monotone (bisection), so rounding and bisection can never make a line unsound.

The relaxation tensor ("gelu.relax") holds rows (lower slope, lower intercept, upper slope, upper
intercept, l, u, lower range start, end, upper range start, end, whether each range is
non-empty). Lines are computed in float64 and returned in the plan's dtype.

Frontends: ONNX Gelu (opset 20, approximate none / tanh), the erf form torch exports at opset 17
(x * 0.5 * (1 + Erf(x / sqrt(2))), fused by `fuse_erf_gelu`, its float constant's distance to
sqrt(2) carried into the sound_fp error bounds as "deviation"), aten gelu.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from boundflow.domains import binds, fp, native
from boundflow.domains.linear import halves, sound
from boundflow.domains.rounding import down, gamma, magnitude, slack, unit_roundoff
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, onnx_rewrite, register, torch_lowering
from boundflow.ops.s_shaped import FUNCTION_ULPS, _back, backward
from boundflow.runtime.device import constant

ITERS = 40                 # bisection steps (the fp rule counts the 2^-40 of a bracket left)
FAR = 40.0                 # |t| beyond which f and f' are 0 / (x, 1) in float64
ROWS = 12
APPROXIMATIONS = ("none", "tanh")
TANH_C, TANH_A = math.sqrt(2 / math.pi), 0.044715


def _df_exact(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _df_tanh(x):
    t = torch.tanh(TANH_C * (x + TANH_A * x ** 3))
    xc = x.clamp(-FAR, FAR)           # beyond, 1 - t^2 is 0 (and x^2 may overflow)
    return 0.5 * (1 + t) + 0.5 * xc * (1 - t * t) * TANH_C * (1 + 3 * TANH_A * xc * xc)


def bisect(fn, target, a, b, iters: int = ITERS):
    """A point of [a, b] (elementwise) where the monotone fn crosses target (an end if none)."""
    rising = fn(b) >= fn(a)
    lo, hi = a, b
    for _ in range(iters):
        mid = (lo + hi) / 2
        left = (fn(mid) < target) == rising
        lo, hi = torch.where(left, mid, lo), torch.where(left, hi, mid)
    return (lo + hi) / 2


def boundary(ok, valid, invalid, iters: int = ITERS):
    """The last point from `valid` towards `invalid` where the monotone predicate ok holds."""
    for _ in range(iters):
        mid = (valid + invalid) / 2
        good = ok(mid)
        valid, invalid = torch.where(good, mid, valid), torch.where(good, invalid, mid)
    return valid


@dataclass(frozen=True)
class Gelu:
    name: str
    f: Callable
    df: Callable
    p: float            # inflection points p < 0 < q
    q: float
    m: float            # the minimum (f' = 0)
    one: float          # f' = 1 in [0, q]
    f_min: float        # a lower bound on min f
    k_min: float        # bounds on f' (so on every chord's slope)
    k_max: float


def _gelu(approximate: str) -> Gelu:
    f = lambda x: F.gelu(x, approximate=approximate)           # noqa: E731
    df = _df_exact if approximate == "none" else _df_tanh

    def d2(x):
        # (this runs at import, which may happen under a caller's no_grad or inference_mode)
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            return torch.autograd.grad(df(x).sum(), x)[0].detach()
    q = float(bisect(d2, 0.0, torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)))
    m = float(bisect(df, 0.0, torch.tensor(-q, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)))
    one = float(bisect(df, 1.0, torch.tensor(0.0, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)))
    f_min = float(f(torch.tensor(m, dtype=torch.float64))) - 1e-12
    k_min, k_max = (float(df(torch.tensor(v, dtype=torch.float64))) for v in (-q, q))
    return Gelu("gelu" if approximate == "none" else "gelu_tanh", f, df, -q, q, m, one, f_min,
                k_min - 1e-9, k_max + 1e-9)


SHAPES = {a: _gelu(a) for a in APPROXIMATIONS}


def _shape(attrs) -> Gelu:
    return SHAPES[attrs.get("approximate", "none")]


# -- lines (float64) ------------------------------------------------------------------------------

def _tangent_at(g: Gelu, t, x):
    return g.f(t) + g.df(t) * (x - t)


def lower_range(g: Gelu, l, u):
    """(start, end, non-empty) of the tangent points of valid lower tangents in [l, u]."""
    start = torch.where(l < g.p, boundary(lambda t: _tangent_at(g, t, l) <= g.f(l), torch.full_like(l, g.m),
                                          torch.full_like(l, g.p)), torch.full_like(l, g.p))
    end = torch.where(u > g.q, boundary(lambda t: _tangent_at(g, t, u) <= g.f(u), torch.full_like(u, g.one),
                                        torch.full_like(u, g.q)), torch.full_like(u, g.q))
    a, e = torch.maximum(l, start), torch.minimum(u, end)
    return a, e, a <= e


def upper_range(g: Gelu, l, u):
    """(start, end, non-empty) of the tangent points of valid upper tangents in [l, u]: in the
    left tail those above f at u (none past 0), else in the right tail those above f at l."""
    far_l, far_r = torch.full_like(l, -FAR).minimum(l), torch.full_like(u, FAR).maximum(u)
    end_left = torch.where(u <= g.p, u, torch.where(u <= 0, boundary(lambda t: _tangent_at(g, t, u) >= g.f(u), far_l,
                                                                    torch.full_like(u, g.p)), torch.full_like(u, -math.inf)))
    start_right = torch.where(l >= g.q, l, torch.where(l >= 0, boundary(lambda t: _tangent_at(g, t, l) >= g.f(l), far_r,
                                                                        torch.full_like(l, g.q)), torch.full_like(l, math.inf)))
    left = l <= end_left
    a = torch.where(left, l, start_right.clamp(max=u))
    e = torch.where(left, end_left.clamp(min=l), u)
    return a, e, left | (start_right <= u)


def _fallback(g: Gelu, l, u):
    """The chord (its slope within f''s range; f' at l for a point)."""
    width = u - l
    point = width <= 1e-12 * (1 + l.abs())
    k = torch.where(point, g.df(l), (g.f(u) - g.f(l)) / torch.where(point, torch.ones_like(u), width))
    k = k.clamp(g.k_min, g.k_max)
    return k, g.f(l) - k * l


def tangent_line(g: Gelu, l, u, a, e, has, alpha):
    """(slope, intercept) before the shift: the tangent at a + alpha (e - a), else the chord."""
    t = a + alpha * (e - a)
    k_t = g.df(t)
    k_f, b_f = _fallback(g, l, u)
    return torch.where(has, k_t, k_f), torch.where(has, g.f(t) - k_t * t, b_f)


def _candidates(g: Gelu, k, l, u, lower: bool):
    """Points of [l, u] holding the extremes of f - line: l, u, p, q and the points where f' = k
    on the monotone pieces whose f'' has the extreme's sign (not differentiated through)."""
    with torch.no_grad():
        def inside(x):
            return torch.minimum(torch.maximum(x, l), u)
        pts = [inside(torch.full_like(l, g.p)), inside(torch.full_like(l, g.q))]
        if lower:       # minima of f - line: in the convex piece
            pts.append(inside(bisect(g.df, k, inside(torch.full_like(l, g.p)), inside(torch.full_like(l, g.q)))))
        else:           # maxima: in the concave tails
            pts.append(inside(bisect(g.df, k, l.clamp(max=g.p), inside(torch.full_like(l, g.p)))))
            pts.append(inside(bisect(g.df, k, inside(torch.full_like(l, g.q)), u.clamp(min=g.q))))
    return [l, u] + pts


def shift(g: Gelu, k, b, l, u, lower: bool):
    """The intercept moved by the line's largest violation of f on [l, u]."""
    gaps = torch.stack([g.f(x) - (k * x + b) for x in _candidates(g, k, l, u, lower)])
    return b + gaps.amin(0).clamp(max=0) if lower else b + gaps.amax(0).clamp(min=0)


def crown_alpha(l, u, a, e):
    """CROWN's tangent point as a fraction of its range: the midpoint of [l, u], clamped in."""
    width = e - a
    frac = ((l + u) / 2 - a) / torch.where(width > 0, width, torch.ones_like(width))
    return torch.where(width > 0, frac.clamp(0, 1), torch.full_like(frac, 0.5))


def _lines(g: Gelu, l, u, ranges, alpha_lo, alpha_up):
    a_lo, e_lo, a_up, e_up, has_lo, has_up = ranges
    k_lo, b_lo = tangent_line(g, l, u, a_lo, e_lo, has_lo > 0, alpha_lo)
    k_up, b_up = tangent_line(g, l, u, a_up, e_up, has_up > 0, alpha_up)
    return k_lo, shift(g, k_lo, b_lo, l, u, True), k_up, shift(g, k_up, b_up, l, u, False)


def relax(ins, ps, attrs):
    """stack(lower, upper) -> the CROWN lines, l, u and the tangent ranges (module docstring)."""
    g = _shape(attrs)
    l, u = ins[0].double()
    (a_lo, e_lo, has_lo), (a_up, e_up, has_up) = lower_range(g, l, u), upper_range(g, l, u)
    ranges = (a_lo, e_lo, a_up, e_up, has_lo.double(), has_up.double())
    lines = _lines(g, l, u, ranges, crown_alpha(l, u, a_lo, e_lo), crown_alpha(l, u, a_up, e_up))
    return (torch.stack((*lines, l, u, *ranges)).to(ins[0].dtype),)


def backward_alpha(ins, ps, attrs):
    """backward with each row's tangent points at fractions alpha [B, 2, R, *shape] (lower line,
    upper line) of their ranges; without alpha (None), CROWN's lines."""
    a, bias, lines, alpha = ins[:4]
    if alpha is None:
        return backward(ins[:3], ps, attrs)
    rows = lines[4:].double().unsqueeze(2)
    lines = _lines(_shape(attrs), rows[0], rows[1], tuple(rows[2:]), alpha[:, 0].double(), alpha[:, 1].double())
    return _back(a, bias, *(t.to(a.dtype) for t in lines), halves(a, attrs))


def alpha_start(op, env) -> torch.Tensor:
    """CROWN's tangent points as fractions, one pair per row of A."""
    a, lines = env[op.inputs[0]], env[op.inputs[2]]
    l, u, a_lo, e_lo, a_up, e_up = lines[4:10]
    pair = torch.stack((crown_alpha(l, u, a_lo, e_lo), crown_alpha(l, u, a_up, e_up)), 1).unsqueeze(2)
    return pair.expand((a.shape[0], 2) + tuple(a.shape[1:])).clone()


# -- forward, interval, fp ------------------------------------------------------------------------

def forward(x, attrs=None):
    return F.gelu(x, approximate=(attrs or {}).get("approximate", "none"))


def _f_min(g: Gelu, dtype: torch.dtype, device) -> torch.Tensor:
    """g.f_min in dtype, rounded down."""
    f_min = constant(g.f_min, torch.float64, device).to(dtype)
    return torch.where(f_min.double() > g.f_min, down(f_min), f_min)


@binds
def interval(ins, ps, attrs, out=(None,)):
    """The exact range: the larger end value above; below the smaller one, or the minimum
    (rounded down) where [l, u] may hold m."""
    g = _shape(attrs)
    (s,) = ins
    l, u = s

    def run():
        fl, fu = forward(l, attrs), forward(u, attrs)
        doubt = 1e-12 * (1 + l.abs().double())
        holds_min = (l.double() - doubt <= g.m) & (u.double() + doubt >= g.m)
        lo = torch.where(holds_min, _f_min(g, l.dtype, l.device).expand_as(fl), torch.minimum(fl, fu))
        return (torch.stack((lo, torch.maximum(fl, fu)), out=out[0]),)
    # (f, then one compiled call for the rest: native.py; it takes float32 CPU boxes only)
    return native.elementwise_run(native._valley_range, (s,), out[0], run, lambda into: into.copy_(forward(s, attrs)),
                                  (g.m, float(_f_min(g, torch.float32, torch.device("cpu"))))) or run


def _f_error(x_mag, dtype, attrs):
    """|computed f - exact f| for |x| <= x_mag: f is a product of x and a library function of a
    rounded argument (FUNCTION_ULPS ulps, a few roundings), plus a fused pattern's deviation."""
    return 2 * (FUNCTION_ULPS + 8) * unit_roundoff(dtype) * (x_mag + 1) + attrs.get("deviation", 0.0)


def fp_interval(ins, ps, attrs):
    s, raw = ins
    return fp.finish(raw, _f_error(magnitude(s), raw.dtype, attrs), attrs["n"])


def fp_lines(ins, ps, attrs):
    """e of the backward rules: the products A * slope (|slope| <= k), the intercept sums over
    the layer (|intercept| <= 3 (1 + (1 + k) max|x|), the shift included), and how far a rounded
    line may cross f after its shift: the shift's evaluation (f, the line at x), the shifted
    intercept's rounding, and the miss of an extreme from the bisection's place (|f' - k| there
    at most f's slope error plus f'' times the bracket, times the distance to the true place)."""
    s, lines = ins
    g = _shape(attrs)
    eps = unit_roundoff(s.dtype)
    m = magnitude(s)
    k = max(abs(g.k_min), abs(g.k_max))
    icpt = 3 * (1 + (1 + k) * m)
    reach = 2 * m + 2
    miss = (2 * (FUNCTION_ULPS + 8) * eps * (m + 1) + reach * 2.0 ** -ITERS) * reach
    gap = _f_error(m, s.dtype, attrs) + 10 * eps * icpt + miss
    n = math.prod(s.shape[2:]) + 4
    return (2 * (2 * eps * k * m + gamma(n, s.dtype) * icpt + 2 * gap) + slack(n, s.dtype),)


GELU_OP = register(Op(
    "gelu", forward, interval, sound(backward), fp=fp_interval, fp_params=lambda graph, node, dtype: [],
    relaxation=Relaxation(relax, ROWS, fp_lines, sound(backward_alpha), alpha_start, params=2)))


# -- frontends ------------------------------------------------------------------------------------

def _approximate(b, value) -> str:
    value = value.decode() if isinstance(value, bytes) else value
    if value not in APPROXIMATIONS:
        b.unsupported(f"attribute approximate={value!r} (supported: {', '.join(APPROXIMATIONS)})")
    return value


@onnx_lowering("Gelu")
def _onnx_gelu(b) -> str:
    attrs = {"approximate": _approximate(b, b.attr("approximate", "none"))}
    deviation = b.attr("boundflow_deviation", 0.0)
    if deviation:
        attrs["deviation"] = float(deviation)
    return b.emit("gelu", [b.var(b.input(0))], attrs, out=b.output)


@torch_lowering(torch.ops.aten.gelu.default)
def _torch_gelu(b) -> str:
    return b.emit("gelu", [b.var(b.arg(0))], {"approximate": _approximate(b, b.kwarg("approximate") or "none")},
                  out=b.output)


@onnx_rewrite
def fuse_erf_gelu(nodes: list, consts: dict) -> list:
    """Replace each x * 0.5 * (1 + Erf(x / s)) (products in either order and association, x / s
    as Div by s or Mul by 1 / s, s within 1e-6 of sqrt(2)) by one Gelu node whose
    "boundflow_deviation" bounds |the pattern - gelu(x)|: 0.5 |x| |erf(x / s) - erf(x / sqrt 2)|
    <= |1/s - 1/sqrt 2| x^2 exp(-x^2 / 2.01) / sqrt(pi) <= 0.43 |1/s - 1/sqrt 2|. The intermediate
    values must have no other reader. consts: name -> numpy array of the constants known."""
    from onnx import helper

    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1

    def scalar(name):
        v = consts.get(name)
        return float(np.asarray(v).reshape(-1)[0]) if v is not None and np.asarray(v).size == 1 else None

    def split(node, op):
        """(other operand, the constant) of a binary node with one scalar constant operand."""
        if node is None or node.op_type != op or len(node.input) != 2:
            return None
        for i, j in ((0, 1), (1, 0)):
            c = scalar(node.input[j])
            if c is not None and (op == "Add" or op == "Mul" or j == 1):
                return node.input[i], c
        return None

    def only(name):
        return readers.get(name, 0) == 1

    removed, replaced = set(), {}
    for erf in (n for n in nodes if n.op_type == "Erf"):
        scaled = producer.get(erf.input[0])
        inv_s = None
        if (d := split(scaled, "Div")) is not None and d[1] != 0:
            x, inv_s = d[0], 1 / d[1]
        elif (d := split(scaled, "Mul")) is not None:
            x, inv_s = d
        if inv_s is None or abs(inv_s - 1 / math.sqrt(2)) > 1e-6 or not only(erf.input[0]) or not only(erf.output[0]):
            continue
        plus = [n for n in nodes if erf.output[0] in n.input and split(n, "Add") is not None]
        if len(plus) != 1 or split(plus[0], "Add")[1] != 1.0 or not only(plus[0].output[0]):
            continue
        match = _erf_products(nodes, x, plus[0].output[0], split, only)
        if match is None:
            continue
        first, last = match
        gelu = helper.make_node("Gelu", [x], [last.output[0]], name=(last.name or erf.name) + "/gelu",
                                boundflow_deviation=0.43 * abs(inv_s - 1 / math.sqrt(2)))
        removed |= {id(n) for n in (scaled, erf, plus[0], first, last)}
        replaced[id(last)] = gelu
    return [replaced.get(id(n), n) for n in nodes if id(n) not in removed or id(n) in replaced]


def _erf_products(nodes, x, one_plus, split, only):
    """(first, last) Mul nodes of x * 0.5 * one_plus in either association, or None."""
    def mul_of(a, b):
        return [n for n in nodes if n.op_type == "Mul" and sorted(n.input) == sorted([a, b])]
    for first in mul_of(x, one_plus):                 # (x * (1 + erf)) * 0.5
        last = [n for n in nodes if first.output[0] in n.input and (s := split(n, "Mul")) is not None and s[1] == 0.5]
        if len(last) == 1 and only(first.output[0]):
            return first, last[0]
    for first in (n for n in nodes if (s := split(n, "Mul")) is not None and s == (x, 0.5)):   # (0.5 x) (1 + erf)
        last = mul_of(first.output[0], one_plus)
        if len(last) == 1 and only(first.output[0]):
            return first, last[0]
    return None

