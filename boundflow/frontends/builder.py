"""What the lowerings in boundflow.ops see of a frontend: a Builder.

Each op module maps its ONNX ops and aten targets onto primal ops (registered with
`onnx_lowering` / `torch_lowering`, boundflow/ops/registry.py). A mapping is fn(builder) -> the
primal value of the source node's output. The ONNX and torch frontends each implement a Builder
for the node they are lowering; the methods below are the part both share, so that one lowering
(a matrix product, BatchNorm, pooling, ...) is written once for both formats. Each frontend adds
its own accessors for the source node's arguments (ONNX inputs and attributes, FX args).

Variables are primal value names (str). Constant operands are `Constant`s: a float64 value with
a rigorous error bound (`Enclosed`, domains/rounding.py: constants derived at import, such as
1 / divisor, stay sound in sound_fp plans) and the model tensors it came from, which decide its
name and kind when it is stored (each frontend has its own rule, in `constant`).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch

from boundflow.domains.concrete import infer_shape
from boundflow.domains.rounding import Enclosed
from boundflow.ir.primal import Graph, Node, TensorType, Value
from boundflow.ops import select


@dataclass(frozen=True)
class Constant:
    """A constant operand: its value and error bound, and the names of the model tensors
    (initializers, parameters, buffers) it was computed from."""
    value: Enclosed
    origin: frozenset[str] = frozenset()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    def map(self, fn) -> Constant:
        """An exact rearrangement (reshape, transpose, index) of the constant."""
        return Constant(self.value.map(fn), self.origin)

    def derive(self, value: Enclosed, *others: Constant) -> Constant:
        """A constant computed from this one (and `others`): it comes from all their tensors."""
        return Constant(value, self.origin.union(*(o.origin for o in others)))

    def scaled(self, k: float) -> Constant:
        """k * c: exact for k = 1 and k = -1, rounded (with its error bound) otherwise."""
        if k == 1.0:
            return self
        return self.derive(-self.value if k == -1.0 else self.value * k)


class Builder(ABC):
    """A frontend's side of lowering one source node into `graph`."""

    graph: Graph

    # -- what each frontend provides ---------------------------------------------------------
    @property
    @abstractmethod
    def output(self) -> str:
        """The primal name the source node's (first) output takes."""

    @property
    @abstractmethod
    def node_name(self) -> str:
        """The source node's name, recorded on every primal node it lowers to."""

    @abstractmethod
    def unsupported(self, why: str) -> NoReturn:
        """Raise UnsupportedOpError naming the source node (and where it comes from) and why."""

    @abstractmethod
    def fresh(self, role: str) -> str:
        """A new, unused value name for something the lowering of this node invents."""

    @abstractmethod
    def constant(self, c: Constant, role: str, weight: bool = False) -> str:
        """The graph value holding `c` (a new param/const, or the model tensor it equals).
        weight: c is a weight or bias of a linear / conv2d."""

    @abstractmethod
    def is_const(self, arg: Any) -> bool:
        """Whether a source argument does not depend on the network input."""

    @abstractmethod
    def var(self, arg: Any) -> str:
        """The primal value of a source argument that depends on the network input."""

    @abstractmethod
    def const(self, arg: Any, what: str) -> Constant:
        """A constant source argument (`what` names it in the error when it is not one)."""

    # -- shared -------------------------------------------------------------------------------
    def operand(self, arg: Any, what: str) -> str | Constant:
        """A source argument as a variable (str) or a Constant."""
        return self.const(arg, what) if self.is_const(arg) else self.var(arg)

    def literal(self, value) -> Constant:
        """A constant the lowering makes up: a number, an array, or an Enclosed computed from them."""
        if isinstance(value, Enclosed):
            return Constant(value)
        return Constant(Enclosed.exact(torch.as_tensor(value, dtype=torch.float64)))

    def shape(self, x: str) -> tuple[int, ...]:
        return self.graph.shape(x)

    def axis(self, axis: int, rank: int) -> int:
        """A possibly negative axis of a rank-`rank` tensor as 0 <= axis < rank."""
        if not -rank <= axis < rank:
            self.unsupported(f"axis {axis} is out of range for rank {rank}")
        return axis % rank

    def emit(self, op: str, inputs: list[str], attrs: dict | None = None, out: str | None = None) -> str:
        """Append a primal node; its output is `out` or a fresh name, its shape the op's own rule's."""
        name = out if out is not None else self.fresh(op)
        if name in self.graph.values:
            raise AssertionError(f"frontend bug: value {name!r} defined twice")
        node = Node(op, list(inputs), [name], dict(attrs or {}), name=self.node_name)
        try:
            shape = infer_shape(self.graph, node)
        except ValueError as e:
            self.unsupported(f"cannot lower to {op}: {e}")
        self.graph.values[name] = Value(name, TensorType(tuple(shape)))
        self.graph.nodes.append(node)
        return name

    def reshape(self, x: str, shape, out: str | None = None) -> str:
        return self.emit("reshape", [x], {"shape": tuple(int(d) for d in shape)}, out)

    def transpose(self, x: str, perm, out: str | None = None) -> str:
        return self.emit("transpose", [x], {"perm": tuple(int(p) for p in perm)}, out)

    def swap_last_two(self, x: str, out: str | None = None) -> str:
        r = len(self.shape(x))
        return self.transpose(x, list(range(r - 2)) + [r - 1, r - 2], out)

    def linear(self, x: str, w: Constant, b: Constant | None = None, out: str | None = None) -> str:
        """linear over the last axis with W [out, in] and an optional bias [out]."""
        inputs = [x, self.constant(w, "weight", weight=True)]
        if b is not None:
            inputs.append(self.constant(b, "bias", weight=True))
        return self.emit("linear", inputs, out=out)

    def affine(self, x: str, scale: Constant | None = None, shift: Constant | None = None,
               out: str | None = None) -> str:
        """y = x * scale + shift (a missing scale is ones, a missing shift zeros, shaped like the
        other). Where the constants broadcast x to a larger shape, x is broadcast first (a
        selection of its entries)."""
        scale = scale if scale is not None else self.literal(np.ones(shift.shape))
        shift = shift if shift is not None else self.literal(np.zeros(scale.shape))
        xs = self.shape(x)
        try:
            full = tuple(np.broadcast_shapes(xs, scale.shape, shift.shape))
        except ValueError:
            self.unsupported(f"constant of shape {list(scale.shape)}/{list(shift.shape)} does not broadcast "
                             f"with the variable of shape {list(xs)}")
        if full != xs:
            x = self.reshape(x, full) if math.prod(full) == math.prod(xs) else select.broadcast(self, x, full)
        return self.emit("affine", [x, self.constant(scale, "scale"), self.constant(shift, "shift")], out=out)
