"""The planner: plan verifier, storage packing, partitioning, memory-aware order and plan stats.

Golden fixtures: verify_plan accepts every plan (each fixture x method, alpha-CROWN included, x
reuse on/off x partition x op order); bounds are bit-identical across those settings on the fixtures tests/test_partition.py
does not already cover. Random DAGs of TaskOps (hypothesis): the packer's plan verifies and sits
between the live-bytes peak and the logical bytes; the memory-aware order respects every
dependence. Hand-corrupted plans are rejected.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import boundflow
from boundflow.api import load_model
from boundflow.ir.task import BFTaskModule, BufferSpec, TaskOp
from boundflow.planner.config import PlannerConfig
from boundflow.planner.liveness import op_lifetimes, peak_live_bytes, task_lifetimes
from boundflow.planner.lower import METHODS as ALL_METHODS
from boundflow.planner.memory import _align, merge_views, plan_memory, view_aliases
from boundflow.planner.order import memory_aware_order
from boundflow.planner.partition import build_tasks, split_ops
from boundflow.planner.pipeline import plan
from boundflow.planner.verify import PlanError, verify_plan
from golden import FIXTURES, load_fixture
from test_partition import SMALL_FIXTURES

METHODS = ("ibp", "crown-ibp", "crown")
PARTITIONS = [{}, {"max_ops_per_task": 1}, {"max_ops_per_task": 3}, {"min_tasks": 5}]
BOUNDS_PARTITIONS = [{}, {"max_ops_per_task": 1}, {"min_tasks": 5}]    # runs cost more than plans
# the golden fixtures whose bounds tests/test_partition.py does not compare across cuts
OTHER_FIXTURES = [name for name in FIXTURES if name not in SMALL_FIXTURES]


def configs(partitions=PARTITIONS):
    for part, reuse, aware in itertools.product(partitions, (True, False), (True, False)):
        yield PlannerConfig(enable_storage_reuse=reuse, memory_aware_order=aware, verify=False, **part)


def fixture_graph(shared, name):
    fx = load_fixture(shared, name)
    graph, _ = load_model(str(fx.model))
    return fx, graph


def spec_rows(fx) -> int | None:
    return None if fx.C is None else fx.C.shape[0]


# --------------------------------------------------------------------------------------------
# golden fixtures: every plan verifies; bounds never depend on reuse, partition or order
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURES)
def test_every_golden_plan_verifies(shared, name):
    fx, graph = fixture_graph(shared, name)
    for method, config in itertools.product(ALL_METHODS, configs()):
        module = plan(graph, method, config, spec_rows=spec_rows(fx))
        verify_plan(module)
        s = module.stats
        assert s["peak_planned_bytes"] <= s["peak_planned_bytes_naive_order"]
        assert s["peak_planned_bytes"] <= s["physical_bytes"] <= sum(
            _align(b.nbytes, config.alignment) for b in module.buffers.values())
        if not config.enable_storage_reuse:
            assert s["reuse_stats"]["hits"] == 0 and s["physical_bytes"] >= s["logical_bytes"]
        if config.max_ops_per_task is not None:
            assert all(len(t.ops) <= config.max_ops_per_task for t in module.tasks)
        assert len(module.tasks) >= min(config.min_tasks, s["num_ops"])


@pytest.mark.parametrize("name", OTHER_FIXTURES)
def test_golden_bounds_identical_for_any_reuse_partition_and_order(shared, name):
    fx = load_fixture(shared, name)
    for method in METHODS:
        ref = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method=method, C=fx.C)
        for config in configs(BOUNDS_PARTITIONS):
            lb, ub = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method=method, C=fx.C,
                                              config=config)
            assert torch.equal(lb, ref[0]) and torch.equal(ub, ref[1]), f"{name} {method} {config}"


@pytest.mark.parametrize("name", ["resnet_block__eps0.01", "mnist-net_256x2__prop_0_0.03__specC"])
@pytest.mark.parametrize("method", METHODS)
def test_only_task_outputs_outlive_their_task(shared, name, method):
    """A task's outputs are exactly its buffers read elsewhere (or returned); every other buffer it
    writes lives and dies inside it (tests/test_partition.py checks inputs and edges)."""
    fx, graph = fixture_graph(shared, name)
    module = plan(graph, method, PlannerConfig(max_ops_per_task=2), spec_rows=spec_rows(fx))
    module_outputs = set(module.outputs.values())
    life = task_lifetimes(module.tasks, set(module.inputs.values()), module_outputs)
    for task in module.tasks:
        written = {b for op in task.ops for b in op.outputs}
        read_elsewhere = {b for t in module.tasks if t.id != task.id for op in t.ops for b in op.inputs}
        assert set(task.outputs) == written & (read_elsewhere | module_outputs)
        for b in written - set(task.outputs):
            assert life[b].start == life[b].end == task.id
        for b in task.outputs:
            assert life[b].end > task.id


def test_plan_stats_and_config_dump(shared):
    fx, graph = fixture_graph(shared, "permute_net__eps0.05")
    config = PlannerConfig(min_tasks=3, enable_storage_reuse=True)
    module = plan(graph, "crown", config)
    s = module.stats
    for key in ("num_tasks", "num_edges", "logical_bytes", "physical_bytes", "peak_planned_bytes",
                "peak_planned_bytes_naive_order", "transposes_folded", "transposes_executed", "transpose_task_ops"):
        assert isinstance(s[key], int), key
    assert set(s["reuse_stats"]) == {"hits", "misses", "bytes_saved"}
    assert s["reuse_stats"]["hits"] + s["reuse_stats"]["misses"] == s["num_buffers"]
    assert s["reuse_stats"]["bytes_saved"] == s["logical_bytes"] - s["physical_bytes"] > 0
    assert {"layout_ms", "lower_ms", "order_ms", "partition_ms", "memory_ms", "verify_ms"} <= set(s["timings"])
    assert s["num_tasks"] == len(module.tasks) >= 3 and s["num_edges"] == len(module.edges)
    assert module.config_dump == dict(config.dump(), method="crown", batch=1, spec_rows=None)
    assert set(config.dump()) == {f.name for f in dataclasses.fields(PlannerConfig)}


# --------------------------------------------------------------------------------------------
# the verifier rejects broken plans
# --------------------------------------------------------------------------------------------
@pytest.fixture
def crown_plan(shared):
    _, graph = fixture_graph(shared, "mlp_small__eps0.05")
    return lambda **kw: plan(graph, "crown", PlannerConfig(**kw))


def _with_offsets(module: BFTaskModule, changes: dict[int, tuple[str, int]]) -> BFTaskModule:
    mp = module.memory_plan
    offsets = {**mp.offsets, **changes}
    return dataclasses.replace(module, memory_plan=dataclasses.replace(mp, offsets=offsets))


def test_rejects_overlapping_live_buffers(crown_plan):
    module = crown_plan()
    ops = list(module.ops())
    life = op_lifetimes(ops, set(module.inputs.values()), set(module.outputs.values()))
    size = {b: s.nbytes for b, s in module.buffers.items()}
    # b, no larger than a, moved onto a's bytes: it fits the arena, and clashes with a
    a, b = next((a, b) for a, b in itertools.permutations(sorted(module.buffers), 2)
                if life[a].overlaps(life[b]) and module.buffers[a].dtype == module.buffers[b].dtype
                and size[b] <= size[a])
    broken = _with_offsets(module, {b: module.memory_plan.offsets[a]})
    with pytest.raises(PlanError, match="share bytes"):
        verify_plan(broken)


def test_rejects_read_before_write(crown_plan):
    module = crown_plan(max_ops_per_task=1)
    # move the first op that reads an intermediate buffer ahead of that buffer's writer
    tasks = list(module.tasks)
    written_by = {b: k for k, t in enumerate(tasks) for b in t.ops[0].outputs}
    k = next(k for k, t in enumerate(tasks) if any(b in written_by for b in t.ops[0].inputs))
    src = min(written_by[b] for b in tasks[k].ops[0].inputs if b in written_by)
    tasks.insert(src, tasks.pop(k))
    with pytest.raises(PlanError, match="before anything writes it"):
        verify_plan(dataclasses.replace(module, tasks=tasks))


def test_rejects_buffer_outside_its_arena_or_unplaced(crown_plan):
    module = crown_plan()
    mp = module.memory_plan
    b = max(module.buffers, key=lambda i: module.buffers[i].nbytes)
    dtype, _ = mp.offsets[b]
    with pytest.raises(PlanError, match="does not fit"):
        verify_plan(_with_offsets(module, {b: (dtype, mp.arena_bytes[dtype] - 4)}))
    offsets = dict(mp.offsets)
    del offsets[b]
    with pytest.raises(PlanError, match="no place"):
        verify_plan(dataclasses.replace(module, memory_plan=dataclasses.replace(mp, offsets=offsets)))


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
def _module(ops, buffers, inputs, outputs, reuse=True, alignment=64) -> BFTaskModule:
    tasks, edges = build_tasks(split_ops(ops, ["p"] * len(ops), PlannerConfig()), set(inputs), set(outputs))
    in_order = [op for t in tasks for op in t.ops]
    life = op_lifetimes(in_order, set(inputs), set(outputs))
    memory = plan_memory(buffers, life, alignment, reuse, view_aliases(in_order, buffers))
    return BFTaskModule("test", tasks, edges, buffers, {}, {f"in{i}": b for i, b in enumerate(inputs)},
                        {f"out{i}": b for i, b in enumerate(outputs)}, memory, {})


def _buf(i, shape, dtype="float32") -> BufferSpec:
    return BufferSpec(i, f"b{i}", shape, dtype)


def test_freed_4x32_buffer_holds_a_later_4x8_one():
    # x -> A [4,32] -> C [4,16] (A dies here; C lives to the end) -> B [4,8]: B lands in A's bytes
    buffers = {0: _buf(0, (4, 4)), 1: _buf(1, (4, 32)), 2: _buf(2, (4, 16)), 3: _buf(3, (4, 8))}
    ops = [TaskOp("interval.softmax", [0], [1]), TaskOp("interval.softmax", [1], [2]), TaskOp("interval.softmax", [2], [3])]
    module = _module(ops, buffers, inputs=[0], outputs=[2, 3])
    verify_plan(module)
    (_, a), (_, b) = module.memory_plan.offsets[1], module.memory_plan.offsets[3]
    assert a <= b and b + buffers[3].nbytes <= a + buffers[1].nbytes
    # x dies as A is written, and C and B both fit in A's bytes once A dies: one A's worth in all
    assert module.memory_plan.physical_bytes == 512 < sum(_align(s.nbytes, 64) for s in buffers.values())


@st.composite
def random_dags(draw):
    """Module inputs, then ops in a topological order, each reading earlier buffers and writing
    one or two fresh ones (float32, some int64; some ops alias, as reshapes do, and some write
    into their planned outputs while reading, as interval.relu does); some are views, a flatten
    of one buffer into one of its size, whose bytes the plan shares between them."""
    buffers: dict[int, BufferSpec] = {}

    def new(dtype="float32"):
        i = len(buffers)
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
        buffers[i] = _buf(i, shape, dtype)
        return i

    inputs = [new() for _ in range(draw(st.integers(1, 2)))]
    ops = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["interval.softmax", "interval.linear", "interval.reshape", "interval.relu",
                                     "interval.flatten"]))
        if kind == "interval.flatten":
            (read,) = reads = [draw(st.sampled_from(sorted(buffers)))]
            writes = [len(buffers)]
            buffers[len(buffers)] = BufferSpec(len(buffers), "view", (buffers[read].numel,), buffers[read].dtype)
        else:
            reads = draw(st.lists(st.sampled_from(sorted(buffers)), min_size=1, max_size=3, unique=True))
            writes = [new(draw(st.sampled_from(["float32", "float32", "int64"]))) for _ in range(draw(st.integers(1, 2)))]
        ops.append(TaskOp(kind, reads, writes))
    written = [b for op in ops for b in op.outputs]
    outputs = sorted(set(draw(st.lists(st.sampled_from(written), min_size=0, max_size=2))) | {written[-1]})
    return ops, buffers, inputs, outputs


DAG_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                        suppress_health_check=[HealthCheck.too_slow])


@DAG_SETTINGS
@given(dag=random_dags(), alignment=st.sampled_from([4, 64]), reuse=st.booleans())
def test_packer_plan_of_random_dag_verifies(dag, alignment, reuse):
    ops, buffers, inputs, outputs = dag
    module = _module(ops, buffers, inputs, outputs, reuse, alignment)
    verify_plan(module)
    life = op_lifetimes(list(module.ops()), set(inputs), set(outputs))
    mp = module.memory_plan
    assert mp.aliases == (view_aliases(list(module.ops()), buffers) if reuse else {})
    assert all(mp.offsets[b] == mp.offsets[r] for b, r in mp.aliases.items())
    aligned = sum(_align(s.nbytes, alignment) for s in buffers.values())
    assert peak_live_bytes(merge_views(life, mp.aliases), {b: s.nbytes for b, s in buffers.items()}) <= \
        mp.physical_bytes <= aligned
    if alignment == 4:          # every float32/int64 size is a multiple of 4: no padding
        assert mp.physical_bytes <= mp.logical_bytes


def test_a_view_shares_its_inputs_bytes_and_the_verifier_checks_it():
    """A flatten's result is placed at its input's bytes (reuse on), the pair kept apart from
    others over both lifetimes; the verifier refuses an alias that is not a view kernel's result
    and a view placed elsewhere than its input."""
    buffers = {0: _buf(0, (4, 8)), 1: _buf(1, (4, 8)), 2: _buf(2, (32,)), 3: _buf(3, (4, 8)), 4: _buf(4, (32,))}
    ops = [TaskOp("interval.softmax", [0], [1]), TaskOp("interval.flatten", [1], [2]),
           TaskOp("interval.softmax", [0], [3]), TaskOp("interval.add", [2, 2], [4])]
    module = _module(ops, buffers, inputs=[0], outputs=[3, 4])
    verify_plan(module)
    mp = module.memory_plan
    assert mp.aliases == {2: 1} and mp.offsets[2] == mp.offsets[1]
    assert mp.offsets[3] != mp.offsets[1]              # 1 is dead after op 1 but its view lives on
    assert not _module(ops, buffers, inputs=[0], outputs=[3, 4], reuse=False).memory_plan.aliases
    bogus = dataclasses.replace(mp, aliases={3: 1}, offsets={**mp.offsets, 3: mp.offsets[1]})
    with pytest.raises(PlanError, match="not the view kernels' results"):
        verify_plan(dataclasses.replace(module, memory_plan=bogus))
    elsewhere = dataclasses.replace(mp, offsets={**mp.offsets, 2: mp.offsets[3]})
    with pytest.raises(PlanError, match="is a view of buffer 1 but not at its bytes"):
        verify_plan(dataclasses.replace(module, memory_plan=elsewhere))


@DAG_SETTINGS
@given(dag=random_dags())
def test_memory_aware_order_respects_dependences(dag):
    ops, buffers, inputs, outputs = dag
    order = memory_aware_order(ops, buffers, set(outputs))
    assert sorted(order) == list(range(len(ops)))
    written = set(inputs)
    for k in order:
        assert set(ops[k].inputs) <= written
        written.update(ops[k].outputs)
    reordered = [ops[k] for k in order]
    verify_plan(_module(reordered, buffers, inputs, outputs))


def test_memory_aware_order_lowers_peak_of_interleaved_branches():
    # two branches, each a big buffer reduced to a small one; naive order keeps both big ones live
    buffers = {0: _buf(0, (4,)), 1: _buf(1, (1000,)), 2: _buf(2, (1000,)), 3: _buf(3, (4,)), 4: _buf(4, (4,)),
               5: _buf(5, (4,))}
    ops = [TaskOp("interval.softmax", [0], [1]), TaskOp("interval.softmax", [0], [2]), TaskOp("interval.softmax", [1], [3]),
           TaskOp("interval.softmax", [2], [4]), TaskOp("interval.add", [3, 4], [5])]
    nbytes = {b: s.nbytes for b, s in buffers.items()}
    naive = peak_live_bytes(op_lifetimes(ops, {0}, {5}), nbytes)
    order = memory_aware_order(ops, buffers, {5})
    chosen = peak_live_bytes(op_lifetimes([ops[k] for k in order], {0}, {5}), nbytes)
    assert order == [0, 2, 1, 3, 4]
    assert (naive, chosen) == (8000, 4016)     # both big buffers at once vs one big and one small


@pytest.mark.parametrize("name", ["resnet_block__eps0.01", "cnn_small__eps0.02", "mnist-net_256x2__prop_0_0.03"])
def test_planner_reports_naive_and_chosen_peak(shared, name):
    fx, graph = fixture_graph(shared, name)
    for method in METHODS:
        aware = plan(graph, method, PlannerConfig(memory_aware_order=True))
        naive = plan(graph, method, PlannerConfig(memory_aware_order=False))
        assert aware.stats["peak_planned_bytes_naive_order"] == naive.stats["peak_planned_bytes"]
        assert aware.stats["peak_planned_bytes"] <= naive.stats["peak_planned_bytes"]
