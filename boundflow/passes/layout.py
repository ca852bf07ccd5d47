"""Layout analysis: fold transposes into the ops next to them where that is exact.

`fold_layout(graph) -> (graph, LayoutReport)` applies these rewrites, one match at a time, until
none applies. Each one keeps the graph's values exactly (up to the order of float sums) and
never adds a transpose:

  sink_transpose_through_relu   transpose -> relu becomes relu -> transpose: relu is elementwise,
                                so it commutes with any permutation; the transpose moves towards
                                the op that can absorb it (tf2onnx's conv -> NHWC -> relu -> NCHW)
  compose_transposes            transpose(p1) -> transpose(p2) becomes one transpose(p1[p2]);
                                a transpose followed by its inverse becomes the identity
  transpose_to_reshape          a transpose that keeps the order of the non-unit axes moves no
                                element in row-major order: it is a reshape (an identity one is
                                dropped)
  merge_reshapes                reshape -> reshape becomes one reshape
  fold_transpose_into_linear    transpose -> reshape -> linear, where the transpose permutes only
                                axes the reshape flattens into the linear's input features,
                                becomes reshape -> linear with permuted weight columns (the NHWC
                                flatten before a Gemm)

Bounds are unchanged: a permutation of the inputs of a linear form, applied to its weight
columns instead, gives the same interval and the same linear (CROWN) bounds, and relu's bound
rules act element by element. The rewrites only fire where every rewired value has a single
consumer, so no other op sees different intermediate bounds.

Transposes that remain are executed; each gets `attrs["layout_hint"] = {"transpose": perm,
"folded": False, "reason": ...}`, and a linear that absorbed one gets `{"transposes": [perm, ...],
"folded": True, "into": "weight columns"}`, for the planner to carry onto its TaskOps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from boundflow.domains.concrete import validate
from boundflow.domains.rounding import enclosed
from boundflow.ir.primal import Graph, Node, TensorType, Value
from boundflow.passes.simplify import _add_tensor, _sole_consumer, remove_dead_nodes, remove_identity_reshapes

HINT = "layout_hint"


@dataclass(frozen=True)
class LayoutReport:
    transposes_before: int
    transposes_after: int
    rewrites: dict[str, int] = field(default_factory=dict)   # rule name -> times it fired

    @property
    def folded(self) -> int:
        return self.transposes_before - self.transposes_after


# --------------------------------------------------------------------------------------------
# permutation helpers
# --------------------------------------------------------------------------------------------
def count_transposes(graph: Graph) -> int:
    return sum(n.op == "transpose" for n in graph.nodes)


def compose(p1, p2) -> tuple[int, ...]:
    """The one permutation equal to x.permute(p1).permute(p2)."""
    return tuple(p1[i] for i in p2)


def keeps_row_major_order(shape, perm) -> bool:
    """True when x.permute(perm) lists x's elements in the same row-major order: the axes of
    size > 1 keep their relative order (unit axes hold no order)."""
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)


def flattened_block(shape, perm, features: int) -> tuple[int, list[int]] | None:
    """Where x.permute(perm), viewed as rows of `features` elements, is x viewed the same way
    with each row's elements permuted: (first permuted axis m, the permuted axes within a row).
    That needs perm to fix the axes before m and the axes from m on to hold `features` elements.
    None when no such m exists."""
    out_shape = [shape[p] for p in perm]
    size, first = 1, None
    for m in range(len(perm) - 1, -1, -1):
        size *= out_shape[m]
        if size > features:
            break
        if size == features:
            first = m       # the smallest such m (unit axes give several) constrains perm least
    if first is None or list(perm[:first]) != list(range(first)):
        return None
    return first, [p - first for p in perm[first:]]


def column_order(shape, m: int, local_perm: list[int]) -> torch.Tensor:
    """Weight-column order W' = W[:, order] for a linear that read x.permute(perm) flattened and
    now reads x flattened: row element k of the permuted tensor is x's row element sigma[k]."""
    block = tuple(shape[m:])
    n = 1
    for d in block:
        n *= d
    sigma = torch.arange(n).reshape(block).permute(local_perm).flatten()
    return torch.argsort(sigma)


# --------------------------------------------------------------------------------------------
# rewrites: each returns a new graph with one match rewritten, or None when nothing matches
# --------------------------------------------------------------------------------------------
def sink_transpose_through_relu(graph: Graph) -> Graph | None:
    consumers, producer = graph.consumers(), graph.producer()
    for k, relu in enumerate(graph.nodes):
        t = producer.get(relu.inputs[0]) if relu.op == "relu" else None
        if (t is None or t.op != "transpose"
                or _sole_consumer(graph, consumers, t.outputs[0]) is not relu
                or _sole_consumer(graph, consumers, t.inputs[0]) is not t):
            continue
        g = graph.copy()
        i = graph.nodes.index(t)
        x, mid, y = t.inputs[0], t.outputs[0], relu.outputs[0]
        xt = g.values[x].type
        g.values[mid] = Value(mid, TensorType(xt.shape, xt.dtype, xt.layout))   # relu(x), x's layout
        # swap places: relu(x) -> mid where the transpose was, transpose(mid) -> y where relu was
        g.nodes[i] = Node("relu", [x], [mid], dict(relu.attrs), relu.name)
        g.nodes[k] = Node("transpose", [mid], [y], dict(t.attrs), t.name)
        return g
    return None


def compose_transposes(graph: Graph) -> Graph | None:
    producer = graph.producer()
    for k, node in enumerate(graph.nodes):
        inner = producer.get(node.inputs[0]) if node.op == "transpose" else None
        if inner is None or inner.op != "transpose":
            continue
        g = graph.copy()
        perm = compose(inner.attrs["perm"], node.attrs["perm"])
        g.nodes[k] = Node("transpose", [inner.inputs[0]], list(node.outputs), dict(node.attrs, perm=perm), node.name)
        return remove_dead_nodes(g)     # the inner transpose, unless something else reads it
    return None


def transpose_to_reshape(graph: Graph) -> Graph | None:
    for k, node in enumerate(graph.nodes):
        if node.op != "transpose" or not keeps_row_major_order(graph.shape(node.inputs[0]), node.attrs["perm"]):
            continue
        g = graph.copy()
        y = node.outputs[0]
        g.nodes[k] = Node("reshape", list(node.inputs), [y], {"shape": tuple(g.shape(y))}, node.name)
        return remove_identity_reshapes(g)
    return None


def merge_reshapes(graph: Graph) -> Graph | None:
    producer = graph.producer()
    for k, node in enumerate(graph.nodes):
        inner = producer.get(node.inputs[0]) if node.op == "reshape" else None
        if inner is None or inner.op != "reshape":
            continue
        g = graph.copy()
        g.nodes[k] = Node("reshape", [inner.inputs[0]], list(node.outputs), dict(node.attrs), node.name)
        return remove_identity_reshapes(remove_dead_nodes(g))
    return None


def _transpose_flatten_linear(graph: Graph, lin: Node, consumers, producer) -> tuple[Node, Node] | None:
    """(transpose, reshape) when `lin` is a linear with constant weights reading
    reshape(transpose(x)), each value read only by the next op."""
    if lin.op != "linear" or not all(graph.values[i].kind in ("param", "const") for i in lin.inputs[1:]):
        return None
    reshape = producer.get(lin.inputs[0])
    if reshape is None or reshape.op != "reshape" or _sole_consumer(graph, consumers, reshape.outputs[0]) is not lin:
        return None
    t = producer.get(reshape.inputs[0])
    if t is None or t.op != "transpose" or _sole_consumer(graph, consumers, t.outputs[0]) is not reshape:
        return None
    return t, reshape


@torch.no_grad()
def fold_transpose_into_linear(graph: Graph) -> Graph | None:
    consumers, producer = graph.consumers(), graph.producer()
    for k, lin in enumerate(graph.nodes):
        match = _transpose_flatten_linear(graph, lin, consumers, producer)
        if match is None:
            continue
        t, reshape = match
        x, perm = t.inputs[0], tuple(t.attrs["perm"])
        w = enclosed(graph, lin.inputs[1])
        block = flattened_block(graph.shape(x), perm, w.shape[1])
        if block is None:
            continue
        g = graph.copy()
        columns = column_order(graph.shape(x), *block)
        w_new = _add_tensor(g, lin.inputs[1], w.map(lambda t: t[:, columns].clone()), "param", "_permuted")
        hint = dict(lin.attrs.get(HINT) or {"folded": True, "into": "weight columns", "transposes": []})
        hint["transposes"] = hint["transposes"] + [list(perm)]
        g.nodes[graph.nodes.index(reshape)] = Node("reshape", [x], list(reshape.outputs), dict(reshape.attrs),
                                                   reshape.name)
        g.nodes[k] = Node("linear", [lin.inputs[0], w_new, *lin.inputs[2:]], list(lin.outputs),
                          dict(lin.attrs, **{HINT: hint}), lin.name)
        return remove_dead_nodes(g)     # the transpose
    return None


RULES: tuple[Callable[[Graph], Graph | None], ...] = (
    sink_transpose_through_relu,
    compose_transposes,
    transpose_to_reshape,
    merge_reshapes,
    fold_transpose_into_linear,
)


# --------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------
def _unfolded_reason(graph: Graph, node: Node) -> str:
    users = graph.consumers()[node.outputs[0]]
    ops = sorted({u.op for u in users})
    if "conv2d" in ops:
        return "feeds conv2d, whose kernels read NCHW"
    if "linear" in ops and node.attrs["perm"][-1] != len(node.attrs["perm"]) - 1:
        return "feeds a linear that contracts an axis the transpose moves (a matmul from the left)"
    return f"no exact fold into its consumers ({', '.join(ops) or 'graph output'})"


def annotate(graph: Graph) -> Graph:
    """Every remaining transpose gets its layout hint: what is executed, and why."""
    g = graph.copy()
    for k, node in enumerate(g.nodes):
        if node.op == "transpose":
            hint = {"transpose": list(node.attrs["perm"]), "folded": False, "reason": _unfolded_reason(g, node)}
            g.nodes[k] = Node("transpose", node.inputs, node.outputs, dict(node.attrs, **{HINT: hint}), node.name)
    return g


def fold_layout(graph: Graph, max_rewrites: int = 10_000) -> tuple[Graph, LayoutReport]:
    """Apply RULES until none matches (each rewrite strictly simplifies the graph or moves a
    transpose later, so this ends); validate; annotate what is left."""
    g, counts = graph, {rule.__name__: 0 for rule in RULES}
    for _ in range(max_rewrites):
        for rule in RULES:
            new = rule(g)
            if new is not None:
                g, counts[rule.__name__] = new, counts[rule.__name__] + 1
                break
        else:
            break
    else:
        raise RuntimeError(f"fold_layout: no fixpoint after {max_rewrites} rewrites of {graph.name!r}")
    validate(g)
    return annotate(g), LayoutReport(count_transposes(graph), count_transposes(g), counts)
