"""Drop ops whose outputs nothing reads (e.g. the output interval when CROWN bounds the output),
and the buffers only they wrote."""
from __future__ import annotations

from boundflow.ir.task import BufferSpec, TaskOp


def prune_dead_ops(ops: list[TaskOp], phases: list[str], buffers: dict[int, BufferSpec],
                   inputs: set[int], outputs: set[int]):
    live = set(outputs)
    keep = [False] * len(ops)
    for k in range(len(ops) - 1, -1, -1):
        if any(b in live for b in ops[k].outputs):
            keep[k] = True
            live.update(ops[k].inputs)
    kept_ops = [op for op, k in zip(ops, keep) if k]
    kept_phases = [ph for ph, k in zip(phases, keep) if k]
    used = inputs | {b for op in kept_ops for b in (*op.inputs, *op.outputs)}
    return kept_ops, kept_phases, {b: s for b, s in buffers.items() if b in used}
