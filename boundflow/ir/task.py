"""Task IR: the executable plan. Every tensor a task reads or writes is a logical buffer with an
id, a shape, a dtype and a lifetime; `memory_plan` places logical buffers inside physical arenas.

Runtime shapes include the region axis B. A buffer with `dynamic_axis` set is planned at its
largest size (shape[dynamic_axis] is an upper bound) and used at the size the data gives at run
time, e.g. the number of unstable neurons that get a CROWN bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

DTYPE_BYTES = {"float32": 4, "float64": 8, "int64": 8}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


class Role(NamedTuple):
    """A module input or output that belongs to a value of the plan (the others are plain
    strings: "box", "C", "bounds"). kind: "interm" (intermediate bounds of a relaxed op's input
    value, given to a beta-crown plan or exported), "refine" (flat indices of the value's
    neurons to re-tighten), "alpha" (a relaxed op's parameters; value: the op's output) or
    "beta" (split multipliers; value: a ReLU's input); target: the value whose bound pass reads
    them (alpha, beta)."""
    kind: str
    value: str
    target: str | None = None

    def __str__(self) -> str:          # buffer names, error messages
        return f"{self.kind}({self.value})" if self.target is None else f"{self.kind}({self.value} -> {self.target})"


def of_kind(roles, *kinds: str) -> list[Role]:
    """The Roles among `roles` (a module's inputs or outputs) whose kind is one of `kinds`."""
    return [r for r in roles if isinstance(r, Role) and r.kind in kinds]


@dataclass(frozen=True)
class BufferSpec:
    id: int
    name: str                      # what lives here, e.g. "interval.lo(/fc1/out)"
    shape: tuple[int, ...]         # runtime shape, region axis first; an upper bound on dynamic_axis
    dtype: str = "float32"
    layout: str | None = None
    role: str = "state"            # "input" | "output" | "state"
    dynamic_axis: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass
class TaskOp:
    op: str                        # "<domain>.<rule>", looked up in boundflow.domains.KERNELS
    inputs: list[int]              # buffer ids
    outputs: list[int]             # buffer ids
    params: list[str] = field(default_factory=list)   # names in BFTaskModule.params
    attrs: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] | None = None               # layout hint: e.g. a transpose folded here
    source: str = ""               # the primal node / bound target this op serves


@dataclass
class BoundTask:
    id: int
    ops: list[TaskOp]
    inputs: list[int] = field(default_factory=list)    # buffers produced outside this task
    outputs: list[int] = field(default_factory=list)   # buffers read after this task


@dataclass
class MemoryPlan:
    """Logical buffer id -> (arena dtype, byte offset). One arena per dtype."""

    offsets: dict[int, tuple[str, int]]
    arena_bytes: dict[str, int]
    logical_bytes: int
    physical_bytes: int
    reuse: bool = False
    # buffer -> the buffer whose bytes it shares by being a view of it (planner/memory.py)
    aliases: dict[int, int] = field(default_factory=dict)

    def physical_of(self, buffer_id: int) -> tuple[str, int]:
        return self.offsets[buffer_id]


@dataclass(eq=False)          # identity semantics: executors key their prepared state on it
class BFTaskModule:
    method: str
    tasks: list[BoundTask]
    edges: list[tuple[int, int]]
    buffers: dict[int, BufferSpec]
    params: dict[str, torch.Tensor]
    inputs: dict[str | Role, int]   # role -> buffer id: "box" = stack(x_lower, x_upper), optionally "C"
    outputs: dict[str | Role, int]  # "bounds" = stack(lb, ub), [2, B, S]
    memory_plan: MemoryPlan
    config_dump: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")   # of params; executors put the arenas there

    def ops(self):
        for task in self.tasks:
            yield from task.ops

    def summary(self) -> str:
        lines = [f"BFTaskModule method={self.method} tasks={len(self.tasks)} edges={len(self.edges)} "
                 f"buffers={len(self.buffers)} logical={self.memory_plan.logical_bytes}B "
                 f"physical={self.memory_plan.physical_bytes}B"]
        for t in self.tasks:
            lines.append(f"  task {t.id}: in {t.inputs} out {t.outputs}")
            for op in t.ops:
                lines.append(f"    {op.op}({op.inputs}; {op.params}) -> {op.outputs}  [{op.source}]")
        return "\n".join(lines)
