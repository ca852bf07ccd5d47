"""Plan verifier: proves a BFTaskModule's storage plan safe, or says which buffers break it.

Checks that every read is of a buffer already written (or a module input), that every buffer
fits inside its arena, and that no two buffers live at the same time share a byte, unless one
is a view of the other (a reshape's result placed with its input: the aliases are exactly the
view kernels' results, recomputed here, at their roots' offsets).
"""
from __future__ import annotations

from boundflow.ir.task import BFTaskModule
from boundflow.planner.liveness import op_lifetimes
from boundflow.planner.memory import view_aliases


class PlanError(ValueError):
    """A plan that would read garbage or let live buffers overwrite each other."""


def verify_plan(module: BFTaskModule) -> None:
    ops = list(module.ops())
    try:
        life = op_lifetimes(ops, set(module.inputs.values()), set(module.outputs.values()))
    except ValueError as e:      # a read before any write, or a buffer written twice
        raise PlanError(str(e)) from e
    plan = module.memory_plan
    aliases = plan.aliases
    if aliases and aliases != view_aliases(ops, module.buffers):
        raise PlanError("the memory plan's aliases are not the view kernels' results")
    for b, r in aliases.items():
        if plan.offsets.get(b) != plan.offsets.get(r):
            raise PlanError(f"buffer {b} ({module.buffers[b].name}) is a view of buffer {r} but not at its bytes")
    spans = []
    for b, spec in module.buffers.items():
        if b not in plan.offsets:
            raise PlanError(f"buffer {b} ({spec.name}) has no place in the memory plan")
        if b not in life:
            raise PlanError(f"buffer {b} ({spec.name}) is never written")
        dtype, off = plan.offsets[b]
        if dtype != spec.dtype or off < 0 or off + spec.nbytes > plan.arena_bytes[dtype]:
            raise PlanError(f"buffer {b} ({spec.name}) at {dtype}+{off} does not fit its arena")
        spans.append((dtype, off, off + spec.nbytes, b))
    # sweep by offset: only buffers whose byte ranges intersect need a lifetime check
    spans.sort()
    for i, (dtype, lo, hi, b) in enumerate(spans):
        for dtype2, lo2, hi2, b2 in spans[i + 1:]:
            if dtype2 != dtype or lo2 >= hi:
                break
            if aliases.get(b, b) != aliases.get(b2, b2) and life[b].overlaps(life[b2]):
                raise PlanError(f"buffers {b} ({module.buffers[b].name}) and {b2} ({module.buffers[b2].name}) "
                                f"share bytes of the {dtype} arena while both are live")
