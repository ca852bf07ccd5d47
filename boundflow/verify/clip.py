"""Clipping input domains to where their linear bounds still allow a violation.

A sound CROWN bound of spec row i over a box is a linear function a_i x + b_i that is at most
row i of the network's output everywhere in the box. A disjunct of the unsafe set needs every
one of its rows at or below its threshold t_i, so inside the box it can only be violated where
a_i x + b_i <= t_i for all of them: the box shrinks to the bounding box of that polytope (one
pass over the rows, each half-space cutting what the previous ones left), and a disjunct whose
polytope comes out empty is unreachable on the box. Input branch and bound then splits the
smaller box. Every cut is computed in float64 with its rounding error added and rounded outward
to float32, so what is cut holds no point of the polytope.
"""
from __future__ import annotations

import math

import torch

from boundflow.domains.rounding import down, gamma, rounded_up, slack, unit_roundoff, up


def halfspace(lo: torch.Tensor, hi: torch.Tensor, a: torch.Tensor, c: torch.Tensor):
    """The bounding box of {x in [lo, hi] : a x + c <= 0} (float64, [N, n] boxes, a [N, n],
    c [N]: a rounded value, e.g. b - t), enlarged by its rounding error; lo > hi somewhere where
    the set is empty.

    For input j, a_j x_j <= -c - sum_{k != j} min(a_k lo_k, a_k hi_k) =: r_j, so x_j <= r_j / a_j
    when a_j > 0 and x_j >= r_j / a_j when a_j < 0."""
    m = torch.minimum(a * lo, a * hi)
    low = c + m.sum(dim=1)                    # min over the box of a x + c
    r = m - low.unsqueeze(1)
    n = a.shape[1] + 5                        # the products, the sum, two subtractions, c's own
    err = 2 * gamma(n, a.dtype) * (c.abs() + 2 * m.abs().sum(dim=1)) + slack(n, a.dtype)
    q = r / a                                 # +-inf or NaN where a_j = 0: no cut (fmin/fmax)
    tol = up(up(err.unsqueeze(1) / a.abs()) + 2 * unit_roundoff(a.dtype) * q.abs())
    cut_hi = torch.where(a > 0, up(q + tol), torch.full_like(q, torch.inf))
    cut_lo = torch.where(a < 0, down(q - tol), torch.full_like(q, -torch.inf))
    void = (low > err).unsqueeze(1)           # a x + c > 0 on the whole box (a = 0 included)
    return torch.where(void, torch.inf, torch.fmax(lo, cut_lo)), torch.fmin(hi, cut_hi)


def combination(lo: torch.Tensor, hi: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                steps: int = 24) -> torch.Tensor:
    """Weights w >= 0 summing to 1 ([N, R]) for the rows a [N, R, n], c [N, R] whose combined
    row sum_j w_j (a_j x + c_j) has a large minimum over the box [lo, hi]: exponentiated
    supergradient ascent from equal weights, keeping the best weights seen (or the best row
    alone). A disjunct is unreachable where that minimum is positive (some row is then positive
    at every point), even where no single row is positive on the whole box: near the surfaces
    where its rows trade places. Any weights give a valid cut; these only make it deep."""
    N, R, _ = a.shape
    single = c + torch.minimum(a * lo.unsqueeze(1), a * hi.unsqueeze(1)).sum(dim=2)   # each row's minimum
    best, top = single.max(dim=1)             # the best row alone is where the search starts from
    best_w = torch.nn.functional.one_hot(top, R).to(a.dtype)
    w = torch.full((N, R), 1.0 / R, dtype=a.dtype, device=a.device)
    for step in range(steps):
        x = torch.where((w.unsqueeze(2) * a).sum(dim=1) >= 0, lo, hi)     # the box's minimiser
        rows = c + (a * x.unsqueeze(1)).sum(dim=2)                        # each row there
        value = (w * rows).sum(dim=1)
        better = value > best
        best, best_w = torch.where(better, value, best), torch.where(better.unsqueeze(1), w, best_w)
        g = rows / rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        w = w * torch.exp(g * (2.0 / math.sqrt(step + 1)))
        w = w / w.sum(dim=1, keepdim=True)
    return best_w


def combined(lo: torch.Tensor, hi: torch.Tensor, w: torch.Tensor, a: torch.Tensor, c: torch.Tensor):
    """(a', c'): a half-space a' x + c' <= 0 holding wherever every row a_j x + c_j <= 0 does
    (c_j rounded, as from b - t): sum_j w_j (a_j x + c_j) <= 0 there, and a', c' are its
    rounded coefficients, so c' takes their rounding over the box."""
    R = a.shape[1]
    g = 2 * gamma(R + 2, a.dtype)
    ac, cc = (w.unsqueeze(2) * a).sum(dim=1), (w * c).sum(dim=1)
    err = g * ((w.unsqueeze(2) * a.abs()).sum(dim=1) * torch.maximum(lo.abs(), hi.abs())).sum(dim=1) \
        + g * (w * c.abs()).sum(dim=1) + slack(R + 2, a.dtype)
    return ac, down(cc - up(err))


def clip(lo: torch.Tensor, hi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor,
         members: torch.Tensor, alive: torch.Tensor):
    """Domains [lo, hi] ([N, n] float32) clipped to their disjuncts' polytopes.

    a [N, S, n], b [N, S] (float64): row i's sound linear lower bound on the box; t [N, S]:
    its threshold; members [K, S] bool: the rows of each disjunct; alive [N, K]: the disjuncts
    not proven yet. Returns the new boxes (float32, inside the old ones; unchanged where no
    alive disjunct is left) and [N, K] bool: the alive disjuncts found unreachable."""
    lo64, hi64 = lo.double(), hi.double()
    new_lo, new_hi = torch.full_like(lo64, torch.inf), torch.full_like(hi64, -torch.inf)
    empty = torch.zeros_like(alive)
    for k in range(members.shape[0]):
        klo, khi = lo64, hi64
        rows = members[k].nonzero().flatten()
        c = b[:, rows] - t[:, rows]
        if len(rows) > 1:                     # the rows' best combination first
            w = combination(klo, khi, a[:, rows], c)
            klo, khi = halfspace(klo, khi, *combined(klo, khi, w, a[:, rows], c))
        for j in range(len(rows)):
            klo, khi = halfspace(klo, khi, a[:, rows[j]], c[:, j])
        gone = (klo > khi).any(dim=1) & alive[:, k]
        empty[:, k] = gone
        keep = (alive[:, k] & ~gone).unsqueeze(1)
        new_lo = torch.where(keep, torch.minimum(new_lo, klo), new_lo)
        new_hi = torch.where(keep, torch.maximum(new_hi, khi), new_hi)
    kept = new_lo[:, 0] <= new_hi[:, 0]       # some disjunct left: the union of their boxes
    out_lo = -rounded_up(-new_lo, torch.float32)
    out_hi = rounded_up(new_hi, torch.float32)
    return (torch.where(kept.unsqueeze(1), torch.maximum(lo, out_lo), lo),
            torch.where(kept.unsqueeze(1), torch.minimum(hi, out_hi), hi), empty)
