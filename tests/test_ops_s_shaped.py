"""Sigmoid and tanh (boundflow/ops/s_shaped.py): the relaxation's lines bound the function on
their interval, for CROWN's tangent points and for any point alpha-CROWN may choose; the
tangent-point table is what it claims."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from boundflow.ops import s_shaped as S

SHAPES = [S.SIGMOID, S.TANH]


def _intervals(seed: int, n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals of every kind: convex, concave, across 0, tiny, points, beyond the table."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 4)      # 1e-4 .. 1e2
    c = torch.randn(n, generator=g, dtype=torch.float64) * scale
    w = torch.rand(n, generator=g, dtype=torch.float64) * scale
    l, u = c - w, c + w
    l[: n // 20] = u[: n // 20]                                                    # points
    return l, u


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.sampled_from(SHAPES), st.integers(0, 2**31), st.booleans())
def test_lines_bound_the_function(shape, seed, crown):
    l, u = _intervals(seed)
    mirror = S.mirrored(l, u, shape.tangent_point(u), -shape.tangent_point(-l))
    alpha = None if crown else torch.rand((2,) + l.shape, generator=torch.Generator().manual_seed(seed + 1),
                                          dtype=torch.float64)
    k_lo, b_lo, k_up, b_up = S.lines_at(shape, *mirror, alpha)
    for t in (k_lo, b_lo, k_up, b_up):
        assert torch.isfinite(t).all()
    x = l[:, None] + (u - l)[:, None] * torch.linspace(0, 1, 257, dtype=torch.float64)[None]
    fx = shape.f(x)
    slack = 1e-13 * (1 + fx.abs())          # float64 evaluation of f and of the lines
    assert (k_lo[:, None] * x + b_lo[:, None] <= fx + slack).all()
    assert (k_up[:, None] * x + b_up[:, None] >= fx - slack).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_tangent_table(shape):
    """d(U) <= 0, its tangent passes under f at U, and it is the largest such point (a tangent a
    little to its right crosses f before U)."""
    table = shape.table
    upper = S.GRID_STEP * torch.arange(len(table), dtype=torch.float64)
    assert (table <= 0).all()
    k = shape.df(table)
    assert (shape.f(table) + k * (upper - table) <= shape.f(upper)).all()
    right = table + 1e-6
    far = upper > 0.1
    crossed = shape.f(right) + shape.df(right) * (upper - right) > shape.f(upper)
    assert crossed[far].all()
    assert torch.isinf(shape.tangent_point(torch.tensor([S.GRID_LIMIT + 1.0], dtype=torch.float64))).all()


def test_crown_is_the_midpoint_tangent_in_the_convex_case():
    l, u = torch.tensor([-3.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    shape = S.SIGMOID
    mirror = S.mirrored(l, u, shape.tangent_point(u), -shape.tangent_point(-l))
    ranges = S.lower_ranges(shape, *mirror)
    a_lo = S.crown_alpha(*mirror, ranges)[0]
    k_lo, b_lo, k_up, b_up = S.lines_at(shape, *mirror)
    m = torch.tensor([-2.0], dtype=torch.float64)
    assert torch.allclose(k_lo, shape.df(m)) and torch.allclose(k_lo * m + b_lo, shape.f(m))
    chord = (shape.f(u) - shape.f(l)) / (u - l)
    assert torch.allclose(k_up, chord)
    assert math.isclose(float(a_lo), 0.5)
