"""TVMTaskExecutor: the same bounds as PythonTaskExecutor in every MemoryPlanMode, on every golden
fixture and on networks that use the ops the fixtures do not; the compile cache; the memory
statistics; the Relax pass list; compute_bounds / CLI selection and the error without TVM.

Compiling is the slow part (seconds per model), so executors share the process-wide compile
cache and the fixtures of one model reuse its compiled module (weights are parameters).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

try:
    import tvm
except ImportError:
    if os.environ.get("BOUNDFLOW_SHARED"):   # CI installs the tvm extra: never skip there
        raise
    pytest.skip('TVM not installed (pip install -e ".[tvm]")', allow_module_level=True)

import boundflow
from boundflow.backends.tvm import pipeline as tvm_pipeline
from boundflow.backends.tvm.analysis import collect_relax_memory_stats
from boundflow.backends.tvm.lower import RULES, LoweringError
from boundflow.cli import main as cli_main
from boundflow.ops import KERNELS
from boundflow.runtime.python_executor import PythonTaskExecutor
from boundflow.runtime.tvm_executor import (MemoryPlanMode, TVMExecutorOptions, TVMTaskExecutor,
                                            TVMUnavailableError)
from golden import FIXTURES, load_fixture
from nets import build

MODES = list(MemoryPlanMode)
SMALL = "mlp_small__eps0.05"


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def executors() -> dict[MemoryPlanMode, TVMTaskExecutor]:
    return {m: TVMTaskExecutor(TVMExecutorOptions(memory_plan_mode=m)) for m in MODES}


@pytest.fixture(scope="module")
def python() -> PythonTaskExecutor:
    return PythonTaskExecutor()


def fixture_plan(shared, name: str, method: str, **config):
    """A fresh plan of a golden fixture, and its inputs."""
    fx = load_fixture(shared, name)
    graph, _ = boundflow.load_model(str(fx.model))
    module = boundflow.plan(graph, method, boundflow.PlannerConfig(**config), batch=1,
                            spec_rows=None if fx.C is None else fx.C.shape[0])
    inputs = {"box": torch.stack((fx.lower, fx.upper)).unsqueeze(1)}
    if fx.C is not None:
        inputs["C"] = fx.C.unsqueeze(0).contiguous()
    return module, inputs


def module_plan(module: nn.Module, shape, method: str, spec_rows: int | None = None, seed: int = 0):
    """A plan of a torch module over a box of radius 0.3 around a random point, and its inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    graph, _ = boundflow.load_model(module, x)
    plan = boundflow.plan(graph, method, batch=1, spec_rows=spec_rows)
    inputs = {"box": torch.stack((x - 0.3, x + 0.3)).unsqueeze(1)}
    if spec_rows is not None:
        n_out = graph.values[graph.outputs[0]].type.numel
        inputs["C"] = torch.randn(1, spec_rows, n_out, generator=gen)
    return plan, inputs


# -- the same bounds ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("name", FIXTURES)
def test_matches_python_executor(shared, executors, python, name, method, mode):
    module, inputs = fixture_plan(shared, name, method)
    ref = python.run(module, inputs)["bounds"]
    out = executors[mode].run(module, inputs)["bounds"]
    assert out.shape == ref.shape
    assert close(out, ref), f"max diff {(out - ref).abs().max():.3e}"


@pytest.mark.parametrize("method,interm", [("crown-ibp", "sparse"), ("crown", "pure"), ("crown", "intersect")])
def test_other_methods(shared, executors, python, method, interm):
    """bound.replace, start_onehot over every neuron, and the intersecting merge."""
    module, inputs = fixture_plan(shared, "cnn_small__eps0.1", method, crown_interm=interm)
    assert close(executors[MemoryPlanMode.DEFAULT].run(module, inputs)["bounds"], python.run(module, inputs)["bounds"])


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


class _Affine(nn.Module):
    """conv -> relu -> per-channel affine -> relu: an affine no linear op can absorb."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(48, 2)
        self.register_buffer("scale", torch.tensor([1.5, -0.5, 2.0]).reshape(3, 1, 1))
        self.register_buffer("shift", torch.tensor([0.1, -0.2, 0.3]).reshape(3, 1, 1))

    def forward(self, x):
        return self.fc(torch.relu(torch.relu(self.conv(x)) * self.scale + self.shift).flatten(1))


def _nets():
    """(name, module, input shape, spec rows) covering what the fixtures do not: conv
    geometries (stride 2 with dilation 2, groups 2, padding), concat, an affine, an NHWC
    transpose, and IBP with C after a relu (spec_box)."""
    built = [(f"cnn{s}", build("cnn", s)) for s in (4, 6, 9)] + [(k, build(k, 0)) for k in ("residual", "nhwc_cnn")]
    nets = [(name, net.module, net.input_shape, None) for name, net in built]
    torch.manual_seed(0)
    relu_last = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU())
    clamps = nn.Sequential(nn.Linear(4, 6), nn.Hardtanh(-0.3, 0.4), nn.Linear(6, 5), nn.ReLU6(), nn.Linear(5, 3))
    clamps_cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                               nn.Hardtanh(-0.2, 0.3), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                               nn.Linear(64, 3))
    nets += [("concat", _Concat().eval(), (1, 4), None), ("affine", _Affine().eval(), (1, 2, 4, 4), None),
             ("relu_last_C", relu_last.eval(), (1, 4), 2), ("clamps", clamps.eval(), (1, 4), None),
             ("clamps_cnn", clamps_cnn.eval(), (1, 2, 8, 8), None)]
    return nets


NETS = _nets()


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("name,net,shape,spec_rows", NETS, ids=[n[0] for n in NETS])
def test_networks(executors, python, name, net, shape, spec_rows, method):
    module, inputs = module_plan(net, shape, method, spec_rows)
    out = executors[MemoryPlanMode.DEFAULT].run(module, inputs)["bounds"]
    assert close(out, python.run(module, inputs)["bounds"])


def test_no_unstable_neuron(shared, executors, python):
    """A box so small that every neuron is stable: the functions after bound.unstable run
    with a symbolic count of 0."""
    module, inputs = fixture_plan(shared, SMALL, "crown")
    centre = inputs["box"].mean(0, keepdim=True)
    inputs = {"box": torch.cat((centre - 1e-7, centre + 1e-7))}
    ex = executors[MemoryPlanMode.DEFAULT]
    assert close(ex.run(module, inputs)["bounds"], python.run(module, inputs)["bounds"])


# ops whose kernels have Relax rules; the TVM executor refuses the others by name
TVM_OPS = {"linear", "conv2d", "affine", "add", "relu", "clamp_min", "reshape", "transpose", "concat"}


def test_every_ibp_and_crown_kernel_of_the_tvm_ops_has_a_rule():
    """Each kernel of the ops TVM lowers has a Relax rule, but the data-dependent host op,
    alpha-CROWN's slopes (alpha-CROWN optimises through torch autograd, so it stays on the
    Python executor) and the floating-point error rules (sound_fp plans run in Python)."""
    from boundflow.ops import OPS
    theirs = {k for name, op in OPS.items() if name in TVM_OPS for k in op.all_kernels()}
    generic = {k for k in KERNELS if not any(k in op.all_kernels() for op in OPS.values())}
    missing = (theirs | generic) - set(RULES)
    assert missing <= {"bound.unstable", "linear.relu_alpha", "linear.patch_relu_alpha",
                       "linear.clamp_min_alpha", "linear.patch_clamp_min_alpha"} | \
        {k for k in missing if k.startswith("fp.")}


def test_an_op_without_relax_rules_is_refused_by_name(python):
    net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    x = torch.zeros(1, 3)
    with pytest.raises(LoweringError, match="no Relax rule for 'interval.sigmoid'"):
        boundflow.compute_bounds(net, x - 1, x + 1, method="ibp", executor="tvm")


@pytest.mark.parametrize("interm", ["sparse", "pure"])
def test_patches_match_on_a_deep_conv_chain(python, interm):
    """Three convs (rectangular kernels and input, strides 1 and 2, paddings 0 to 2, one without
    bias): the patch ops' Relax rules give the torch kernels' bounds."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 4, (3, 2), stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, stride=1, padding=2, bias=False), nn.ReLU(),
                        nn.Conv2d(5, 3, (2, 3), stride=2, padding=0), nn.ReLU(), nn.Flatten(), nn.Linear(18, 4))
    x = torch.randn(1, 2, 9, 7)
    graph, _ = boundflow.load_model(net, x)
    module = boundflow.plan(graph, "crown", boundflow.PlannerConfig(crown_interm=interm), batch=2)
    assert sum(op.op == "linear.patch_conv" for op in module.ops()) >= 2
    inputs = {"box": torch.stack((x - 0.2, x + 0.2)).expand(2, 2, *x.shape).contiguous()}
    assert close(TVMTaskExecutor().run(module, inputs)["bounds"], python.run(module, inputs)["bounds"])


# -- failing clearly ---------------------------------------------------------------------------
def test_unknown_op_is_a_clear_error(shared):
    module, inputs = fixture_plan(shared, SMALL, "ibp")
    next(module.ops()).op = "interval.mystery"
    with pytest.raises(LoweringError, match="no Relax rule for 'interval.mystery'"):
        TVMTaskExecutor().run(module, inputs)


def test_data_dependent_ops_must_run_on_the_host(shared):
    module, inputs = fixture_plan(shared, SMALL, "crown")
    with pytest.raises(LoweringError, match="host_ops"):
        TVMTaskExecutor(TVMExecutorOptions(host_ops=())).run(module, inputs)


def test_host_ops_are_counted(shared):
    module, inputs = fixture_plan(shared, SMALL, "crown")
    ex = TVMTaskExecutor()
    ex.run(module, inputs)
    unstable = sum(op.op == "bound.unstable" for op in module.ops())
    assert unstable > 0 and ex.stats["host_op_calls"] == {"bound.unstable": unstable}
    assert ex.stats["relax_calls"] == ex.stats["relax_functions"]


# -- compile cache -----------------------------------------------------------------------------
def test_cache_hits_on_repeat_and_misses_on_shape_or_option_change(shared):
    cache = tvm_pipeline.CompileCache()
    module, inputs = fixture_plan(shared, SMALL, "ibp")
    TVMTaskExecutor(cache=cache).run(module, inputs)
    assert cache.stats["misses"] == 1 and cache.stats["hits"] == 0
    again, _ = fixture_plan(shared, "mlp_small__eps0.2", "ibp")      # another box, same shapes
    ex = TVMTaskExecutor(cache=cache)
    ex.run(again, inputs)
    assert cache.stats["hits"] == 1 and ex.stats["compile_hits"] == 1
    fx = load_fixture(shared, SMALL)
    graph, _ = boundflow.load_model(str(fx.model))
    batch2 = boundflow.plan(graph, "ibp", batch=2)
    two = [t.unsqueeze(0).expand(2, *t.shape) for t in (fx.lower, fx.upper)]
    TVMTaskExecutor(cache=cache).run(batch2, {"box": torch.stack(two).contiguous()})
    assert cache.stats["misses"] == 2
    disabled = TVMExecutorOptions(memory_plan_mode=MemoryPlanMode.DISABLE_STATIC_PLAN)
    TVMTaskExecutor(disabled, cache=cache).run(module, inputs)
    assert cache.stats["misses"] == 3 and cache.stats["hits"] == 1
    assert len(cache) == 3


def test_cache_key_covers_every_option(shared):
    """Every mode compiles a CROWN plan (symbolic sizes) differently; on an IBP plan FORCE adds
    nothing to DEFAULT, so they share a key. cache_dir changes no code."""
    from boundflow.backends.tvm.lower import lower_module
    target = tvm_pipeline.host_target()
    options = [TVMExecutorOptions(memory_plan_mode=m) for m in MODES] + [TVMExecutorOptions(schedule="dlight")]

    def keys(method):
        lowered = lower_module(fixture_plan(shared, SMALL, method)[0], ("bound.unstable",))
        return [tvm_pipeline.cache_key(tvm_pipeline.with_memory_plan_attrs(lowered, o.memory_plan_mode), target, o)
                for o in options + [TVMExecutorOptions(cache_dir="/elsewhere")]]

    crown = keys("crown")
    assert len(set(crown[:-1])) == len(options) and crown[-1] == crown[0]
    ibp = keys("ibp")
    assert len(set(ibp)) == len(options) - 1 and ibp[0] == ibp[2]


def test_disk_cache(shared, python, tmp_path):
    module, inputs = fixture_plan(shared, SMALL, "ibp")
    first = tvm_pipeline.CompileCache(tmp_path)
    TVMTaskExecutor(cache=first).run(module, inputs)
    assert first.stats["disk_writes"] == 1 and len(list(tmp_path.glob("*.so"))) == 1
    second = tvm_pipeline.CompileCache(tmp_path)
    ex = TVMTaskExecutor(cache=second)
    out = ex.run(module, inputs)["bounds"]
    assert second.stats == dict(second.stats, disk_hits=1, misses=0) and ex.stats["compile_disk_hits"] == 1
    assert close(out, python.run(module, inputs)["bounds"])
    assert ex.compile_stats(module)["memory_stats"]["alloc_storage"] > 0


# -- memory plan modes and statistics ----------------------------------------------------------
def test_pass_list_mirrors_tvms_cpu_pipeline():
    """Our written-out list is TVM's cpu_generic default pipeline, stage by stage."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    target = tvm_pipeline.host_target()
    theirs = [p.info.name for stage in (cpu.library_dispatch_passes, cpu.legalize_passes,
                                        cpu.dataflow_lower_passes, cpu.finalize_passes) for p in stage(target)]
    assert tvm_pipeline.pass_names(MemoryPlanMode.DEFAULT) == theirs
    disabled = tvm_pipeline.pass_names(MemoryPlanMode.DISABLE_STATIC_PLAN)
    assert disabled == [p for p in theirs if p != "StaticPlanBlockMemory"]
    assert tvm_pipeline.pass_names(MemoryPlanMode.FORCE_STATIC_PLAN) == theirs


def test_memory_plan_modes(shared, executors):
    """DISABLE gives every tensor its own storage; FORCE plans the storages sized by the
    unstable count statically, at its upper bound."""
    module, _ = fixture_plan(shared, "mnist-net_256x2__prop_0_0.03", "crown")
    stats = {m: executors[m].compile_stats(module) for m in MODES}
    default, disabled, forced = (stats[m]["memory_stats"] for m in MODES)
    assert "StaticPlanBlockMemory" not in stats[MemoryPlanMode.DISABLE_STATIC_PLAN]["passes"]
    assert disabled["alloc_storage"] == disabled["alloc_tensor"]
    assert default["alloc_storage"] < disabled["alloc_storage"]
    assert default["alloc_storage_total_bytes"] < disabled["alloc_storage_total_bytes"]
    assert default["alloc_storage_dynamic"] > 0 and forced["alloc_storage_dynamic"] == 0
    assert forced["alloc_storage"] < default["alloc_storage"]
    assert stats[MemoryPlanMode.FORCE_STATIC_PLAN]["forced_upper_bounds"]
    for s in stats.values():
        assert s["tasks"] and all(t["memory_plan_mode"] == s["memory_plan_mode"] for t in s["tasks"])
        assert s["compile_ms"] >= 0 and s["cache"] in ("hit", "miss", "disk")


def _chain_module() -> tvm.IRModule:
    """x [4, 8] through four matmuls: three [4, 8] intermediates, then the output."""
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 8), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            v = x
            for _ in range(4):
                v = bb.emit(relax.op.matmul(v, w))
            out = bb.emit_output(v)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("mode,storages", [(MemoryPlanMode.DISABLE_STATIC_PLAN, 4), (MemoryPlanMode.DEFAULT, 3)])
def test_collect_relax_memory_stats(mode, storages):
    """Without planning each of the four tensors has its storage; with it the third
    intermediate reuses the first's (the output always has its own)."""
    snapshots = []
    pipeline = tvm_pipeline.build_pipeline(mode, "none", snapshots.append)
    target = tvm_pipeline.host_target()
    with target:
        tvm.compile(_chain_module(), target, relax_pipeline=pipeline)
    stats = collect_relax_memory_stats(snapshots[-1])
    assert stats["alloc_storage"] == storages and stats["alloc_tensor"] == 4
    assert stats["alloc_storage_total_bytes"] == storages * 4 * 8 * 4
    assert stats["alloc_storage_max_bytes"] == 4 * 8 * 4
    assert stats["op_names"] == {"relax.vm.alloc_storage": storages, "relax.vm.alloc_tensor": 4}


def test_measure_memory(shared, executors):
    module, inputs = fixture_plan(shared, "mnist-net_256x2__prop_0_0.03", "crown")
    m = executors[MemoryPlanMode.FORCE_STATIC_PLAN].measure_memory(module, inputs)
    assert set(m) >= {"estimate_bytes", "alloc_storage_bytes", "peak_bytes", "functions", "method"}
    assert m["alloc_storage_bytes"] == m["estimate_bytes"]      # every size planned at its bound
    if m["peak_bytes"] is not None:                              # glibc
        assert 0 < m["peak_bytes"] <= 2 * m["estimate_bytes"]
    dynamic = executors[MemoryPlanMode.DEFAULT].measure_memory(module, inputs)
    assert dynamic["alloc_storage_bytes"] < dynamic["estimate_bytes"]  # actual unstable counts < bound


# -- choosing the executor ---------------------------------------------------------------------
def test_compute_bounds_with_tvm(shared):
    fx = load_fixture(shared, SMALL)
    want = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method="crown")
    res = boundflow.bound(str(fx.model), fx.lower, fx.upper, method="crown", executor="tvm",
                          tvm_options=TVMExecutorOptions(memory_plan_mode=MemoryPlanMode.FORCE_STATIC_PLAN))
    assert close(res.lb, want[0]) and close(res.ub, want[1])
    assert res.stats["executor"] == "tvm" and res.stats["tvm"]["memory_plan_mode"] == "force_static_plan"
    with pytest.raises(ValueError, match="executor='python'"):
        boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method="alpha-crown", executor="tvm")
    with pytest.raises(ValueError, match="unknown executor"):
        boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, executor="cuda")


def test_missing_tvm_says_how_to_install(shared, monkeypatch):
    fx = load_fixture(shared, SMALL)
    monkeypatch.setitem(sys.modules, "tvm", None)          # import tvm now raises ImportError
    with pytest.raises(TVMUnavailableError, match=r'pip install -e "\.\[tvm\]"'):
        boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, executor="tvm",
                                 tvm_options=TVMExecutorOptions(schedule="none"))


def test_cli_executor_tvm(shared, tmp_path, capsys):
    fx = load_fixture(shared, SMALL)
    box = tmp_path / "box.json"
    box.write_text(json.dumps({"lower": fx.lower.flatten().tolist(), "upper": fx.upper.flatten().tolist()}))
    results = {}
    for executor in ("python", "tvm"):
        assert cli_main(["bounds", str(fx.model), "--box", str(box), "--method", "ibp", "--json",
                         "--executor", executor]) == 0
        results[executor] = json.loads(capsys.readouterr().out)
    assert results["tvm"]["stats"]["executor"] == "tvm"
    assert close(torch.tensor(results["tvm"]["lb"]), torch.tensor(results["python"]["lb"]))
    assert close(torch.tensor(results["tvm"]["ub"]), torch.tensor(results["python"]["ub"]))


def test_tvm_leaves_the_cpu_affinity_alone():
    """TVM's thread pool pins the thread that starts it to core 0 unless TVM_BIND_THREADS=0:
    torch, in the same process, then ran on one core (and CI's two test workers shared it)."""
    code = ("import json, os; from boundflow.runtime.tvm_executor import require_tvm; "
            "before = sorted(os.sched_getaffinity(0)); require_tvm().runtime.num_threads(); "
            "print(json.dumps([before, sorted(os.sched_getaffinity(0))]))")
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    before, after = json.loads(proc.stdout)
    assert after == before
