"""plan(graph, method, ...) -> BFTaskModule: lowering, partitioning and storage, each a pure step."""
from __future__ import annotations

import time

from boundflow.ir.primal import Graph
from boundflow.ir.task import BFTaskModule
from boundflow.planner.config import PlannerConfig
from boundflow.planner.lower import lower
from boundflow.planner.memory import plan_memory
from boundflow.planner.partition import build_tasks, split_ops


def plan(graph: Graph, method: str = "crown", config: PlannerConfig | None = None, *,
         batch: int = 1, spec_rows: int | None = None) -> BFTaskModule:
    """Plan bound computation `method` for `batch` input regions, bounding `spec_rows` rows of a
    runtime spec matrix C (None: every output)."""
    config = config or PlannerConfig()
    timings = {}
    t0 = time.perf_counter()
    low = lower(graph, method, batch, spec_rows, config)
    t1 = time.perf_counter()
    groups = split_ops(low.ops, low.phases, config)
    tasks, edges = build_tasks(groups, set(low.inputs.values()), set(low.outputs.values()))
    t2 = time.perf_counter()
    memory = plan_memory(low.buffers, config.alignment, config.enable_storage_reuse)
    t3 = time.perf_counter()
    timings.update(lower_ms=(t1 - t0) * 1e3, partition_ms=(t2 - t1) * 1e3, memory_ms=(t3 - t2) * 1e3)
    module = BFTaskModule(method, tasks, edges, low.buffers, low.params, low.inputs, low.outputs, memory,
                          dict(config.dump(), method=method, batch=batch, spec_rows=spec_rows))
    module.stats.update(
        num_tasks=len(tasks), num_edges=len(edges), num_ops=len(low.ops), num_buffers=len(low.buffers),
        logical_bytes=memory.logical_bytes, physical_bytes=memory.physical_bytes,
        param_bytes=sum(p.numel() * p.element_size() for p in low.params.values()),
        timings=timings)
    return module
