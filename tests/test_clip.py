"""Clipping input domains to their linear bounds' polytopes (verify/clip.py): every point of the
polytope stays, checked in exact rational arithmetic on the points that decide the bounding
box, and the cuts are as deep as they should be."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boundflow.verify.clip import clip, halfspace


def _exact(x) -> Fraction:
    return Fraction(float(x))


def _extremes(lo, hi, a, c):
    """For each input j with a_j != 0: the point of {a x + c <= 0} in the box (if any) with x_j
    as large (a_j > 0) or small (a_j < 0) as it gets, in exact rationals: every other input at
    the end that makes a x smallest, x_j where a x + c = 0, clamped into the box."""
    n = len(a)
    ends = [lo[k] if a[k] >= 0 else hi[k] for k in range(n)]
    points = []
    for j in range(n):
        if a[j] == 0:
            continue
        rest = c + sum(a[k] * ends[k] for k in range(n) if k != j)
        x = list(ends)
        x[j] = min(max(-rest / a[j], lo[j]), hi[j])
        if sum(a[k] * x[k] for k in range(n)) + c <= 0:
            points.append(x)
    return points


floats = st.floats(-4, 4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.integers(1, 6), st.data())
def test_a_halfspace_cut_keeps_every_point_of_it(n, data):
    ends = [sorted(data.draw(st.tuples(floats, floats))) for _ in range(n)]
    lo = [e[0] for e in ends]
    hi = [e[1] for e in ends]
    a = [data.draw(st.one_of(st.just(0.0), floats)) for _ in range(n)]
    c = data.draw(st.floats(-20, 20, allow_nan=False))
    t_lo, t_hi, t_a = (torch.tensor([v], dtype=torch.float64) for v in (lo, hi, a))
    new_lo, new_hi = halfspace(t_lo, t_hi, t_a, torch.tensor([c], dtype=torch.float64))
    assert (new_lo >= t_lo).all() and (new_hi <= t_hi).all()
    q = lambda v: [_exact(x) for x in v]
    points = _extremes(q(lo), q(hi), q(a), _exact(c))
    for x in points:
        for j in range(n):
            assert _exact(new_lo[0, j]) <= x[j] <= _exact(new_hi[0, j]), (j, x, new_lo, new_hi)
    if not points:                     # the set may still be a sliver the cut's rounding keeps
        return
    assert (new_lo <= new_hi).all()


def test_cuts_are_deep_and_empty_sets_are_found():
    """x0 <= 0.25, x0 >= 0.5 and x0 + x1 <= -0.5 on the unit square: the first two cut it to
    within float32 steps of the exact bounds, the third finds no point (proven)."""
    lo, hi = torch.zeros(3, 2), torch.ones(3, 2)
    a = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)   # one row each
    b = torch.tensor([[-0.25], [0.5], [0.5]], dtype=torch.float64)
    t = torch.zeros(3, 1, dtype=torch.float64)
    members, alive = torch.ones(1, 1, dtype=torch.bool), torch.ones(3, 1, dtype=torch.bool)
    new_lo, new_hi, empty = clip(lo, hi, a, b, t, members, alive)
    assert new_lo.dtype == torch.float32 and empty.tolist() == [[False], [False], [True]]
    assert 0.25 <= new_hi[0, 0].item() < 0.25 + 1e-6 and new_lo[0, 0] == 0 and new_hi[0, 1] == 1
    assert 0.5 - 1e-6 < new_lo[1, 0].item() <= 0.5 and new_hi[1, 0] == 1
    assert torch.equal(new_lo[2], lo[2]) and torch.equal(new_hi[2], hi[2])   # nothing left: the box stays


def test_rows_that_clear_only_together_prove_the_disjunct():
    """x0 + x1 <= 0.5 and x0 + x1 >= 0.6 on the unit square: each row alone leaves points
    (the first cuts the box to [0, 0.5]^2, the second cuts nothing), cutting by one and then
    the other leaves [0.1, 0.5]^2, and their combination shows that no point meets both."""
    lo, hi = torch.zeros(1, 2), torch.ones(1, 2)
    a = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]], dtype=torch.float64)
    b = torch.tensor([[-0.5, 0.6]], dtype=torch.float64)
    t = torch.zeros(1, 2, dtype=torch.float64)
    alive = torch.ones(1, 1, dtype=torch.bool)
    _, _, empty = clip(lo, hi, a, b, t, torch.ones(1, 2, dtype=torch.bool), alive)
    assert empty.tolist() == [[True]]
    for row in range(2):                            # one row at a time: a cut, no proof
        one = torch.zeros(1, 2, dtype=torch.bool)
        one[0, row] = True
        new_lo, new_hi, empty = clip(lo, hi, a, b, t, one, alive)
        assert empty.tolist() == [[False]]
        expect = torch.full((1, 2), 0.5 if row == 0 else 1.0)
        assert (new_hi >= expect).all() and (new_hi < expect + 1e-6).all() and new_lo.tolist() == [[0, 0]]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31))
def test_clipped_boxes_keep_every_sampled_violation(n, rows, seed):
    """Disjuncts of several rows, some already proven: every sampled point that meets all rows
    of an alive disjunct (exactly) stays inside the clipped box, and its disjunct is not
    declared empty."""
    rng = np.random.default_rng(seed)
    N, K = 4, 2
    lo = torch.tensor(rng.uniform(-1, 0, (N, n)), dtype=torch.float32)
    hi = lo + torch.tensor(rng.uniform(0, 1, (N, n)), dtype=torch.float32)
    S = K * rows
    a = torch.tensor(np.round(rng.standard_normal((N, S, n)), 2))
    b = torch.tensor(np.round(rng.standard_normal((N, S)), 2))
    t = torch.tensor(np.round(rng.standard_normal((N, S)) * 0.5, 2))
    members = torch.zeros(K, S, dtype=torch.bool)
    for k in range(K):
        members[k, k * rows:(k + 1) * rows] = True
    alive = torch.tensor(rng.random((N, K)) < 0.8)
    new_lo, new_hi, empty = clip(lo, hi, a, b, t, members, alive)
    assert (new_lo >= lo).all() and (new_hi <= hi).all() and not (empty & ~alive).any()
    for d in range(N):
        u = rng.random((60, n))
        corners = np.array(np.meshgrid(*[[0.0, 1.0]] * n)).reshape(n, -1).T
        for x in np.concatenate([u, corners]):
            p = (lo[d].double() + torch.tensor(x) * (hi[d] - lo[d]).double()).float().double()
            p = torch.minimum(torch.maximum(p, lo[d].double()), hi[d].double())
            for k in range(K):
                if not alive[d, k]:
                    continue
                meets = all(sum(_exact(a[d, i, j]) * _exact(p[j]) for j in range(n)) + _exact(b[d, i]) <= _exact(t[d, i])
                            for i in members[k].nonzero().flatten().tolist())
                if meets:
                    assert not empty[d, k]
                    assert all(_exact(new_lo[d, j]) <= _exact(p[j]) <= _exact(new_hi[d, j]) for j in range(n))
