"""The executor against the storage plan: kernels that promise fresh results really return
fresh tensors (outputs may take the bytes of inputs that die at the op), and the arena gives
the same bounds as running without it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import boundflow
from boundflow.planner.config import PlannerConfig
from boundflow.runtime.python_executor import PythonTaskExecutor
from golden import FIXTURES, load_fixture


def _inputs(fx):
    box = torch.stack((fx.lower, fx.upper)).unsqueeze(1)
    return {"box": box} if fx.C is None else {"box": box, "C": fx.C.unsqueeze(0)}


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_kernels_fresh_and_arena_matches_functional(shared, name, method):
    fx = load_fixture(shared, name)
    graph, _ = boundflow.load_model(str(fx.model))
    module = boundflow.plan(graph, method, PlannerConfig(), spec_rows=None if fx.C is None else fx.C.shape[0])
    ex = PythonTaskExecutor(checked=True)
    arena = ex.run(module, _inputs(fx))["bounds"]
    functional = ex.run_functional(module, _inputs(fx))[module.outputs["bounds"]]
    assert torch.equal(arena, functional)
    again = ex.run(module, _inputs(fx))["bounds"]          # the arena is reused across calls
    assert torch.equal(arena, again)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_inputs_written_into_their_views_are_read_there(shared, method):
    """A caller may write a run's inputs into the plan's own views of them and pass the views
    (compute_bounds does: no tensor in between, nothing copied): each run reads what was
    written there, the bounds that copies of the same inputs give."""
    fx = load_fixture(shared, "mnist-net_256x2__prop_0_0.03__specC")
    graph, _ = boundflow.load_model(str(fx.model))
    module = boundflow.plan(graph, method, PlannerConfig(), spec_rows=fx.C.shape[0])
    ex = PythonTaskExecutor()
    views = ex.prepare(module).inputs
    assert set(views) == {"box", "C"}
    for shrink in (1.0, 0.5):
        mid, rad = (fx.lower + fx.upper) / 2, (fx.upper - fx.lower) / 2 * shrink
        inputs = _inputs(dataclasses.replace(fx, lower=mid - rad, upper=mid + rad))
        for role, t in inputs.items():
            views[role].copy_(t)
        in_place = ex.run(module, views)["bounds"]
        assert torch.equal(in_place, PythonTaskExecutor().run(module, inputs)["bounds"])


def test_prepared_state_follows_module_lifetime(shared):
    fx = load_fixture(shared, "mlp_small__eps0.05")
    graph, _ = boundflow.load_model(str(fx.model))
    ex = PythonTaskExecutor()
    for _ in range(3):
        module = boundflow.plan(graph, "crown")
        ex.run(module, _inputs(fx))
    del module
    import gc
    gc.collect()
    assert len(ex._prepared) == 0


@pytest.mark.parametrize("folder,name", [("golden", n) for n in FIXTURES[2:12:3]] + [
    ("golden", "resnet_block__eps0.05"), ("golden_ops", "convtranspose_net__eps0.1"),
    ("golden_ops", "attention_tiny__eps0.1")])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_ops_bound_once_read_each_runs_inputs(shared, folder, name, method):
    """Ops bound to their buffers at prepare (domains.binds: views cut once, a branch taken
    once) compute each run from that run's values: a second run on another box gives, bit for
    bit, what the kernels called afresh give on it (run_functional)."""
    fx = load_fixture(shared, name, folder)
    graph, _ = boundflow.load_model(str(fx.model))
    module = boundflow.plan(graph, method, PlannerConfig(), spec_rows=None if fx.C is None else fx.C.shape[0])
    ex = PythonTaskExecutor()
    assert any(step[0] is not None for step in ex.prepare(module).program)
    ex.run(module, _inputs(fx))
    mid = (fx.lower + fx.upper) / 2
    other = dataclasses.replace(fx, lower=fx.lower * 0.5 + mid * 0.5 - 0.01, upper=fx.upper * 0.5 + mid * 0.5 + 0.01)
    second = ex.run(module, _inputs(other))["bounds"]
    assert torch.equal(second, ex.run_functional(module, _inputs(other))[module.outputs["bounds"]])
    assert not torch.equal(second, ex.run(module, _inputs(fx))["bounds"])


@pytest.mark.parametrize("name,method", [("mnist-net_256x2__prop_0_0.03", "crown"), ("mlp_small__eps0.05", "crown"),
                                         ("cnn_small__eps0.02", "crown"), ("mlp_small__eps0.05", "ibp"),
                                         ("cnn_small__eps0.02", "ibp"),
                                         ("cifar_base_kw__cifar_base_kw-img2908-eps0.019869281045751634", "ibp")])
def test_writing_kernels_leave_their_results_in_the_arena(shared, name, method):
    """Kernels marked writes_into put every result in its planned bytes (a buffer of dynamic
    size too: the unstable neurons' pass), so the executor copies none of them; the bounds
    are those of a run without the arena. IBP: linear's compiled loop, conv's pair form
    (cifar_base_kw's 4x4 kernels) and two convs (cnn_small's 3x3)."""
    from boundflow.runtime.python_executor import _at

    fx = load_fixture(shared, name)
    graph, _ = boundflow.load_model(str(fx.model))
    module = boundflow.plan(graph, method, PlannerConfig(), spec_rows=None if fx.C is None else fx.C.shape[0])
    ex = PythonTaskExecutor(checked=True)
    prepared = ex.prepare(module)
    placed = []

    def note(results, outs):
        for b, t in zip(outs, results):
            view = prepared.views[b]
            placed.append(t is view if view is not None else _at(t, *prepared.slots[b]))
        return results

    def watch(kernel, outs):                      # a kernel, and an op bound to static buffers
        return lambda ins, ps, attrs, out: note(kernel(ins, ps, attrs, out=out), outs)

    def watch_bound(run, outs):
        return None if run is None else lambda: note(run(), outs)

    prepared.program[:] = [(watch_bound(run, outs), watch(k, outs), ins, outs, *rest, into, static) if into is not None
                           else (run, k, ins, outs, *rest, into, static)
                           for run, k, ins, outs, *rest, into, static in prepared.program]
    dynamic = {b for b, s in module.buffers.items() if s.dynamic_axis is not None}
    assert dynamic or name != "mnist-net_256x2__prop_0_0.03"
    arena = ex.run(module, _inputs(fx))["bounds"]
    assert len(placed) >= (4 if method == "crown" else 3) and all(placed)
    assert torch.equal(arena, ex.run_functional(module, _inputs(fx))[module.outputs["bounds"]])


def test_results_are_ordinary_tensors_after_an_inference_mode_run(shared):
    """The executor runs its kernels in torch.inference_mode (less dispatch per op), but what it
    hands out (bounds, intermediate bounds) and the kernels' cached constants are ordinary
    tensors: autograd may take them in later (alpha-CROWN takes the bounds of a run, and its
    kernels read the same constants with gradients on)."""
    from boundflow.runtime.device import constant

    fx = load_fixture(shared, "mlp_small__eps0.05")
    graph, _ = boundflow.load_model(str(fx.model))
    module = boundflow.plan(graph, "crown", PlannerConfig())
    ex = PythonTaskExecutor()
    outputs = ex.run(module, _inputs(fx))
    assert outputs and not any(t.is_inference() for t in outputs.values())
    x = torch.ones(2, requires_grad=True)
    (x * outputs["bounds"].flatten()[:2]).sum().backward()      # usable beside autograd
    assert torch.equal(x.grad, outputs["bounds"].flatten()[:2])
    with torch.inference_mode():
        made_inside = constant((1.5, 2.5), torch.float32, torch.device("cpu"))
    assert not made_inside.is_inference()
    (x * made_inside).sum().backward()                           # saved for backward: allowed


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_bounds_in_a_callers_no_grad_or_inference_mode(mode):
    """compute_bounds in a caller's no_grad or inference_mode block gives the bounds it gives
    outside, alpha-CROWN (autograd moves its slopes) included, and the model and plans it
    caches there serve later calls outside (weights made in inference mode could not be saved
    for backward). Importing boundflow there works too (gelu's constants use autograd)."""
    import subprocess
    import sys

    from boundflow import api

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.zeros(1, 4)
    methods = ("ibp", "crown", "alpha-crown")
    outside = [boundflow.compute_bounds(net, x - 0.1, x + 0.1, method=m) for m in methods]
    api._plans.clear()
    api._graphs.clear()
    with mode():
        inside = [boundflow.compute_bounds(net, x - 0.1, x + 0.1, method=m) for m in methods]
    after = [boundflow.compute_bounds(net, x - 0.1, x + 0.1, method=m) for m in methods]
    for bounds in (inside, after):
        assert all(torch.equal(a, b) for pair, ref in zip(bounds, outside) for a, b in zip(pair, ref))
    code = f"import torch\nwith torch.{mode.__name__}():\n    import boundflow\n"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("n_in", [50, 300])
def test_linear_backward_drops_dead_columns_only_where_it_pays(n_in, monkeypatch):
    """A @ W without the columns of A that are zero in every row: the same product (the dropped
    terms are exact zeros), done only for products wide enough to repay the check and the
    gather (linear.PRUNE_MIN_WIDTH); a narrow one multiplies the whole A."""
    from boundflow.ops import linear
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 40, 200, generator=gen)
    a[..., ::4] = 0
    a[..., 1::4] = 0                                  # half the columns dead in every row
    w, b = torch.randn(200, n_in, generator=gen), torch.randn(200, generator=gen)
    bias = torch.zeros(64, 40)
    seen = []
    index_select = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, *args: seen.append(1) or index_select(t, *args))
    new_a, new_bias = linear.backward([a, bias], [w, b], {})
    assert bool(seen) == (n_in >= linear.PRUNE_MIN_WIDTH)
    assert torch.allclose(new_a, a @ w, rtol=1e-5, atol=1e-4)
    assert torch.allclose(new_bias, a @ b, rtol=1e-5, atol=1e-4)
