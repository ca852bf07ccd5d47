"""Primal graph: what the model computes, independent of any bound method.

Shapes are *per region*: the model's own tensor shapes as its file declares them (an ONNX
input [1, 784, 1] stays [1, 784, 1]). Every runtime tensor carries one extra leading axis B,
the number of input regions bounded together, so rules shift per-region axes by one.

The primal op set is deliberately small; frontends lower everything to it:

  linear     inputs (x, W[out,in], b[out]?)  y = x @ W.T + b over the last axis
  conv2d     inputs (x, W[co,ci/g,kh,kw], b[co]?)  attrs stride, padding (top, left,
             bottom, right), dilation, groups; x is [..., C, H, W]
  affine     inputs (x, scale, shift)  y = x * scale + shift, constants broadcast to x
  add        inputs (x, y)  two variable tensors of the same shape
  relu       inputs (x,)
  reshape    inputs (x,)  attrs shape (full per-region target shape)
  transpose  inputs (x,)  attrs perm (over per-region axes)
  concat     inputs (x1, x2, ...)  attrs axis (per-region, non-negative)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

PRIMAL_OPS = ("linear", "conv2d", "affine", "add", "relu", "reshape", "transpose", "concat")

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

    def __post_init__(self):
        if self.op not in PRIMAL_OPS:
            raise ValueError(f"node {self.name!r}: {self.op!r} is not a primal op {PRIMAL_OPS}")


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

    def enclosed(self, name: str):
        """The constant `name` as float64 with its error bound (domains.rounding.Enclosed)."""
        from boundflow.domains.rounding import Enclosed

        data = self.data(name).to(torch.float64)
        err = self.values[name].err
        return Enclosed(data, torch.zeros_like(data) if err is None else err.to(torch.float64))

    def copy(self) -> "Graph":
        return Graph(dict(self.values), [Node(n.op, list(n.inputs), list(n.outputs), dict(n.attrs), n.name)
                                         for n in self.nodes], list(self.inputs), list(self.outputs), self.name)

    # -- checks ------------------------------------------------------------------
    def validate(self) -> None:
        """Topological order, every name defined once, shapes agree with the shape rules."""
        from boundflow.domains.concrete import infer_shape

        defined = {n for n, v in self.values.items() if v.kind in ("input", "param", "const")}
        if len(self.inputs) != 1:
            raise ValueError(f"graph {self.name!r}: exactly one network input is supported, got {self.inputs}")
        for node in self.nodes:
            for i in node.inputs:
                if i not in defined:
                    raise ValueError(f"node {node.name!r} ({node.op}) reads {i!r} before it is defined")
            for o in node.outputs:
                if o in defined:
                    raise ValueError(f"node {node.name!r} ({node.op}) redefines {o!r}")
                defined.add(o)
            want = infer_shape(self, node)
            got = self.shape(node.outputs[0])
            if tuple(want) != tuple(got):
                raise ValueError(f"node {node.name!r} ({node.op}): output {node.outputs[0]!r} declared "
                                 f"{list(got)} but the op gives {list(want)}")
        for o in self.outputs:
            if o not in defined:
                raise ValueError(f"graph output {o!r} is never computed")

    def __repr__(self) -> str:
        lines = [f"Graph {self.name}: input {self.inputs} {[list(self.shape(i)) for i in self.inputs]}"]
        for n in self.nodes:
            lines.append(f"  {n.outputs[0]} {list(self.shape(n.outputs[0]))} = {n.op}({', '.join(n.inputs)}) {n.attrs or ''}")
        lines.append(f"  outputs {self.outputs}")
        return "\n".join(lines)
