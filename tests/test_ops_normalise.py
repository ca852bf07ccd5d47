"""Softmax, LayerNormalization and the quotient of two variables (boundflow/ops/normalise.py:
mappings composed of exp, reduce_sum, reciprocal, sqrt, pow and mul): forward equal to
onnxruntime and torch, every method (float32 and sound_fp) contains sampled points and corners,
both frontends, a clear error for a divisor whose interval holds 0, and the tiny attention block
of ../shared/golden_ops (sound everywhere; alpha-CROWN within 2% of auto_LiRPA's width)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import boundflow
from boundflow.domains.concrete import evaluate
from boundflow.errors import DomainError, UnsupportedOpError
from golden import load_fixture
from nets import export_onnx, onnx_runner, sample_box

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")


class Attention(nn.Module):
    """One head of self-attention with a residual and LayerNorm, as the ViT benchmarks build it."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.o = nn.Linear(d, 2)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 2.0, dim=-1)
        return self.o(self.ln(x + att @ self.v(x)).mean(-2))


class Ratio(nn.Module):
    """x0 / (softplus(x1) + 0.5) and softmax over two logits, without LayerNorm's scale."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.ln = nn.LayerNorm(3, elementwise_affine=False)

    def forward(self, x):
        q = self.a(x) / (nn.functional.softplus(self.b(x)) + 0.5)
        return torch.cat([self.ln(q), torch.softmax(q, dim=-1)], -1)


CASES = {"attention": (Attention, (1, 3, 4)), "ratio": (Ratio, (1, 3))}


def _box(shape, eps):
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return (x0 - eps).unsqueeze(0), (x0 + eps).unsqueeze(0)


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_onnxruntime_and_torch(tmp_path, case):
    cls, shape = CASES[case]
    torch.manual_seed(0)
    module = cls().eval()
    path = export_onnx(module, torch.zeros(shape), tmp_path / f"{case}.onnx")
    pts = torch.randn((16,) + shape)
    want = torch.cat([module(p) for p in pts]).reshape(16, -1)
    for model in (path, module):
        graph, _ = boundflow.load_model(model, torch.zeros(shape) if model is module else None)
        with torch.no_grad():
            got = evaluate(graph, pts)[0].reshape(16, -1)
        assert torch.allclose(got, want.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(onnx_runner(path)(pts.reshape(16, -1)).float(), want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("frontend", ["onnx", "torch"])
@pytest.mark.parametrize("sound_fp", [False, True], ids=["float32", "sound_fp"])
def test_every_method_sound(tmp_path, case, frontend, sound_fp):
    cls, shape = CASES[case]
    torch.manual_seed(0)
    module = cls().eval()
    path = export_onnx(module, torch.zeros(shape), tmp_path / f"{case}.onnx")
    model = path if frontend == "onnx" else module
    lo, hi = _box(shape, 0.1)
    pts = sample_box(lo[0].reshape(-1), hi[0].reshape(-1), 600, 200)
    with torch.no_grad():
        ys = module(pts.reshape((-1,) + shape)).reshape(len(pts), -1).double()
    for method in METHODS:
        res = boundflow.bound(model, lo, hi, method, sound_fp=sound_fp)
        lb, ub = res.lb[0].double(), res.ub[0].double()
        tol = 1e-5 * ys.abs().clamp(min=1)
        assert (ys >= lb - tol).all() and (ys <= ub + tol).all(), (method, (lb - ys).max(), (ys - ub).max())
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all()


def test_divisor_across_zero_fails_clearly(tmp_path):
    class Across(nn.Module):
        def forward(self, x):
            return x[:, :1] / x[:, 1:]

    path = export_onnx(Across(), torch.ones(1, 2), tmp_path / "across.onnx")
    with pytest.raises(DomainError, match="reciprocal"):
        boundflow.bound(path, -torch.ones(1, 1, 2), torch.ones(1, 1, 2), "crown")


def test_softmax_before_opset_13_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    with pytest.raises(UnsupportedOpError, match="opset"):
        boundflow.load_model(model)


@pytest.mark.parametrize("name", ["attention_tiny__eps0.02", "attention_tiny__eps0.1"])
@pytest.mark.parametrize("method,key", [("ibp", "IBP"), ("crown-ibp", "CROWN-IBP"), ("crown", "CROWN"),
                                        ("alpha-crown", "alpha-CROWN")])
def test_attention_fixture(shared, name, method, key):
    """Sound on the fixture's 2,000 onnxruntime samples; alpha-CROWN within 2% of auto_LiRPA's
    mean width. (Not yet as tight as auto_LiRPA's IBP, CROWN-IBP and CROWN, which bound softmax
    as one op: ours composes it, see the module docstring of boundflow/ops/normalise.py.)"""
    fx = load_fixture(shared, name, "golden_ops")
    lb, ub = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method=method, C=fx.C)
    lb, ub = lb[0].double(), ub[0].double()
    emp_lo, emp_hi = (t.double() for t in fx.empirical)
    tol = 1e-5 * emp_lo.abs().clamp(min=1)
    assert (lb <= emp_lo + tol).all() and (ub >= emp_hi - tol).all()
    ref = fx.reference(key)
    if method == "alpha-crown" and ref is not None:
        width, ref_width = (ub - lb).mean().item(), (ref[1] - ref[0]).double().mean().item()
        assert width <= 1.02 * ref_width, (width, ref_width)
