"""Cut the flat op list into BoundTasks and derive the task DAG.

Default cut: one task per phase (a run of forward interval ops, one CROWN refinement, the output
pass). `max_ops_per_task` and `min_tasks` cut further. Bounds never depend on the cut: a task
boundary only decides which buffers cross between tasks.
"""
from __future__ import annotations

from boundflow.ir.task import BoundTask, TaskOp
from boundflow.planner.config import PlannerConfig


def split_ops(ops: list[TaskOp], phases: list[str], config: PlannerConfig) -> list[list[TaskOp]]:
    groups: list[list[TaskOp]] = []
    for i, op in enumerate(ops):
        if i == 0 or phases[i] != phases[i - 1]:
            groups.append([])
        groups[-1].append(op)
    if config.max_ops_per_task is not None:
        m = config.max_ops_per_task
        groups = [g[k:k + m] for g in groups for k in range(0, len(g), m)]
    while len(groups) < config.min_tasks:
        i = max(range(len(groups)), key=lambda k: len(groups[k]))
        if len(groups[i]) < 2:
            break
        half = len(groups[i]) // 2
        groups[i:i + 1] = [groups[i][:half], groups[i][half:]]
    return groups


def build_tasks(groups: list[list[TaskOp]], module_inputs: set[int], module_outputs: set[int]):
    """Tasks with their boundary buffers, and the edges (producer task, consumer task)."""
    producer_task: dict[int, int] = {}
    for t, ops in enumerate(groups):
        for op in ops:
            for b in op.outputs:
                producer_task[b] = t
    tasks = [BoundTask(t, ops) for t, ops in enumerate(groups)]
    edges: set[tuple[int, int]] = set()
    read_elsewhere: set[tuple[int, int]] = set()   # (buffer, reading task)
    for t, ops in enumerate(groups):
        for op in ops:
            for b in op.inputs:
                src = producer_task.get(b)
                if src is None:
                    if b not in module_inputs:
                        raise ValueError(f"op {op.op} reads buffer {b} that nothing writes")
                    read_elsewhere.add((b, t))
                elif src != t:
                    edges.add((src, t))
                    read_elsewhere.add((b, t))
    for b, t in sorted(read_elsewhere):
        if b not in tasks[t].inputs:
            tasks[t].inputs.append(b)
        src = producer_task.get(b)
        if src is not None and b not in tasks[src].outputs:
            tasks[src].outputs.append(b)
    for b in module_outputs:
        if b not in tasks[producer_task[b]].outputs:
            tasks[producer_task[b]].outputs.append(b)
    return tasks, sorted(edges)
