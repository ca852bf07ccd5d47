"""Concrete evaluation of primal graphs: running each op's forward rule (boundflow.ops), the
single source of truth for what it computes.

Every rule takes tensors with a leading region axis B followed by the per-region shape.
Shape inference runs the same rules on small zero tensors, so shapes can never disagree with values.
"""
from __future__ import annotations

from typing import Callable

import torch

from boundflow import ops
from boundflow.ir.primal import Graph, Node


def apply(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    # constants may be kept in float64 (Value.err); the op computes in its input's precision
    dtype = args[0].dtype
    args = [a if a is None or a.dtype == dtype else a.to(dtype) for a in args]
    return ops.get(node.op).forward(*args, attrs=node.attrs)


def apply_constant(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """A node whose inputs are all constants: its rules expect a region axis, so give the first
    input one and take it off the result."""
    return apply(node, [args[0].unsqueeze(0)] + args[1:]).squeeze(0)


def constant_valued(graph: Graph) -> set[str]:
    """Values that do not depend on the network input: params, consts, and outputs of nodes all
    of whose inputs are constant-valued (present until simplify folds them)."""
    const = {n for n, v in graph.values.items() if v.kind in ("param", "const")}
    for node in graph.nodes:
        if all(i in const for i in node.inputs):
            const.update(node.outputs)
    return const


def infer_shape(graph: Graph, node: Node) -> tuple[int, ...]:
    """Per-region output shape of `node`, by running its concrete rule on zeros. (Small real
    tensors, not meta ones: ops on meta tensors import torch's compiler stack, seconds of
    start-up for every process.)"""
    const = constant_valued(graph)
    args = []
    for name in node.inputs:
        v = graph.values[name]
        if v.data is not None:
            args.append(v.data)
        elif name in const:
            args.append(torch.zeros(tuple(v.type.shape)))
        else:
            # a region axis of 2, not 1, so a constant that would broadcast over it is caught
            args.append(torch.zeros((2,) + tuple(v.type.shape)))
    if all(i in const for i in node.inputs):
        with torch.no_grad():
            return tuple(apply_constant(node, args).shape)
    try:
        with torch.no_grad():
            out = apply(node, args)
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"node {node.name!r} ({node.op}): inputs "
                         f"{[list(graph.values[i].type.shape) for i in node.inputs]} are invalid: {e}") from e
    return tuple(out.shape[1:])


def validate(graph: Graph) -> None:
    """Topological order, every name defined once, one network input, registered ops, and
    declared shapes equal to what the shape rules give."""
    defined = {n for n, v in graph.values.items() if v.kind in ("input", "param", "const")}
    if len(graph.inputs) != 1:
        raise ValueError(f"graph {graph.name!r}: exactly one network input is supported, got {graph.inputs}")
    for node in graph.nodes:
        if node.op not in ops.OPS:
            raise ValueError(f"node {node.name!r}: {node.op!r} is not a primal op ({', '.join(sorted(ops.OPS))})")
        for i in node.inputs:
            if i not in defined:
                raise ValueError(f"node {node.name!r} ({node.op}) reads {i!r} before it is defined")
        for o in node.outputs:
            if o in defined:
                raise ValueError(f"node {node.name!r} ({node.op}) redefines {o!r}")
            defined.add(o)
        want = infer_shape(graph, node)
        got = graph.shape(node.outputs[0])
        if tuple(want) != tuple(got):
            raise ValueError(f"node {node.name!r} ({node.op}): output {node.outputs[0]!r} declared "
                             f"{list(got)} but the op gives {list(want)}")
    for o in graph.outputs:
        if o not in defined:
            raise ValueError(f"graph output {o!r} is never computed")


def values(graph: Graph, x: torch.Tensor, stop: Callable[[dict], bool] | None = None) -> dict[str, torch.Tensor]:
    """Run the graph on a batch of points x: [B, *input_shape]. Returns every value computed,
    by name, stopping early once ``stop(values)`` holds. Differentiable (attacks use the
    gradient); wrap in torch.no_grad() when it is not needed."""
    in_shape = graph.shape(graph.inputs[0])
    if tuple(x.shape[1:]) != tuple(in_shape):
        raise ValueError(f"evaluate: input of shape {list(x.shape)} does not match [B, *{list(in_shape)}]")
    env: dict[str, torch.Tensor] = {graph.inputs[0]: x}
    const = {n for n, v in graph.values.items() if v.kind in ("param", "const")}
    for name, v in graph.values.items():
        if v.kind in ("param", "const"):
            env[name] = v.data
    for node in graph.nodes:
        args = [env[i] for i in node.inputs]
        if all(i in const for i in node.inputs):
            const.update(node.outputs)
            env[node.outputs[0]] = apply_constant(node, args)
        else:
            env[node.outputs[0]] = apply(node, args)
        if stop is not None and stop(env):
            break
    return env


def evaluate(graph: Graph, x: torch.Tensor) -> list[torch.Tensor]:
    """The graph outputs at points x: [B, *input_shape] (see :func:`values`)."""
    env = values(graph, x)
    return [env[o] for o in graph.outputs]
