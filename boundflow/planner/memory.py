"""Storage plan: place every logical buffer at a byte offset inside one arena per dtype.

Without reuse each buffer gets bytes of its own (physical == logical). With reuse, buffers are
packed greedily by size, largest first, each at the best-fitting gap between the buffers already
placed whose lifetimes overlap its own (the "greedy by size" planner of TFLite and others), so a
freed [4, 32] buffer can hold a later [4, 8] one. Buffers with a dynamic axis are placed at
their largest size.
"""
from __future__ import annotations

from boundflow.ir.task import BufferSpec, MemoryPlan
from boundflow.planner.liveness import Lifetime


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _pack(ids: list[int], sizes: dict[int, int], life: dict[int, Lifetime]) -> tuple[dict[int, int], int]:
    placed: list[tuple[int, int, int]] = []            # (offset, size, buffer)
    offsets: dict[int, int] = {}
    for b in sorted(ids, key=lambda i: (-sizes[i], i)):
        best, best_gap, top = None, None, 0
        for off, size, other in sorted(p for p in placed if life[p[2]].overlaps(life[b])):
            gap = off - top
            if gap >= sizes[b] and (best_gap is None or gap < best_gap):
                best, best_gap = top, gap
            top = max(top, off + size)
        offsets[b] = top if best is None else best
        placed.append((offsets[b], sizes[b], b))
    arena = max((off + sizes[b] for b, off in offsets.items()), default=0)
    return offsets, arena


def plan_memory(buffers: dict[int, BufferSpec], lifetimes: dict[int, Lifetime], alignment: int = 64,
                reuse: bool = True) -> MemoryPlan:
    offsets: dict[int, tuple[str, int]] = {}
    arena: dict[str, int] = {}
    for dtype in sorted({s.dtype for s in buffers.values()}):
        ids = sorted(b for b, s in buffers.items() if s.dtype == dtype)
        sizes = {b: _align(buffers[b].nbytes, alignment) for b in ids}
        if reuse:
            where, top = _pack(ids, sizes, lifetimes)
        else:
            where, top = {}, 0
            for b in ids:
                where[b], top = top, top + sizes[b]
        offsets.update({b: (dtype, off) for b, off in where.items()})
        arena[dtype] = top
    logical = sum(s.nbytes for s in buffers.values())
    return MemoryPlan(offsets, arena, logical, sum(arena.values()), reuse)
