"""Softmax (boundflow/ops/softmax.py: one op, exact interval, LSE tangent-plane lines),
LayerNormalization and the quotient of two variables (boundflow/ops/normalise.py: mappings
composed of reduce_sum, reciprocal, sqrt, pow and mul): softmax's interval is the exact range
and its lines bound it for CROWN's and any alpha's tangent points (wide and far-off boxes too),
its float error bounds hold against float64; forward equal to onnxruntime and torch (softmax over
any axis), every method (float32 and sound_fp) contains sampled points and corners, both
frontends, clear errors. (The tiny attention block of ../shared/golden_ops is in
tests/test_golden_ops.py: as tight as auto_LiRPA's bounds.)"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import boundflow
from boundflow.domains.concrete import evaluate
from boundflow.domains.rounding import unit_roundoff
from boundflow.errors import DomainError, UnsupportedOpError
from boundflow.ops import softmax
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


class Axes(nn.Module):
    """Softmax over each axis of [2, 3, 4] (transposes around the op for all but the last), and
    over an axis of one element."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = 3 * self.a(x)
        parts = [torch.softmax(h, -3), torch.softmax(h, -2), torch.softmax(h, -1), torch.softmax(h[..., :1], -1)]
        return torch.cat(parts, -1).sum(-3)


CASES = {"attention": (Attention, (1, 3, 4)), "ratio": (Ratio, (1, 3)), "axes": (Axes, (1, 2, 3, 4))}


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


# -- softmax's rules ------------------------------------------------------------------------------

def _softmax_boxes(seed: int, n: int, dtype=torch.float64) -> torch.Tensor:
    """stack(lower, upper) [2, 2, 3, n]: rows of narrow and wide intervals (widths 1e-3 .. 300),
    near 0 and far off (centres up to 1e3), points among them."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (torch.rand((2, 3, n), generator=g, dtype=torch.float64) * 5 - 3)
    c = torch.randn((2, 3, n), generator=g, dtype=torch.float64) * scale + \
        torch.randn((2, 3, 1), generator=g, dtype=torch.float64) * 10.0 ** torch.randint(0, 4, (2, 3, 1), generator=g)
    w = torch.rand((2, 3, n), generator=g, dtype=torch.float64) * scale
    w[0, 0] = 0                                                                   # a row of points
    return torch.stack((c - w, c + w)).to(dtype)


def _extremes(box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax_i at the corner minimising it (x_i = l_i, others u) and at the one maximising it."""
    l, u = box.double()
    n = l.shape[-1]
    eye = torch.eye(n, dtype=torch.bool)
    lo_pt = torch.where(eye, l.unsqueeze(-2), u.unsqueeze(-2))                     # [..., i, j]
    hi_pt = torch.where(eye, u.unsqueeze(-2), l.unsqueeze(-2))
    return torch.softmax(lo_pt, -1).diagonal(dim1=-2, dim2=-1), torch.softmax(hi_pt, -1).diagonal(dim1=-2, dim2=-1)


def _points(box: torch.Tensor, g: torch.Generator, k: int = 40) -> torch.Tensor:
    """[k, *shape] float64 points of the box: corners, ends and middles, uniform."""
    l, u = box.double()
    t = torch.rand((k,) + tuple(l.shape), generator=g, dtype=torch.float64)
    t[: k // 2] = torch.randint(0, 3, (k // 2,) + tuple(l.shape), generator=g) / 2
    return l + (u - l) * t


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("seed", range(4))
def test_softmax_interval_is_the_exact_range(n, seed):
    box = _softmax_boxes(seed, n)
    (got,) = softmax.interval([box], [], {})
    want_lo, want_hi = _extremes(box)
    assert torch.isfinite(got).all()
    assert torch.allclose(got[0], want_lo, rtol=1e-12, atol=1e-300)
    assert torch.allclose(got[1], want_hi, rtol=1e-12, atol=1e-300)
    ys = torch.softmax(_points(box, torch.Generator().manual_seed(seed)), -1)
    assert (ys >= got[0] * (1 - 1e-12)).all() and (ys <= got[1] * (1 + 1e-12)).all()


@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", ["crown", "random", "ends"])
@pytest.mark.parametrize("lower_only", [False, True])
def test_softmax_lines_bound_every_row(n, seed, alpha, lower_only):
    """A backward step through softmax: for points of the box, lower rows give A' x + bias <=
    A softmax(x), upper rows >=, at CROWN's tangent points and at any alpha."""
    g = torch.Generator().manual_seed(100 + seed)
    box = _softmax_boxes(seed, n)
    (lines,) = softmax.relax([box], [], {})
    S = 4
    rows = S if lower_only else 2 * S
    a = torch.randn((2, rows, 3, n), generator=g, dtype=torch.float64)
    bias = torch.randn((2, rows), generator=g, dtype=torch.float64)
    attrs = {"lower_only": True} if lower_only else {}
    if alpha == "crown":
        new_a, new_bias = softmax.backward([a, bias, lines], [], attrs)
    else:
        t = torch.rand((2, 2, rows, 3, n), generator=g, dtype=torch.float64)
        new_a, new_bias = softmax.backward_alpha([a, bias, lines, t.round() if alpha == "ends" else t], [], attrs)
    assert torch.isfinite(new_a).all() and torch.isfinite(new_bias).all()
    x = _points(box, g)
    exact = (a.unsqueeze(0) * torch.softmax(x, -1)[:, :, None]).flatten(3).sum(-1) + bias      # [k, B, rows]
    linear = (new_a.unsqueeze(0) * x[:, :, None]).flatten(3).sum(-1) + new_bias
    scale = 1e-9 * (a.abs().flatten(2).sum(-1) + (new_a.abs() * box.abs().amax(0)[:, None]).flatten(2).sum(-1) + 1)
    s = rows if lower_only else S
    assert (linear[..., :s] <= exact[..., :s] + scale[:, :s]).all()
    assert (linear[..., s:] >= exact[..., s:] - scale[:, s:]).all()


def test_softmax_crown_lines_are_the_midpoint_tangents():
    """alpha = 1/2 for both lines is CROWN (auto_LiRPA's midpoints), and the start of alpha-CROWN."""
    box = _softmax_boxes(7, 4)
    (lines,) = softmax.relax([box], [], {})
    a = torch.randn((2, 6, 3, 4), dtype=torch.float64)
    bias = torch.zeros(2, 6, dtype=torch.float64)
    half = torch.full((2, 2, 6, 3, 4), 0.5, dtype=torch.float64)
    crown = softmax.backward([a, bias, lines], [], {})
    alpha = softmax.backward_alpha([a, bias, lines, half], [], {})
    for x, y in zip(crown, alpha):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_softmax_float_error_bounds_hold(seed):
    """The sound_fp kernels run in float32 (where rounding is large enough to see): the widened
    interval contains the float64 range, and every row's widened bound from the lines holds
    against float64 softmax at points of the box."""
    g = torch.Generator().manual_seed(200 + seed)
    n = 1 + seed
    box64 = _softmax_boxes(seed, n)
    box = box64.float()
    box64 = box.double()                                     # the float32 box, taken as exact
    (raw,) = softmax.interval([box], [], {})
    wide, e = softmax.fp_interval([box, raw], [], {"n": n + 4})
    want_lo, want_hi = _extremes(box64)
    assert (wide[0].double() <= want_lo).all() and (wide[1].double() >= want_hi).all()
    assert (e <= 1e4 * unit_roundoff(torch.float32) * (raw[1] + 1e-30)).all()           # small, not useless
    (lines,) = softmax.relax([box], [], {})
    (err,) = softmax.fp_lines([box, lines], [], {})
    assert torch.isfinite(err).all()
    a = torch.randn((2, 8, 3, n), generator=g)
    bias = torch.zeros(2, 8)
    t = torch.rand((2, 2, 8, 3, n), generator=g)
    new_a, new_bias = softmax.SOFTMAX.relaxation.optimised([a, bias, lines, t, err], [], {"fp": True})
    x = _points(box64, g)
    exact = (a.double().unsqueeze(0) * torch.softmax(x, -1)[:, :, None]).flatten(3).sum(-1)
    linear = (new_a.double().unsqueeze(0) * x[:, :, None]).flatten(3).sum(-1) + new_bias.double()
    assert (linear[..., :4] <= exact[..., :4]).all() and (linear[..., 4:] >= exact[..., 4:]).all()


def test_softmax_is_one_op_and_refuses_an_infinite_interval():
    torch.manual_seed(0)
    graph, _ = boundflow.load_model(Attention().eval(), torch.zeros(1, 3, 4))
    ops = [n.op for n in graph.nodes]
    assert ops.count("softmax") == 1 and "exp" not in ops
    box = torch.tensor([[[0.0, -math.inf]], [[1.0, 2.0]]], dtype=torch.float64)
    with pytest.raises(DomainError, match="softmax: input interval .* not finite"):
        softmax.relax([box], [], {})
