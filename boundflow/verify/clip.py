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

import torch

from boundflow.domains.rounding import down, gamma, rounded_up, slack, unit_roundoff, up


def halfspace(lo: torch.Tensor, hi: torch.Tensor, a: torch.Tensor, c: torch.Tensor):
    """The bounding box of {x in [lo, hi] : a x + c <= 0} (float64, [N, n] boxes, a [N, n],
    c [N]), enlarged by its rounding error; lo > hi somewhere where the set is empty.

    For input j, a_j x_j <= -c - sum_{k != j} min(a_k lo_k, a_k hi_k) =: r_j, so x_j <= r_j / a_j
    when a_j > 0 and x_j >= r_j / a_j when a_j < 0."""
    m = torch.minimum(a * lo, a * hi)
    r = m - (c.unsqueeze(1) + m.sum(dim=1, keepdim=True))
    n = a.shape[1] + 4                        # the products, the sum, the two subtractions
    err = 2 * gamma(n, a.dtype) * (c.abs() + 2 * m.abs().sum(dim=1)).unsqueeze(1) + slack(n, a.dtype)
    q = r / a                                 # +-inf or NaN where a_j = 0: no cut (fmin/fmax)
    tol = up(up(err / a.abs()) + 2 * unit_roundoff(a.dtype) * q.abs())
    cut_hi = torch.where(a > 0, up(q + tol), torch.full_like(q, torch.inf))
    cut_lo = torch.where(a < 0, down(q - tol), torch.full_like(q, -torch.inf))
    return torch.fmax(lo, cut_lo), torch.fmin(hi, cut_hi)


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
        for i in members[k].nonzero().flatten().tolist():
            klo, khi = halfspace(klo, khi, a[:, i], b[:, i] - t[:, i])
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
