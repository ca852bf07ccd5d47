"""Bounds against auto_LiRPA 0.7.1 (../shared/golden): IBP, CROWN-IBP, textbook CROWN
(crown_interm="pure") and the default CROWN (crown_interm="sparse", auto_LiRPA's default
intermediate bounds) match to 1e-5 relative / 1e-6 absolute; every method contains the
fixtures' sampled outputs."""
from __future__ import annotations

import pytest
import torch

import boundflow
from golden import FIXTURES, load_fixture

EXACT = [("ibp", "IBP", "sparse"), ("crown-ibp", "CROWN-IBP", "sparse"), ("crown", "CROWN:pure_interm", "pure"),
         ("crown", "CROWN", "sparse")]


def _close(ours, ref):
    # 1e-5 relative and 1e-6 absolute, as the issue asks
    return torch.allclose(ours.double(), ref.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("method,key,interm", EXACT, ids=[k for _, k, _ in EXACT])
def test_matches_auto_lirpa(shared, name, method, key, interm):
    fx = load_fixture(shared, name)
    lb, ub = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method=method, C=fx.C,
                                      crown_interm=interm)
    ref_lb, ref_ub = fx.reference(key)
    assert lb.shape == (1, len(ref_lb))
    assert _close(lb[0], ref_lb), f"lb diff {(lb[0] - ref_lb).abs().max():.3e}"
    assert _close(ub[0], ref_ub), f"ub diff {(ub[0] - ref_ub).abs().max():.3e}"


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("interm", ["sparse", "intersect"])
def test_crown_at_least_as_tight_as_auto_lirpa(shared, name, interm):
    fx = load_fixture(shared, name)
    lb, ub = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method="crown", C=fx.C,
                                      crown_interm=interm)
    if interm == "intersect" and name == "permute_net__eps0.2":
        # the adaptive lower slope makes CROWN non-monotone in its intermediate bounds: tighter
        # intermediate bounds give a looser output here (documented in PlannerConfig)
        pytest.xfail("intersect mode is not monotone")
    ref_lb, ref_ub = fx.reference("CROWN")
    tol = 1e-6 + 1e-5 * ref_lb.abs().clamp(min=1)
    assert (lb[0] >= ref_lb - tol).all(), f"looser lb by {(ref_lb - lb[0]).max():.3e}"
    tol = 1e-6 + 1e-5 * ref_ub.abs().clamp(min=1)
    assert (ub[0] <= ref_ub + tol).all(), f"looser ub by {(ub[0] - ref_ub).max():.3e}"


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("method,interm", [("ibp", "sparse"), ("crown-ibp", "sparse"), ("crown", "sparse"),
                                           ("crown", "intersect"), ("crown", "pure")])
def test_contains_empirical_range(shared, name, method, interm):
    """The fixtures' 2000 onnxruntime samples (corners included) lie inside our bounds."""
    fx = load_fixture(shared, name)
    lb, ub = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method=method, C=fx.C,
                                      crown_interm=interm)
    emp_lo, emp_hi = fx.empirical
    tol = 1e-5 * emp_lo.abs().clamp(min=1)
    assert (lb[0] <= emp_lo + tol).all()
    assert (ub[0] >= emp_hi - tol).all()


@pytest.mark.parametrize("name", FIXTURES)
def test_alpha_crown_close_to_auto_lirpa(shared, name):
    """alpha-CROWN with the fixtures' budget (20 iterations, lr 0.1): sound, never looser than
    CROWN, and a mean width at most 2% above auto_LiRPA's."""
    fx = load_fixture(shared, name)
    lb, ub = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method="alpha-crown", C=fx.C)
    ref_lb, ref_ub = fx.reference("alpha-CROWN")
    crown_lb, crown_ub = fx.reference("CROWN")
    emp_lo, emp_hi = fx.empirical
    tol = 1e-5 * emp_lo.abs().clamp(min=1)
    assert (lb[0] <= emp_lo + tol).all() and (ub[0] >= emp_hi - tol).all()
    assert (lb[0] >= crown_lb - 1e-5 * crown_lb.abs().clamp(min=1)).all()
    assert (ub[0] <= crown_ub + 1e-5 * crown_ub.abs().clamp(min=1)).all()
    width, ref_width = (ub - lb).mean().item(), (ref_ub - ref_lb).mean().item()
    assert width <= 1.02 * ref_width, f"mean width {width:.6g} vs auto_LiRPA {ref_width:.6g}"
