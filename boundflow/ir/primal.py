"""Primal graph: what the model computes, independent of any bound method.

Shapes are *per region*: the model's own tensor shapes as its file declares them (an ONNX
input [1, 784, 1] stays [1, 784, 1]). Every runtime tensor carries one extra leading axis B,
the number of input regions bounded together, so rules shift per-region axes by one.

A node's op names a primal op of the registry (boundflow.ops: one module per op family says
what it computes and how each bound method handles it); frontends lower everything to those.
This module is data only: graphs are checked against the ops by
boundflow.domains.concrete.validate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

VALUE_KINDS = ("input", "param", "const", "intermediate")


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str | None = None  # e.g. "NCHW" / "NHWC" where known; informational

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Value:
    name: str
    type: TensorType
    kind: str = "intermediate"
    data: torch.Tensor | None = None  # set for param / const
    # for a constant derived at import or by simplification (1 / std, a folded BatchNorm): a
    # bound on |exact value - data| (domains/rounding.py); None when data is exact
    err: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in VALUE_KINDS:
            raise ValueError(f"value {self.name!r}: unknown kind {self.kind!r}")
        if self.kind in ("param", "const") and self.data is None:
            raise ValueError(f"value {self.name!r}: a {self.kind} needs data")


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # the source node's name, for error messages


@dataclass
class Graph:
    """A DAG of primal nodes in topological order, one network input, one or more outputs."""

    values: dict[str, Value]
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    name: str = "model"

    # -- queries -----------------------------------------------------------------
    def producer(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {v: [] for v in self.values}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out

    def is_variable(self, name: str) -> bool:
        return self.values[name].kind in ("input", "intermediate")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.values[name].type.shape

    def data(self, name: str) -> torch.Tensor:
        v = self.values[name]
        if v.data is None:
            raise KeyError(f"value {name!r} has no constant data")
        return v.data

    def copy(self) -> "Graph":
        return Graph(dict(self.values), [Node(n.op, list(n.inputs), list(n.outputs), dict(n.attrs), n.name)
                                         for n in self.nodes], list(self.inputs), list(self.outputs), self.name)

    def to(self, device) -> "Graph":
        """A copy whose constants (data and error bounds) live on `device`."""
        def moved(v: Value) -> Value:
            if v.data is None:
                return v
            return Value(v.name, v.type, v.kind, v.data.to(device), None if v.err is None else v.err.to(device))
        g = self.copy()
        g.values = {name: moved(v) for name, v in self.values.items()}
        return g

    def __repr__(self) -> str:
        lines = [f"Graph {self.name}: input {self.inputs} {[list(self.shape(i)) for i in self.inputs]}"]
        for n in self.nodes:
            lines.append(f"  {n.outputs[0]} {list(self.shape(n.outputs[0]))} = {n.op}({', '.join(n.inputs)}) {n.attrs or ''}")
        lines.append(f"  outputs {self.outputs}")
        return "\n".join(lines)
