"""softmax: y = exp(x) / sum exp(x) over the last axis (the frontends move another axis last
with transposes). One op rather than exp, sum, reciprocal and a product, so that its interval is
exact and its lines see the whole row.

Interval, exact over a box: y_i grows with x_i and falls with every other x_j, so

  lower_i = 1 / (1 + sum_{j != i} exp(u_j - l_i))      upper_i = 1 / (1 + sum_{j != i} exp(l_j - u_i))

(an exp that overflows makes the bound 0, its limit; no cancellation, no 0 / 0).

Lines (Wei et al., "Convex bounds on the softmax function", AISTATS 2023; auto_LiRPA's default
BoundSoftmax), per row k of the softmax axis, with s = max_j u_j (any constant would do):

  lower  h_k(x) = exp(x_k - s) / g(x), g(x) = sum_j chord_j(x_j), chord_j the chord of
         exp(. - s) over [l_j, u_j]: g >= sum_j exp(x_j - s) on the box, so h_k <= y_k; and
         log h_k = x_k - s - log g is convex, so h_k is, and its tangent plane at any point x0 of
         the box bounds y_k from below
  upper  y_k = exp(-t_k), t_k = logsumexp(x) - x_k in [-log p̄_k, -log p̲_k] (p̲, p̄: the
         interval); exp(-t) is convex, so y_k <= p̄_k - c_k (t_k + log p̄_k) (its chord there,
         c_k >= 0), which is concave in x (logsumexp is convex): its tangent plane at any x0
         bounds y_k from above

CROWN puts both tangent points at the box's midpoint (auto_LiRPA); alpha-CROWN optimises them,
x0 = l + alpha (u - l) per row of A and neuron, alpha in [0, 1] (lower line, upper line; the
lower line's point of the coordinate with the largest u stays in the upper half of its interval,
which keeps g >= 1/2). A line is y0 + J (x - x0) with J = diag(d) - p q^T on each row of the
axis; the backward rule applies J without forming it (auto_LiRPA's BoundSoftmax does the same).
Where p̲ underflows to 0 the upper line is the constant p̄.

The relaxation tensor ("softmax.relax") holds rows (l, u, s, exp(l - s), chord slope, p̲, p̄, c);
p̲, p̄ are the interval widened by its rounding error bound, so the upper chord's range holds the
exact one. Then CROWN's lines, which every pass reads: the midpoint, the lower line's x0, y0 and
p, the upper line's y0 and q (RELAX_ROWS in all).
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

from boundflow.domains import fp
from boundflow.domains.linear import halves, sound
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.errors import DomainError
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering
from boundflow.ops.s_shaped import FUNCTION_ULPS

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder

aten = torch.ops.aten
RELAX_ROWS = 14
EXP_RANGE = 750.0          # |t| beyond which float64's exp(t) has under- or overflowed


def forward(x, attrs=None):
    return torch.softmax(x, -1)


# -- interval -------------------------------------------------------------------------------------

def _others(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[..., i, j] = y_j - x_i (the differences the interval rule exponentiates)."""
    return y.unsqueeze(-2) - x.unsqueeze(-1)


@functools.lru_cache(maxsize=64)
def _off_diagonal(n: int, device: torch.device) -> torch.Tensor:
    """The [n, n] mask of j != i, made once per size and device (outside inference mode: autograd
    may save it). Never modify it."""
    with torch.inference_mode(False):
        return ~torch.eye(n, dtype=torch.bool, device=device)


def bounds(s: torch.Tensor) -> torch.Tensor:
    """The exact interval of softmax over the box s = stack(l, u) (module docstring), both sides
    at once: 1 / (1 + sum_{j != i} exp(y_j - x_i)) with (x, y) = (l, u) for the lower bound and
    (u, l) for the upper one."""
    terms = torch.where(_off_diagonal(s.shape[-1], s.device), torch.exp(_others(s, s.flip(0))), 0.0)
    return torch.reciprocal(1 + terms.sum(-1))


def interval(ins, ps, attrs):
    return (bounds(ins[0]),)


def _bounds_error(l, u, lo, hi) -> torch.Tensor:
    """How far the computed interval may be from the exact one. With S = sum_{j != i} exp(d_ij)
    and y = 1 / (1 + S): each d_ij rounds once (u |d_ij|, carried through exp as a relative
    error), exp is off by FUNCTION_ULPS ulps, the sum by gamma(n); a relative error r of S moves
    y by y (1 - y) r <= y r, and 1 + S and the reciprocal round once each. An exp that under- or
    overflows only leaves errors below the underflow slack (|d| is capped at EXP_RANGE)."""
    eps = unit_roundoff(l.dtype)
    off = _off_diagonal(l.shape[-1], l.device)

    def rel(x, y):
        reach = torch.where(off, _others(x, y).abs().clamp(max=EXP_RANGE), x.new_zeros(())).amax(-1)
        return (FUNCTION_ULPS + 2 + reach) * eps + gamma(l.shape[-1] + 1, l.dtype)
    return torch.maximum(lo * rel(l, u), hi * rel(u, l)) + 3 * eps * hi


def fp_interval(ins, ps, attrs):
    s, raw = ins
    return fp.finish(raw, _bounds_error(s[0], s[1], raw[0], raw[1]), attrs["n"])


# -- relaxation -----------------------------------------------------------------------------------

def relax(ins, ps, attrs):
    """stack(lower, upper) of the input -> rows (l, u, s, exp(l - s), chord slope, p̲, p̄, c)."""
    l, u = ins[0]
    if not bool(torch.isfinite(ins[0]).all()):
        i = int((~torch.isfinite(ins[0])).flatten(1).any(0).nonzero()[0])
        raise DomainError(f"softmax: input interval [{float(l.flatten()[i]):.6g}, {float(u.flatten()[i]):.6g}] "
                          f"(element {i}) is not finite")
    lo, hi = bounds(ins[0])
    err = 2 * _bounds_error(l, u, lo, hi) + slack(l.shape[-1] + 4, l.dtype)
    lo, hi = (lo - err).clamp(min=0), (hi + err).clamp(max=1)
    s = u.amax(-1, keepdim=True).expand_as(u)
    e_l, e_u = torch.exp(l - s), torch.exp(u - s)
    width = u - l
    slope = torch.where(width > 0, (e_u - e_l) / torch.where(width > 0, width, torch.ones_like(width)),
                        torch.zeros_like(width))
    # c = p̄ (1 - r) / -log r, r = p̲ / p̄: the chord's slope in t (p̄ at r = 1, its limit); 0
    # where p̲ = 0 (the constant line p̄)
    r = lo / hi.clamp(min=torch.finfo(hi.dtype).tiny)
    safe = torch.where((r > 0) & (r < 1), r, torch.full_like(r, 0.5))
    c = torch.where(r < 1, hi * (1 - safe) / -torch.log(safe), hi)
    c = torch.where(r > 0, c, torch.zeros_like(c))
    rows = (l, u, s, e_l, slope, lo, hi, c)
    mid = (l + u) / 2
    x0, y0, _, p, _ = _lower_line(rows, mid)
    _, y0_up, _, _, q_up = _upper_line(rows, mid)
    return (torch.stack(rows + (mid, x0, y0, p, y0_up, q_up)),)


def _lower_line(lines, x0):
    """(x0, y0, d, p, q) of the tangent of h at x0: y0 = h(x0), J = diag(y0) - (y0 / g) slope^T.
    The coordinate with the largest u (u = s) keeps its tangent point in the upper half of its
    interval, so that its chord term, and g, stay >= 1/2 (no underflow; error bounds: fp_lines)."""
    l, u, s, e_l, slope = lines[:5]
    x0 = torch.where(u == s, torch.maximum(x0, (l + u) / 2), x0)
    g = (e_l + slope * (x0 - l)).sum(-1, keepdim=True)
    y0 = torch.exp(x0 - s) / g
    return x0, y0, y0, y0 / g, slope


def _upper_line(lines, x0):
    """(x0, y0, d, p, q) of the tangent of p̄ - c (t + log p̄) at x0: y0 there (t = -log
    softmax(x0)), J = c (I - 1 softmax(x0)^T) per row."""
    hi, c = lines[6], lines[7]
    used = c > 0
    log_hi = torch.log(torch.where(used, hi, torch.ones_like(hi)))
    y0 = torch.where(used, hi - c * (log_hi - torch.log_softmax(x0, -1)), hi)
    return x0, y0, c, c, torch.softmax(x0, -1)


def _apply(a, line):
    """A J and the constant A (y0 - J x0) of a line, J = diag(d) - p q^T on the last axis."""
    x0, y0, d, p, q = line
    aj = a * d - (a * p).sum(-1, keepdim=True) * q
    return aj, (a * y0).flatten(2).sum(-1) - (aj * x0).flatten(2).sum(-1)


def _back(a, bias, lower, upper, s: int):
    """Lower rows (the first s): positive coefficients take the lower line, negative ones the
    upper line; upper rows the other way round. Lines are [B, 1, *shape] (shared by every row)
    or [B, rows, *shape]."""
    def rows(line, low):
        return tuple(t if t.shape[1] == 1 else (t[:, :s] if low else t[:, s:]) for t in line)

    def side(a, low):
        pos_line, neg_line = (lower, upper) if low else (upper, lower)
        a_pos, c_pos = _apply(a.clamp(min=0), rows(pos_line, low))
        a_neg, c_neg = _apply(a.clamp(max=0), rows(neg_line, low))
        return a_pos + a_neg, c_pos + c_neg

    lo, up = side(a[:, :s], True), side(a[:, s:], False)
    return torch.cat([lo[0], up[0]], 1), bias + torch.cat([lo[1], up[1]], 1)


def backward(ins, ps, attrs):
    """CROWN's lines, as relax made them."""
    a, bias, lines = ins
    _, _, _, _, slope, _, _, c, mid, x0, y0, p, y0_up, q_up = lines.unsqueeze(2)
    return _back(a, bias, (x0, y0, y0, p, slope), (mid, y0_up, c, c, q_up), halves(a, attrs))


def backward_alpha(ins, ps, attrs):
    """backward with each row's tangent points at x0 = l + alpha (u - l), alpha [B, 2, R,
    *shape] (lower line, upper line); without alpha (None), CROWN's midpoints."""
    a, bias, lines, alpha = ins[:4]
    if alpha is None:
        return backward(ins[:3], ps, attrs)
    lines = lines.unsqueeze(2)
    l, u = lines[0], lines[1]

    def point(t):
        return torch.minimum(torch.maximum(l + t * (u - l), l), u)
    return _back(a, bias, _lower_line(lines, point(alpha[:, 0])), _upper_line(lines, point(alpha[:, 1])),
                 halves(a, attrs))


def alpha_start(op, env) -> torch.Tensor:
    """The midpoints, for both lines and every row of A: [B, 2, R, *shape]."""
    a = env[op.inputs[0]]
    return torch.full((a.shape[0], 2) + tuple(a.shape[1:]), 0.5, dtype=a.dtype, device=a.device)


def fp_lines(ins, ps, attrs):
    """e of the backward rules: how far a computed line may be from the exact tangent (at the
    computed x0, which is as good a tangent point as any) anywhere in the box, for any x0 in it,
    plus the rounding of the rule's own sums. First-order error terms, doubled at the end:

      lower  exp(l - s), exp(u - s), exp(x0 - s) are off by rel = (FUNCTION_ULPS + 2 + |l - s| +
             |u - s|) u relative (the shifts round, then exp); each chord term of g by 4 rel
             (exp(l - s) + exp(u - s)) (the chord's slope times a width too), so g (>= 1/2) by
             rho_g relative; y0 = h(x0) <= p̄ by rho_l, y0 / g <= 2 p̄ by rho_l + rho_g; the
             line's error at x is the error of y0 plus that of J times |x - x0| <= u - l (the
             chord slopes are at most exp(u - s) <= 1)
      upper  c is within (FUNCTION_ULPS + 6) u p̄ of the chord's slope times the t range; y0
             carries the error of log p̄ and of log_softmax(x0) (span = max u - min l of the
             row), J that of softmax(x0) <= p̄
      rule   A J and A (y0 - J x0): gamma(N + n + 4) (|y0| + d max|x_k| + p sum_j q_j max|x_j|)
    """
    box, lines = ins
    l, u, s, e_l, slope, lo, hi, c = lines[:8]
    dt, n = l.dtype, l.shape[-1]
    eps, width = unit_roundoff(dt), u - l
    m = magnitude(box)
    rule = gamma(math.prod(l.shape[1:]) + n + 4, dt)

    def row_sum(t):
        return t.sum(-1, keepdim=True)

    # lower line
    rel = (FUNCTION_ULPS + 2 + (l - s).abs() + (u - s).abs()) * eps
    term = 4 * rel * (e_l + torch.exp(u - s))
    rho_g = 2 * row_sum(term) + gamma(n + 2, dt)
    rho_l = rel + rho_g + 2 * eps
    lower = rho_l * hi * (1 + width) + 2 * hi * row_sum((rho_l + rho_g) * slope * width + term)
    lower = lower + rule * 2 * hi * (1 + m + row_sum(slope * m))
    # upper line (c = 0: the constant p̄, exact)
    span = u.amax(-1, keepdim=True) - l.amin(-1, keepdim=True)
    used = c > 0
    log_lo = torch.log(torch.where(used, lo, torch.ones_like(lo))).abs()
    d_lsm = (2 * FUNCTION_ULPS + n + 6 + 2 * span + 2 * log_lo) * eps
    rho_sm = (FUNCTION_ULPS + 4 + span) * eps + gamma(n + 1, dt)
    upper = (FUNCTION_ULPS + 14) * eps * hi + c * (FUNCTION_ULPS * eps * (log_lo + 1) + d_lsm + rho_sm * row_sum(hi * width))
    upper = torch.where(used, upper + rule * (2 * hi + c * m + c * row_sum(hi * m)), rule * hi)
    return (2 * torch.maximum(lower, upper) + slack(math.prod(l.shape[1:]) + n + 4, dt),)


SOFTMAX = register(Op(
    "softmax", forward, interval, sound(backward), fp_interval, fp_params=lambda graph, node, dtype: [],
    relaxation=Relaxation(relax, RELAX_ROWS, fp_lines, sound(backward_alpha), alpha_start, params=2)))


# -- frontends ------------------------------------------------------------------------------------

def softmax(b: Builder, x: str, axis: int, out: str | None) -> str:
    """softmax over `axis`: the op over the last axis, between two transposes for another."""
    rank = len(b.shape(x))
    axis = b.axis(axis, rank)
    if axis == rank - 1:
        return b.emit("softmax", [x], out=out)
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]                # a swap: its own inverse
    return b.transpose(b.emit("softmax", [b.transpose(x, perm)]), perm, out)


@onnx_lowering("Softmax")
def _onnx_softmax(b) -> str:
    if b.opset < 13:                    # before 13: softmax over the flattened axes from `axis` on
        b.unsupported("Softmax before opset 13 (over flattened trailing axes); export with opset >= 13")
    return softmax(b, b.var(b.input(0)), int(b.attr("axis", -1)), b.output)


@torch_lowering(aten._softmax.default, aten.softmax.int)
def _torch_softmax(b) -> str:
    return softmax(b, b.var(b.arg(0)), int(b.arg(1, "dim")), b.output)
