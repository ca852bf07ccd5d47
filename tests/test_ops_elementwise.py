"""Elementwise nonlinear ops (boundflow/ops/convex.py, leaky_relu.py, sign.py, clamp.py):
the relaxations' lines bound their function on dense grids (CROWN's tangent points, alpha at 0,
1 and random); CROWN's lines are auto_LiRPA's where it has a relaxation; forward equals
onnxruntime; every method contains sampled points and corners, float32 and sound_fp, on ONNX
nets built with onnx.helper and on torch modules; clear errors; `verify` on a net with them."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import boundflow
from boundflow.domains.concrete import evaluate
from boundflow.errors import DomainError, UnsupportedOpError
from boundflow.ops import KERNELS
from boundflow.ops import clamp as M
from boundflow.ops import convex as C
from boundflow.ops import leaky_relu as L
from boundflow.ops import sign as S
from nets import onnx_file, onnx_runner

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]
F64 = torch.float64

CURVES = [C.EXP, C.LOG, C.RECIPROCAL, C.SQRT, C.SOFTPLUS] + [C.power(p) for p in (2, 3, 4, 5, 1.5, 0.3, -2, -3, -0.5)]


def _intervals(curve: C.Curve, seed: int, n: int = 1500):
    """Random intervals inside the curve's domain, of widths 1e-4 .. 1e1, points included."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (torch.rand(n, generator=g, dtype=F64) * 5 - 4)
    c = torch.randn(n, generator=g, dtype=F64) * 3
    w = torch.rand(n, generator=g, dtype=F64) * scale
    l, u = c - w, c + w
    if curve.lo_bound is not None:                       # x > 0 (or >= 0): shift into the domain
        l, u = l.abs() + (1e-3 if curve.open_lo else 0.0), l.abs() + 2 * w + 1e-3
        l[:50] = 0.0 if not curve.open_lo else l[:50]
    if curve.pole is not None:                           # one side of 0
        side = torch.where(c >= 0, 1.0, -1.0).to(F64)
        l, u = torch.minimum(side * (c.abs() + 1e-2), side * (c.abs() + 1e-2 + w)), \
            torch.maximum(side * (c.abs() + 1e-2), side * (c.abs() + 1e-2 + w))
    l[-100:] = u[-100:]                                  # points
    return l, u


def _check_lines(f, k_lo, b_lo, k_up, b_up, l, u, rel=1e-12):
    x = l[:, None] + (u - l)[:, None] * torch.linspace(0, 1, 257, dtype=F64)[None]
    fx = f(x)
    slack = rel * (1 + fx.abs() + (k_lo.abs() + k_up.abs())[:, None] * x.abs())
    for t in (k_lo, b_lo, k_up, b_up):
        assert torch.isfinite(t).all()
    assert (k_lo[:, None] * x + b_lo[:, None] <= fx + slack).all(), "lower line above f"
    assert (k_up[:, None] * x + b_up[:, None] >= fx - slack).all(), "upper line below f"


@settings(max_examples=len(CURVES) * 2, deadline=None, derandomize=True)
@given(st.sampled_from(CURVES), st.integers(0, 2**31), st.sampled_from(["crown", "zero", "one", "random"]))
def test_convex_lines_bound_the_function(curve, seed, which):
    l, u = _intervals(curve, seed)
    l = C._in_domain(curve, l, u, "test interval")
    if which == "crown":
        _check_lines(curve.f, *C.crown_lines(curve, l, u), l, u)
        a_lo, a_up = C.crown_alphas(curve, l, u)        # (alpha-CROWN's start: the same lines)
    else:
        g = torch.Generator().manual_seed(seed + 1)
        fill = {"zero": 0.0, "one": 1.0}.get(which)
        a_lo, a_up = ((torch.full_like(l, fill) if fill is not None else torch.rand(l.shape, generator=g, dtype=F64))
                      for _ in range(2))
    _check_lines(curve.f, *C.lines_at(curve, l, u, a_lo, a_up), l, u)


@pytest.mark.parametrize("slope", [-1.0, -0.3, 0.0, 0.1, 1.0, 2.5])
@pytest.mark.parametrize("which", ["crown", "zero", "one", "random"])
def test_leaky_relu_lines_bound_the_function(slope, which):
    g = torch.Generator().manual_seed(3)
    c, w = torch.randn(4000, generator=g, dtype=F64), torch.rand(4000, generator=g, dtype=F64) * 2
    l, u = c - w, c + w
    a = torch.full_like(l, slope)
    alpha = None if which == "crown" else {"zero": torch.zeros_like(l), "one": torch.ones_like(l),
                                           "random": torch.rand(l.shape, generator=g, dtype=F64)}[which]
    _check_lines(lambda x: L.forward(x, slope), *L.lines(l, u, a, alpha), l, u)


@pytest.mark.parametrize("which", ["crown", "zero", "one", "random"])
def test_sign_lines_bound_the_step(which):
    g = torch.Generator().manual_seed(4)
    c, w = torch.randn(4000, generator=g, dtype=F64), torch.rand(4000, generator=g, dtype=F64) * 2
    l, u = c - w, c + w
    l[:100], u[:100] = 0.0, u[:100].abs()                 # intervals ending at the step
    l[100:200], u[100:200] = -l[100:200].abs(), 0.0
    if which == "crown":
        alphas = S.crown_alphas(l, u)
    else:
        alphas = [{"zero": torch.zeros_like(l), "one": torch.ones_like(l),
                   "random": torch.rand(l.shape, generator=g, dtype=F64)}[which] for _ in range(2)]
    _check_lines(torch.sign, *S.lines(l, u, *alphas), l, u)


@pytest.mark.parametrize("which", ["crown", "zero", "one", "random"])
def test_clamp_min_lines_bound_the_function(which):
    g = torch.Generator().manual_seed(5)
    m, w = torch.randn(4000, generator=g, dtype=F64), torch.rand(4000, generator=g, dtype=F64) * 2
    l, u = m - w, m + w
    c = torch.randn(4000, generator=g, dtype=F64)
    c[:100], c[100:200], c[200:300] = l[:100], u[100:200], l[200:300]      # kink at an end
    u[200:300] = l[200:300]                                                 # points
    alpha = None if which == "crown" else {"zero": torch.zeros_like(l), "one": torch.ones_like(l),
                                           "random": torch.rand(l.shape, generator=g, dtype=F64)}[which]
    _check_lines(lambda x: torch.maximum(x, c[:, None]), *M.lines(l, u, c, alpha), l, u)


def test_clamp_min_lines_are_exact_where_it_is_linear():
    """Above c the lines are y = x, below y = c: slope 1 and intercept 0, or slope 0 and
    intercept c, exactly (a step after the clamp reads their values)."""
    l = torch.tensor([0.5, -3.0, 0.1], dtype=torch.float32)
    u = torch.tensor([2.0, -2.0, 0.1], dtype=torch.float32)
    c = torch.tensor([0.25, -1.5, 0.1], dtype=torch.float32)
    k_lo, b_lo, k_up, b_up = M.lines(l, u, c)
    assert torch.equal(k_lo, torch.tensor([1.0, 0.0, 1.0])) and torch.equal(k_up, k_lo)
    assert torch.equal(b_lo, torch.tensor([0.0, -1.5, 0.0])) and torch.equal(b_up, b_lo)


# -- auto_LiRPA's lines on one neuron (its CROWN relaxations, written out) ---------------------------

def _tangent(f, df, t):
    return df(t), f(t) - df(t) * t


def _chord(f, l, u):
    k = (f(u) - f(l)) / (u - l)
    return k, f(l) - k * l


def _lirpa_lines(name, l, u):
    """(k_lo, b_lo, k_up, b_up) of auto_LiRPA 0.7.1's relaxation (convex_concave.py BoundExp,
    BoundLog, BoundSqrt, BoundReciprocal; bivariate.py get_bound_square for x * x; relu.py
    BoundRelu with leaky_alpha; activations.py BoundAbs)."""
    m = (l + u) / 2
    if name == "exp":
        return (*_tangent(torch.exp, torch.exp, torch.minimum(m, l + 0.99)), *_chord(torch.exp, l, u))
    if name == "log":
        return (*_chord(torch.log, l, u), *_tangent(torch.log, torch.reciprocal, m))
    if name == "sqrt":
        return (*_chord(torch.sqrt, l, u), *_tangent(torch.sqrt, lambda x: 0.5 / x.sqrt(), m))
    if name == "reciprocal":
        return (*_tangent(torch.reciprocal, lambda x: -1 / x ** 2, m), *_chord(torch.reciprocal, l, u))
    if name == "square":
        t = l.clamp(min=0) - (-u).clamp(min=0)
        return 2 * t, -t * t, l + u, -l * u
    lr, ur = l.clamp(max=0), u.clamp(min=0)
    if name == "leaky":                                   # alpha = 0.1, l < 0 < u
        k = (ur - 0.1 * lr) / (ur - lr)
        return torch.where(k > 0.5, torch.ones_like(k), torch.full_like(k, 0.1)), torch.zeros_like(l), k, -lr * k + 0.1 * lr
    if name == "abs":
        k = (ur.abs() - lr.abs()) / (ur - lr)
        return torch.zeros_like(l), torch.zeros_like(l), k, lr.abs() - k * lr
    raise KeyError(name)


@pytest.mark.parametrize("name", ["exp", "log", "sqrt", "reciprocal", "square", "leaky", "abs"])
def test_crown_lines_are_auto_lirpas(name):
    g = torch.Generator().manual_seed(5)
    c, w = torch.randn(2000, generator=g, dtype=F64) * 2, torch.rand(2000, generator=g, dtype=F64) * 3 + 1e-3
    l, u = c - w, c + w
    if name in ("log", "sqrt", "reciprocal"):
        l, u = l.abs() + 0.05, l.abs() + 0.05 + 2 * w
    if name in ("leaky", "abs"):
        l, u = -l.abs() - 1e-3, u.abs() + 1e-3
        ours = L.lines(l, u, torch.full_like(l, 0.1 if name == "leaky" else -1.0))
    else:
        curve = {"square": C.power(2)}.get(name) or C.FIXED[name]
        ours = C.crown_lines(curve, l, u)
    for mine, theirs in zip(ours, _lirpa_lines(name, l, u)):
        assert torch.allclose(mine, theirs.to(F64), rtol=1e-9, atol=1e-9)


# -- ONNX nets: forward = onnxruntime, all methods sound ---------------------------------------------

# (op nodes on "h" -> "z", extra initializers, whether the op needs positive inputs)
ONNX_OPS = {
    "Exp": ([helper.make_node("Exp", ["h"], ["z"])], {}, False),
    "Log": ([helper.make_node("Log", ["h"], ["z"])], {}, True),
    "Reciprocal": ([helper.make_node("Reciprocal", ["h"], ["z"])], {}, True),
    "Sqrt": ([helper.make_node("Sqrt", ["h"], ["z"])], {}, True),
    "Softplus": ([helper.make_node("Softplus", ["h"], ["z"])], {}, False),
    "Pow2": ([helper.make_node("Pow", ["h", "p"], ["z"])], {"p": np.array(2.0, np.float32)}, False),
    "Pow3": ([helper.make_node("Pow", ["h", "p"], ["z"])], {"p": np.array(3.0, np.float32)}, False),
    "Pow-1.5": ([helper.make_node("Pow", ["h", "p"], ["z"])], {"p": np.array(-1.5, np.float32)}, True),
    "MulSquare": ([helper.make_node("Mul", ["h", "h"], ["z"])], {}, False),
    "LeakyRelu": ([helper.make_node("LeakyRelu", ["h"], ["z"], alpha=0.1)], {}, False),
    "LeakyRelu2": ([helper.make_node("LeakyRelu", ["h"], ["z"], alpha=2.0)], {}, False),
    "PRelu": ([helper.make_node("PRelu", ["h", "s"], ["z"])],
              {"s": np.array([0.2, -0.5, 1.5, 0.0, 3.0, -1.0], np.float32)}, False),
    "Abs": ([helper.make_node("Abs", ["h"], ["z"])], {}, False),
    "Sign": ([helper.make_node("Sign", ["h"], ["z"])], {}, False),
    "Max": ([helper.make_node("Max", ["h", "c"], ["z"])], {"c": np.linspace(-0.5, 0.5, 6).astype(np.float32)}, False),
    "Min": ([helper.make_node("Min", ["c", "h"], ["z"])], {"c": np.array(0.25, np.float32)}, False),
    "Clip": ([helper.make_node("Clip", ["h", "lo", "hi"], ["z"])],
             {"lo": np.array(-0.3, np.float32), "hi": np.array(0.4, np.float32)}, False),
    "Relu6": ([helper.make_node("Clip", ["h", "lo", "hi"], ["z"])],
              {"lo": np.array(0.0, np.float32), "hi": np.array(0.6, np.float32)}, False),
}


def _onnx_net(tmp_path, op: str, seed: int) -> str:
    nodes, inits, positive = ONNX_OPS[op]
    rng = np.random.default_rng(seed)
    pre = [helper.make_node("Gemm", ["x", "W1", "b1"], ["g"], transB=1)]
    pre.append(helper.make_node("Exp", ["g"], ["h"]) if positive else helper.make_node("Identity", ["g"], ["h"]))
    post = [helper.make_node("Gemm", ["z", "W2", "b2"], ["y"], transB=1)]
    inits = dict(inits, W1=(rng.standard_normal((6, 3)) * 0.7).astype(np.float32),
                 b1=(rng.standard_normal(6) * 0.3).astype(np.float32),
                 W2=(rng.standard_normal((2, 6)) * 0.5).astype(np.float32), b2=np.zeros(2, np.float32))
    return onnx_file(pre + nodes + post, inits, [1, 3], [1, 2], tmp_path / f"{op}_{seed}.onnx")


def _samples(lo, hi, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    inner = lo + (hi - lo) * torch.rand((n,) + lo.shape[1:], generator=g)
    corners = torch.where(torch.rand((n,) + lo.shape[1:], generator=g) < 0.5, lo, hi)
    return torch.cat([inner, corners])


@pytest.mark.parametrize("op", list(ONNX_OPS))
def test_forward_equals_onnxruntime(tmp_path, op):
    path = _onnx_net(tmp_path, op, 0)
    graph, _ = boundflow.load_model(path)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    ours = evaluate(graph, x.unsqueeze(1))[0].reshape(16, -1).double()
    assert torch.allclose(ours, onnx_runner(path)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", list(ONNX_OPS))
@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 1000), eps=st.sampled_from([0.02, 0.3, 1.0]))
def test_onnx_nets_sound(tmp_path_factory, op, seed, eps):
    path = _onnx_net(tmp_path_factory.mktemp("nets"), op, seed)
    x0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(seed))
    lo, hi = x0 - eps, x0 + eps
    pts = _samples(lo, hi, seed=seed)
    y = onnx_runner(path)(pts)
    for method in METHODS:
        for sound_fp in (False, True):
            lb, ub = boundflow.compute_bounds(path, lo, hi, method=method, sound_fp=sound_fp)
            tol = 1e-5 * (1 + y.abs())         # onnxruntime rounds in float32
            assert (y >= lb.double() - tol).all(), (method, sound_fp, float((lb.double() - y).max()))
            assert (y <= ub.double() + tol).all(), (method, sound_fp, float((y - ub.double()).max()))


@pytest.mark.parametrize("node", ["Clip", "Min", "Max"])
def test_clamps_are_onnxruntimes_bit_for_bit(tmp_path, node):
    """No rounding in a clamp: the values are onnxruntime's exactly, at the bounds too."""
    c = np.array([-0.3, 0.1, 0.7], np.float32)
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])] if node == "Clip" else \
        [helper.make_node(node, ["x", "c"], ["y"])]
    inits = {"lo": np.float32(-0.3), "hi": np.float32(0.7)} if node == "Clip" else {"c": c}
    path = _direct(tmp_path, nodes, inits)
    x = torch.cat([torch.randn(64, 3, generator=torch.Generator().manual_seed(3)), torch.tensor(c).expand(1, 3)])
    graph, _ = boundflow.load_model(path)
    assert "relu" not in {n.op for n in graph.nodes}
    ours = evaluate(graph, x.unsqueeze(1))[0].reshape(len(x), -1)
    assert torch.equal(ours.double(), onnx_runner(path)(x))


def test_a_far_clamp_bound_costs_no_precision():
    """hardtanh(x, -1e6, 0.4): as relu(x + 1e6) - 1e6 in float32 x lost everything below 0.06
    (an ulp of 1e6), and CROWN's bounds missed sampled outputs by 0.14; max(x, -1e6) is exact."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(8, 64), nn.Hardtanh(-1e6, 0.4), nn.Linear(64, 64), nn.Hardtanh(-1e6, 0.4),
                        nn.Linear(64, 10)).eval()
    x0 = torch.randn(1, 8)
    pts = _samples(x0 - 0.05, x0 + 0.05, 1000)
    with torch.no_grad():
        y = net(pts)
    for method in METHODS:
        lb, ub = boundflow.compute_bounds(net, x0 - 0.05, x0 + 0.05, method=method)
        assert (y >= lb - 1e-5).all() and (y <= ub + 1e-5).all(), method


def test_a_clamps_input_refines_the_neurons_whose_interval_holds_its_kink(tmp_path):
    """CROWN refines a clamp's input only where l < c < u (elsewhere the clamp is linear on the
    interval and its lines exact): bound.unstable reads the kinks of the value's readers."""
    from boundflow import api
    from boundflow.domains.bound import unstable
    lo = torch.tensor([[-1.0, 0.2, -0.5, 0.6, -2.0]])
    hi = torch.tensor([[-0.5, 0.4, 0.5, 0.9, -1.5]])
    c = torch.tensor([-0.7, 0.5, 0.1, 0.0, -1.0])
    assert unstable([torch.stack((lo, hi))], [c], {"dense_fraction": 1.0})[0].tolist() == [0, 2]
    assert unstable([torch.stack((lo, hi))], [c, torch.zeros(())], {"dense_fraction": 1.0})[0].tolist() == [0, 2]
    assert unstable([torch.stack((lo, hi))], [], {"dense_fraction": 1.0})[0].tolist() == [2]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Hardtanh(-0.5, 0.5), torch.nn.Linear(6, 6),
                              torch.nn.Hardtanh(-0.25, 0.5), torch.nn.Linear(6, 2)).eval()
    graph, key = boundflow.load_model(net, torch.zeros(1, 3))
    module, _ = api.get_plan(graph, key, "crown", 1, None, api._default_config("sparse"))
    kinks = [module.params[op.params[0]] for task in module.tasks for op in task.ops if op.op == "bound.unstable"]
    assert kinks and all(float(k.unique()) in (-0.25, -0.5) for k in kinks)       # max(x, -0.25), max(-x, -0.5)


@pytest.mark.parametrize("seed", range(6))
def test_sign_after_clamps_that_meet_at_zero(tmp_path, seed):
    """Sign(Relu(Max(b, Min(a, Relu(x))))) with a > 0 > b is 0 at x = 0: exactly 0 through
    clamps that round nothing (a fuzzer's network; as relu(x - c) + c the shifts folded into one
    rounded constant left 7e-9 there, and the step made that 1)."""
    rng = np.random.default_rng(seed)
    a, b = np.float32(rng.uniform(0.01, 1)), np.float32(-rng.uniform(0.01, 1))
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Min", ["a", "r"], ["m"]),
             helper.make_node("Max", ["b", "m"], ["n"]), helper.make_node("Relu", ["n"], ["s"]),
             helper.make_node("Sign", ["s"], ["y"])]
    path = onnx_file(nodes, {"a": a.reshape(1), "b": b.reshape(1)}, [1], [1], tmp_path / "net.onnx")
    for lo, hi in ((0.0, 0.0), (-1e-3, 0.0), (0.0, 1e-6)):
        box = torch.tensor([lo]), torch.tensor([hi])
        ys = onnx_runner(path)(torch.tensor([[lo], [hi], [(lo + hi) / 2]]))
        for method in METHODS:
            for sound_fp in (False, True):
                lb, ub = boundflow.compute_bounds(path, *box, method=method, sound_fp=sound_fp)
                assert (lb.double() <= ys.min()) and (ub.double() >= ys.max()), (lo, hi, method, sound_fp, lb, ub)
        lb, ub = boundflow.compute_bounds(path, *box, method="ibp")
        assert float(lb) == 0.0 and float(ub) == (0.0 if hi == 0 else 1.0)


def test_alpha_crown_tighter_than_crown_on_the_square(tmp_path):
    path = _onnx_net(tmp_path, "MulSquare", 7)
    x0 = torch.zeros(1, 3)
    widths = {m: (lambda b: (b[1] - b[0]).mean().item())(boundflow.compute_bounds(path, x0 - 1, x0 + 1, method=m))
              for m in ("crown", "alpha-crown")}
    assert widths["alpha-crown"] < widths["crown"]


# -- torch frontend -----------------------------------------------------------------------------------

class _Net(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.act = torch.nn.Linear(3, 6), torch.nn.Linear(6, 2), act
        self.prelu = torch.nn.PReLU(6)
        with torch.no_grad():
            self.prelu.weight.copy_(torch.tensor([0.2, -0.5, 1.5, 0.0, 3.0, -1.0]))

    def forward(self, x):
        return self.l2(self.act(self, self.l1(x)))


TORCH_ACTS = {
    "exp": lambda m, h: torch.exp(h), "log": lambda m, h: torch.log(torch.exp(h) + 0.5),
    "reciprocal": lambda m, h: 1 / (torch.exp(h) + 0.2), "sqrt": lambda m, h: torch.sqrt(torch.exp(h)),
    "softplus": lambda m, h: torch.nn.functional.softplus(h, beta=2.0), "square": lambda m, h: h * h,
    "pow3": lambda m, h: h ** 3, "rsqrt_pow": lambda m, h: (torch.exp(h) + 1) ** -0.5,
    "leaky": lambda m, h: torch.nn.functional.leaky_relu(h, 0.1), "prelu": lambda m, h: m.prelu(h),
    "abs": lambda m, h: torch.abs(h), "sign": lambda m, h: torch.sign(h),
    "minmax": lambda m, h: torch.maximum(torch.minimum(h, torch.tensor(0.4)), torch.tensor([-0.3] * 6)),
}


@pytest.mark.parametrize("name", list(TORCH_ACTS))
def test_torch_frontend(name):
    module = _Net(TORCH_ACTS[name]).eval()
    x0 = torch.randn(1, 3, generator=torch.Generator().manual_seed(2))
    lo, hi = x0 - 0.4, x0 + 0.4
    pts = _samples(lo, hi, 200)
    with torch.no_grad():
        y = module(pts)
    graph, _ = boundflow.load_model(module, x0)
    assert torch.allclose(evaluate(graph, pts.unsqueeze(1))[0].reshape(len(pts), -1), y, rtol=1e-5, atol=1e-6)
    for method in METHODS:
        lb, ub = boundflow.compute_bounds(module, lo, hi, method=method)
        assert (y >= lb - 1e-5).all() and (y <= ub + 1e-5).all(), method


# -- errors ---------------------------------------------------------------------------------------

def _direct(tmp_path, nodes, inits=None, name="net.onnx"):
    return onnx_file(nodes, inits or {}, [1, 3], [1, 3], tmp_path / name)


@pytest.mark.parametrize("op,lo,hi,match", [("Log", 0.5, 2.0, None), ("Log", -0.5, 2.0, "outside the domain"),
                                           ("Log", 0.0, 2.0, "outside the domain"),
                                           ("Reciprocal", -1.0, 1.0, "contains 0"), ("Reciprocal", -2.0, -1.0, None),
                                           ("Sqrt", -1.0, -0.5, "outside the domain"), ("Sqrt", -0.1, 1.0, None)])
def test_domain_errors(tmp_path, op, lo, hi, match):
    path = _direct(tmp_path, [helper.make_node(op, ["x"], ["y"])])
    box = (torch.full((1, 3), lo), torch.full((1, 3), hi))
    for method in METHODS:
        if match is None:
            lb, ub = boundflow.compute_bounds(path, *box, method=method)
            assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
        else:
            with pytest.raises(DomainError, match=match):
                boundflow.compute_bounds(path, *box, method=method)


def test_overflow_is_an_error(tmp_path):
    path = _direct(tmp_path, [helper.make_node("Exp", ["x"], ["y"])])
    for method in METHODS:
        with pytest.raises(DomainError, match="overflow"):
            boundflow.compute_bounds(path, torch.zeros(1, 3), torch.full((1, 3), 200.0), method=method)


def test_finite_values_whose_sum_overflows_are_no_error(tmp_path):
    """The interval rule checks its values with one sum: where that overflows while every value
    is finite (exp near float32's largest), the values are looked at one by one, and pass."""
    path = _direct(tmp_path, [helper.make_node("Exp", ["x"], ["y"])])
    lo, hi = torch.full((1, 3), 87.0), torch.full((1, 3), 88.5)
    assert not torch.isfinite(torch.exp(torch.stack((lo, hi))).sum())
    lb, ub = boundflow.compute_bounds(path, lo, hi, method="ibp")
    assert torch.equal(lb, torch.exp(lo)) and torch.equal(ub, torch.exp(hi))


@pytest.mark.parametrize("nodes,inits,match", [
    ([helper.make_node("Pow", ["x", "x"], ["y"])], {}, "variable exponent"),
    ([helper.make_node("Pow", ["x", "p"], ["y"])], {"p": np.array([2.0, 3.0, 2.0], np.float32)}, "scalar exponent"),
    ([helper.make_node("PRelu", ["x", "s"], ["y"])], {"s": np.ones((2, 3), np.float32)}, "does not broadcast"),
    ([helper.make_node("Max", ["x", "x"], ["y"])], {}, "one variable"),
    ([helper.make_node("Min", ["x", "a", "b"], ["y"])], {"a": np.float32(1), "b": np.float32(2)}, "one variable"),
])
def test_unsupported_attributes(tmp_path, nodes, inits, match):
    with pytest.raises(UnsupportedOpError, match=match):
        boundflow.load_model(_direct(tmp_path, nodes, inits))


# -- verify ---------------------------------------------------------------------------------------

def test_verify_holds_and_violated(tmp_path):
    """y = exp(x0) + |x1| - leaky(x0 - x1) on [0, 1]^2 stays below e + 1.2: y >= 5.5 cannot
    hold, y <= 1.2 can (at x = 0: y = 1)."""
    from boundflow.verify.verifier import verify

    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1),
             helper.make_node("Exp", ["h"], ["e"]), helper.make_node("Abs", ["h"], ["a"]),
             helper.make_node("LeakyRelu", ["h"], ["r"], alpha=0.2),
             helper.make_node("Concat", ["e", "a", "r"], ["z"], axis=1),
             helper.make_node("Gemm", ["z", "V"], ["y"], transB=1)]
    pick = np.zeros((1, 9), np.float32)
    pick[0, [0, 4, 8]] = [1, 1, -1]                      # exp(h0) + |h1| - leaky(h2)
    inits = {"W": np.array([[1, 0], [0, 1], [1, -1]], np.float32), "b": np.zeros(3, np.float32), "V": pick}
    model = onnx_file(nodes, inits, [1, 2], [1, 1], tmp_path / "mix.onnx")
    box = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n" \
          "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"
    (tmp_path / "hold.vnnlib").write_text(box + "(assert (>= Y_0 5.5))\n")
    (tmp_path / "viol.vnnlib").write_text(box + "(assert (<= Y_0 1.2))\n")
    assert verify(model, tmp_path / "hold.vnnlib", timeout=30).verdict == "holds"
    res = verify(model, tmp_path / "viol.vnnlib", timeout=30)
    assert res.verdict == "violated"
    x, y = res.counterexample
    assert float(onnx_runner(model)(torch.tensor(np.asarray(x, np.float32)).reshape(1, 2))[0, 0]) <= 1.2


def test_attack_finds_counterexamples_through_sign(tmp_path):
    """y = sign(x0 - 0.7) + sign(x1 - 0.9) on [0, 1]^2: y >= 1.5 needs x0 > 0.7 and x1 > 0.9; the
    steps' own gradients are zero, the attack still gets there."""
    from boundflow.verify.verifier import verify

    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1), helper.make_node("Sign", ["h"], ["s"]),
             helper.make_node("Gemm", ["s", "V"], ["y"], transB=1)]
    inits = {"W": np.eye(2, dtype=np.float32), "b": np.array([-0.7, -0.9], np.float32),
             "V": np.array([[1, 1]], np.float32)}
    model = onnx_file(nodes, inits, [1, 2], [1, 1], tmp_path / "sign.onnx")
    prop = tmp_path / "p.vnnlib"
    prop.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                    "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"
                    "(assert (>= Y_0 1.5))\n")
    res = verify(model, prop, timeout=30)
    assert res.verdict == "violated", res.stats


def test_relu_branch_and_bound_splits_leaky_relus(tmp_path):
    """A threshold 90% of the way from alpha-CROWN's bound to the sampled minimum: ReLU branch and
    bound splits the leaky ReLUs at 0 and proves it."""
    from boundflow.verify.verifier import VerifyConfig, verify
    from test_relu_bab import branching_gap, two_layer_net

    path, prop, _ = branching_gap(two_layer_net(torch.nn.LeakyReLU(0.1)), tmp_path)
    res = verify(path, prop, timeout=60, config=VerifyConfig(split="relu", refine_min_inputs=0))
    assert res.verdict == "holds", res.stats
    assert res.stats["decided_by"] == "relu_bab", res.stats


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 20), st.booleans(), st.integers(0, 2**16))
def test_relu_backward_is_the_masked_product(batch, rows, n, with_alpha, seed):
    """relu's backward rule (written without boolean masks) equals the textbook masked form
    A * where(A >= 0, ...) exactly, and so do its gradients with respect to A and alpha, also
    where A is exactly 0: there both the product and the intercept take the A >= 0 side's
    derivative (alpha-CROWN: a derivative that was neither side's made it looser)."""
    from boundflow.ops import relu as R
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(batch, n, generator=g, dtype=F64)
    box = torch.stack((lo, lo + torch.rand(batch, n, generator=g, dtype=F64) * 2))
    (lines,) = R.relax([box], [], {})
    a = torch.randn(batch, 2 * rows, n, generator=g, dtype=F64)
    a = a * (torch.rand(a.shape, generator=g) < 0.6)                    # many exact zeros
    a.requires_grad_(True)
    alpha = torch.rand(batch, 2 * rows, n, generator=g, dtype=F64, requires_grad=True) if with_alpha else None
    bias = torch.zeros(batch, 2 * rows, dtype=F64)
    got = R.backward_alpha([a, bias, lines, alpha], [], {}) if with_alpha else R.backward([a, bias, lines], [], {})

    up_slope, up_bias, lo_slope = lines.unsqueeze(2)
    if with_alpha:
        lo_slope = torch.where(up_bias > 0, alpha, lo_slope)
    lo_l, lo_u = (lo_slope[:, :rows], lo_slope[:, rows:]) if with_alpha else (lo_slope, lo_slope)
    a_lo, a_up = a[:, :rows], a[:, rows:]
    want = (torch.cat([a_lo * torch.where(a_lo >= 0, lo_l, up_slope), a_up * torch.where(a_up >= 0, up_slope, lo_u)], 1),
            torch.cat([(torch.where(a_lo < 0, a_lo, 0) * up_bias).sum(-1), (torch.where(a_up >= 0, a_up, 0) * up_bias).sum(-1)], 1))
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1])
    weights = torch.randn(got[0].shape, generator=g, dtype=F64)
    leaves = [a] + ([alpha] if with_alpha else [])
    grads = torch.autograd.grad((got[0] * weights).sum() + got[1].sum(), leaves)
    want_grads = torch.autograd.grad((want[0] * weights).sum() + want[1].sum(), leaves)
    for x, y in zip(grads, want_grads):
        assert torch.allclose(x, y)


def _op_of(curve: C.Curve) -> tuple[str, dict]:
    """The op name and attrs whose rules use `curve`."""
    return (curve.name, {}) if curve.name in C.FIXED else ("pow", {"exponent": float(curve.name[3:])})


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_convex_interval_is_f_at_the_ends_and_the_stationary_point(curve, dtype):
    """The rule is, bit for bit, min and max of f at l, u and the stationary point clamped into
    [l, u], with l raised into a closed domain (f evaluated on the points stacked, as the rule
    does: torch's vectorised and scalar loops of one function may differ in the last place)."""
    l, u = (t.to(dtype) for t in _intervals(curve, 11))
    name, attrs = _op_of(curve)
    (got,) = KERNELS[f"interval.{name}"]([torch.stack((l, u)).view(2, 1, -1)], [], attrs)
    low = l if curve.lo_bound is None else l.clamp(min=curve.lo_bound)
    points = [low, u] + ([torch.minimum(low.clamp(min=curve.stationary), u)] if curve.stationary is not None else [])
    values = curve.f(torch.stack(points).unsqueeze(1)).squeeze(1).unbind(0)
    want = torch.stack((functools.reduce(torch.minimum, values), functools.reduce(torch.maximum, values)))
    assert got.dtype == dtype and torch.equal(got.view(2, -1), want)


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.5, 1.0, 3.0, -0.2])
def test_leaky_relu_interval_is_f_at_the_ends_and_the_kink(slope):
    """Bit for bit the three-point range (ends, and the point nearest 0), whether the rule takes
    its increasing shortcut (slope >= 0, decided when the kernel is bound) or not."""
    g = torch.Generator().manual_seed(3)
    c, w = torch.randn(500, generator=g), torch.rand(500, generator=g) * 2
    l, u = c - w, c + w
    l[:20] = u[:20]
    a = torch.tensor(slope)
    kernel = KERNELS["interval.leaky_relu"]
    s = torch.stack((l, u)).view(2, 1, -1)
    bound = kernel.bind([s], [a], {})
    values = [L.forward(x, a) for x in (l, u, torch.maximum(l, u.clamp(max=0)))]
    want = torch.stack((functools.reduce(torch.minimum, values), functools.reduce(torch.maximum, values)))
    for (got,) in (kernel([s], [a], {}), bound()):
        assert torch.equal(got.view(2, -1), want)
    s.copy_(s.flip(-1))                                   # a bound kernel reads each run's values
    assert torch.equal(bound()[0].view(2, -1), want.flip(-1))
