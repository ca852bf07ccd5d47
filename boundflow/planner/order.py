"""Memory-aware op order: among the topological orders the data dependences allow, pick greedily
the ready op that grows the live set least (bytes it writes minus bytes whose last reader it is),
ties going to the lowering's order. Residual branches, concats and the many CROWN passes leave
room to choose."""
from __future__ import annotations

from boundflow.ir.task import BufferSpec, TaskOp


def memory_aware_order(ops: list[TaskOp], buffers: dict[int, BufferSpec], outputs: set[int]) -> list[int]:
    producer = {b: k for k, op in enumerate(ops) for b in op.outputs}
    readers: dict[int, int] = {}
    for op in ops:
        for b in set(op.inputs):
            readers[b] = readers.get(b, 0) + 1
    waiting = [len({producer[b] for b in op.inputs if b in producer}) for op in ops]
    users: list[list[int]] = [[] for _ in ops]
    for k, op in enumerate(ops):
        for p in {producer[b] for b in op.inputs if b in producer}:
            users[p].append(k)
    ready = {k for k, w in enumerate(waiting) if w == 0}
    order: list[int] = []

    def growth(k: int) -> int:
        op = ops[k]
        freed = sum(buffers[b].nbytes for b in set(op.inputs) if readers[b] == 1 and b not in outputs)
        return sum(buffers[b].nbytes for b in op.outputs) - freed

    while ready:
        k = min(ready, key=lambda i: (growth(i), i))
        ready.remove(k)
        order.append(k)
        for b in set(ops[k].inputs):
            readers[b] -= 1
        for u in users[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.add(u)
    if len(order) != len(ops):
        raise ValueError("op list has a dependence cycle")
    return order
