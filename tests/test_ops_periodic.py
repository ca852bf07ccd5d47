"""Sin and cos (boundflow/ops/periodic.py): the lines bound the function on their interval and
touch it (no slack), for CROWN's tangent points and any alpha; the tangent-point table is what it
claims; the interval rule is the exact range; forward equals onnxruntime; every method (float32
and sound_fp) contains sampled points of small networks with the op between layers, from both
frontends; `boundflow verify` decides a small property both ways."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from torch import nn

import boundflow
from boundflow.domains.concrete import evaluate
from boundflow.ops import periodic as P
from nets import export_onnx, onnx_file, onnx_runner

PERIODIC = [P.SIN, P.COS]
METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
DENSE = torch.linspace(0, 1, 513, dtype=torch.float64)


def _intervals(seed: int, n: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals of every kind: tiny to longer than 2 pi, centres up to +-30, points."""
    g = torch.Generator().manual_seed(seed)
    width = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 5 - 4) * 8      # 8e-4 .. 80
    c = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 60
    l, u = c - width / 2, c + width / 2
    l[: n // 20] = u[: n // 20]
    return l, u


def _grid(l, u):
    """513 points of each [l, u], both ends exactly."""
    return torch.minimum(l[:, None] + (u - l)[:, None] * DENSE[None], u[:, None])


def _periodic_lines(op, l, u, alpha, shifted=True):
    """The lines (k_lo, b_lo, k_up, b_up) at CROWN's tangent points (alpha None) or at alpha;
    unshifted: as the tangent ranges and the chord decision make them, before the violation shift."""
    a, e, has = P.tangent_range(op, l, u)
    return P.lines(op, l, u, a, e, has, P.crown_alpha(l, u, a, e) if alpha is None else alpha, shifted)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.sampled_from(PERIODIC), st.integers(0, 2**31), st.sampled_from(["crown", 0.0, 1.0, "random"]))
def test_periodic_lines_bound_and_touch(op, seed, alpha):
    """lower <= f <= upper on a dense grid, and each line touches f (the lines of the envelope:
    a tangent in the interval, the chord, or the constant at an extremum); before the violation
    shift too, up to the table's grid (the tangent ranges and the chord decision are right)."""
    l, u = _intervals(seed)
    if alpha == "random":
        alpha = torch.rand(l.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    elif alpha != "crown":
        alpha = torch.full_like(l, alpha)
    x = _grid(l, u)
    fx = op.f(x)
    spacing = (u - l) / 512
    for shifted in (False, True):
        k_lo, b_lo, k_up, b_up = _periodic_lines(op, l, u, None if alpha == "crown" else alpha, shifted)
        below = fx - (k_lo[:, None] * x + b_lo[:, None])
        above = (k_up[:, None] * x + b_up[:, None]) - fx
        # unshifted, only the table's grid (tangent ranges a little too short) may leave a tiny miss
        tol = 1e-12 if shifted else 1e-9
        assert below.min() >= -tol and above.min() >= -tol
        # touching: 0 up to the grid's resolution (a tangent point between grid points)
        assert (below.amin(1) <= 1e-12 + spacing ** 2).all() and (above.amin(1) <= 1e-12 + spacing ** 2).all()


def test_periodic_long_intervals_are_flat_and_troughs_take_the_midpoint_tangent():
    l = torch.tensor([0.0, 3.5, 1.5 * math.pi - 0.5], dtype=torch.float64)
    u = torch.tensor([2 * math.pi, 20.0, 1.5 * math.pi + 0.5], dtype=torch.float64)
    k_lo, b_lo, k_up, b_up = _periodic_lines(P.SIN, l, u, None)
    ones = torch.ones(2, dtype=torch.float64)
    assert torch.equal(k_lo[:2], 0 * ones) and torch.equal(b_lo[:2], -ones)
    assert torch.equal(k_up[:2], 0 * ones) and torch.equal(b_up[:2], ones)
    # the trough around 3 pi / 2: the tangent at the midpoint below, the chord above
    assert math.isclose(k_lo[2].item(), 0.0, abs_tol=1e-15) and math.isclose(b_lo[2].item(), -1.0)
    chord = (torch.sin(u[2]) - torch.sin(l[2])) / (u[2] - l[2])
    assert math.isclose(k_up[2].item(), chord.item(), abs_tol=1e-15)


def test_tangent_table():
    """T(v) in [0, pi/2]; its tangent stays under -cos up to v; a little further right it does
    not (the table is tight); pi/2 up to v = pi/2 and 0 from 2 pi on."""
    v = P.GRID_STEP * torch.arange(len(P.TABLE), dtype=torch.float64)
    t = P.TABLE
    assert ((t >= 0) & (t <= math.pi / 2)).all()
    assert (t[v <= math.pi / 2] == math.pi / 2).all() and (t[v >= 2 * math.pi] == 0).all()
    x = torch.linspace(-8, 1, 2001, dtype=torch.float64)[None] * v[:, None].clamp(min=1)
    x = torch.minimum(x, v[:, None])
    tangent = -torch.cos(t)[:, None] + torch.sin(t)[:, None] * (x - t[:, None])
    assert (tangent <= -torch.cos(x) + 1e-13).all()
    inner = (v > math.pi / 2 + 0.01) & (v < 2 * math.pi - 0.1)
    r = (t + 1e-6)[inner]
    crossed = -torch.cos(r) + torch.sin(r) * (v[inner] - r) > -torch.cos(v[inner])
    assert crossed.all()


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.sampled_from(PERIODIC), st.integers(0, 2**31))
def test_periodic_interval_is_the_range(op, seed):
    l, u = _intervals(seed)
    (lo, hi), = P._interval(op)([torch.stack((l, u))], [], {})
    fx = op.f(_grid(l, u))
    assert (lo <= fx.amin(1)).all() and (hi >= fx.amax(1)).all()
    spacing = (u - l) / 512
    assert (lo >= fx.amin(1) - spacing ** 2).all() and (hi <= fx.amax(1) + spacing ** 2).all()


@pytest.mark.parametrize("op", PERIODIC)
def test_periodic_contains_finds_every_trough_and_no_distant_one(op):
    """A float32 interval around a trough of either wave (phase + 2 pi k, k up to +-2000: the
    float32 neighbours of its rounding hold it) is found to hold it, and so the interval rule
    gives -1 / 1 there; an interval 0.1 to 0.2 past it is not."""
    k = torch.arange(-2000, 2001, dtype=torch.float64)
    for wave, phase in enumerate(op.phases):
        trough = (phase + P.TWO_PI * k).float()
        around = torch.stack((torch.nextafter(trough, trough - 1), torch.nextafter(trough, trough + 1)))
        assert P.contains(op, around)[wave].all()
        (lo, hi), = P._interval(op)([around], [], {})
        assert ((lo if wave == 0 else hi) == (-1.0 if wave == 0 else 1.0)).all()
        past = torch.stack((trough.double() + 0.1, trough.double() + 0.2)).float()
        assert not P.contains(op, past)[wave].any()


# -- networks --------------------------------------------------------------------------------------

class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _mlp(act: nn.Module, seed: int, widths=(4, 6, 5, 3), scale: float = 1.5) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        with torch.no_grad():
            layers[-1].weight.mul_(scale)
        if i < len(widths) - 2:
            layers.append(act)
    return nn.Sequential(*layers).eval()


def _samples(lo, hi, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pts = lo + (hi - lo) * torch.rand((n,) + tuple(lo.shape[1:]), generator=g, dtype=lo.dtype)
    corners = torch.where(torch.rand((n,) + tuple(lo.shape[1:]), generator=g) < 0.5, lo, hi)
    return torch.cat([pts, corners])


def assert_sound(model, module, lo, hi, seed, methods=METHODS):
    """Every method, float32 and sound_fp, contains the module's outputs at samples and corners
    (float32 with a small tolerance; sound_fp with none, against float64 evaluation)."""
    pts = _samples(lo, hi, 300, seed)
    with torch.no_grad():
        y32 = module(pts).reshape(len(pts), -1).double()
        y64 = module.double()(pts.double()).reshape(len(pts), -1)
        module.float()
    for method in methods:
        for sound_fp in (False, True):
            lb, ub = boundflow.compute_bounds(model, lo, hi, method=method, sound_fp=sound_fp)
            lb, ub = lb.double(), ub.double()
            y, tol = (y64, 0.0) if sound_fp else (y32, 1e-5 * (1 + y32.abs()))
            assert (y >= lb - tol).all(), (method, sound_fp, (lb - y).max())
            assert (y <= ub + tol).all(), (method, sound_fp, (y - ub).max())


@settings(max_examples=5, deadline=None, derandomize=True)
@given(st.sampled_from([torch.sin, torch.cos]), st.integers(0, 2**16), st.sampled_from([0.05, 0.5, 4.0]))
def test_periodic_mlp_sound(fn, seed, eps):
    module = _mlp(Fn(fn), seed)
    x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(seed))
    assert_sound(module, module, x0 - eps, x0 + eps, seed)


def test_periodic_onnx_forward_and_bounds(tmp_path):
    """Hand-made ONNX (Gemm, Sin, Gemm, Cos, Gemm): forward equals onnxruntime, bounds sound."""
    g = np.random.default_rng(0)
    inits = {"w1": g.normal(size=(3, 6)).astype(np.float32) * 2, "w2": g.normal(size=(6, 5)).astype(np.float32),
             "w3": g.normal(size=(5, 2)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Sin", ["h1"], ["s"]),
             helper.make_node("MatMul", ["s", "w2"], ["h2"]), helper.make_node("Cos", ["h2"], ["c"]),
             helper.make_node("MatMul", ["c", "w3"], ["y"])]
    path = onnx_file(nodes, inits, [1, 3], [1, 2], tmp_path / "sincos.onnx")
    run = onnx_runner(path)
    graph, _ = boundflow.load_model(path)
    x = torch.randn(16, 1, 3, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(evaluate(graph, x)[0].reshape(16, -1).double(), run(x), rtol=1e-5, atol=1e-6)
    lo, hi = torch.full((1, 3), -0.4), torch.full((1, 3), 0.3)
    pts = _samples(lo, hi, 100, 1)
    y = run(pts)
    for method in METHODS:
        for sound_fp in (False, True):
            lb, ub = boundflow.compute_bounds(path, lo, hi, method=method, sound_fp=sound_fp)
            assert (y >= lb.double() - 1e-5).all() and (y <= ub.double() + 1e-5).all(), (method, sound_fp)


@pytest.mark.parametrize("fn", [torch.sin, torch.cos], ids=["sin", "cos"])
def test_periodic_torch_export_onnx(fn, tmp_path):
    """torch.onnx.export (opset 17) of the op: same forward, bounds sound."""
    module = _mlp(Fn(fn), 3)
    x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(3))
    path = export_onnx(module, x0, tmp_path / "m.onnx")
    graph, _ = boundflow.load_model(path)
    assert {n.op for n in graph.nodes} >= {fn.__name__}
    assert_sound(path, module, x0 - 0.3, x0 + 0.3, 3, methods=("crown", "alpha-crown"))


@pytest.mark.parametrize("fn", [torch.sin, torch.cos], ids=["sin", "cos"])
def test_periodic_torch_frontend(fn):
    """torch.export's aten.sin / aten.cos lower to the op; forward equals the module."""
    module = _mlp(Fn(fn), 4)
    x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(4))
    graph, _ = boundflow.load_model(module, x0)
    assert fn.__name__ in {n.op for n in graph.nodes}
    pts = _samples(x0 - 1, x0 + 1, 8, 4)
    with torch.no_grad():
        assert torch.allclose(evaluate(graph, pts.unsqueeze(1))[0].reshape(len(pts), -1), module(pts), atol=1e-6)
    assert_sound(module, module, x0 - 0.2, x0 + 0.2, 4, methods=("crown-ibp", "alpha-crown"))


def _vnnlib(n_in: int, box: float, out_rows: str) -> str:
    head = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + "(declare-const Y_0 Real)\n"
    return head + "".join(f"(assert (>= X_{i} {-box}))\n(assert (<= X_{i} {box}))\n" for i in range(n_in)) + out_rows


def test_periodic_verify(tmp_path):
    """y = sin(x0 + 2 x1) on [-0.5, 0.5]^2 (range [-1, 1]): y >= 1.01 never holds (verified, a
    property IBP alone proves only by the exact range), y >= 0.9 does (x = (0.5, 0.5))."""
    from boundflow.cli import main
    from boundflow.verify.verifier import verify

    path = onnx_file([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sin", ["h"], ["y"])],
                     {"w": np.array([[1.0], [2.0]], np.float32)}, [1, 2], [1, 1], tmp_path / "sin.onnx")
    holds = tmp_path / "h.vnnlib"
    holds.write_text(_vnnlib(2, 0.5, "(assert (>= Y_0 1.01))\n"))
    assert verify(path, str(holds), timeout=60).verdict == "holds"
    bad = tmp_path / "v.vnnlib"
    bad.write_text(_vnnlib(2, 0.5, "(assert (>= Y_0 0.9))\n"))
    res = verify(path, str(bad), timeout=60)
    assert res.verdict == "violated"
    x = np.asarray(res.counterexample[0], dtype=np.float32).reshape(1, 2)
    assert np.all(np.abs(x) <= 0.5)
    assert onnx_runner(path)(torch.from_numpy(x)).item() >= 0.9
    out = tmp_path / "res.txt"
    assert main(["verify", path, str(holds), "--timeout", "3600", "--results", str(out)]) == 0
    assert out.read_text() == "unsat\n"


# -- GELU ------------------------------------------------------------------------------------------

from boundflow.ops import gelu as G  # noqa: E402

GELUS = list(G.SHAPES.values())


def _gelu_intervals(seed: int, n: int = 2000):
    """Around the minimum (-0.75) and the inflections, short to very long, points."""
    g = torch.Generator().manual_seed(seed)
    width = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 5 - 3) * 4       # 4e-3 .. 400
    c = torch.randn(n, generator=g, dtype=torch.float64) * 2 - 0.75
    l, u = c - width / 2, c + width / 2
    l[: n // 20] = u[: n // 20]
    return l, u


def _gelu_lines(g, l, u, alpha, shifted=True):
    (a_lo, e_lo, h_lo), (a_up, e_up, h_up) = G.lower_range(g, l, u), G.upper_range(g, l, u)
    if alpha is None:
        alpha_lo, alpha_up = G.crown_alpha(l, u, a_lo, e_lo), G.crown_alpha(l, u, a_up, e_up)
    else:
        alpha_lo = alpha_up = alpha
    if shifted:
        return G._lines(g, l, u, (a_lo, e_lo, a_up, e_up, h_lo.double(), h_up.double()), alpha_lo, alpha_up)
    return (*G.tangent_line(g, l, u, a_lo, e_lo, h_lo, alpha_lo), *G.tangent_line(g, l, u, a_up, e_up, h_up, alpha_up))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.sampled_from(GELUS), st.integers(0, 2**31), st.sampled_from(["crown", 0.0, 1.0, "random"]))
def test_gelu_lines_bound_and_touch(g, seed, alpha):
    """As for sin: lower <= gelu <= upper on a dense grid, each line touching gelu, before the
    violation shift too (the tangent ranges and the chord decision are right)."""
    l, u = _gelu_intervals(seed)
    if alpha == "random":
        alpha = torch.rand(l.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    elif alpha != "crown":
        alpha = torch.full_like(l, alpha)
    x = _grid(l, u)
    fx = g.f(x)
    spacing = (u - l) / 512
    for shifted in (False, True):
        k_lo, b_lo, k_up, b_up = _gelu_lines(g, l, u, None if alpha == "crown" else alpha, shifted)
        below = fx - (k_lo[:, None] * x + b_lo[:, None])
        above = (k_up[:, None] * x + b_up[:, None]) - fx
        tol = 1e-12 * (1 + x.abs())
        assert (below >= -tol).all() and (above >= -tol).all()
        assert (below.amin(1) <= 1e-11 + spacing ** 2).all() and (above.amin(1) <= 1e-11 + spacing ** 2).all()


@pytest.mark.parametrize("g", GELUS, ids=lambda g: g.name)
def test_gelu_constants_and_interval(g):
    """p, q are where f'' changes sign, m where f' does; the interval rule is the exact range."""
    x = torch.linspace(-6, 6, 120001, dtype=torch.float64)
    slope = g.df(x)
    assert ((slope[1:] - slope[:-1] > 0) == ((x[1:] > g.p) & (x[:-1] < g.q))).float().mean() > 0.9999
    assert ((slope > 0) == (x > g.m)).all()
    l, u = _gelu_intervals(7)
    (lo, hi), = G.interval([torch.stack((l, u))], [], {"approximate": "tanh" if "tanh" in g.name else "none"})
    fx = g.f(_grid(l, u))
    rounding = 1e-14 * (1 + torch.maximum(l.abs(), u.abs()))      # f's evaluation (1 + erf cancels)
    assert (lo <= fx.amin(1) + rounding).all() and (hi >= fx.amax(1) - rounding).all()
    spacing = (u - l) / 512
    assert (lo >= fx.amin(1) - spacing ** 2 - 1e-11).all() and (hi <= fx.amax(1) + rounding).all()


def test_gelu_tighter_than_ibp():
    """CROWN's lines through one GELU layer beat its exact range (mean width, a random layer)."""
    module = _mlp(nn.GELU(), 5, widths=(4, 16, 4))
    x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(5))
    widths = {}
    for method in ("ibp", "crown"):
        lb, ub = boundflow.compute_bounds(module, x0 - 0.5, x0 + 0.5, method=method)
        widths[method] = (ub - lb).mean().item()
    assert widths["crown"] < 0.7 * widths["ibp"], widths


@settings(max_examples=2, deadline=None, derandomize=True)
@given(st.sampled_from(["none", "tanh"]), st.integers(0, 2**16), st.sampled_from([0.05, 0.5, 3.0]))
def test_gelu_mlp_sound(approximate, seed, eps):
    module = _mlp(nn.GELU(approximate=approximate), seed)
    x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(seed))
    assert_sound(module, module, x0 - eps, x0 + eps, seed)


@pytest.mark.parametrize("approximate,opset", [("none", 17), ("none", 20), ("tanh", 20)])
def test_gelu_onnx_export(approximate, opset, tmp_path):
    """torch.onnx.export of nn.GELU: the erf pattern (opset 17) fuses to one gelu carrying its
    constant's deviation; opset 20's Gelu maps directly. Forward equals onnxruntime, bounds sound."""
    import warnings

    module = _mlp(nn.GELU(approximate=approximate), 6)
    x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(6))
    path = str(tmp_path / "g.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x0,), path, dynamo=False, opset_version=opset)
    graph, _ = boundflow.load_model(path)
    gelus = [n for n in graph.nodes if n.op == "gelu"]
    assert [n.op for n in graph.nodes] == ["linear", "gelu", "linear", "gelu", "linear"]
    assert all(n.attrs["approximate"] == approximate for n in gelus)
    assert all((n.attrs.get("deviation", 0) > 0) == (opset == 17) for n in gelus)
    pts = _samples(x0 - 2, x0 + 2, 8, 6)
    assert torch.allclose(evaluate(graph, pts.unsqueeze(1))[0].reshape(16, -1).double(), onnx_runner(path)(pts),
                          rtol=1e-5, atol=1e-6)
    assert_sound(path, module, x0 - 0.4, x0 + 0.4, 6, methods=("crown",))


def test_gelu_onnx_forms_and_errors(tmp_path):
    """Hand-made: 0.5 * x first, Mul by 1/sqrt(2); an Erf pattern whose middle value has another
    reader is not fused (Erf is then unsupported); an unknown approximate is refused by name."""
    from boundflow.errors import UnsupportedOpError

    c = {"h": np.float32(1 / math.sqrt(2)), "one": np.float32(1.0), "half": np.float32(0.5)}
    nodes = [helper.make_node("Mul", ["half", "x"], ["hx"]), helper.make_node("Mul", ["x", "h"], ["xs"]),
             helper.make_node("Erf", ["xs"], ["e"]), helper.make_node("Add", ["one", "e"], ["ep"]),
             helper.make_node("Mul", ["ep", "hx"], ["y"])]
    path = onnx_file(nodes, c, [1, 3], [1, 3], tmp_path / "a.onnx")
    graph, _ = boundflow.load_model(path)
    assert [n.op for n in graph.nodes] == ["gelu"]
    x = torch.randn(8, 1, 3, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(evaluate(graph, x)[0].reshape(8, -1).double(), onnx_runner(path)(x), rtol=1e-5, atol=1e-6)
    leaky = nodes[:-1] + [helper.make_node("Mul", ["ep", "hx"], ["p"]), helper.make_node("Add", ["p", "e"], ["y"])]
    with pytest.raises(UnsupportedOpError, match="Erf"):
        boundflow.load_model(onnx_file(leaky, c, [1, 3], [1, 3], tmp_path / "b.onnx"))
    from onnx import TensorProto
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3]) for n in "xy"]
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], approximate="fast")], "g", io[:1], io[1:])
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(UnsupportedOpError, match="approximate='fast'"):
        boundflow.load_model(bad)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_torch_frontend(approximate):
    """torch.export's aten.gelu (approximate none / tanh) lowers to gelu; forward equals torch."""
    module = _mlp(nn.GELU(approximate=approximate), 8)
    x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(8))
    graph, _ = boundflow.load_model(module, x0)
    assert [n.attrs["approximate"] for n in graph.nodes if n.op == "gelu"] == [approximate] * 2
    pts = _samples(x0 - 2, x0 + 2, 8, 8)
    with torch.no_grad():
        assert torch.allclose(evaluate(graph, pts.unsqueeze(1))[0].reshape(len(pts), -1), module(pts), atol=1e-6)
    assert_sound(module, module, x0 - 0.3, x0 + 0.3, 8, methods=("alpha-crown",) if approximate == "tanh" else ("crown-ibp",))
