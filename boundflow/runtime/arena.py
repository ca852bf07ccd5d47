"""The arenas a memory plan describes, shared by every executor: one flat tensor per dtype, a
static view per buffer, and for buffers with a dynamic axis the slot their view is cut from."""
from __future__ import annotations

import torch

from boundflow.errors import ShapeError
from boundflow.ir.task import DTYPE_BYTES, TORCH_DTYPES, BFTaskModule


# (ordinary tensors in a caller's inference mode too: callers write inputs into them outside it)
@torch.inference_mode(False)
def allocate(module: BFTaskModule, alignment: int = 1):
    """(arenas, views, slots): views[b] is buffer b's view (None when its size is dynamic),
    slots[b] = (arena, element offset). Every offset must be a multiple of `alignment` bytes."""
    plan = module.memory_plan
    arenas = {dt: torch.empty(max(n, 8) // DTYPE_BYTES[dt], dtype=TORCH_DTYPES[dt], device=module.device)
              for dt, n in plan.arena_bytes.items()}
    n = max(module.buffers) + 1 if module.buffers else 0
    views: list[torch.Tensor | None] = [None] * n
    slots: list[tuple[torch.Tensor, int] | None] = [None] * n
    for bid, spec in module.buffers.items():
        dt, off = plan.offsets[bid]
        if off % alignment:
            raise ValueError(f"buffer {bid} ({spec.name}) sits at byte {off}; this executor needs every "
                             f"buffer at a multiple of {alignment} bytes (PlannerConfig(alignment={alignment}))")
        arena, start = arenas[dt], off // DTYPE_BYTES[dt]
        slots[bid] = (arena, start)
        if spec.dynamic_axis is None:
            views[bid] = arena.narrow(0, start, spec.numel).view(spec.shape)
    return arenas, views, slots


def bind_inputs(module: BFTaskModule, env: list, inputs: dict[str, torch.Tensor]) -> None:
    """Copy the module inputs into their planned views, checking roles and shapes (an input
    on another device than the plan's is copied over here, once per run). An input given as
    its view (input_views) was written there by the caller."""
    for role, bid in module.inputs.items():
        if role not in inputs:
            raise ShapeError(f"missing input {role!r} for this plan")
        spec, t = module.buffers[bid], inputs[role]
        if t is env[bid]:
            continue
        if tuple(t.shape) != spec.shape:
            raise ShapeError(f"input {role!r} has shape {list(t.shape)}, the plan expects {list(spec.shape)}")
        env[bid].copy_(t)


def input_views(module: BFTaskModule, views: list) -> dict:
    """role -> the planned view of each module input, from an executor's static views."""
    return {role: views[bid] for role, bid in module.inputs.items()}
