"""Liveness of logical buffers over the execution order.

Time runs in half steps: op k reads its inputs at 2k and writes its outputs at 2k + 1, after its
kernel has returned, so an output may take the bytes of an input whose last reader is op k.
Kernels whose results may be views of their inputs (ALIASING_KERNELS) and kernels that write
into their outputs' planned bytes while reading their inputs (WRITING_KERNELS) write at 2k instead.
A buffer is live from its write to its last read (module inputs from -1, outputs to the end);
two buffers may share bytes only if their ranges are disjoint.
"""
from __future__ import annotations

from dataclasses import dataclass

from boundflow.ops import ALIASING_KERNELS, WRITING_KERNELS
from boundflow.ir.task import BoundTask, TaskOp


@dataclass(frozen=True)
class Lifetime:
    start: int   # half step of the write (-1: module input)
    end: int     # half step of the last read (2 * len(ops): module output)

    def overlaps(self, other: "Lifetime") -> bool:
        return self.start <= other.end and other.start <= self.end


def op_lifetimes(ops: list[TaskOp], inputs: set[int], outputs: set[int]) -> dict[int, Lifetime]:
    start: dict[int, int] = {b: -1 for b in inputs}
    end: dict[int, int] = {b: -1 for b in inputs}
    for k, op in enumerate(ops):
        for b in op.inputs:
            if b not in start:
                raise ValueError(f"op {k} ({op.op}) reads buffer {b} before anything writes it")
            end[b] = 2 * k
        write = 2 * k if op.op in ALIASING_KERNELS or op.op in WRITING_KERNELS else 2 * k + 1
        for b in op.outputs:
            if b in start:
                raise ValueError(f"op {k} ({op.op}) writes buffer {b}, which is already written")
            start[b] = end[b] = write
    for b in outputs:
        end[b] = 2 * len(ops)
    return {b: Lifetime(start[b], end[b]) for b in start}


def task_lifetimes(tasks: list[BoundTask], inputs: set[int], outputs: set[int]) -> dict[int, Lifetime]:
    """The same at task granularity: which tasks a buffer must survive."""
    start: dict[int, int] = {b: -1 for b in inputs}
    end: dict[int, int] = {b: -1 for b in inputs}
    for t, task in enumerate(tasks):
        for op in task.ops:
            for b in op.inputs:
                end[b] = max(end.get(b, t), t)
            for b in op.outputs:
                start.setdefault(b, t)
                end[b] = max(end.get(b, t), t)
    for b in outputs:
        end[b] = len(tasks)
    return {b: Lifetime(start[b], end[b]) for b in start}


def peak_live_bytes(lifetimes: dict[int, Lifetime], nbytes: dict[int, int]) -> int:
    """The most bytes live at any one time: a lower bound for any storage plan."""
    events: dict[int, int] = {}
    for b, life in lifetimes.items():
        events[life.start] = events.get(life.start, 0) + nbytes[b]
        events[life.end + 1] = events.get(life.end + 1, 0) - nbytes[b]
    peak = live = 0
    for k in sorted(events):
        live += events[k]
        peak = max(peak, live)
    return peak
