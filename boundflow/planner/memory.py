"""Storage plan: place every logical buffer at a byte offset inside one arena per dtype.

Without reuse each buffer gets bytes of its own (physical == logical). With reuse, buffers are
packed greedily by size, largest first, each at the best-fitting gap between the buffers already
placed whose lifetimes overlap its own (the "greedy by size" planner of TFLite and others), so a
freed [4, 32] buffer can hold a later [4, 8] one. Buffers with a dynamic axis are placed at
their largest size.

With reuse, the result of a view kernel (a reshape: its input's bytes read in another shape)
shares its input's bytes, the pair packed as one buffer live over both lifetimes: the copy from
the one to the other goes, and the executor skips the op (nothing is ever written to either
after its producer: a plan writes every buffer once).
"""
from __future__ import annotations

from boundflow.ir.task import BufferSpec, MemoryPlan, TaskOp
from boundflow.ops import VIEW_KERNELS
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


def view_aliases(ops: list[TaskOp], buffers: dict[int, BufferSpec]) -> dict[int, int]:
    """Result -> the buffer it is a view of (followed back to one that is not): each result of
    a view kernel with its same-position input, where both have a static size and the same
    dtype and size. ops in execution order."""
    root: dict[int, int] = {}
    for op in ops:
        if op.op in VIEW_KERNELS and len(op.inputs) == len(op.outputs):
            for i, o in zip(op.inputs, op.outputs):
                a, b = buffers[i], buffers[o]
                if a.dynamic_axis is None and b.dynamic_axis is None and (a.dtype, a.numel) == (b.dtype, b.numel):
                    root[o] = root.get(i, i)
    return root


def merge_views(lifetimes: dict[int, Lifetime], aliases: dict[int, int]) -> dict[int, Lifetime]:
    """The lifetimes of the buffers with bytes of their own: each view's folded into its root's
    (a view keeps its root's bytes while it lives)."""
    life = {b: t for b, t in lifetimes.items() if b not in aliases}
    for b, r in aliases.items():
        life[r] = Lifetime(min(life[r].start, lifetimes[b].start), max(life[r].end, lifetimes[b].end))
    return life


def plan_memory(buffers: dict[int, BufferSpec], lifetimes: dict[int, Lifetime], alignment: int = 64,
                reuse: bool = True, aliases: dict[int, int] | None = None) -> MemoryPlan:
    """aliases (view_aliases; used with reuse only): buffers placed with the one they view."""
    aliases = dict(aliases or {}) if reuse else {}
    life = merge_views(lifetimes, aliases)
    offsets: dict[int, tuple[str, int]] = {}
    arena: dict[str, int] = {}
    for dtype in sorted({s.dtype for s in buffers.values()}):
        ids = sorted(b for b, s in buffers.items() if s.dtype == dtype and b not in aliases)
        sizes = {b: _align(buffers[b].nbytes, alignment) for b in ids}
        if reuse:
            where, top = _pack(ids, sizes, life)
        else:
            where, top = {}, 0
            for b in ids:
                where[b], top = top, top + sizes[b]
        offsets.update({b: (dtype, off) for b, off in where.items()})
        arena[dtype] = top
    offsets.update({b: offsets[r] for b, r in aliases.items()})
    logical = sum(s.nbytes for s in buffers.values())
    return MemoryPlan(offsets, arena, logical, sum(arena.values()), reuse, aliases)
