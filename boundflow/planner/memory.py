"""Storage plan: place every logical buffer at a byte offset inside one arena per dtype.

Without reuse each logical buffer gets its own bytes (physical == logical). Buffers with a
dynamic axis are placed at their largest size.
"""
from __future__ import annotations

from boundflow.ir.task import BufferSpec, MemoryPlan


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def plan_memory(buffers: dict[int, BufferSpec], alignment: int = 64, reuse: bool = False) -> MemoryPlan:
    if reuse:
        raise NotImplementedError("storage reuse lands with the global planner (issue 3)")
    offsets: dict[int, tuple[str, int]] = {}
    arena: dict[str, int] = {}
    for bid in sorted(buffers):
        spec = buffers[bid]
        top = arena.get(spec.dtype, 0)
        offsets[bid] = (spec.dtype, top)
        arena[spec.dtype] = _align(top + spec.nbytes, alignment)
    logical = sum(b.nbytes for b in buffers.values())
    return MemoryPlan(offsets, arena, logical, sum(arena.values()), reuse)
