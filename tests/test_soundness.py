"""Soundness by sampling: every sampled output lies inside the certified bounds.

(a) the golden fixtures (../shared/golden), sampled with onnxruntime;
(b) random networks from tests/nets.py (hypothesis), sampled with the torch module and with
    onnxruntime on its ONNX export, bounded through both frontends, B = 1 and B = 3 regions.

Tolerance: 1e-5 * max(1, |bound|). Also: lb <= ub, and for ibp, crown-ibp and crown (pure
intermediate bounds) B regions bounded together equal B separate calls (regions are
independent). Sparse/intersect CROWN pick the neurons to refine from the union over the batch,
so there only soundness is asserted. alpha-CROWN (an optimiser, slow) is sampled on small random
networks only.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import boundflow
from boundflow.verify.alpha import AlphaConfig
from golden import FIXTURES, load_fixture
from nets import KINDS, export_onnx, networks, onnx_runner, sample_box

METHODS = [("ibp", "sparse"), ("crown-ibp", "sparse"), ("crown", "sparse"), ("crown", "intersect"),
           ("crown", "pure")]
METHOD_IDS = ["ibp", "crown-ibp", "crown-sparse", "crown-intersect", "crown-pure"]
BATCH_INDEPENDENT = {("ibp", "sparse"), ("crown-ibp", "sparse"), ("crown", "pure")}

N_SAMPLES = 1200       # per region: centre + >= 300 vertices (all when fewer) + mixed + uniform
N_CORNERS = 300


def _tol(b: torch.Tensor) -> torch.Tensor:
    return 1e-5 * b.double().abs().clamp(min=1)


def assert_inside(y: torch.Tensor, lb: torch.Tensor, ub: torch.Tensor, what: str):
    """y: [N, S] sampled values; lb, ub: [S]."""
    y, lb, ub = y.double(), lb.double(), ub.double()
    assert lb.shape == ub.shape == y.shape[1:], (what, lb.shape, ub.shape, y.shape)
    below = (lb - _tol(lb)) - y        # > 0: violation
    above = y - (ub + _tol(ub))
    for name, excess, bound in (("lower", below, lb), ("upper", above, ub)):
        if (excess > 0).any():
            n, s = divmod(int(excess.argmax()), excess.shape[1])
            raise AssertionError(
                f"{what}: {int((excess > 0).sum())} sample(s) outside the {name} bound; worst: "
                f"sample {n}, row {s}: value {y[n, s].item():.9g}, bound {bound[s].item():.9g}, "
                f"excess {excess[n, s].item():.3e}")


def assert_ordered(lb: torch.Tensor, ub: torch.Tensor, what: str):
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all(), f"{what}: non-finite bounds"
    bad = lb.double() > ub.double() + _tol(ub)     # a zero-width box may round 1 ulp apart
    assert not bad.any(), f"{what}: lb > ub at {bad.nonzero()[0].tolist()}: " \
                          f"{lb[bad][0].item():.9g} > {ub[bad][0].item():.9g}"


# --------------------------------------------------------------------------------------------
# (a) golden fixtures
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _golden_samples(shared: str, name: str) -> torch.Tensor:
    fx = load_fixture(Path(shared), name)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    pts = sample_box(fx.lower, fx.upper, N_SAMPLES, N_CORNERS, gen)    # [N, *input_shape]
    y = onnx_runner(fx.model)(pts)                                     # [N, O]
    if fx.C is not None:
        y = y @ fx.C.double().T
    return y


@pytest.mark.parametrize("method,interm", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("name", FIXTURES)
def test_golden_fixtures_sound(shared, name, method, interm):
    fx = load_fixture(shared, name)
    lb, ub = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method=method, C=fx.C,
                                      crown_interm=interm)
    y = _golden_samples(str(shared), name)
    assert lb.shape == ub.shape == (1, y.shape[1])
    what = f"{name} {method}/{interm}"
    assert_ordered(lb, ub, what)
    assert_inside(y, lb[0], ub[0], what)


# --------------------------------------------------------------------------------------------
# (b) random networks
# --------------------------------------------------------------------------------------------
EPS = {"zero": 0.0, "tiny": 1e-6, "small": 1e-3, "medium": 0.05, "large": 0.5, "huge": 3.0}


@st.composite
def regions(draw, input_shape: tuple[int, ...], batch: int):
    """[B, *input_shape[1:]] boxes: random centres, eps of random magnitude, per coordinate
    sometimes (some coordinates fixed)."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (batch,) + tuple(input_shape[1:])
    scale = draw(st.sampled_from([0.0, 0.3, 1.0, 3.0]))
    centre = torch.randn(shape, generator=gen) * scale
    eps_kind = draw(st.sampled_from(list(EPS)))
    eps = torch.full(shape, EPS[eps_kind])
    if eps_kind != "zero" and draw(st.booleans()):          # per-coordinate radii, some zero
        eps = eps * torch.rand(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.8)
    lo, hi = (centre - eps).float(), (centre + eps).float()
    return lo, hi, f"centre scale {scale}, eps {eps_kind}"


@st.composite
def specs(draw, batch: int, num_out: int):
    kind = draw(st.sampled_from(["none", "none", "shared", "per_region", "robustness"]))
    if kind == "none":
        return None
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    rows = draw(st.integers(1, 4))
    if kind == "robustness" and num_out > 1:
        label = draw(st.integers(0, num_out - 1))
        C = -torch.eye(num_out)[[j for j in range(num_out) if j != label]]
        C[:, label] = 1.0
        return C
    C = torch.randn((rows, num_out) if kind != "per_region" else (batch, rows, num_out), generator=gen)
    return C


def _spec_for(C: torch.Tensor | None, b: int) -> torch.Tensor | None:
    if C is None:
        return None
    return C[b] if C.dim() == 3 else C


def _apply_spec(y: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
    return y if C is None else y @ C.double().T


@functools.lru_cache(maxsize=1)
def _onnx_export_works() -> bool:
    try:
        with tempfile.TemporaryDirectory() as d:
            export_onnx(torch.nn.Linear(2, 2), torch.zeros(1, 2), os.path.join(d, "m.onnx"))
        return True
    except Exception:  # noqa: BLE001 - e.g. an exporter that needs a missing package
        return False


SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# examples per kind: the conv nets cost more (torch.export, conv backward passes); the whole file
# should stay well under 90 s on 2 cores. BOUNDFLOW_SOUNDNESS_EXAMPLES=n multiplies them by n.
EXAMPLES = {"mlp": 10, "normalized_mlp": 8, "permute": 8}
SCALE = int(os.environ.get("BOUNDFLOW_SOUNDNESS_EXAMPLES", "1"))


@pytest.mark.parametrize("kind", KINDS)
def test_random_networks_sound(kind):
    @settings(SETTINGS, max_examples=EXAMPLES.get(kind, 5) * SCALE)
    @given(data=st.data())
    def run(data):
        check_random_network(kind, data)

    run()


def check_random_network(kind, data):
    net = data.draw(networks([kind]), label="net")
    batch = data.draw(st.sampled_from([1, 3]), label="B")
    lo, hi, box_desc = data.draw(regions(net.input_shape, batch), label="box")
    C = data.draw(specs(batch, net.num_outputs), label="C")
    gen = torch.Generator().manual_seed(1)

    models: list[tuple[str, object]] = [("torch", net.module)]
    with tempfile.TemporaryDirectory() as tmp:
        runner = None
        if _onnx_export_works():
            path = export_onnx(net.module, torch.zeros(net.input_shape), os.path.join(tmp, "net.onnx"))
            runner = onnx_runner(path)
            models.append(("onnx", path))

        # samples, per region, evaluated by torch (and by onnxruntime)
        samples = []
        for b in range(batch):
            pts = sample_box(lo[b], hi[b], N_SAMPLES, N_CORNERS, gen)
            ys = [_apply_spec(net(pts).double(), _spec_for(C, b))]
            if runner is not None:
                ys.append(_apply_spec(runner(pts), _spec_for(C, b)))
            samples.append(ys)

        for method, interm in METHODS:
            per_frontend = {}
            for fe, model in models:
                what = f"{net!r} {box_desc} B={batch} C={None if C is None else list(C.shape)} " \
                       f"{method}/{interm} via {fe}"
                lb, ub = boundflow.compute_bounds(model, lo, hi, method=method, C=C, crown_interm=interm)
                rows = net.num_outputs if C is None else C.shape[-2]
                assert lb.shape == ub.shape == (batch, rows), what
                assert_ordered(lb, ub, what)
                for b in range(batch):
                    for y in samples[b]:
                        assert_inside(y, lb[b], ub[b], f"{what} region {b}")
                per_frontend[fe] = (lb, ub)

            if batch > 1 and (method, interm) in BATCH_INDEPENDENT:
                lb, ub = per_frontend["torch"]
                for b in range(batch):
                    lb1, ub1 = boundflow.compute_bounds(net.module, lo[b:b + 1], hi[b:b + 1], method=method,
                                                        C=_spec_for(C, b), crown_interm=interm)
                    for got, want, side in ((lb[b], lb1[0], "lb"), (ub[b], ub1[0], "ub")):
                        diff = (got.double() - want.double()).abs()
                        assert (diff <= _tol(want)).all(), \
                            f"{net!r} {method}/{interm}: region {b} {side} with B={batch} differs from " \
                            f"B=1 by {diff.max().item():.3e}"


ALPHA_KINDS = ("mlp", "normalized_mlp", "permute")


@settings(SETTINGS, max_examples=8)
@given(data=st.data())
def test_random_networks_alpha_crown_sound(data):
    net = data.draw(networks(ALPHA_KINDS), label="net")
    batch = data.draw(st.sampled_from([1, 2]), label="B")
    lo, hi, box_desc = data.draw(regions(net.input_shape, batch), label="box")
    C = data.draw(specs(batch, net.num_outputs), label="C")
    gen = torch.Generator().manual_seed(2)
    lb, ub = boundflow.compute_bounds(net.module, lo, hi, method="alpha-crown", C=C)
    clb, cub = boundflow.compute_bounds(net.module, lo, hi, method="crown", C=C)
    what = f"{net!r} {box_desc} B={batch} C={None if C is None else list(C.shape)} alpha-crown"
    assert_ordered(lb, ub, what)
    # never looser than the CROWN it starts from (it keeps the best bound it has seen)
    assert (lb.double() >= clb.double() - _tol(clb)).all() and (ub.double() <= cub.double() + _tol(cub)).all(), what
    for b in range(batch):
        pts = sample_box(lo[b], hi[b], N_SAMPLES, N_CORNERS, gen)
        assert_inside(_apply_spec(net(pts).double(), _spec_for(C, b)), lb[b], ub[b], f"{what} region {b}")


@settings(SETTINGS, max_examples=12)
@given(data=st.data())
def test_patches_equal_dense_passes(data):
    """Refinement passes over receptive-field windows give the dense passes' bounds (the same
    arithmetic, fewer zeros), for every intermediate mode and B regions at once, through
    clamps and affine maps too, with alpha-CROWN's slopes too."""
    net = data.draw(networks(["cnn", "bn_cnn", "residual", "clamp_cnn"]), label="net")
    batch = data.draw(st.sampled_from([1, 3]), label="B")
    lo, hi, _ = data.draw(regions(net.input_shape, batch), label="box")
    interm = data.draw(st.sampled_from(["sparse", "intersect", "pure"]), label="interm")
    method = data.draw(st.sampled_from(["crown", "alpha-crown"]), label="method")
    got = {}
    for patches in (True, False):
        config = boundflow.PlannerConfig(crown_interm=interm, patches=patches)
        res = boundflow.bound(net.module, lo, hi, method, config=config)
        got[patches] = res
    for side in ("lb", "ub"):
        a, b = getattr(got[True], side).double(), getattr(got[False], side).double()
        assert ((a - b).abs() <= 10 * _tol(b)).all(), (repr(net), interm, method, side, (a - b).abs().max().item())


def patched_and_dense(module, lo, hi, method: str, op: str, **config) -> dict:
    """Bounds with patches (True) and without (False); the patched plan has ``op``, the other
    not, and both give the same bounds."""
    got = {}
    for patches in (True, False):
        cfg = boundflow.PlannerConfig(patches=patches, **config)
        got[patches] = boundflow.bound(module, lo, hi, method, config=cfg)
        graph, key = boundflow.load_model(module, lo)
        plan, _ = boundflow.api.get_plan(graph, key, method, 1, None, cfg)
        assert any(o.op == op for o in plan.ops()) == patches
    assert torch.allclose(got[True].lb, got[False].lb, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got[True].ub, got[False].ub, rtol=1e-5, atol=1e-5)
    return got


@pytest.mark.parametrize("method,op", [("crown", "linear.patch_clamp_min"), ("crown", "linear.patch_affine"),
                                       ("alpha-crown", "linear.patch_clamp_min_alpha"),
                                       ("alpha-crown", "linear.patch_affine")])
def test_patches_go_through_clamps_and_affine_maps(method, op):
    """ReLU6, a hardtanh, a BatchNorm after an activation (no conv absorbs it): the passes stay
    on windows (dense passes took a ReLU6 CNN on 3x32x32 7.9 s, these 0.18 s), same bounds."""
    torch.manual_seed(0)
    nn = torch.nn
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(-1.5, 1.5)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU6(), bn, nn.Conv2d(4, 4, 3, stride=2, padding=1),
                        nn.Hardtanh(-0.3, 0.4), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64, 3)).eval()
    x0 = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    patched_and_dense(net, x0 - 0.3, x0 + 0.3, method, op)


def test_patches_whose_window_grid_starts_past_the_input(tmp_path):
    """A nightly fuzz find: a 1 x 1 input, a first conv padded by 2 on the left with stride 2 and
    1 x 1 convs padded below after it; the windows on the input start past its far edge, where
    F.pad refused the crop. Both plans agree and hold at the input."""
    from onnx import TensorProto, helper, numpy_helper
    gen = torch.Generator().manual_seed(3)
    w = [torch.randn(1, 1, 1, 1, generator=gen).numpy() for _ in range(4)]
    convs = [dict(pads=[0, 2, 0, 0], strides=[1, 2]), dict(pads=[0, 0, 1, 0]), dict(pads=[0, 0, 1, 0]),
             dict(strides=[1, 2])]
    nodes, x = [], "x"
    for k, kw in enumerate(convs):
        nodes += [helper.make_node("Conv", [x, f"w{k}"], [f"c{k}"], **kw), helper.make_node("Relu", [f"c{k}"], [f"r{k}"])]
        x = f"r{k}"
    nodes += [helper.make_node("Flatten", [x], ["f"]), helper.make_node("Gemm", ["f", "hw", "hb"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(a, f"w{k}") for k, a in enumerate(w)]
    inits += [numpy_helper.from_array(torch.randn(1, 3, generator=gen).numpy(), "hw"),
              numpy_helper.from_array(torch.randn(1, generator=gen).numpy(), "hb")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    path = tmp_path / "net.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)]).SerializeToString())
    lo, hi = -torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    got = patched_and_dense(str(path), lo, hi, "crown", "linear.patch_concretize")
    y = torch.as_tensor(onnx_runner(str(path))(torch.linspace(-1, 1, 21).reshape(21, 1, 1, 1)))
    assert_inside(y, got[True].lb[0], got[True].ub[0], "window grid past the input")


def test_alpha_crown_sound_fp_on_a_zero_width_sign_stays_finite(tmp_path):
    """A nightly fuzz find: on a point box, Sign after ReLUs of a padded conv's zeros gave NaN
    slope gradients; one Adam step made the slopes NaN and the kept "best" bound NaN (torch.maximum
    propagates it). Now the bound stays finite and holds at the point."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np
    head = [0.0247, -0.1263, 0.0852, 0.3074, 0.2232, -0.1659, -0.2983, -0.1469, 0.0097, -0.548, -0.0516,
            -0.2937, -0.1726, -0.1283, -0.0746, 0.097, 0.2457, -0.0303]
    inits = [numpy_helper.from_array(np.array([0.1257, -0.1321, 0.6404], np.float32).reshape(3, 1, 1, 1), "w"),
             numpy_helper.from_array(np.array([head], np.float32), "hw"),
             numpy_helper.from_array(np.array([0.4099], np.float32), "hb")]
    nodes = [helper.make_node("GlobalMaxPool", ["x"], ["g"]), helper.make_node("Conv", ["g", "w"], ["c"], pads=[0, 0, 1, 2]),
             helper.make_node("Relu", ["c"], ["r1"]), helper.make_node("Relu", ["r1"], ["r2"]),
             helper.make_node("Relu", ["r2"], ["r3"]), helper.make_node("Sign", ["r3"], ["s"]),
             helper.make_node("Flatten", ["s"], ["f"], axis=0),
             helper.make_node("Gemm", ["f", "hw", "hb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    path = tmp_path / "net.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)]).SerializeToString())
    x = torch.zeros(1, 1, 1, 1)
    res = boundflow.bound(str(path), x, x, "alpha-crown", config=boundflow.PlannerConfig(sound_fp=True),
                          alpha=AlphaConfig(iterations=8))
    y = torch.as_tensor(onnx_runner(str(path))(x.reshape(1, 1, 1, 1)))
    assert torch.isfinite(res.lb).all() and torch.isfinite(res.ub).all()
    assert_inside(y, res.lb[0], res.ub[0], "zero-width sign")


@pytest.mark.parametrize("interm", ["sparse", "pure"])
def test_patches_on_a_deep_conv_chain(interm):
    """Three convs (strides 1 and 2, paddings 0 to 2, rectangular kernels and input, one without
    bias): the plan uses patches and matches the dense plan; both are sound by sampling."""
    torch.manual_seed(5)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, (3, 2), stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3, stride=1, padding=2, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(5, 3, (2, 3), stride=2, padding=0), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.LazyLinear(4))
    x = torch.randn(1, 2, 9, 7)
    module(x)
    lo, hi = x - 0.2, x + 0.2
    got = patched_and_dense(module, lo, hi, "crown", "linear.patch_conv", crown_interm=interm)
    pts = sample_box(lo[0], hi[0], N_SAMPLES, N_CORNERS, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_inside(module(pts).double(), got[True].lb[0], got[True].ub[0], f"deep conv chain {interm}")


class _ResidualNet(torch.nn.Module):
    """resnet_2b's shape, small: a strided stem, a block whose shortcut is a strided 1 x 1
    conv, a block with an identity shortcut, a dense head; with `bare`, a sum that feeds a conv
    directly (no ReLU between: that pass stays dense)."""

    def __init__(self, bare: bool = False):
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem = conv(2, 4, 3, stride=2, padding=1)
        self.a1, self.a2, self.short = conv(4, 6, 3, stride=2, padding=1), conv(6, 6, 3, padding=1), conv(4, 6, 1, stride=2)
        self.b1, self.b2 = conv(6, 6, 3, padding=1), conv(6, 6, (3, 1), padding=(1, 0))
        self.bare = conv(6, 6, 3, padding=1) if bare else None
        self.head = torch.nn.LazyLinear(3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.a2(torch.relu(self.a1(h))) + self.short(h))
        h = h + self.b2(torch.relu(self.b1(h)))
        h = torch.relu(self.bare(h) + h if self.bare is not None else h)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("bare", [False, True])
@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_patches_through_residual_blocks(bare, method):
    """Passes go through sums (residual connections) and fan-out over windows: a value read by
    a block and by its shortcut gets their windows' union. The bounds are the dense plan's,
    and sound by sampling."""
    torch.manual_seed(7)
    module = _ResidualNet(bare)
    x = torch.randn(1, 2, 12, 12)
    module(x)
    lo, hi = x - 0.1, x + 0.1
    got = patched_and_dense(module, lo, hi, method, "linear.patch_add", crown_interm="pure")
    graph, key = boundflow.load_model(module, lo)
    plan, _ = boundflow.api.get_plan(graph, key, method, 1, None, boundflow.PlannerConfig(crown_interm="pure"))
    assert any(o.op == "linear.patch_start_onehot" for o in plan.ops())
    pts = sample_box(lo[0], hi[0], N_SAMPLES, N_CORNERS, torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_inside(module(pts).double(), got[True].lb[0], got[True].ub[0], f"residual patches {method}")


def test_patch_add_places_its_second_input():
    """patch_add (the sum of a value's two contributions, the second on smaller windows) is
    patch_pad then accumulate, bit for bit, into its planned view or a fresh tensor."""
    from boundflow.domains.linear import accumulate
    from boundflow.domains.patches import patch_add, patch_pad
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 6, 2, 7, 5, generator=g), torch.randn(1, 6, 2, 3, 2, generator=g)
    attrs = {"pad": [1, 3, 2, 1]}
    want = accumulate([a, patch_pad([b], [], attrs)[0]], [], {})[0]
    view = torch.full_like(a, float("nan"))
    assert torch.equal(patch_add([a, b], [], attrs)[0], want)
    got = patch_add([a, b], [], attrs, out=(view,))[0]
    assert got is view and torch.equal(view, want)


def test_alpha_crown_patches_equal_dense():
    """alpha-CROWN's refinement passes over windows: one slope per row and window position,
    started from CROWN's; the optimiser sees the same problem, so the bounds agree."""
    torch.manual_seed(6)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, stride=1, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.randn(1, 2, 8, 8)
    module(x)
    lo, hi = x - 0.3, x + 0.3
    got = patched_and_dense(module, lo, hi, "alpha-crown", "linear.patch_relu_alpha")
    crown = boundflow.bound(module, lo, hi, "crown")
    assert (got[True].lb >= crown.lb - 1e-5).all() and (got[True].ub <= crown.ub + 1e-5).all()
    pts = sample_box(lo[0], hi[0], N_SAMPLES, N_CORNERS, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_inside(module(pts).double(), got[True].lb[0], got[True].ub[0], "alpha-crown patches")


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_identity_model_bounds_are_the_box(tmp_path, method):
    """output = input (an ONNX Identity, no op left after loading): the bounds are the box itself,
    and C @ box exactly for a spec (CROWN crashed looking for the output's producer)."""
    from onnx import helper

    from nets import onnx_file

    path = onnx_file([helper.make_node("Identity", ["x"], ["y"])], {}, [1, 3], [1, 3], tmp_path / "id.onnx")
    lo, hi = torch.tensor([[[-1.0, 0.0, 2.0]], [[0.5, -4.0, 1.0]]]), torch.tensor([[[1.0, 0.5, 3.0]], [[0.5, 2.0, 8.0]]])
    res = boundflow.bound(path, lo, hi, method)
    assert torch.equal(res.lb, lo[:, 0]) and torch.equal(res.ub, hi[:, 0])
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 2.0, -0.5]])
    res = boundflow.bound(path, lo, hi, method, C=C)
    want_lb = C.clamp(min=0) @ lo[:, 0].T + C.clamp(max=0) @ hi[:, 0].T
    want_ub = C.clamp(min=0) @ hi[:, 0].T + C.clamp(max=0) @ lo[:, 0].T
    assert torch.equal(res.lb, want_lb.T) and torch.equal(res.ub, want_ub.T)


def test_torch_module_changed_in_place_gets_fresh_bounds():
    """The model cache is keyed by the module's tensors: weights scaled in place (through the
    parameter or through .data, which torch's version counter does not see) give the bounds of
    the new weights, which hold on samples (the old key, id(module), returned stale bounds)."""
    torch.manual_seed(11)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    lo, hi = -torch.ones(1, 4), torch.ones(1, 4)
    first = boundflow.bound(module, lo, hi, "crown")
    assert boundflow.bound(module, lo, hi, "crown").stats["plan_cached"]      # unchanged: cached
    pts = sample_box(lo[0], hi[0], N_SAMPLES, N_CORNERS)
    for scale in (lambda p: p.mul_(10), lambda p: p.data.mul_(10)):
        with torch.no_grad():
            for p in module.parameters():
                scale(p)
        res = boundflow.bound(module, lo, hi, "crown")
        assert not torch.equal(res.lb, first.lb)
        with torch.no_grad():
            assert_inside(module(pts).double(), res.lb[0], res.ub[0], "scaled in place")
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        fresh.load_state_dict(module.state_dict())
        assert torch.equal(res.lb, boundflow.bound(fresh, lo, hi, "crown").lb)


def test_model_proto_changed_in_place_gets_fresh_bounds(tmp_path):
    """A ModelProto is cached by its serialized bytes: an initializer replaced in place gives the
    bounds of the model as it now is (the same as its saved file's)."""
    import onnx
    from onnx import numpy_helper

    from test_api_errors import _mlp_proto

    model = _mlp_proto()
    lo, hi = -torch.ones(1, 3), torch.ones(1, 3)
    first = boundflow.bound(model, lo, hi, "crown")
    w = model.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 10, w.name))
    res = boundflow.bound(model, lo, hi, "crown")
    assert not torch.equal(res.lb, first.lb)
    onnx.save(model, str(tmp_path / "scaled.onnx"))
    saved = boundflow.bound(str(tmp_path / "scaled.onnx"), lo, hi, "crown")
    assert torch.equal(res.lb, saved.lb) and torch.equal(res.ub, saved.ub)


def test_bounded_model_reads_its_model_once(tmp_path):
    """A BoundedModel gives, bit for bit, the bounds a call with the path (or the torch module)
    gives, for every method and a spec; it does not look at the file again (what it saves per
    call): a file rewritten with other weights afterwards keeps its bounds, while the path and a
    new BoundedModel give the new ones."""
    import onnx
    from onnx import numpy_helper

    from test_api_errors import _mlp_proto

    model, path = _mlp_proto(), str(tmp_path / "mlp.onnx")
    onnx.save(model, path)
    lo, hi = -torch.ones(1, 3), torch.ones(1, 3)
    loaded = boundflow.BoundedModel(path)
    C = torch.tensor([[1.0, -1.0]])
    for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        for spec in (None, C):
            want = boundflow.bound(path, lo, hi, method, C=spec)
            got = loaded.bound(lo, hi, method, C=spec)
            assert torch.equal(got.lb, want.lb) and torch.equal(got.ub, want.ub), (method, spec)
    first = loaded.compute_bounds(lo, hi, "crown")
    w = model.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 10, w.name))
    onnx.save(model, path)
    assert all(map(torch.equal, loaded.compute_bounds(lo, hi, "crown"), first))
    fresh = boundflow.compute_bounds(path, lo, hi, "crown")
    assert not torch.equal(fresh[0], first[0])
    assert all(map(torch.equal, boundflow.BoundedModel(path).compute_bounds(lo, hi, "crown"), fresh))
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert all(map(torch.equal, boundflow.BoundedModel(net, lo).compute_bounds(lo, hi, "crown"),
                   boundflow.compute_bounds(net, lo, hi, "crown")))


def _fuzz_case_sound(path, lo, hi, method, config=None):
    """Bounds of `method` contain onnxruntime's outputs at sampled points of [lo, hi]."""
    res = boundflow.bound(str(path), lo, hi, method, config=config)
    pts = sample_box(lo[0], hi[0], 400, 100)
    ys = onnx_runner(path)(pts)
    assert_inside(ys, res.lb[0], res.ub[0], f"{method} {config}")


def test_two_relaxed_ops_reading_one_value(tmp_path):
    """Regression (found by tests/test_fuzz.py): a ReLU and a sigmoid of one value made
    alpha-CROWN's plan read a slope buffer nothing wrote (both ops' slopes were named by their
    common input). Now each op has its own slopes, and ReLU branch and bound splits the value."""
    nn = torch.nn

    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.relu(h) + torch.sigmoid(h) - torch.relu(h) * 0.5)

    torch.manual_seed(0)
    path = export_onnx(Fork(), torch.zeros(1, 4), tmp_path / "fork.onnx")
    lo, hi = -torch.ones(1, 4), torch.ones(1, 4)
    for method in ("crown", "alpha-crown"):
        _fuzz_case_sound(path, lo, hi, method)


def test_alpha_crown_windowed_slopes_sound_fp(tmp_path):
    """Regression (found by tests/test_fuzz.py): alpha-CROWN's starting slopes on receptive
    field windows (conv/relu chains, pure intermediate CROWN) misread a sound_fp plan's inputs
    (the last one is the op's error vector) and crashed."""
    nn = torch.nn
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
                           nn.Flatten(), nn.Linear(32, 2))
    path = export_onnx(module, torch.zeros(1, 1, 4, 4), tmp_path / "chain.onnx")
    lo, hi = -torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    _fuzz_case_sound(path, lo, hi, "alpha-crown", boundflow.PlannerConfig(crown_interm="pure", sound_fp=True))


def test_biased_conv_on_a_leading_axis(tmp_path):
    """Regression (found by tests/test_fuzz.py): CROWN refining a biased conv of a [N > 1, C,
    H, W] value through its dense matrix broadcast the bias over [C, H, W] only and crashed."""
    import numpy as np
    from onnx import helper

    from nets import onnx_file
    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(size=(2, 2, 1, 1)).astype(np.float32), "B": rng.normal(size=2).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "W", "B"], ["c2"]), helper.make_node("Relu", ["c2"], ["y"])]
    path = onnx_file(nodes, inits, [2, 2, 2, 2], [2, 2, 2, 2], tmp_path / "lead.onnx")
    lo, hi = -torch.ones(1, 2, 2, 2, 2), torch.ones(1, 2, 2, 2, 2)
    for method in ("crown", "alpha-crown"):
        _fuzz_case_sound(path, lo, hi, method)


@pytest.mark.parametrize("op", ["Add", "Mul", "Min", "Max"])
@pytest.mark.parametrize("cshape", [(2, 1, 3), (1, 1, 1), (2, 3)])
def test_a_constant_that_broadcasts_the_variable(tmp_path, op, cshape):
    """Regression (found by tests/test_fuzz.py): Min(x, c) with c of a higher rank than x failed
    to load (the scalar clamp kept x's shape); a constant that enlarges x (Add, Mul, Min, Max of a
    [1, 3] x and a [2, 3] c) was refused. Now x is broadcast to the output shape first."""
    import numpy as np
    from onnx import helper

    from nets import onnx_file
    c = np.linspace(-0.5, 0.5, int(np.prod(cshape)), dtype=np.float32).reshape(cshape)
    out = list(np.broadcast_shapes((1, 3), cshape))
    path = onnx_file([helper.make_node(op, ["x", "c"], ["y"])], {"c": c}, [1, 3], out, tmp_path / "bc.onnx")
    lo, hi = -torch.ones(1, 1, 3), torch.ones(1, 1, 3)
    for method in ("ibp", "crown", "alpha-crown"):
        _fuzz_case_sound(path, lo, hi, method)


def test_pure_crown_keeps_a_divisor_in_its_domain(tmp_path):
    """Regression (found by tests/test_fuzz.py): with crown_interm="pure", CROWN's bound on
    softplus(x) + 0.5 (a tangent below a convex curve) reached below 0 and replaced the interval,
    so 1/x had no domain. Inputs of relaxed ops other than ReLU keep the interval's cut."""
    import numpy as np
    from onnx import helper

    from nets import onnx_file
    nodes = [helper.make_node("Softplus", ["x"], ["s"]), helper.make_node("Add", ["s", "h"], ["d"]),
             helper.make_node("Reciprocal", ["d"], ["y"])]
    path = onnx_file(nodes, {"h": np.float32(0.5)}, [1, 2], [1, 2], tmp_path / "div.onnx")
    lo, hi = torch.tensor([[[-10.0, -1.0]]]), torch.tensor([[[10.0, 3.0]]])
    for method in ("crown", "alpha-crown"):
        _fuzz_case_sound(path, lo, hi, method, boundflow.PlannerConfig(crown_interm="pure"))


def test_sign_of_a_rounded_zero_is_not_a_step_up(tmp_path):
    """A nightly fuzz find: Clip(max 0.5) of ReLU outputs that reach 0, then Sign. CROWN's bound
    on the clip's input is 0.5 - relu(0.5 - x), whose lower end comes out +3e-8 in float32 where
    the exact one is 0: Sign read that as "always 1" and the output's lower bound was 0.169 above
    a value the net takes (-0.077). Sign now treats non-zero ends that close to 0 as crossing it."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np
    import onnxruntime as ort
    head = [0.009740626, -0.548015, -0.05156969, -0.29366404, -0.17259707, -0.12828307, -0.07455266, 0.09702225,
            0.24572276, -0.030295910, 0.32207853, -0.15678789, 0.08285172, 0.21294996, 0.022158911, -0.17524445,
            -0.21725276, -0.107887015]
    w = [[0.088904694, -0.093412243], [0.45284721, 0.074175581], [-0.37877545, 0.25568631], [0.92206728, 0.66968739]]
    inits = [numpy_helper.from_array(np.array(w, np.float32), "w"),
             numpy_helper.from_array(np.array([-0.35186762, -0.63271075, -0.31163722], np.float32), "b"),
             numpy_helper.from_array(np.array([head], np.float32), "hw"),
             numpy_helper.from_array(np.array([0.066058539], np.float32), "hb")]
    nodes = [helper.make_node("Add", ["x", "x"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Gemm", ["w", "r", "b"], ["g"]), helper.make_node("Relu", ["g"], ["r2"]),
             helper.make_node("Concat", ["r2", "r"], ["c"], axis=0), helper.make_node("Clip", ["c"], ["k"], max=0.5),
             helper.make_node("Sign", ["k"], ["s"]), helper.make_node("Flatten", ["s"], ["f"], axis=0),
             helper.make_node("Gemm", ["f", "hw", "hb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    path = tmp_path / "net.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)]).SerializeToString())
    lo = torch.tensor([[0.1136071607, 2.0019376278, 0.3010737896], [-1.3447642326, 0.3035575151, 0.1856819987]])
    hi = torch.tensor([[0.1136071607, 2.4172656536, 0.9129873514], [-0.0936397314, 0.9853509665, 2.0696105957]])
    points = sample_box(lo, hi, 400, 64, torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.tensor([float(sess.run(None, {"x": p.numpy()})[0].item()) for p in points])
    assert y.min() < -0.07                              # the value the wrong bound excluded
    for method in ("ibp", "crown-ibp", "crown"):
        res = boundflow.bound(str(path), lo, hi, method)
        assert res.lb.item() <= y.min().item() + 1e-6 and y.max().item() <= res.ub.item() + 1e-6, method   # (float32)


def _sign_after_cancellation() -> "onnx.ModelProto":
    """A nightly fuzzer's network (seed 4058081320): Sign(Relu(Relu(g - tanh(g)))) with g tiny,
    so g - tanh(g) ~ -g^3 / 3 is decided by rounding, and a head reading the step."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    def init(name, values, shape):
        return numpy_helper.from_array(np.array(values, np.float32).reshape(shape), name)
    nodes = [helper.make_node("Gemm", ["w1", "x"], ["g"], transB=1),
             helper.make_node("Tanh", ["g"], ["t"]),
             helper.make_node("MatMul", ["w6", "t"], ["m"]),
             helper.make_node("Sub", ["g", "t"], ["d"]),
             helper.make_node("Relu", ["d"], ["r1"]),
             helper.make_node("Relu", ["r1"], ["r2"]),
             helper.make_node("Sign", ["r2"], ["s"]),
             helper.make_node("Flatten", ["m"], ["mf"], axis=0),
             helper.make_node("Gemm", ["mf", "hw1", "hb1"], ["h1"], transB=1),
             helper.make_node("Flatten", ["s"], ["sf"], axis=0),
             helper.make_node("Gemm", ["sf", "hw2", "hb2"], ["h2"], transB=1),
             helper.make_node("Add", ["h1", "h2"], ["y"])]
    inits = [init("w1", [0.004835969302803278], (1, 1)), init("w6", [-1.2525882720947266], (1,)),
             init("hw1", [-1.2740799188613892, 0.6397044062614441], (1, 2)), init("hb1", [-0.037608228623867035], (1,)),
             init("hw2", [0.6580728888511658, -0.8989201784133911], (1, 2)), init("hb2", [-0.41034170985221863], (1,))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


@pytest.mark.parametrize("method", ["crown", "crown-ibp", "alpha-crown"])
def test_crossed_intermediate_bounds_are_never_kept_crossed(method):
    """At a point box a CROWN bound of Sign's input (a ReLU's exact 0) came out -8.6e-12, under
    the interval bound's 0; intersected as they were, [0, -8.6e-12] made Sign's upper end -1 and
    the output's upper bound -1.107 under the network's value -0.449. Crossed ends now meet at
    the interval bound's end (domains.bound.met): the bounds hold, and are that value, in float32
    as in sound_fp."""
    import onnxruntime as ort
    model = _sign_after_cancellation()
    x = torch.tensor([[-0.2434], [-0.3019]])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    value = sess.run(None, {"x": x.numpy()})[0].item()
    for sound in (False, True):
        lb, ub = boundflow.compute_bounds(model, x, x, method=method, sound_fp=sound, device="cpu")
        assert value - 1e-6 <= lb.item() <= value + 1e-6 and value - 1e-6 <= ub.item() <= value + 1e-6, \
            (sound, lb, ub, value)


def test_merges_of_crossed_bounds_are_ordered():
    """Every way a CROWN bound meets an interval bound keeps lower <= upper: an intersection
    whose ends cross (the CROWN bound wholly below or above the interval, by rounding) is the
    interval's nearer end; a CROWN bound taken alone has crossed ends swapped."""
    from boundflow.domains import bound
    s = torch.tensor([[0.0, 1.0, -2.0, 0.0], [0.0, 3.0, -1.0, 1.0]]).view(2, 1, 4)      # stack(lo, hi)
    crown = torch.tensor([[-5e-10, 1.5, -1.5, 1.2], [-8e-12, 2.0, -1.2, 1.3]]).view(2, 1, 4)
    want = torch.tensor([[0.0, 1.5, -1.5, 1.0], [0.0, 2.0, -1.2, 1.0]]).view(2, 1, 4)
    idx = torch.arange(4)
    for got in (bound.intersect([s, crown], [], {}), bound.merge_sparse([s, idx, crown], [], {"intersect": True}),
                bound.merge_sparse([s, idx.view(1, 4), crown], [], {"intersect": True})):
        assert torch.equal(got[0], want)
    crossed = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.5, 1.0, 1.0, 0.0]]).view(2, 1, 4)
    swapped = torch.tensor([[0.5, 0.0, 1.0, 0.0], [1.0, 1.0, 2.0, 0.0]]).view(2, 1, 4)
    for got in (bound.replace([s, crossed], [], {}), bound.merge_sparse([s, idx, crossed], [], {"intersect": False})):
        assert torch.equal(got[0], swapped)
