"""Graph simplification: pure functions Graph -> Graph, and `simplify` running them to a fixpoint.

Every pass preserves concrete semantics (up to float rounding) and never makes a bound looser.
An elementwise affine is bounded exactly by interval arithmetic, and |W * s| = |W| * |s|, so
folding one into the weights of the linear/conv2d before or after it gives the same interval
(and linear) bounds up to rounding. Folds are only done where that algebra is exact (see each
pass). Passes never mutate their input: they work on `graph.copy()` and replace `Value`s
instead of editing them.

  fold_constants                 nodes whose inputs are all param/const become const values
  remove_identity_reshapes       reshape to the same shape, transpose with the identity perm
  merge_affine_chain             affine -> affine  (Sub(mean) then Div(std))
  fold_affine_into_linear        linear/conv2d -> affine  (bias add, BatchNorm after a conv)
  fold_affine_into_next_linear   affine [-> reshape] -> linear/conv2d  (input normalisation)
  remove_dead_nodes              nodes and values nothing reads

Linear-linear chains are deliberately not merged: that changes IBP bounds.

Folded constants are computed in float64 on enclosures (domains/rounding.py): each keeps a
rigorous bound on its distance to the exact value (`Value.err`), so that floating-point-sound
bounds (sound_fp) of the simplified graph hold for the model as written.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from boundflow.domains.concrete import apply, infer_shape, validate
from boundflow.domains.rounding import Enclosed, enclosed, gamma
from boundflow.ir.primal import Graph, Node, TensorType, Value

# Ops whose every input carries the region axis at run time; the others only their first input.
_ALL_REGION_INPUTS = ("add", "concat")


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _is_constant(graph: Graph, name: str) -> bool:
    return graph.values[name].kind in ("param", "const")


def _fresh(graph: Graph, base: str) -> str:
    name, k = base, 1
    while name in graph.values:
        name, k = f"{base}_{k}", k + 1
    return name


def _add_tensor(graph: Graph, base: str, enc: Enclosed, kind: str = "param", tag: str = "_folded") -> str:
    name = _fresh(graph, base.replace(tag, "") + tag)  # not "w_folded_folded"
    data, err = enc.stored()
    graph.values[name] = Value(name, TensorType(tuple(data.shape)), kind, data, err)
    return name


def _sole_consumer(graph: Graph, consumers: dict[str, list[Node]], name: str) -> Node | None:
    """The only node reading `name` (reading it once), if `name` is not also a graph output."""
    users = consumers.get(name, [])
    if name in graph.outputs or len(users) != 1 or users[0].inputs.count(name) != 1:
        return None
    return users[0]


def _along_axis(t: Enclosed, shape: tuple[int, ...], axis: int) -> Enclosed | None:
    """If `t`, broadcast to `shape`, varies only along `axis`, its values along that axis (with
    the largest error bound along the other axes)."""
    if t.value.dim() > len(shape) or len(shape) == 0:
        return None
    try:
        full = t.value.expand(shape)
        err = t.err.expand(shape)
    except RuntimeError:  # t would broadcast `shape` to something larger
        return None
    ax = axis % len(shape)
    index = tuple(slice(None) if i == ax else 0 for i in range(len(shape)))
    vec = full[index]
    view = [1] * len(shape)
    view[ax] = shape[ax]
    if not torch.equal(full, vec.reshape(view).expand(shape)):
        return None
    others = tuple(i for i in range(len(shape)) if i != ax)
    return Enclosed(vec.clone(), err.amax(dim=others) if others else err.clone())


def _bias(graph: Graph, node: Node, n_out: int) -> Enclosed:
    return enclosed(graph, node.inputs[2]) if len(node.inputs) > 2 else Enclosed.exact(torch.zeros(n_out))


def _affine_constants(graph: Graph, node: Node) -> tuple[Enclosed, Enclosed] | None:
    if not all(_is_constant(graph, i) for i in node.inputs[1:]):
        return None
    return enclosed(graph, node.inputs[1]), enclosed(graph, node.inputs[2])


def _signature(graph: Graph) -> tuple:
    return (tuple((n.op, tuple(n.inputs), tuple(n.outputs)) for n in graph.nodes),
            tuple(sorted(graph.values)), tuple(graph.outputs))


# --------------------------------------------------------------------------------------------
# passes
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_constants(graph: Graph) -> Graph:
    """Evaluate nodes whose inputs are all param/const; their outputs become const values.

    A constant in a region position (x of linear/relu/..., both operands of add/concat) is a
    per-region tensor, so it gets a region axis of size 1 for `apply`, removed afterwards.
    A node computing a graph output is kept, so outputs always depend on the input."""
    g = graph.copy()
    kept = []
    folded = False
    for node in g.nodes:
        if node.outputs[0] in g.outputs or not all(_is_constant(g, i) for i in node.inputs):
            kept.append(node)
            continue
        args = [enclosed(g, i).map(lambda t: t.unsqueeze(0)) if k == 0 or node.op in _ALL_REGION_INPUTS
                else enclosed(g, i) for k, i in enumerate(node.inputs)]
        out = _enclosed_apply(node, args).map(lambda t: t[0])  # drop the region axis of size 1
        data, err = out.stored()
        name = node.outputs[0]
        g.values[name] = Value(name, TensorType(tuple(data.shape), layout=g.values[name].type.layout), "const",
                               data, err)
        folded = True
    g.nodes = kept
    if folded:
        _refresh_shapes(g)
    return g


def _enclosed_apply(node: Node, args: list[Enclosed]) -> Enclosed:
    """A primal op on constants, in float64 with an error bound. linear / conv2d: the error of
    the inputs through |W| and |x|, plus gamma(n) |W| |x| for the sums; ops that only move
    values move their errors (a ReLU is 1-Lipschitz, so its error passes unchanged)."""
    x = args[0]
    if node.op == "linear":
        y = x.matmul(args[1].map(lambda t: t.T))
        return y + args[2] if len(args) > 2 else y
    if node.op == "affine":
        return x * args[1] + args[2]
    if node.op == "add":
        return x + args[1]
    if node.op == "reduce_sum":
        y = x.sum([a + 1 for a in node.attrs["axes"]])
        return y.map(lambda t: t.reshape(apply(node, [x.value]).shape))
    if node.op in ("conv2d", "conv_transpose2d"):
        w = args[1]
        b = args[2].value if len(args) > 2 else None
        conv = lambda a, k, bias=None: apply(node, [a, k, bias])   # noqa: E731
        xv, wv = x.value.abs(), w.value.abs()
        xe, we = x.err.expand_as(x.value), w.err.expand_as(w.value)
        n = w.value.numel() + 1                 # at least the terms of any output's sum
        err = conv(xe, wv) + conv(xv, we) + conv(xe, we) + gamma(n) * conv(xv, wv)
        if len(args) > 2:
            err = err + args[2].err.expand_as(args[2].value).reshape(-1, 1, 1) + gamma(n) * args[2].value.abs().reshape(-1, 1, 1)
        return Enclosed.rounded(conv(x.value, w.value, b), err)
    values = apply(node, [a.value for a in args])
    errs = apply(node, [a.err.expand_as(a.value) for a in args])
    return Enclosed(values, errs)


def _refresh_shapes(g: Graph) -> None:
    """Re-derive declared shapes after folding. infer_shape treats a constant in a region
    position as having no region axis, so shapes declared downstream of an all-constant node
    can be off by that axis; with the constants folded they are derived correctly."""
    for node in g.nodes:
        shape = tuple(infer_shape(g, node))
        v = g.values[node.outputs[0]]
        if shape != v.type.shape:
            g.values[v.name] = dataclasses.replace(v, type=TensorType(shape, v.type.dtype, v.type.layout))


def remove_identity_reshapes(graph: Graph) -> Graph:
    """Drop reshapes to the input's own shape and transposes with the identity permutation."""
    g = graph.copy()
    rename: dict[str, str] = {}
    kept = []
    for node in g.nodes:
        node.inputs = [rename.get(i, i) for i in node.inputs]
        x, y = node.inputs[0] if node.inputs else None, node.outputs[0]
        identity = ((node.op == "reshape" and tuple(node.attrs["shape"]) == g.shape(x))
                    or (node.op == "transpose" and tuple(node.attrs["perm"]) == tuple(range(len(g.shape(x))))))
        if identity and y not in g.outputs:
            rename[y] = x
            del g.values[y]
        else:
            kept.append(node)
    g.nodes = kept
    return g


@torch.no_grad()
def fold_affine_into_linear(graph: Graph) -> Graph:
    """linear/conv2d -> affine, where the affine is per output feature: merge into W and b.

    Per output feature means the scale and shift, broadcast to the op's output, vary only along
    the last axis (linear) or the channel axis -3 (conv2d); a scalar works for both. The op must
    have no other consumer. The merged op takes over the affine's output name."""
    g = graph.copy()
    producer, consumers = g.producer(), g.consumers()
    dropped: set[int] = set()
    for node in g.nodes:
        if node.op != "affine":
            continue
        x = node.inputs[0]
        p = producer.get(x)
        consts = _affine_constants(g, node)
        if (p is None or p.op not in ("linear", "conv2d") or consts is None
                or _sole_consumer(g, consumers, x) is not node
                or not all(_is_constant(g, i) for i in p.inputs[1:])):
            continue
        axis = -1 if p.op == "linear" else -3
        s = _along_axis(consts[0], g.shape(x), axis)
        t = _along_axis(consts[1], g.shape(x), axis)
        if s is None or t is None:
            continue
        w = enclosed(g, p.inputs[1])
        b = _bias(g, p, w.shape[0])
        new_w = w * s.map(lambda v: v.reshape((-1,) + (1,) * (len(w.shape) - 1)))
        new_b = b * s + t
        bias_base = p.inputs[2] if len(p.inputs) > 2 else f"{node.outputs[0]}.bias"
        p.inputs = [p.inputs[0], _add_tensor(g, f"{p.inputs[1]}_folded", new_w),
                    _add_tensor(g, f"{bias_base}_folded", new_b)]
        p.outputs = list(node.outputs)
        del g.values[x]
        dropped.add(id(node))
    g.nodes = [n for n in g.nodes if id(n) not in dropped]
    return g


def _fold_into_linear(g: Graph, lin: Node, s_view: torch.Tensor, t_view: torch.Tensor) -> bool:
    """linear(s*x + t) -> linear'(x), with s and t given in the linear's input shape."""
    shape = g.shape(lin.inputs[0])
    s, t = _along_axis(s_view, shape, -1), _along_axis(t_view, shape, -1)
    if s is None or t is None:
        return False
    w = enclosed(g, lin.inputs[1])
    b = _bias(g, lin, w.shape[0])
    new_w = w * s.map(lambda v: v[None, :])
    new_b = b + w.matmul(t)
    lin.inputs[1:] = [_add_tensor(g, f"{lin.inputs[1]}_folded", new_w),
                      _add_tensor(g, f"{lin.outputs[0]}.bias_folded", new_b)]
    return True


def _fold_into_conv(g: Graph, conv: Node, s_view: torch.Tensor, t_view: torch.Tensor) -> bool:
    """conv2d(s*x + t) -> conv2d'(x) for per-input-channel s, t; only without padding, since a
    shift folded into the bias would also be added where the window covers zero padding."""
    if any(conv.attrs["padding"]):
        return False
    shape = g.shape(conv.inputs[0])
    s, t = _along_axis(s_view, shape, -3), _along_axis(t_view, shape, -3)
    if s is None or t is None:
        return False
    w = enclosed(g, conv.inputs[1])  # [co, ci/g, kh, kw]
    co, ci_g = w.shape[0], w.shape[1]
    groups = conv.attrs["groups"]
    # input channel feeding weight[o, j]: group(o) * ci_g + j
    channel = (torch.arange(co)[:, None] // (co // groups)) * ci_g + torch.arange(ci_g)[None, :]
    s_mat = s.map(lambda v: v[channel][:, :, None, None])
    t_mat = t.map(lambda v: v[channel][:, :, None, None])
    b = _bias(g, conv, co)
    new_b = b + (w * t_mat).sum((1, 2, 3))
    conv.inputs[1:] = [_add_tensor(g, f"{conv.inputs[1]}_folded", w * s_mat),
                       _add_tensor(g, f"{conv.outputs[0]}.bias_folded", new_b)]
    return True


@torch.no_grad()
def fold_affine_into_next_linear(graph: Graph) -> Graph:
    """affine [-> reshape] -> linear/conv2d: fold the affine into the next op's weights.

    Legal when the scale and shift, broadcast to the affine's full shape and viewed in the next
    op's input shape (through the reshape, if any), are constant along every axis but the one the
    op contracts: the last for linear (W' = W * s, b' = b + W @ t), the channel axis for a conv2d
    with zero padding. The affine (and each intermediate value) must have no other consumer."""
    g = graph.copy()
    consumers = g.consumers()
    dropped: set[int] = set()
    for node in g.nodes:
        if node.op != "affine":
            continue
        consts = _affine_constants(g, node)
        y = node.outputs[0]
        nxt = _sole_consumer(g, consumers, y)
        if consts is None or nxt is None:
            continue
        x_shape = g.shape(node.inputs[0])
        if g.shape(y) != x_shape:  # the constants broadcast x to a larger shape
            continue
        try:
            s_full, t_full = (c.map(lambda v: v.expand(x_shape)) for c in consts)
        except RuntimeError:
            continue
        reshape = None
        if nxt.op == "reshape":
            reshape, nxt = nxt, _sole_consumer(g, consumers, nxt.outputs[0])
            if nxt is None:
                continue
        if nxt.op not in ("linear", "conv2d") or not all(_is_constant(g, i) for i in nxt.inputs[1:]):
            continue
        if nxt.inputs[0] != (reshape.outputs[0] if reshape else y):
            continue
        in_shape = g.shape(nxt.inputs[0])
        s_view, t_view = (c.map(lambda v: v.reshape(in_shape)) for c in (s_full, t_full))
        fold = _fold_into_linear if nxt.op == "linear" else _fold_into_conv
        if not fold(g, nxt, s_view, t_view):
            continue
        (reshape or nxt).inputs[0] = node.inputs[0]
        del g.values[y]
        dropped.add(id(node))
    g.nodes = [n for n in g.nodes if id(n) not in dropped]
    return g


@torch.no_grad()
def merge_affine_chain(graph: Graph) -> Graph:
    """affine(affine(x, s1, t1), s2, t2) -> affine(x, s1 * s2, t1 * s2 + t2).

    Exact elementwise algebra, so values and bounds are unchanged (e.g. Sub(mean) then Div(std)).
    The inner affine must have no other consumer."""
    g = graph.copy()
    producer, consumers = g.producer(), g.consumers()
    dropped: set[int] = set()
    for node in g.nodes:
        inner = producer.get(node.inputs[0]) if node.op == "affine" else None
        if (inner is None or inner.op != "affine" or id(inner) in dropped
                or _sole_consumer(g, consumers, inner.outputs[0]) is not node):
            continue
        outer_c, inner_c = _affine_constants(g, node), _affine_constants(g, inner)
        if outer_c is None or inner_c is None:
            continue
        (s1, t1), (s2, t2) = inner_c, outer_c
        del g.values[node.inputs[0]]
        node.inputs = [inner.inputs[0], _add_tensor(g, node.inputs[1], s1 * s2, "const", "_merged"),
                       _add_tensor(g, node.inputs[2], t1 * s2 + t2, "const", "_merged")]
        dropped.add(id(inner))
    g.nodes = [n for n in g.nodes if id(n) not in dropped]
    return g


def remove_dead_nodes(graph: Graph) -> Graph:
    """Drop nodes whose outputs nothing needs, then param/const values no node reads."""
    g = graph.copy()
    live = set(g.outputs)
    kept = []
    for node in reversed(g.nodes):
        if any(o in live for o in node.outputs):
            kept.append(node)
            live.update(node.inputs)
    g.nodes = kept[::-1]
    used = live | set(g.inputs) | {o for n in g.nodes for o in n.outputs}
    g.values = {k: v for k, v in g.values.items() if k in used}
    return g


PASSES: tuple[Callable[[Graph], Graph], ...] = (
    fold_constants,
    remove_identity_reshapes,
    merge_affine_chain,
    fold_affine_into_linear,
    fold_affine_into_next_linear,
    remove_dead_nodes,
)


def simplify(graph: Graph, max_rounds: int = 100) -> Graph:
    """Apply PASSES in order until a full round changes nothing; the result is validated."""
    g = graph
    for _ in range(max_rounds):
        before = _signature(g)
        for p in PASSES:
            g = p(g)
        if _signature(g) == before:
            break
    validate(g)
    return g
