"""Partitioning and storage never change the bounds, and every plan is a well-formed module.

Property: compute_bounds with PlannerConfig(max_ops_per_task=k, min_tasks=m, storage reuse on or
off, memory-aware order on or off) gives bitwise the same bounds as the default plan (within
1e-6 allowed), on random networks and on golden fixtures. Plans with a finer cut really have
more tasks. Module invariants, checked independently of boundflow.planner.verify:

  * tasks are numbered 0..n-1 and run in that order; every op reads buffers written by an earlier
    op (in this task or an earlier one) or module inputs; a task's `inputs` are exactly the
    buffers its ops read that it does not write, each produced by an earlier task or a module
    input; its `outputs` are buffers it writes that a later task reads or that are module outputs
  * edges go forward and each one carries a buffer
  * every buffer id in an op, and every module input/output, is in module.buffers
  * memory_plan.offsets covers every buffer, in an arena of its dtype, inside the arena, aligned
  * without reuse no two buffers share a byte; with reuse, buffers sharing bytes are never live
    at the same time
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import boundflow
from boundflow.ops import ALIASING_KERNELS, VIEW_KERNELS, WRITING_KERNELS
from boundflow.planner.config import PlannerConfig
from golden import FIXTURES, load_fixture
from nets import KINDS, networks

METHODS = [("ibp", "sparse"), ("crown-ibp", "sparse"), ("crown", "sparse"), ("crown", "intersect"),
           ("crown", "pure")]
SMALL_FIXTURES = ["mlp_small__eps0.05", "cnn_small__eps0.1", "permute_net__eps0.2", "resnet_block__eps0.05",
                  "ACASXU_run2a_1_1_batch_2000__prop_1", "mnist-net_256x2__prop_0_0.03__specC"]

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------
# module invariants
# --------------------------------------------------------------------------------------------
def check_module(module: boundflow.BFTaskModule) -> None:
    bufs = module.buffers
    mod_in, mod_out = set(module.inputs.values()), set(module.outputs.values())
    assert mod_in <= set(bufs) and mod_out <= set(bufs)
    assert [t.id for t in module.tasks] == list(range(len(module.tasks)))

    producer_task: dict[int, int] = {}
    written: set[int] = set(mod_in)
    readers: dict[int, set[int]] = {}
    for task in module.tasks:
        own: set[int] = set()
        needs: set[int] = set()
        assert task.ops, f"task {task.id} is empty"
        for op in task.ops:
            for b in (*op.inputs, *op.outputs):
                assert b in bufs, f"task {task.id} {op.op} uses unknown buffer {b}"
            for b in op.inputs:
                assert b in written, f"task {task.id} {op.op} reads buffer {b} ({bufs[b].name}) before it is written"
                readers.setdefault(b, set()).add(task.id)
                if b not in own:
                    needs.add(b)
            for b in op.outputs:
                assert b not in written, f"buffer {b} ({bufs[b].name}) written twice"
                assert b not in mod_in, f"module input {b} overwritten by {op.op}"
                written.add(b)
                own.add(b)
                producer_task[b] = task.id
        assert set(task.inputs) == needs, f"task {task.id}: inputs {sorted(task.inputs)} != read-not-written {sorted(needs)}"
        for b in task.inputs:
            assert b in mod_in or producer_task[b] < task.id
    assert mod_out <= written

    for task in module.tasks:
        for b in task.outputs:
            assert producer_task.get(b) == task.id, f"task {task.id} lists output {b} it does not write"
        want = {b for b, t in producer_task.items()
                if t == task.id and (b in mod_out or any(r != task.id for r in readers.get(b, ())))}
        assert want <= set(task.outputs), f"task {task.id}: outputs {sorted(task.outputs)} miss {sorted(want - set(task.outputs))}"

    carried = {(producer_task[b], r) for b, rs in readers.items() if b in producer_task for r in rs
               if r != producer_task[b]}
    for s, d in module.edges:
        assert 0 <= s < d < len(module.tasks), f"edge {(s, d)} does not go forward"
    assert set(module.edges) == carried

    check_memory(module)


def _lifetimes(module) -> dict[int, tuple[int, int]]:
    """Half steps: op k reads at 2k, writes at 2k+1 (2k for kernels that may return views or
    that write into their planned outputs while reading)."""
    ops = list(module.ops())
    start = {b: -1 for b in module.inputs.values()}
    end = dict(start)
    for k, op in enumerate(ops):
        for b in op.inputs:
            end[b] = 2 * k
        w = 2 * k if op.op in ALIASING_KERNELS | WRITING_KERNELS else 2 * k + 1
        for b in op.outputs:
            start[b] = end[b] = w
    for b in module.outputs.values():
        end[b] = 2 * len(ops)
    return {b: (start[b], end[b]) for b in start}


def check_memory(module) -> None:
    plan, bufs = module.memory_plan, module.buffers
    assert set(plan.offsets) == set(bufs), "memory plan does not place exactly the module's buffers"
    align = module.config_dump.get("alignment", 1)
    spans = []
    for b, spec in bufs.items():
        dtype, off = plan.offsets[b]
        assert dtype == spec.dtype
        assert off >= 0 and off % align == 0, f"buffer {b} at unaligned offset {off}"
        assert off + spec.nbytes <= plan.arena_bytes[dtype], f"buffer {b} ({spec.name}) overflows its arena"
        spans.append((dtype, off, off + spec.nbytes, b))
    assert plan.physical_bytes == sum(plan.arena_bytes.values())
    assert plan.logical_bytes == sum(s.nbytes for s in bufs.values())
    life = _lifetimes(module)
    # a view kernel's result at its input's bytes (a static reshape) is that input, read again
    views: dict[int, int] = {}
    for op in module.ops():
        if op.op in VIEW_KERNELS:
            for i, o in zip(op.inputs, op.outputs):
                if plan.offsets[o] == plan.offsets[i] and bufs[o].nbytes == bufs[i].nbytes:
                    views[o] = views.get(i, i)
    assert plan.aliases == views
    spans.sort()
    for i, (dt, lo, hi, b) in enumerate(spans):
        for dt2, lo2, hi2, b2 in spans[i + 1:]:
            if dt2 != dt or lo2 >= hi:
                break
            if lo2 == hi2 or lo == hi or views.get(b, b) == views.get(b2, b2):
                continue                      # an empty buffer shares no byte; a view is its input
            assert plan.reuse, f"without reuse, buffers {b} and {b2} share bytes"
            (s1, e1), (s2, e2) = life[b], life[b2]
            assert e1 < s2 or e2 < s1, \
                f"buffers {b} ({bufs[b].name}, live {life[b]}) and {b2} ({bufs[b2].name}, live {life[b2]}) " \
                f"share bytes while both live"
    if not plan.reuse:
        assert plan.physical_bytes >= plan.logical_bytes


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
@st.composite
def configs(draw, interm: str):
    return PlannerConfig(
        crown_interm=interm,
        max_ops_per_task=draw(st.one_of(st.none(), st.integers(1, 12))),
        min_tasks=draw(st.sampled_from([1, 2, 3, 5, 8, 20, 1000])),
        enable_storage_reuse=draw(st.booleans()),
        memory_aware_order=draw(st.booleans()),
    )


def assert_same_bounds(a, b, what):
    for x, y, side in ((a[0], b[0], "lb"), (a[1], b[1], "ub")):
        assert x.shape == y.shape, what
        if not torch.equal(x, y):
            diff = (x.double() - y.double()).abs().max().item()
            assert diff <= 1e-6, f"{what}: {side} differs by {diff:.3e}"


def check_task_counts(graph, method, cfg, batch, spec_rows, what):
    """The cut `cfg` asks for is the cut the plan has, and bounds its ops the same way."""
    base = boundflow.plan(graph, method, PlannerConfig(crown_interm=cfg.crown_interm,
                                                       enable_storage_reuse=cfg.enable_storage_reuse,
                                                       memory_aware_order=cfg.memory_aware_order),
                          batch=batch, spec_rows=spec_rows)
    mod = boundflow.plan(graph, method, cfg, batch=batch, spec_rows=spec_rows)
    check_module(base)
    check_module(mod)
    n_ops, n_base, n = base.stats["num_ops"], base.stats["num_tasks"], mod.stats["num_tasks"]
    assert mod.stats["num_ops"] == n_ops == sum(len(t.ops) for t in mod.tasks), what
    assert n == len(mod.tasks)
    assert n >= n_base, f"{what}: {n} tasks, fewer than the default cut's {n_base}"
    assert n >= min(cfg.min_tasks, n_ops), f"{what}: {n} tasks for min_tasks={cfg.min_tasks}"
    if cfg.max_ops_per_task is not None:
        assert n >= -(-n_ops // cfg.max_ops_per_task)
        if cfg.max_ops_per_task == 1:
            assert n == n_ops
        if cfg.min_tasks == 1:
            assert all(len(t.ops) <= cfg.max_ops_per_task for t in mod.tasks)
    if cfg.min_tasks > n_base and n_ops > n_base:
        assert n > n_base, f"{what}: min_tasks={cfg.min_tasks} left {n} tasks"
    # the ops are the same, in the same order
    assert [op.op for op in mod.ops()] == [op.op for op in base.ops()]


# --------------------------------------------------------------------------------------------
# random networks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kinds", [KINDS[: len(KINDS) // 2], KINDS[len(KINDS) // 2:]],
                         ids=["kinds-a", "kinds-b"])
@SETTINGS
@given(data=st.data())
def test_random_networks_cut_independent(kinds, data):
    net = data.draw(networks(kinds), label="net")
    method, interm = data.draw(st.sampled_from(METHODS), label="method")
    batch = data.draw(st.sampled_from([1, 2]), label="B")
    eps = data.draw(st.sampled_from([0.0, 0.01, 0.3]), label="eps")
    use_C = data.draw(st.booleans(), label="C")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    shape = (batch,) + net.input_shape[1:]
    x = torch.randn(shape, generator=gen)
    lo, hi = x - eps, x + eps
    C = torch.randn(2, net.num_outputs, generator=gen) if use_C else None
    cfgs = [data.draw(configs(interm), label=f"config {i}") for i in range(2)]

    what = f"{net!r} {method}/{interm} B={batch}"
    ref = boundflow.compute_bounds(net.module, lo, hi, method=method, C=C,
                                   config=PlannerConfig(crown_interm=interm))
    graph, _ = boundflow.load_model(net.module, torch.zeros(net.input_shape))
    for cfg in cfgs:
        got = boundflow.compute_bounds(net.module, lo, hi, method=method, C=C, config=cfg)
        assert_same_bounds(ref, got, f"{what} {cfg}")
        check_task_counts(graph, method, cfg, batch, None if C is None else C.shape[0], f"{what} {cfg}")


# --------------------------------------------------------------------------------------------
# golden fixtures
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _reference(shared: str, name: str, method: str, interm: str):
    from pathlib import Path

    fx = load_fixture(Path(shared), name)
    return boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method=method, C=fx.C,
                                    config=PlannerConfig(crown_interm=interm))


@pytest.mark.parametrize("name", SMALL_FIXTURES)
def test_golden_fixtures_cut_independent(shared, name):
    fx = load_fixture(shared, name)
    graph, _ = boundflow.load_model(str(fx.model))
    spec_rows = None if fx.C is None else fx.C.shape[0]
    cases = [dict(max_ops_per_task=1), dict(min_tasks=7), dict(min_tasks=10**6),
             dict(max_ops_per_task=3, min_tasks=4, enable_storage_reuse=False),
             dict(max_ops_per_task=2, memory_aware_order=False)]
    # two cuts per method, rotating, so every cut meets every method over the fixtures
    start = FIXTURES.index(name)
    for m, (method, interm) in enumerate(METHODS):
        ref = _reference(str(shared), name, method, interm)
        for k in (start + m) % len(cases), (start + m + 2) % len(cases):
            cfg = PlannerConfig(crown_interm=interm, **cases[k])
            got = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method=method, C=fx.C, config=cfg)
            what = f"{name} {method}/{interm} {cfg}"
            assert_same_bounds(ref, got, what)
            check_task_counts(graph, method, cfg, 1, spec_rows, what)


@pytest.mark.parametrize("name", SMALL_FIXTURES[:3])
@pytest.mark.parametrize("reuse", [False, True])
def test_plan_invariants_default_cut(shared, name, reuse):
    fx = load_fixture(shared, name)
    graph, _ = boundflow.load_model(str(fx.model))
    for method, interm in METHODS:
        for batch in (1, 3):
            mod = boundflow.plan(graph, method, PlannerConfig(crown_interm=interm, enable_storage_reuse=reuse),
                                 batch=batch, spec_rows=None if fx.C is None else fx.C.shape[0])
            check_module(mod)
            if not reuse:
                assert mod.memory_plan.physical_bytes >= mod.memory_plan.logical_bytes


def test_more_tasks_when_asked(shared):
    fx = load_fixture(shared, "mlp_small__eps0.05")
    graph, _ = boundflow.load_model(str(fx.model))
    counts = []
    for m in (1, 2, 4, 8, 16):
        mod = boundflow.plan(graph, "crown", PlannerConfig(min_tasks=m))
        counts.append(mod.stats["num_tasks"])
        n_ops = mod.stats["num_ops"]
        assert counts[-1] >= min(m, n_ops)
    assert counts == sorted(counts) and counts[-1] > counts[0], counts
    one_op = boundflow.plan(graph, "crown", PlannerConfig(max_ops_per_task=1))
    assert one_op.stats["num_tasks"] == one_op.stats["num_ops"] == len(list(one_op.ops()))
    assert all(len(t.ops) == 1 for t in one_op.tasks)
