"""Elementwise functions that are convex or concave on each piece of their domain: exp, log,
reciprocal, sqrt, softplus, and powers x^p with a constant exponent (the square among them, which
ONNX Mul(x, x) and torch x * x lower to). One table entry (`Curve`) per function: f, f', its
convexity on an interval, CROWN's tangent point and its domain; one relaxation for all of them.

Linear relaxation over an input interval [l, u] inside one piece of the domain:

  convex    upper: the chord; lower: the tangent at a point t in [l, u]
  concave   lower: the chord; upper: the tangent at a point t in [l, u]
  odd powers across 0 (concave left of 0, convex right of it; x^n is homogeneous, so the
            points whose tangent stays a bound are a fixed fraction c_n of the interval's ends):
            lower: the chord when u <= c_n |l|, else a tangent at t in [c_n |l|, u];
            upper: the chord when |l| <= c_n u, else a tangent at t in [l, -c_n u]

alpha-CROWN optimises each tangent point over its range (a parameter in [0, 1] per line, row of
A and neuron); CROWN's points are auto_LiRPA's: the midpoint (log, sqrt, reciprocal, powers),
min(midpoint, l + 0.99) for exp (BoundExp: the lower line stays positive), and for even powers
the minimiser clamp(0, l, u) (auto_LiRPA's square, BoundSqr and Mul(x, x): never worse than
interval bounds); across 0 for odd powers, the midpoint moved into the range.

Domains: log needs l > 0 and a reciprocal (negative powers) an interval that does not contain 0,
else DomainError. For sqrt and fractional powers (domain x >= 0) a lower bound below 0 is
raised to 0: bounds hold wherever the network is real-valued (an input below 0 makes it NaN).
An output that overflows (exp of a large bound) is a DomainError too, never an infinite line.

The relaxation tensor ("<op>.relax") holds rows (lower slope, lower intercept, upper slope,
upper intercept, l, u); l and u are the interval after the domain clamp.
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
from boundflow.domains.rounding import Enclosed, gamma, magnitude, slack, unit_roundoff
from boundflow.errors import DomainError
from boundflow.runtime.device import constant
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering
from boundflow.ops.s_shaped import FUNCTION_ULPS, _back
from boundflow.ops.s_shaped import backward as lines_backward

aten = torch.ops.aten
Fn = Callable[[torch.Tensor], torch.Tensor]

CONVEX, CONCAVE, MIXED = 0, 1, 2


@dataclass(frozen=True)
class Curve:
    """One function of the table (f also takes out=, where it writes its values).

    kind        CONVEX or CONCAVE on the whole domain, or fn(l, u) -> per neuron CONVEX, CONCAVE or
                MIXED (odd powers across 0)
    crown       fn(l, u) -> CROWN's tangent point in the convex / concave case
    lo_bound    smallest lower bound allowed: an open domain (l > lo_bound) when open_lo, else
                a closed one to which lower bounds are raised; None: none
    pole        a point no interval may contain (reciprocal: 0)
    stationary  where f' = 0 (even powers): the interval rule's minimum candidate
    split       c_n of an odd power (MIXED intervals), else None
    steep_at_lo f' is infinite at lo_bound (sqrt): tangent points stay a little above it
    ulps        error bound of the library's f and f' in float64 (units in the last place)
    """
    name: str
    f: Fn
    df: Fn
    kind: int | Callable
    crown: Callable
    lo_bound: float | None = None
    open_lo: bool = False
    pole: float | None = None
    stationary: float | None = None
    split: float | None = None
    steep_at_lo: bool = False
    ulps: int = FUNCTION_ULPS


def _midpoint(l, u):
    return (l + u) / 2


def _by_sign(positive: int, negative: int):
    """Pieces x > 0 and x < 0 (or a MIXED interval across 0) of kinds `positive`, `negative`."""
    def kind(l, u):
        out = torch.full_like(l, MIXED, dtype=torch.int8)
        out = torch.where(l >= 0, torch.full_like(out, positive), out)
        return torch.where(u <= 0, torch.full_like(out, negative), out)
    return kind


def _softplus(x, out=None):
    # log(1 + e^x) without overflow and without torch's linear threshold (exact semantics)
    return torch.add(x.clamp(min=0), torch.log1p(torch.exp(-x.abs())), out=out)


EXP = Curve("exp", torch.exp, torch.exp, CONVEX, lambda l, u: torch.minimum(_midpoint(l, u), l + 0.99))
LOG = Curve("log", torch.log, torch.reciprocal, CONCAVE, _midpoint, lo_bound=0.0, open_lo=True)
RECIPROCAL = Curve("reciprocal", torch.reciprocal, lambda x: -torch.reciprocal(x * x), _by_sign(CONVEX, CONCAVE),
                   _midpoint, pole=0.0)
SQRT = Curve("sqrt", torch.sqrt, lambda x: 0.5 / torch.sqrt(x), CONCAVE, _midpoint, lo_bound=0.0, steep_at_lo=True)
# f and f' with three roundings and two library calls each
SOFTPLUS = Curve("softplus", _softplus, torch.sigmoid, CONVEX, _midpoint, ulps=3 * FUNCTION_ULPS)


def _odd_split(n: int) -> float:
    """c_n: the tangent of x^n at -s u (s > 0) passes above (u, u^n) iff s >= c_n, the root of
    (n - 1) s^n + n s^(n-1) = 1 (c_3 = 1/2); rounded up, so every s >= c_n keeps the bound."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if (n - 1) * mid ** n + n * mid ** (n - 1) >= 1 else (mid, hi)
    return hi * (1 + 1e-9)


@functools.lru_cache(maxsize=None)
def power(p: float) -> Curve:
    """x^p for a constant p other than 0 and 1 (made once per exponent: every rule asks for it)."""
    if p == 0.5:
        return SQRT
    if p == -1:
        return RECIPROCAL
    name = f"pow{p:g}"

    def f(x, out=None):
        return torch.pow(x, p, out=out)

    def df(x):
        return p * torch.pow(x, p - 1)

    if p == int(p) and p > 0:
        n = int(p)
        if n % 2 == 0:                 # convex everywhere, minimum at 0 (auto_LiRPA's square)
            return Curve(name, f, df, CONVEX, lambda l, u: l.clamp(min=0) - (-u).clamp(min=0), stationary=0.0)
        return Curve(name, f, df, _by_sign(CONVEX, CONCAVE), _midpoint, split=_odd_split(n))
    if p == int(p):                    # negative integers: both sides of the pole at 0
        odd = int(p) % 2 != 0
        return Curve(name, f, df, _by_sign(CONVEX, CONCAVE if odd else CONVEX), _midpoint, pole=0.0)
    # other exponents: x >= 0 (x > 0 for p < 0), convex for p > 1 or p < 0, concave in between
    if p < 0:
        return Curve(name, f, df, CONVEX, _midpoint, lo_bound=0.0, open_lo=True)
    return Curve(name, f, df, CONVEX if p > 1 else CONCAVE, _midpoint, lo_bound=0.0, steep_at_lo=p < 1)


def curve_of(name: str, attrs) -> Curve:
    return power(float(attrs["exponent"])) if name == "pow" else FIXED[name]


FIXED = {c.name: c for c in (EXP, LOG, RECIPROCAL, SQRT, SOFTPLUS)}


# -- domain ---------------------------------------------------------------------------------------

def _in_domain(curve: Curve, l: torch.Tensor, u: torch.Tensor, what: str) -> torch.Tensor:
    """l raised to a closed domain's bound; DomainError where [l, u] leaves the domain."""
    def fail(mask, why):
        i = int(mask.flatten().nonzero()[0])
        raise DomainError(f"{curve.name}: {what} [{float(l.flatten()[i]):.6g}, {float(u.flatten()[i]):.6g}] "
                          f"(element {i}) {why}")

    if curve.pole is not None:
        bad = (l <= curve.pole) & (u >= curve.pole)
        if bool(bad.any()):
            fail(bad, f"contains {curve.pole:g}, where {curve.name} is not defined")
    if curve.lo_bound is not None:
        bad = (u <= curve.lo_bound) if curve.open_lo else (u < curve.lo_bound)
        bad = bad | ((l <= curve.lo_bound) if curve.open_lo else torch.zeros_like(bad))
        if bool(bad.any()):
            side = ">" if curve.open_lo else ">="
            fail(bad, f"reaches outside the domain x {side} {curve.lo_bound:g}")
        l = l.clamp(min=curve.lo_bound)
    return l


def _finite(curve: Curve, t: torch.Tensor, s: torch.Tensor, what: str) -> torch.Tensor:
    """t, or a DomainError naming the first element of the input interval s = stack(l, u) where
    t overflows (one reduction checks it: amax of |t| is NaN or infinite exactly then)."""
    if t.numel() and not math.isfinite(t.detach().abs().amax()):
        l, u = s
        bad = ~torch.isfinite(t).flatten(-l.dim()).reshape(-1, l.numel()).all(0)
        i = int(bad.nonzero()[0])
        raise DomainError(f"{curve.name}: {what} of the input interval [{float(l.flatten()[i]):.6g}, "
                          f"{float(u.flatten()[i]):.6g}] (element {i}) overflow {str(l.dtype)[6:]}")
    return t


# -- lines ----------------------------------------------------------------------------------------

def _tangent(curve: Curve, t):
    k = curve.df(t)
    return k, curve.f(t) - k * t


def _chord(curve: Curve, l, u):
    """(slope, intercept) of the chord; a point interval (l = u) gets the tangent at l."""
    fl, fu = curve.f(l), curve.f(u)
    point = u == l
    k = torch.where(point, curve.df(l), (fu - fl) / torch.where(point, torch.ones_like(u), u - l))
    return k, fl - k * l


def _ranges(curve: Curve, l, u):
    """Per neuron and line: whether it is a tangent (None: never, the curve being convex or
    concave throughout), and the range [a, b] of its tangent point."""
    point = u == l
    if isinstance(curve.kind, int):
        tangent = ~point
        lo_t, up_t = (tangent, None) if curve.kind == CONVEX else (None, tangent)
    else:
        kind = curve.kind(l, u)
        lo_t = (kind == CONVEX) & ~point
        up_t = (kind == CONCAVE) & ~point
    lo_a, lo_b, up_a, up_b = l, u, l, u
    if curve.steep_at_lo:                    # f' infinite at the domain's end: stay off it
        lo_a = up_a = torch.maximum(l, u * 1e-6)
    if curve.split is not None:
        c = curve.split
        mixed = (kind == MIXED) & ~point
        lo_t = lo_t | (mixed & (u > c * -l))
        up_t = up_t | (mixed & (-l > c * u))
        lo_a = torch.where(mixed, torch.minimum(c * -l, u), lo_a)
        up_b = torch.where(mixed, torch.maximum(c * -u, l), up_b)
    return (lo_t, lo_a, lo_b), (up_t, up_a, up_b)


def _point(a, b, alpha):
    return torch.minimum(torch.maximum(a + alpha * (b - a), a), b)


def _lines(curve: Curve, l, u, ranges, point):
    """(lower slope, lower intercept, upper slope, upper intercept): tangents at point(a, b,
    side) (side 0: the lower line) where a line is one, the chord elsewhere."""
    kc, bc = _chord(curve, l, u)
    out = []
    for side, (tangent, a, b) in enumerate(ranges):
        if tangent is None:
            out += [kc, bc]
            continue
        # tangent points only where used (elsewhere l, which every curve's f' accepts)
        k, icpt = _tangent(curve, torch.where(tangent, point(a, b, side), l))
        out += [torch.where(tangent, k, kc), torch.where(tangent, icpt, bc)]
    return tuple(out)


def lines_at(curve: Curve, l, u, alpha_lo, alpha_up, ranges=None):
    """The lines with the tangent points at fractions alpha of their ranges (alpha-CROWN)."""
    alphas = (alpha_lo, alpha_up)
    return _lines(curve, l, u, ranges or _ranges(curve, l, u), lambda a, b, side: _point(a, b, alphas[side]))


def crown_lines(curve: Curve, l, u, ranges=None):
    """CROWN's lines: its tangent points (module docstring) moved into their ranges, as
    crown_alphas' fractions would place them, without the round trip through a fraction."""
    t = curve.crown(l, u)
    return _lines(curve, l, u, ranges or _ranges(curve, l, u), lambda a, b, side: torch.clamp(t, a, b))


def crown_alphas(curve: Curve, l, u, ranges=None):
    """CROWN's tangent points as fractions of their ranges (module docstring); 0.5 for a line
    that is never a tangent."""
    t = curve.crown(l, u)

    def frac(tangent, a, b):
        if tangent is None:
            return torch.full_like(l, 0.5)
        width = b - a
        safe = torch.where(width > 0, width, torch.ones_like(width))
        return torch.where(width > 0, (t - a) / safe, torch.full_like(width, 0.5)).clamp(0, 1)
    return tuple(frac(*side) for side in (ranges or _ranges(curve, l, u)))


# -- kernels --------------------------------------------------------------------------------------

def _curve_kernels(name: str):
    def relax(ins, ps, attrs):
        curve = curve_of(name, attrs)
        l, u = ins[0]
        l = _in_domain(curve, l, u, "input interval")
        rows = torch.stack((*crown_lines(curve, l, u), l, u))
        _finite(curve, rows[:4], rows[4:], "the linear bounds")
        return (rows,)

    def backward_alpha(ins, ps, attrs):
        """backward with each row's tangent points at fractions alpha [B, 2, R, *shape] (lower
        line, upper line) of their ranges; without alpha (None), CROWN's lines."""
        a, bias, lines, alpha = ins[:4]
        if alpha is None:
            return lines_backward(ins[:3], ps, attrs)
        l, u = lines[4:6].unsqueeze(2)
        k_lo, b_lo, k_up, b_up = lines_at(curve_of(name, attrs), l, u, alpha[:, 0], alpha[:, 1])
        return _back(a, bias, k_lo, b_lo, k_up, b_up, halves(a, attrs))

    def alpha_start(op, env) -> torch.Tensor:
        a, lines = env[op.inputs[0]], env[op.inputs[2]]
        a_lo, a_up = crown_alphas(curve_of(name, op.attrs), lines[4], lines[5])    # [B, *shape]
        pair = torch.stack((a_lo, a_up), 1).unsqueeze(2)                          # [B, 2, 1, *shape]
        return pair.expand((a.shape[0], 2) + tuple(a.shape[1:])).clone()

    @binds
    def interval(ins, ps, attrs, out=(None,)):
        """The range of f over [l, u]: f at the ends (a lower end below a closed domain raised
        to its bound) and at the stationary point inside, all in one call of f, and both ends
        of the range in one reduction (this rule's time is mostly per call). One sum of the
        values checks the domain and overflow: it is NaN or infinite where the interval leaves
        the domain (f is NaN or infinite there: sqrt(-1), log(0)) or f overflows, or where finite
        values' sum does; only then are they looked at one by one, for the error (or none).
        A pole inside [l, u] leaves f finite: one reduction finds it."""
        curve = curve_of(name, attrs)
        (s,) = ins
        l, u = s
        ends = (2,) + (1,) * (s.dim() - 1)
        floor = None if curve.lo_bound is None or curve.open_lo else \
            constant((curve.lo_bound, -math.inf), s.dtype, s.device).view(ends)
        signs = None if curve.pole is None else constant((1.0, -1.0), s.dtype, s.device).view(ends)
        inside = None if curve.stationary is None else constant(curve.stationary, s.dtype, s.device)
        ends = extremes(out[0])

        def run():
            if signs is not None and s.numel():
                shifted = s - curve.pole if curve.pole else s
                if not shifted.mul(signs).amax(0).amin() > 0:    # max(l - pole, pole - u) <= 0 (or NaN)
                    _in_domain(curve, l, u, "input interval")
            points = s if floor is None else torch.clamp(s, min=floor)
            if inside is not None:                            # (the stationary point is in the domain)
                points = torch.cat((points, torch.clamp(inside, l, u).unsqueeze(0)))
            values = curve.f(points)
            bounds = ends(values)
            if not math.isfinite(values.sum().item()):
                _in_domain(curve, l, u, "input interval")
                _finite(curve, bounds, s, "the values")
            return (bounds,)

        # (f, then one compiled call for the rest: native.py)
        def fill(into):
            curve.f(s if floor is None else torch.clamp(s, min=floor, out=into), out=into)
        at = math.nan if curve.stationary is None else curve.stationary
        f_at = math.nan if inside is None else float(curve.f(torch.tensor(at, dtype=torch.float32)))
        pole = math.nan if curve.pole is None else curve.pole
        return native.elementwise_run(native._curve_range, (s,), out[0], run, fill, (pole, at, f_at)) or run

    def fp_interval(ins, ps, attrs):
        """f rounded by the library: `ulps` units in the last place of f."""
        s, raw = ins
        eps = unit_roundoff(raw.dtype)
        return fp.finish(raw, 2 * curve_of(name, attrs).ulps * eps * magnitude(raw), attrs["n"])

    def fp_lines(ins, ps, attrs):
        """e of the backward rules. With F = max |f| and K = max |f'| on [l, u] (at its ends: f
        is monotone or convex, f' monotone on each piece), every line's slope is at most K (a
        tangent inside, a chord by the mean value theorem) and its intercept at most F + K M
        (M = max |x|); computed ones are taken as they are where larger (a chord's rounding).
        The error: the products A * slope, the intercept sums over the layer, and how far a
        rounded line may cross f: `ulps` of f and f' at the tangent point carried along
        x - t, the intercept's own rounding (a chord's error is at its ends, f - line being
        convex or concave)."""
        curve = curve_of(name, attrs)
        s, lines = ins
        l, u = lines[4], lines[5]
        ends = torch.stack((l, u))
        big_f = curve.f(ends).abs().amax(0)
        big_k = curve.df(torch.where(ends == 0, torch.full_like(ends, curve.lo_bound or 0.0), ends)).abs()
        if curve.steep_at_lo:                              # f' at the lowest tangent point used
            big_k = torch.maximum(big_k[1], curve.df(torch.maximum(l, u * 1e-6)).abs())
        else:
            big_k = big_k.amax(0)
        big_k = torch.maximum(big_k.nan_to_num(0, 0, 0), lines[[0, 2]].abs().amax(0))
        m = magnitude(s)
        icpt = torch.maximum(big_f + big_k * m, lines[[1, 3]].abs().amax(0))
        eps = unit_roundoff(s.dtype)
        gap = 4 * curve.ulps * eps * (big_f + big_k * (u - l + m)) + 4 * eps * icpt
        n = math.prod(s.shape[2:]) + 4
        return (2 * (2 * eps * big_k * m + gamma(n, s.dtype) * icpt + gap) + slack(n, s.dtype),)

    return relax, backward_alpha, alpha_start, interval, fp_interval, fp_lines


def _forward(name: str):
    if name == "pow":
        return lambda x, attrs=None: torch.pow(x, float(attrs["exponent"]))
    f = FIXED[name].f
    return lambda x, attrs=None: f(x)


def _register(name: str) -> Op:
    relax, backward_alpha, alpha_start, interval, fp_interval, fp_lines = _curve_kernels(name)
    return register(Op(name, _forward(name), interval, sound(lines_backward), fp=fp_interval,
                       fp_params=lambda graph, node, dtype: [],
                       relaxation=Relaxation(relax, 6, fp_lines, sound(backward_alpha), alpha_start, params=2)))


OPS = {name: _register(name) for name in ("exp", "log", "reciprocal", "sqrt", "softplus", "pow")}


# -- frontends ------------------------------------------------------------------------------------

def unary(b, name: str, x: str) -> str:
    return b.emit(name, [x], out=b.output)


def pow_const(b, x: str, p: float) -> str:
    """x^p for a constant p: 1 is x itself, 0 the constant 1 (x * 0 + 1), others the pow op."""
    if not math.isfinite(p):
        b.unsupported(f"exponent {p} (only finite exponents are supported)")
    if p == 1:
        return b.affine(x, b.literal(1.0), out=b.output)
    if p == 0:
        return b.affine(x, b.literal(0.0), b.literal(1.0), out=b.output)
    return b.emit("pow", [x], {"exponent": p}, out=b.output)


def square(b, x: str) -> str:
    return pow_const(b, x, 2.0)


def _scalar_exponent(b, arr) -> float:
    if np.size(arr) != 1:
        b.unsupported(f"an exponent of shape {list(np.shape(arr))} (only a scalar exponent is supported)")
    return float(np.asarray(arr, dtype=np.float64).reshape(-1)[0])


for _name, _onnx, _aten in (("exp", "Exp", aten.exp.default), ("log", "Log", aten.log.default),
                            ("reciprocal", "Reciprocal", aten.reciprocal.default), ("sqrt", "Sqrt", aten.sqrt.default)):
    onnx_lowering(_onnx)(lambda b, name=_name: unary(b, name, b.var(b.input(0))))
    torch_lowering(_aten)(lambda b, name=_name: unary(b, name, b.var(b.arg(0))))


@onnx_lowering("Softplus")
def _onnx_softplus(b) -> str:
    return unary(b, "softplus", b.var(b.input(0)))


@torch_lowering(aten.softplus.default, keep_whole=True)
def _torch_softplus(b) -> str:
    """softplus(x, beta, threshold) = softplus(beta x) / beta. torch's threshold (linear above
    it) is a float32-level approximation; the op is the exact function."""
    x = b.var(b.arg(0))
    beta = b.arg(1, "beta", 1.0)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        b.unsupported(f"softplus beta {beta!r} (a positive number is supported)")
    if beta == 1:
        return unary(b, "softplus", x)
    y = b.emit("softplus", [b.affine(x, b.literal(float(beta)))])
    return b.affine(y, b.literal(Enclosed.exact(torch.tensor(float(beta))).reciprocal()), out=b.output)


@onnx_lowering("Pow")
def _onnx_pow(b) -> str:
    if not b.is_const(b.input(1)):
        b.unsupported("a variable exponent (only constant exponents are supported)")
    return pow_const(b, b.var(b.input(0)), _scalar_exponent(b, b.array(b.input(1), "exponent")))


@torch_lowering(aten.pow.Tensor_Scalar)
def _torch_pow(b) -> str:
    p = b.arg(1)
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        b.unsupported(f"exponent {p!r} (only a constant number is supported)")
    return pow_const(b, b.var(b.arg(0)), float(p))


@torch_lowering(aten.square.default)
def _torch_square(b) -> str:
    return square(b, b.var(b.arg(0)))
