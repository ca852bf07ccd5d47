"""The device option. On the CPU: choosing a device ("auto" is the CPU here; "cuda" without CUDA
and unknown names fail clearly), and the plumbing, checked on torch's "meta" device: a plan for
it keeps its parameters there, the executor allocates its arena there, and every kernel's result
is there (the checked executor asserts it for every op; a kernel mixing in a CPU tensor fails
outright). Ops whose kernels check their input intervals' values (the convex curves' domain
checks) cannot run on meta; the CUDA tests cover them.

With CUDA (scripts/gpu_check.sh): bounds on the GPU equal the CPU's on the golden fixtures,
sound_fp bounds contain the sampled outputs, and verify gives the expected verdicts there.
"""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.fx.experimental._config as fx_config

import boundflow
from boundflow.cli import main
from boundflow.errors import DeviceError
from boundflow.ir.task import of_kind
from boundflow.planner.config import PlannerConfig
from boundflow.planner.lower import fp32_refusal
from boundflow.runtime.device import constant, ieee_float32, resolve_device
from boundflow.runtime.python_executor import PythonTaskExecutor
from boundflow.verify.alpha import starting_slopes
from golden import FIXTURES, load_fixture
from nets import KINDS, build, export_onnx

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run scripts/gpu_check.sh on one)")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the errors of a machine without CUDA")
METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
META_OPS_FIXTURES = ["sigmoid_tanh_mlp__eps0.1", "maxpool_cnn__eps0.1", "convtranspose_net__eps0.1",
                     "bivariate_mul__eps0.2"]


# --------------------------------------------------------------------------- choosing a device

def test_auto_is_the_cpu_without_cuda(monkeypatch):
    """("auto" is decided once per process: the cache is cleared around the pretence.)"""
    from boundflow.runtime.device import _auto

    try:
        _auto.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert resolve_device("auto") == "cpu"
        _auto.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert resolve_device("auto") == "cuda"
    finally:
        _auto.cache_clear()


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "meta", "cpu:1", "", "tpu"])
def test_unknown_device_fails_clearly(name):
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device(name)


def test_unknown_device_in_the_planner_fails_clearly():
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        PlannerConfig(device="gpu")


@no_cuda
def test_cuda_without_cuda_fails_clearly(capsys, tmp_path):
    lo = torch.zeros(1, 3)
    with pytest.raises(DeviceError, match="torch sees no CUDA device"):
        boundflow.compute_bounds(torch.nn.Linear(3, 2), lo, lo + 1, device="cuda")
    model = tmp_path / "m.onnx"
    from nets import export_onnx
    export_onnx(torch.nn.Linear(3, 2), lo, model)
    box = tmp_path / "box.json"
    box.write_text('{"lower": [0, 0, 0], "upper": [1, 1, 1]}')
    assert main(["bounds", str(model), "--box", str(box), "--device", "cuda"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert main(["bounds", str(model), "--box", str(box), "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err


@no_cuda
def test_verify_on_cuda_without_cuda_fails_clearly(tmp_path):
    from boundflow.verify.verifier import VerifyConfig, verify
    with pytest.raises(DeviceError, match="torch sees no CUDA device"):
        verify(tmp_path / "absent.onnx", tmp_path / "absent.vnnlib", 10, config=VerifyConfig(device="cuda"))


def test_the_device_of_a_search_is_not_a_bound_option():
    from boundflow.verify.bab import BabConfig
    from boundflow.verify.verifier import VerifyConfig
    with pytest.raises(ValueError, match="VerifyConfig.device"):
        VerifyConfig(bab=BabConfig(bound_options={"device": "cpu"}))


def test_auto_runs_on_the_cpu_here_and_results_come_back():
    net = build("cnn", 0)
    lo = torch.zeros(net.input_shape)
    res = boundflow.api.bound(net.module, lo, lo + 0.1, "crown")
    assert res.stats["device"] == resolve_device("auto")
    assert res.stats["config"]["device"] == res.stats["device"]
    assert res.lb.device.type == "cpu" and res.ub.device.type == "cpu"


def test_tvm_refuses_a_gpu_plan(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    lo = torch.zeros(1, 3)
    with pytest.raises(DeviceError, match="CPU only"):
        boundflow.compute_bounds(torch.nn.Linear(3, 2), lo, lo + 1, executor="tvm", device="cuda")


def test_tvm_executor_refuses_a_plan_for_another_device():
    pytest.importorskip("tvm")
    lo = torch.zeros(1, 3)
    graph, _ = boundflow.load_model(torch.nn.Linear(3, 2), lo)
    module = boundflow.plan(graph, "crown", PlannerConfig(device="meta"))
    with pytest.raises(ValueError, match="CPU only"):
        boundflow.TVMTaskExecutor().prepare(module)


# --------------------------------------------------------------------------- plumbing, on meta

@pytest.fixture
def meta_nonzero():
    """nonzero on meta (the unstable-neuron selection) as if every neuron were selected."""
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def _run_on_meta(graph, method: str, sound_fp: bool, spec_rows: int | None = None):
    module = boundflow.plan(graph, method, PlannerConfig(device="meta", sound_fp=sound_fp), batch=2,
                            spec_rows=spec_rows)
    assert module.device == torch.device("meta")
    assert module.params and all(p.device.type == "meta" for p in module.params.values())
    dtype = torch.float64 if sound_fp else torch.float32
    shape = (2, 2) + tuple(graph.shape(graph.inputs[0]))
    inputs = {"box": torch.zeros(shape, dtype=dtype, device="meta")}
    if spec_rows is not None:
        out = graph.values[graph.outputs[0]].type.numel
        inputs["C"] = torch.zeros((2, spec_rows, out), dtype=dtype, device="meta")
    ex = PythonTaskExecutor(checked=True)
    if method == "alpha-crown":
        roles = {role: None for role in of_kind(module.inputs, "alpha")}
        env = ex.run_functional(module, {**inputs, **roles})
        assert all(t.device.type == "meta" for t in env.values() if isinstance(t, torch.Tensor))
        assert all(t.device.type == "meta" for t in starting_slopes(module, env).values())
        return
    out = ex.run(module, inputs)
    assert all(a.device.type == "meta" for a in ex.prepare(module).arenas.values())
    assert out["bounds"].device.type == "meta"
    assert out["bounds"].shape == (2, 2, spec_rows or graph.values[graph.outputs[0]].type.numel)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sound_fp", [False, True], ids=["float32", "sound_fp"])
def test_every_tensor_of_a_plan_is_on_its_device(meta_nonzero, kind, method, sound_fp):
    net = build(kind, 0)
    graph, _ = boundflow.load_model(net.module, torch.zeros(net.input_shape))
    _run_on_meta(graph, method, sound_fp)


@pytest.mark.parametrize("name", FIXTURES[:1] + META_OPS_FIXTURES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sound_fp", [False, True], ids=["float32", "sound_fp"])
def test_every_tensor_of_a_plan_is_on_its_device_golden(shared, meta_nonzero, name, method, sound_fp):
    fx = load_fixture(shared, name, "golden" if name in FIXTURES else "golden_ops")
    graph, _ = boundflow.load_model(str(fx.model))
    _run_on_meta(graph, method, sound_fp, None if fx.C is None else fx.C.shape[0])


def test_a_graph_and_a_problem_move_whole():
    from boundflow.frontends.vnnlib import parse_vnnlib
    from boundflow.verify.property import make_problem

    net = build("bn_cnn", 0)
    graph, _ = boundflow.load_model(net.module, torch.zeros(net.input_shape))
    moved = graph.to("meta")
    consts = [v for v in moved.values.values() if v.data is not None]
    assert consts and all(v.data.device.type == "meta" for v in consts)
    assert all(v.err is None or v.err.device.type == "meta" for v in consts)
    assert all(v.data.device.type == "cpu" for v in graph.values.values() if v.data is not None)
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(2)) + \
        "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n" + \
        "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n" + \
        "(assert (<= Y_0 Y_1))\n"
    problem = make_problem(parse_vnnlib(text, 2, 2), (1, 2)).to("meta")
    assert problem.device.type == "meta"
    assert all(t.device.type == "meta" for t in (problem.outer_lo, problem.inner_hi, problem.members,
                                                  problem.C_bound, problem.spec, problem.thresholds))


def test_input_search_output_pass_plans_for_the_search_device(tmp_path):
    """Input branch and bound's float64 output pass (MixedBounder) runs on the problem's device
    (meta here), from intermediate bounds on that device, like its float32 bound."""
    from boundflow.frontends.vnnlib import parse_vnnlib
    from boundflow.verify.bab import MixedBounder
    from boundflow.verify.property import make_problem
    model = tmp_path / "mlp.onnx"
    export_onnx(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)),
                torch.zeros(1, 2), model)
    text = "".join(f"(declare-const X_{i} Real)\n(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 1.0))\n" for i in range(2))
    problem = make_problem(parse_vnnlib(text + "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
                                        "(assert (<= Y_0 Y_1))\n"), (1, 2))
    cpu = MixedBounder(str(model), problem, "crown", {})
    lo, hi = problem.outer_lo, problem.outer_hi
    rows = cpu.row_bounds(lo, hi)
    res = boundflow.api.BoundsResult(None, None, "crown", {}, {k: v.to("meta") for k, v in cpu.last_intermediate.items()})
    meta = MixedBounder(str(model), problem.to("meta"), "crown", {})
    out = meta._output_pass(lo.to("meta"), hi.to("meta"), res, rows.to("meta"))
    assert out.device.type == "meta" and out.shape == rows.shape


def test_kernel_constants_are_made_once_per_device():
    a = constant((1, 2, 3), torch.int64, torch.device("cpu"))
    assert a is constant((1, 2, 3), torch.int64, torch.device("cpu"))
    assert constant((1, 2, 3), torch.int64, torch.device("meta")).device.type == "meta"
    assert a.tolist() == [1, 2, 3]


def test_ieee_float32_on_cuda_and_restored():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with ieee_float32(torch.device("cuda")):
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with ieee_float32(torch.device("cpu")):
        assert (conv.fp32_precision, matmul.fp32_precision) == before


@pytest.mark.parametrize("sound_fp", [False, True], ids=["float32", "sound_fp"])
@pytest.mark.parametrize("name,folder", [("mlp_small__eps0.2", "golden"), ("cnn_small__eps0.1", "golden"),
                                         ("resnet_block__eps0.05", "golden"), ("attention_tiny__eps0.02", "golden_ops")])
def test_alpha_crown_needs_no_derivative_older_torch_lacks(shared, name, folder, sound_fp, monkeypatch):
    """torch before 2.13 (the GPU machines' 2.11) has no derivative for nextafter or aminmax:
    alpha-CROWN's kernels differentiate neither (rounding.up/down step one ulp with the
    identity's gradient), and the bounds are the same as with torch 2.13's derivatives."""
    fx = load_fixture(shared, name, folder)
    kw = dict(method="alpha-crown", C=fx.C, sound_fp=sound_fp, device="cpu")   # (bitwise: CUDA's are not)
    lb_ref, ub_ref = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, **kw)

    def no_derivative(f, what):
        def g(x, *args, **kwargs):
            if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x,) + args):
                raise NotImplementedError(f"the derivative for {what!r} is not implemented.")
            return f(x, *args, **kwargs)
        return g

    monkeypatch.setattr(torch, "nextafter", no_derivative(torch.nextafter, "nextafter"))
    monkeypatch.setattr(torch, "aminmax", no_derivative(torch.aminmax, "aminmax"))
    monkeypatch.setattr(torch.Tensor, "aminmax", no_derivative(torch.Tensor.aminmax, "aminmax"))
    lb, ub = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, **kw)
    assert torch.equal(lb, lb_ref) and torch.equal(ub, ub_ref)


# --------------------------------------------------------------------------- on a GPU

GPU_FIXTURES = [(n, "golden") for n in FIXTURES] + [(n, "golden_ops") for n in (
    "sigmoid_tanh_mlp__eps0.1", "maxpool_cnn__eps0.1", "nonlinear_mix__eps0.2", "convtranspose_net__eps0.1",
    "bivariate_mul__eps0.2")]


@needs_cuda
@pytest.mark.parametrize("name,folder", GPU_FIXTURES, ids=[n for n, _ in GPU_FIXTURES])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sound_fp", [False, True], ids=["float32", "sound_fp"])
def test_cuda_bounds_equal_the_cpu_ones(shared, name, folder, method, sound_fp):
    """Same plan, another device: the bounds agree up to summation order (1e-4 relative; an
    alpha-CROWN optimiser's mean width within 1%), and sound_fp bounds contain the samples."""
    fx = load_fixture(shared, name, folder)
    kw = dict(method=method, C=fx.C, sound_fp=sound_fp)
    lb_cpu, ub_cpu = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, device="cpu", **kw)
    res = boundflow.api.bound(str(fx.model), fx.lower.cuda(), fx.upper.cuda(), device="cuda", **kw)
    assert res.stats["device"] == "cuda" and res.lb.is_cuda
    lb, ub = res.lb.cpu().double(), res.ub.cpu().double()
    emp_lo, emp_hi = (t.double() for t in fx.empirical)
    tol = 1e-5 * emp_lo.abs().clamp(min=1)
    assert (lb[0] <= emp_lo + tol).all() and (ub[0] >= emp_hi - tol).all()
    lb_cpu, ub_cpu = lb_cpu.double(), ub_cpu.double()
    if method == "alpha-crown":
        width, cpu_width = (ub - lb).mean().item(), (ub_cpu - lb_cpu).mean().item()
        assert width <= 1.01 * cpu_width + 1e-6, f"mean width {width:.6g} vs the CPU's {cpu_width:.6g}"
    else:
        assert torch.allclose(lb, lb_cpu, rtol=1e-4, atol=1e-5), f"lb {(lb - lb_cpu).abs().max():.3e}"
        assert torch.allclose(ub, ub_cpu, rtol=1e-4, atol=1e-5), f"ub {(ub - ub_cpu).abs().max():.3e}"


@needs_cuda
@pytest.mark.parametrize("name,folder", GPU_FIXTURES, ids=[n for n, _ in GPU_FIXTURES])
def test_cuda_float32_sound_plans_contain_the_samples(shared, name, folder):
    """float32 sound_fp plans (the search's bounder) on the GPU: IEEE float32 there too, so
    the error terms hold; the bounds contain the samples and agree with the CPU's."""
    fx = load_fixture(shared, name, folder)
    graph, _ = boundflow.load_model(str(fx.model))
    if fp32_refusal(graph) is not None:
        pytest.skip("has ops with float64 error rules only")
    config = PlannerConfig(sound_fp=True, fp_dtype="float32")
    for method in METHODS[:3]:
        kw = dict(method=method, C=fx.C, config=config)
        cpu = boundflow.api.bound(str(fx.model), fx.lower, fx.upper, device="cpu", **kw)
        res = boundflow.api.bound(str(fx.model), fx.lower.cuda(), fx.upper.cuda(), device="cuda", **kw)
        assert res.lb.is_cuda and res.lb.dtype == torch.float32
        lb, ub = res.lb.cpu().double(), res.ub.cpu().double()
        emp_lo, emp_hi = (t.double() for t in fx.empirical)
        tol = 1e-5 * emp_lo.abs().clamp(min=1)
        assert (lb[0] <= emp_lo + tol).all() and (ub[0] >= emp_hi - tol).all(), method
        assert torch.allclose(lb, cpu.lb.double(), rtol=1e-4, atol=1e-5), method
        assert torch.allclose(ub, cpu.ub.double(), rtol=1e-4, atol=1e-5), method


@needs_cuda
def test_cuda_plan_runs_every_kernel_there(shared):
    fx = load_fixture(shared, "resnet_block__eps0.05")
    graph, _ = boundflow.load_model(str(fx.model))
    for method in METHODS[:3]:
        module = boundflow.plan(graph, method, PlannerConfig(device="cuda"))
        box = torch.stack((fx.lower, fx.upper)).unsqueeze(1).cuda()
        out = PythonTaskExecutor(checked=True).run(module, {"box": box})
        assert out["bounds"].is_cuda


@needs_cuda
@pytest.mark.parametrize("suite_name,onnx_name,vnnlib_name", [
    ("mnistfc", "mnist-net_256x2.onnx", "prop_0_0.03.vnnlib"),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_1_0.05.vnnlib"),
    ("acasxu", "ACASXU_run2a_1_1_batch_2000.onnx", "prop_3.vnnlib"),
])
def test_cuda_verify_gives_the_expected_verdict(shared, suite_name, onnx_name, vnnlib_name):
    from boundflow.verify.verifier import VerifyConfig, verify
    root = shared / "benchmarks/vnncomp2021"
    with open(root / "expected.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["benchmark"] == suite_name
                and r["onnx"].endswith(onnx_name) and r["vnnlib"].endswith(vnnlib_name)]
    assert rows, f"{onnx_name} {vnnlib_name} not in expected.csv"
    res = verify(root / suite_name / onnx_name, root / suite_name / vnnlib_name, 60,
                 config=VerifyConfig(device="cuda"))
    assert res.stats["device"] == "cuda"
    assert res.verdict == rows[0]["expected"], res.stats
    if res.verdict == "violated":                 # confirmed by onnxruntime on the CPU
        assert all(math.isfinite(float(v)) for v in res.counterexample[1])
