"""The product of two perturbed tensors (boundflow/ops/mul.py): McCormick planes bound x y on
their box for CROWN's choice and for every alpha; the interval and backward rules; forward equal
to onnxruntime (with broadcasting); every method, float32 and sound_fp, contains sampled points
(corners included) of random product networks and of matrix products of two variables (MatMul,
Gemm: sums of products); the torch frontend; clear errors; and verdicts
of `boundflow verify` on product networks (input splitting, and ReLU branch and bound with a
product beside the ReLUs)."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import boundflow
from boundflow.cli import main
from boundflow.domains.concrete import evaluate
from boundflow.errors import UnsupportedOpError
from boundflow.ops import mul
from boundflow.verify.verifier import VerifyConfig, verify

from nets import export_onnx, onnx_runner, sample_box
from test_relu_bab import property_text, spec_values
from test_verify import assert_counterexample

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
SETTINGS = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _boxes(seed: int, n: int, shape=()) -> tuple[torch.Tensor, ...]:
    """(lx, ux, ly, uy) [n, *shape] float64: boxes on either side of 0 and across it, of widths
    1e-4 .. 1e2, points among them."""
    g = torch.Generator().manual_seed(seed)

    def side():
        scale = 10.0 ** (torch.rand((n,) + shape, generator=g, dtype=torch.float64) * 6 - 4)
        c = torch.randn((n,) + shape, generator=g, dtype=torch.float64) * scale
        w = torch.rand((n,) + shape, generator=g, dtype=torch.float64) * scale
        w[: n // 20] = 0                                                            # points
        return c - w, c + w
    return (*side(), *side())


def _grid(lo: torch.Tensor, hi: torch.Tensor, k: int = 9) -> torch.Tensor:
    """k points from lo to hi (both ends included) along a new last axis."""
    return lo[..., None] + (hi - lo)[..., None] * torch.linspace(0, 1, k, dtype=torch.float64)


# -- the relaxation ---------------------------------------------------------------------------------

def _crown_planes(lx, ux, ly, uy):
    """CROWN's planes L1, U1 as mul.relax lays them out for the backward rule."""
    (lines,) = mul.relax([torch.stack((lx, ux)), torch.stack((ly, uy))], [], {})
    lx, ux, ly, uy, ly2, lxly, lxuy, lxly2 = lines
    assert torch.equal(ly2, ly) and torch.equal(lxly2, lxly)
    return (ly, lx, lxly), (uy, lx, lxuy)


@settings(SETTINGS, max_examples=12)
@given(st.integers(0, 2**31), st.sampled_from(["crown", "zero", "one", "random"]))
def test_planes_bound_the_product(seed, which):
    """On a 9 x 9 grid of each box (corners included): lower plane <= x y <= upper plane."""
    lx, ux, ly, uy = _boxes(seed, 2000)
    if which == "crown":
        lower, upper = _crown_planes(lx, ux, ly, uy)
    else:
        g = torch.Generator().manual_seed(seed + 1)
        r_lo, r_up = ({"zero": torch.zeros_like, "one": torch.ones_like}[which](lx) if which != "random"
                      else torch.rand(lx.shape, generator=g, dtype=torch.float64) for _ in range(2))
        lower, upper = mul.planes(lx, ux, ly, uy, r_lo, r_up)
    x = _grid(lx, ux)[:, :, None]                                  # [n, 9, 1]
    y = _grid(ly, uy)[:, None, :]                                  # [n, 1, 9]
    xy = x * y

    def at(plane):
        kx, ky, c = (t[:, None, None] for t in plane)
        return kx * x + ky * y + c
    slack = 1e-12 * (1 + (x.abs() * y.abs()))
    assert (at(lower) <= xy + slack).all()
    assert (at(upper) >= xy - slack).all()


def test_crown_planes_are_the_ends_of_the_optimised_ones():
    """r = 1 gives CROWN's planes exactly (auto_LiRPA's L1, U1); r = 0 the other McCormick pair."""
    lx, ux, ly, uy = _boxes(7, 500)
    one, zero = torch.ones_like(lx), torch.zeros_like(lx)
    for got, want in zip(mul.planes(lx, ux, ly, uy, one, one), _crown_planes(lx, ux, ly, uy)):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    lower, upper = mul.planes(lx, ux, ly, uy, zero, zero)
    for a, b in zip(lower, (uy, ux, -(ux * uy))):
        assert torch.equal(a, b)
    for a, b in zip(upper, (ly, ux, -(ux * ly))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lower_only", [False, True])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 1), (1, 4)), ((1, 4), (3, 4))])
def test_crown_backward_is_the_generic_rule_at_r_1(shapes, lower_only):
    """The CROWN rule (both halves at once, slices of the relax tensor) gives what the generic
    rule gives with every r = 1, broadcast operands' sums included."""
    g = torch.Generator().manual_seed(5)
    bounds = []
    for shape in shapes:
        c, w = torch.randn((2,) + shape, generator=g), torch.rand((2,) + shape, generator=g)   # 2 regions
        bounds.append(torch.stack((c - w, c + w)))
    (lines,) = mul.relax(bounds, [], {})
    rows = 3 if lower_only else 6
    a = torch.randn((2, rows) + tuple(lines.shape[2:]), generator=g)
    a[a.abs() < 0.3] = 0.0
    bias = torch.randn(2, rows, generator=g)
    attrs = {"shapes": [list(s) for s in shapes], "lower_only": lower_only}
    fast = mul.backward([a, bias, lines], [], attrs)
    generic = mul.backward_alpha([a, bias, lines, torch.ones((2, 2) + tuple(a.shape[1:]))], [], attrs)
    for f, want in zip(fast, generic):
        assert f.shape == want.shape
        assert torch.equal(f, want)


def test_interval_is_the_range_of_the_product():
    """The least and largest corner product, and every grid point in between."""
    lx, ux, ly, uy = _boxes(3, 2000)
    (s,) = mul.interval([torch.stack((lx, ux)), torch.stack((ly, uy))], [], {})
    corners = [[a * b for a in (lx[i], ux[i]) for b in (ly[i], uy[i])] for i in range(len(lx))]
    assert s[0].tolist() == [min(c).item() for c in corners]
    assert s[1].tolist() == [max(c).item() for c in corners]
    xy = (_grid(lx, ux)[:, :, None] * _grid(ly, uy)[:, None, :]).flatten(1)
    slack = (1e-13 * torch.maximum(lx.abs(), ux.abs()) * torch.maximum(ly.abs(), uy.abs()))[:, None]  # the grid's rounding
    assert (s[0][:, None] <= xy + slack).all() and (s[1][:, None] >= xy - slack).all()


SHAPES = [((3, 4), (3, 4)), ((3, 4), (1, 4)), ((3, 1), (1, 4)), ((2, 1, 3), (2, 4, 1))]


@pytest.mark.parametrize("shapes", SHAPES + [((2, 3, 4), (4,)), ((4,), (2, 1, 4))])
def test_interval_of_broadcast_operands_is_the_corner_range(shapes):
    """Operands of broadcast shapes (of one rank: one crosswise product; of two ranks: the
    four products one by one) give, bit for bit, the least and largest corner product."""
    g = torch.Generator().manual_seed(9)
    sx, sy = (torch.randn((2,) + shape, generator=g).sort(0).values for shape in shapes)
    (got,) = mul.interval([sx, sy], [], {})
    corners = torch.stack(torch.broadcast_tensors(*(a * b for a in sx for b in sy)))
    assert torch.equal(got, torch.stack((corners.amin(0), corners.amax(0))))


@settings(SETTINGS, max_examples=30)
@given(st.integers(0, 2**31), st.sampled_from(SHAPES), st.booleans(), st.booleans())
def test_backward_bounds_every_row(seed, shapes, optimised, lower_only):
    """A backward step through mul: for points (x, y) of the boxes (broadcast shapes too), lower
    rows give A_x x + A_y y + bias <= A (x y), upper rows >= (any alpha in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = shapes
    out = torch.broadcast_shapes(xs, ys)
    B, S = 2, 3
    sx, sy = (torch.sort(torch.randn((2, B) + s, generator=g, dtype=torch.float64), 0).values for s in (xs, ys))
    (lines,) = mul.relax([sx, sy], [], {})
    rows = S if lower_only else 2 * S
    a = torch.randn((B, rows) + out, generator=g, dtype=torch.float64)
    attrs = {"shapes": [list(xs), list(ys)], **({"lower_only": True} if lower_only else {})}
    bias = torch.zeros(B, rows, dtype=torch.float64)
    if optimised:
        alpha = torch.rand((B, 2, rows) + out, generator=g, dtype=torch.float64)
        ax, ay, b = mul.backward_alpha([a, bias, lines, alpha], [], attrs)
    else:
        ax, ay, b = mul.backward([a, bias, lines], [], attrs)
    assert ax.shape == (B, rows) + xs and ay.shape == (B, rows) + ys
    for _ in range(30):
        x = sx[0] + (sx[1] - sx[0]) * torch.randint(0, 3, sx[0].shape, generator=g) / 2   # ends and middles
        y = sy[0] + (sy[1] - sy[0]) * torch.rand(sy[0].shape, generator=g, dtype=torch.float64)
        exact = (a * (x * y).unsqueeze(1)).flatten(2).sum(-1)
        linear = (ax * x.unsqueeze(1)).flatten(2).sum(-1) + (ay * y.unsqueeze(1)).flatten(2).sum(-1) + b
        s = rows if lower_only else S
        assert (linear[:, :s] <= exact[:, :s] + 1e-9).all()
        assert (linear[:, s:] >= exact[:, s:] - 1e-9).all()


# -- networks with a product of two branches -----------------------------------------------------

ACTS = {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class Product(nn.Module):
    """c(f(a x) * g(b x)), optionally times a third branch again (a product of a product), and
    with b of width 1 (broadcast against a's width)."""

    def __init__(self, n_in: int, width: int, f: str, g: str, broadcast: bool, nested: bool):
        super().__init__()
        self.a, self.b = nn.Linear(n_in, width), nn.Linear(n_in, 1 if broadcast else width)
        self.f, self.g = ACTS[f](), ACTS[g]()
        self.d = nn.Linear(n_in, width) if nested else None
        self.c = nn.Linear(width, 2)

    def forward(self, x):
        p = self.f(self.a(x)) * self.g(self.b(x))
        if self.d is not None:
            p = torch.relu(p) * self.d(x)
        return self.c(p)


@st.composite
def products(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    module = Product(draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.sampled_from(sorted(ACTS))),
                     draw(st.sampled_from(sorted(ACTS))), draw(st.booleans()), draw(st.booleans()))
    return module.eval()


@settings(SETTINGS, max_examples=6)
@given(products(), st.integers(0, 1000), st.sampled_from([0.05, 0.5]))
def test_every_method_contains_samples(module, seed, eps):
    n_in = module.a.in_features
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, n_in, generator=gen)
    lo, hi = x0 - eps, x0 + eps
    pts = sample_box(lo[0], hi[0], 600, 200, gen)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(module, x0, os.path.join(tmp, "net.onnx"))
        y = onnx_runner(path)(pts)
        graph, _ = boundflow.load_model(path)
        assert "mul" in {n.op for n in graph.nodes}
        assert torch.allclose(evaluate(graph, pts[:16].unsqueeze(1))[0].reshape(16, -1).double(), y[:16], atol=1e-6)
        widths = {}
        for sound_fp in (False, True):
            for method in METHODS:
                lb, ub = boundflow.compute_bounds(path, lo, hi, method=method, sound_fp=sound_fp)
                lb, ub = lb[0].double(), ub[0].double()
                tol = 1e-5 * y.abs().clamp(min=1)
                assert (lb <= y + tol).all() and (ub >= y - tol).all(), (method, sound_fp)
                widths[method, sound_fp] = (ub - lb).mean().item()
    for sound_fp in (False, True):      # alpha-CROWN starts at CROWN and keeps its best
        assert widths["alpha-crown", sound_fp] <= widths["crown", sound_fp] * (1 + 1e-6) + 1e-9


class Broadcasts(nn.Module):
    """Products of variables of different ranks and shapes: [1, 3, 4] * [4] and [1, 3, 1] * [1, 1, 4]."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(3, 12), nn.Linear(3, 4), nn.Linear(3, 3), nn.Linear(3, 4)

    def forward(self, x):
        u = self.a(x).reshape(1, 3, 4) * torch.tanh(self.b(x)).reshape(4)
        v = self.c(x).reshape(1, 3, 1) * self.d(x).reshape(1, 1, 4)
        return (u * v).reshape(1, 12)


def test_broadcasting_forward_equals_onnxruntime_and_bounds_hold(tmp_path):
    torch.manual_seed(0)
    module = Broadcasts().eval()
    x0 = torch.randn(1, 3)
    path = export_onnx(module, x0, tmp_path / "broadcast.onnx")
    graph, _ = boundflow.load_model(str(path))
    assert sum(n.op == "mul" for n in graph.nodes) == 3
    lo, hi = x0 - 0.1, x0 + 0.1
    pts = sample_box(lo[0], hi[0], 400, 8)
    y = onnx_runner(path)(pts)
    assert torch.allclose(evaluate(graph, pts.unsqueeze(1))[0].reshape(len(pts), -1).double(), y, atol=1e-6)
    for method in METHODS:
        for sound_fp in (False, True):
            lb, ub = boundflow.compute_bounds(str(path), lo, hi, method=method, sound_fp=sound_fp)
            tol = 1e-5 * y.abs().clamp(min=1)
            assert (lb[0].double() <= y + tol).all() and (ub[0].double() >= y - tol).all(), (method, sound_fp)


@pytest.mark.parametrize("method", METHODS)
def test_torch_frontend(method):
    """aten.mul.Tensor of two variables (broadcast) lowers to mul; the bounds contain samples."""
    torch.manual_seed(1)
    module = Product(3, 4, "tanh", "none", True, True).eval()
    x0 = torch.randn(1, 3)
    graph, _ = boundflow.load_model(module, x0)
    assert sum(n.op == "mul" for n in graph.nodes) == 2
    lo, hi = x0 - 0.2, x0 + 0.2
    pts = sample_box(lo[0], hi[0], 400, 8)
    with torch.no_grad():
        y = module(pts)
    assert torch.allclose(evaluate(graph, pts.unsqueeze(1))[0].reshape(len(pts), -1), y, atol=1e-6)
    lb, ub = boundflow.compute_bounds(module, lo, hi, method=method)
    assert (lb[0] <= y + 1e-5).all() and (ub[0] >= y - 1e-5).all()


# -- matrix products of two variables ---------------------------------------------------------------

class Attention(nn.Module):
    """Two heads of q @ k^T, a tanh (for the softmax, not supported yet), then @ v: [1, 3, 4] -> [1, 18]."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 6)

    def heads(self, t):
        return t.reshape(1, 3, 2, 3).transpose(1, 2)

    def forward(self, x):
        scores = self.heads(self.q(x)) @ self.heads(self.k(x)).transpose(-1, -2)      # [1, 2, 3, 3]
        return (torch.tanh(scores) @ self.heads(self.v(x))).reshape(1, 18)


class Vectors(nn.Module):
    """[k] @ [k, n] and [n, k] @ [k]: vectors promoted and their unit axis dropped."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 8), nn.Linear(3, 8)

    def forward(self, x):
        u = self.a(x).reshape(4)
        return torch.cat([(u @ self.b(x).reshape(4, 2)).reshape(1, 2), (self.c(x).reshape(2, 4) @ u).reshape(1, 2)], 1)


def _gemm_of_two_variables(path) -> str:
    """alpha A @ B + C, A [2, 3] and B [3, 2] both from the input [1, 6]."""
    from onnx import helper

    from nets import onnx_file
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(6, 6, generator=g).numpy(), torch.randn(6, 6, generator=g).numpy()
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Reshape", ["h1", "s1"], ["a"]),
             helper.make_node("MatMul", ["x", "w2"], ["h2"]), helper.make_node("Reshape", ["h2", "s2"], ["b"]),
             helper.make_node("Gemm", ["a", "b", "c"], ["g"], alpha=0.5),
             helper.make_node("Reshape", ["g", "s3"], ["y"])]
    inits = {"w1": w1, "w2": w2, "s1": torch.tensor([2, 3]).numpy(), "s2": torch.tensor([3, 2]).numpy(),
             "c": torch.randn(2, 2, generator=g).numpy(), "s3": torch.tensor([1, 4]).numpy()}
    return onnx_file(nodes, inits, [1, 6], [1, 4], path)


@pytest.mark.parametrize("name", ["attention", "vectors", "gemm"])
def test_matmul_of_two_variables(tmp_path, name):
    """ONNX MatMul / Gemm of two variables: the forward rule equals onnxruntime; every method,
    float32 and sound_fp, contains sampled points (corners included); alpha-CROWN no looser
    than CROWN."""
    torch.manual_seed(2)
    if name == "gemm":
        path, x0 = _gemm_of_two_variables(tmp_path / "gemm.onnx"), torch.randn(1, 6)
    else:
        module, x0 = (Attention(), torch.randn(1, 3, 4)) if name == "attention" else (Vectors(), torch.randn(1, 3))
        path = export_onnx(module.eval(), x0, tmp_path / f"{name}.onnx")
    graph, _ = boundflow.load_model(str(path))
    assert "mul" in {n.op for n in graph.nodes}
    lo, hi = x0 - 0.05, x0 + 0.05
    pts = sample_box(lo[0], hi[0], 80, 32).reshape((-1,) + tuple(x0.shape[1:]))
    y = onnx_runner(path)(pts)
    assert torch.allclose(evaluate(graph, pts.unsqueeze(1))[0].reshape(len(pts), -1).double(), y, atol=1e-5)
    widths = {}
    for method in METHODS:
        for sound_fp in (False, True):
            lb, ub = boundflow.compute_bounds(str(path), lo, hi, method=method, sound_fp=sound_fp)
            tol = 1e-5 * y.abs().clamp(min=1)
            assert (lb[0].double() <= y + tol).all() and (ub[0].double() >= y - tol).all(), (method, sound_fp)
            widths[method, sound_fp] = (ub - lb).mean().item()
    assert widths["alpha-crown", False] <= widths["crown", False] * (1 + 1e-6)


def test_matmul_torch_frontend():
    torch.manual_seed(4)
    module, x0 = Attention().eval(), torch.randn(1, 3, 4)
    graph, _ = boundflow.load_model(module, x0)
    assert sum(n.op == "mul" for n in graph.nodes) == 2
    lo, hi = x0 - 0.05, x0 + 0.05
    pts = sample_box(lo[0], hi[0], 100, 32)
    with torch.no_grad():
        y = torch.cat([module(p[None]) for p in pts])
    assert torch.allclose(evaluate(graph, pts.unsqueeze(1))[0].reshape(len(pts), -1), y, atol=1e-5)
    lb, ub = boundflow.compute_bounds(module, lo, hi, method="crown")
    assert (lb[0] <= y + 1e-5).all() and (ub[0] >= y - 1e-5).all()


# -- clear errors -------------------------------------------------------------------------------------

class Square(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3)

    def forward(self, x):
        h = self.a(x)
        return h * h


def test_square_is_its_own_op(tmp_path):
    """mul relaxes two different operands; x * x (one value twice) is the square (ops/convex.py),
    whose lines are tighter than McCormick's on one value."""
    path = export_onnx(Square(), torch.zeros(1, 2), tmp_path / "square.onnx")
    for model in (str(path), Square()):
        graph, _ = boundflow.load_model(model, torch.zeros(1, 2) if isinstance(model, nn.Module) else None)
        kinds = {n.op for n in graph.nodes}
        assert "pow" in kinds and "mul" not in kinds, sorted(kinds)


# -- verification ---------------------------------------------------------------------------------------

class Difference(nn.Module):
    """y = (x0 + x1) (x0 - x1) = x0^2 - x1^2: on [0, 1]^2 its range is [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.plus, self.minus = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.plus.weight.copy_(torch.tensor([[1.0, 1.0]]))
            self.minus.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x):
        return self.plus(x) * self.minus(x)


def _box(n_in: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + "(declare-const Y_0 Real)\n" + \
        "".join(f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 1.0))\n" for i in range(n_in))


@pytest.mark.parametrize("threshold,verdict", [(1.1, "holds"), (0.9, "violated")])
def test_verify_product(capsys, tmp_path, threshold, verdict):
    """`boundflow verify`, unsafe: y >= threshold. 1.1 is above the maximum 1 (McCormick alone
    gives 2: input splitting proves it); 0.9 is reached near x = (1, 0), a counterexample that
    onnxruntime confirms."""
    path = export_onnx(Difference(), torch.zeros(1, 2), tmp_path / "difference.onnx")
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_box(2) + f"(assert (>= Y_0 {threshold}))\n")
    out = tmp_path / "res.txt"
    # --timeout counts from the start of the process (here: pytest's), hence the large value
    assert main(["verify", str(path), str(prop), "--timeout", "3600", "--results", str(out)]) == 0
    assert capsys.readouterr().out.startswith(verdict)
    assert out.read_text().splitlines()[0] == {"holds": "unsat", "violated": "sat"}[verdict]
    if verdict == "violated":
        assert_counterexample(path, prop, verify(path, prop, timeout=20))


class ReluProduct(nn.Module):
    """c(relu(a x) * b x): ReLU branch and bound splits the ReLU, the product stays relaxed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) * self.b(x))


def test_relu_branch_and_bound_beside_a_product(tmp_path):
    """Verdicts agree with sampling: just above the sampled minimum never "holds", well below
    it "holds" (through ReLU splitting, with the product's own optimised planes)."""
    module = ReluProduct().eval()
    lo, hi = -torch.ones(3), torch.ones(3)
    pts = sample_box(lo, hi, 4000, 8)
    with torch.no_grad():
        values = spec_values(module(pts).double())
    low, spread = float(values.min()), float(values.max() - values.min())
    path = export_onnx(module, torch.zeros(1, 3), tmp_path / "relu_product.onnx")
    config = VerifyConfig(split="relu", refine_min_inputs=0)
    for threshold, want in ((low + 0.02 * spread + 1e-4, "violated"), (low - 0.3 * spread, "holds")):
        prop = tmp_path / "p.vnnlib"
        prop.write_text(property_text(3, 2, lo, hi, threshold))
        res = verify(path, prop, timeout=30, config=config)
        assert res.verdict == want, (threshold, low, res.stats)
