"""plan(graph, method, ...) -> BFTaskModule.

fold layout (transposes into weights or reshapes) -> lower (method -> ops over logical buffers)
-> prune dead ops -> memory-aware order -> partition into tasks -> liveness -> storage plan (with
reuse) -> verify. Each step is a pure function of the previous one's result.
"""
from __future__ import annotations

import time

import torch

from boundflow.ir.primal import Graph
from boundflow.ir.task import BFTaskModule
from boundflow.passes.layout import LayoutReport, count_transposes, fold_layout
from boundflow.planner.config import PlannerConfig
from boundflow.planner.liveness import op_lifetimes, peak_live_bytes
from boundflow.planner.lower import lower
from boundflow.planner.memory import merge_views, plan_memory, view_aliases
from boundflow.planner.order import memory_aware_order
from boundflow.planner.partition import build_tasks, split_ops
from boundflow.planner.prune import prune_dead_ops
from boundflow.planner.verify import verify_plan


def plan(graph: Graph, method: str = "crown", config: PlannerConfig | None = None, *,
         batch: int = 1, spec_rows: int | None = None) -> BFTaskModule:
    """Plan bound computation `method` for `batch` input regions, bounding `spec_rows` rows of a
    runtime spec matrix C (None: every output)."""
    config = config or PlannerConfig()
    timings = {}
    t_layout = time.perf_counter()
    graph, layout = planned_graph(graph, config)
    t0 = time.perf_counter()
    low = lower(graph, method, batch, spec_rows, config)
    ins, outs = set(low.inputs.values()), set(low.outputs.values())
    ops, phases, buffers = prune_dead_ops(low.ops, low.phases, low.buffers, ins, outs)
    t1 = time.perf_counter()
    aliases = view_aliases(ops, buffers) if config.enable_storage_reuse else {}
    nbytes = {b: s.nbytes for b, s in buffers.items()}
    peak_naive = peak_live_bytes(merge_views(op_lifetimes(ops, ins, outs), aliases), nbytes)
    peak = peak_naive
    if config.memory_aware_order:
        order = memory_aware_order(ops, buffers, outs)
        reordered = [ops[k] for k in order]
        peak_reordered = peak_live_bytes(merge_views(op_lifetimes(reordered, ins, outs), aliases), nbytes)
        if peak_reordered < peak_naive:
            ops, phases, peak = reordered, [phases[k] for k in order], peak_reordered
    t2 = time.perf_counter()
    tasks, edges = build_tasks(split_ops(ops, phases, config), ins, outs)
    t3 = time.perf_counter()
    lifetimes = op_lifetimes([op for t in tasks for op in t.ops], ins, outs)
    memory = plan_memory(buffers, lifetimes, config.alignment, config.enable_storage_reuse, aliases)
    t4 = time.perf_counter()
    timings.update(layout_ms=(t0 - t_layout) * 1e3, lower_ms=(t1 - t0) * 1e3, order_ms=(t2 - t1) * 1e3,
                   partition_ms=(t3 - t2) * 1e3, memory_ms=(t4 - t3) * 1e3)
    # the parameters move to the plan's device once, here
    device = torch.device(config.device)
    params = {name: t.to(device) for name, t in low.params.items() if any(name in op.params for op in ops)}
    module = BFTaskModule(method, tasks, edges, buffers, params, low.inputs, low.outputs, memory,
                          dict(config.dump(), method=method, batch=batch, spec_rows=spec_rows), device=device)
    module.stats.update(
        num_tasks=len(tasks), num_edges=len(edges), num_ops=len(ops), num_buffers=len(buffers),
        ops_pruned=len(low.ops) - len(ops),
        logical_bytes=memory.logical_bytes, physical_bytes=memory.physical_bytes,
        peak_planned_bytes=peak, peak_planned_bytes_naive_order=peak_naive,
        reuse_stats=_reuse_stats(memory, buffers),
        transposes_folded=layout.folded, transposes_executed=layout.transposes_after,
        transpose_task_ops=sum(op.op.endswith(".transpose") for op in ops), layout_rewrites=layout.rewrites,
        param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
        timings=timings)
    if config.verify:
        t5 = time.perf_counter()
        verify_plan(module)
        timings["verify_ms"] = (time.perf_counter() - t5) * 1e3
    return module


def planned_graph(graph: Graph, config: PlannerConfig) -> tuple[Graph, LayoutReport]:
    """The graph plan() lowers (layout folded when config.fold_layout) and what folding did. Its
    value names are the plan's (Role("interm", <relu input>), ...), which folding may rename:
    whoever names a plan's values reads them from here."""
    if config.fold_layout:
        return fold_layout(graph)
    return graph, LayoutReport(count_transposes(graph), count_transposes(graph))


def _reuse_stats(memory, buffers) -> dict:
    """hits: buffers placed in bytes another buffer also uses; misses: buffers with bytes of
    their own; bytes_saved: logical - physical."""
    shared = _buffers_sharing_bytes(memory, buffers)
    return {"hits": shared, "misses": len(buffers) - shared,
            "bytes_saved": max(memory.logical_bytes - memory.physical_bytes, 0)}


def _buffers_sharing_bytes(memory, buffers) -> int:
    spans = sorted((memory.offsets[b][0], memory.offsets[b][1], memory.offsets[b][1] + s.nbytes, b)
                   for b, s in buffers.items())
    sharing = set()
    for i, (dt, lo, hi, b) in enumerate(spans):
        for dt2, lo2, hi2, b2 in spans[i + 1:]:
            if dt2 != dt or lo2 >= hi:
                break
            sharing.update((b, b2))
    return len(sharing)
