"""simplify passes: semantics preserved, the expected folds happen (and only where sound), inputs untouched."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from boundflow.domains.concrete import apply, evaluate, infer_shape, validate
from boundflow.frontends.onnx import load_onnx
from boundflow.ir.primal import Graph, Node, TensorType, Value
from boundflow.passes.simplify import (PASSES, fold_affine_into_linear, fold_affine_into_next_linear,
                                       fold_constants, merge_affine_chain, remove_dead_nodes,
                                       remove_identity_reshapes, simplify)

RNG = np.random.default_rng(1)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def rand(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def onnx_model(nodes, in_shape, inits, opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    return model


class Builder:
    """Hand-built primal graphs: b = Builder((1, 4)); y = b.op("relu", b.x); g = b.graph(y)."""

    def __init__(self, in_shape):
        self.x = "x"
        self.values = {"x": Value("x", TensorType(tuple(in_shape)), "input")}
        self.nodes: list[Node] = []

    def const(self, data, kind="const") -> str:
        name = f"{kind}{len(self.values)}"
        data = torch.as_tensor(data, dtype=torch.float32)
        self.values[name] = Value(name, TensorType(tuple(data.shape)), kind, data)
        return name

    def op(self, op, *inputs, **attrs) -> str:
        name = f"v{len(self.values)}"
        node = Node(op, list(inputs), [name], attrs, name=name)
        g = Graph(self.values, self.nodes, ["x"], [])
        self.values[name] = Value(name, TensorType(tuple(infer_shape(g, node))))
        self.nodes.append(node)
        return name

    def graph(self, *outputs) -> Graph:
        g = Graph(dict(self.values), list(self.nodes), ["x"], list(outputs))
        validate(g)
        return g


def ops(graph) -> list[str]:
    return [n.op for n in graph.nodes]


def assert_same(a: Graph, b: Graph, lo=-1.0, hi=1.0):
    x = torch.empty((4,) + a.shape(a.inputs[0])).uniform_(lo, hi)
    for u, v in zip(evaluate(a, x), evaluate(b, x)):
        assert u.shape == v.shape
        # float32 folding reorders sums: the error scales with the outputs, not with 1
        scale = max(1.0, float(u.abs().max()))
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-5 * scale), float((u - v).abs().max())


@torch.no_grad()
def ibp(graph: Graph, lo: torch.Tensor, hi: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Plain interval propagation (centre/radius), enough to compare raw and simplified graphs."""
    env = {graph.inputs[0]: ((lo + hi) / 2, (hi - lo) / 2)}
    for node in graph.nodes:
        if node.op in ("linear", "conv2d"):
            w = graph.data(node.inputs[1])
            b = graph.data(node.inputs[2]) if len(node.inputs) > 2 else None
            mid, rad = env[node.inputs[0]]
            env[node.outputs[0]] = (apply(node, [mid, w] + ([b] if b is not None else [])),
                                    apply(node, [rad, w.abs()]))
        elif node.op == "affine":
            mid, rad = env[node.inputs[0]]
            s, t = graph.data(node.inputs[1]), graph.data(node.inputs[2])
            env[node.outputs[0]] = (mid * s + t, rad * s.abs())
        elif node.op == "relu":
            mid, rad = env[node.inputs[0]]
            l, u = torch.relu(mid - rad), torch.relu(mid + rad)
            env[node.outputs[0]] = ((l + u) / 2, (u - l) / 2)
        elif node.op == "add":
            (m1, r1), (m2, r2) = env[node.inputs[0]], env[node.inputs[1]]
            env[node.outputs[0]] = (m1 + m2, r1 + r2)
        else:  # reshape / transpose / concat act on centre and radius alike
            ins = [env[i] for i in node.inputs]
            env[node.outputs[0]] = (apply(node, [m for m, _ in ins]), apply(node, [r for _, r in ins]))
    return [(env[o][0] - env[o][1], env[o][0] + env[o][1]) for o in graph.outputs]


def assert_bounds_no_looser(raw: Graph, simple: Graph, eps=0.05):
    centre = torch.empty((2,) + raw.shape(raw.inputs[0])).uniform_(-1, 1)
    for (l1, u1), (l2, u2) in zip(ibp(raw, centre - eps, centre + eps), ibp(simple, centre - eps, centre + eps)):
        tol = 1e-5 * (1 + torch.maximum(l1.abs(), u1.abs()))
        assert torch.all(l2 >= l1 - tol) and torch.all(u2 <= u1 + tol)


def snapshot(graph: Graph):
    return (repr(graph), list(graph.inputs), list(graph.outputs), dict(graph.values),
            {k: (v.name, v.type, v.kind, None if v.data is None else v.data.clone()) for k, v in graph.values.items()},
            [(n.op, list(n.inputs), list(n.outputs), dict(n.attrs), n.name, id(n)) for n in graph.nodes])


def assert_snapshot_equal(a, b):
    assert a[:3] == b[:3]
    assert a[3].keys() == b[3].keys() and all(a[3][k] is b[3][k] for k in a[3])  # same Value objects
    for k in a[4]:
        (n1, t1, k1, d1), (n2, t2, k2, d2) = a[4][k], b[4][k]
        assert (n1, t1, k1) == (n2, t2, k2)
        assert (d1 is None and d2 is None) or torch.equal(d1, d2)
    assert a[5] == b[5]


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def conv_bn_model(pads=(1, 1, 1, 1), group=1) -> onnx.ModelProto:
    c = 4
    inits = {"W": rand(c, c // group, 3, 3), "b": rand(c), "g": rand(c), "be": rand(c), "m": rand(c),
             "v": np.abs(rand(c)) + 0.5, "W2": rand(c, c, 3, 3)}
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=list(pads), group=group),
             helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["c2"]),
             helper.make_node("BatchNormalization", ["c2", "g", "be", "m", "v"], ["y"])]
    return onnx_model(nodes, (1, c, 7, 7), inits)


def normalised_model(first: str, pads=(0, 0, 0, 0), group=1) -> onnx.ModelProto:
    """x -> Sub(mean) -> Div(std) -> first layer (Gemm or Conv) -> Relu -> ..."""
    if first == "gemm":
        inits = {"mean": rand(6), "std": np.abs(rand(6)) + 0.5, "W": rand(5, 6), "b": rand(5), "V": rand(5, 3)}
        nodes = [helper.make_node("Sub", ["x", "mean"], ["s"]), helper.make_node("Div", ["s", "std"], ["d"]),
                 helper.make_node("Gemm", ["d", "W", "b"], ["h"], transB=1),
                 helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "V"], ["y"])]
        return onnx_model(nodes, (1, 6), inits)
    inits = {"mean": rand(3, 1, 1), "std": np.abs(rand(3, 1, 1)) + 0.5, "W": rand(6, 3 // group, 3, 3), "b": rand(6)}
    nodes = [helper.make_node("Sub", ["x", "mean"], ["s"]), helper.make_node("Div", ["s", "std"], ["d"]),
             helper.make_node("Conv", ["d", "W", "b"], ["h"], pads=list(pads), group=group, strides=[2, 1]),
             helper.make_node("Relu", ["h"], ["y"])]
    return onnx_model(nodes, (1, 3, 8, 8), inits)


# --------------------------------------------------------------------------------------------
# folds that must happen
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 2])
def test_batchnorm_folded_into_conv(group):
    raw = load_onnx(conv_bn_model(group=group))
    assert ops(raw).count("affine") == 2
    simple = simplify(raw)
    assert ops(simple) == ["conv2d", "relu", "conv2d"]
    assert simple.outputs == ["y"]
    assert_same(raw, simple)
    assert_bounds_no_looser(raw, simple)


def test_resnet_block_batchnorms_folded(shared):
    raw = load_onnx(shared / "golden" / "models" / "resnet_block.onnx")
    simple = simplify(raw)
    assert ops(raw).count("affine") == 3 and ops(simple).count("affine") == 0
    assert len(simple.nodes) == len(raw.nodes) - 3
    assert_same(raw, simple)
    assert_bounds_no_looser(raw, simple)


@pytest.mark.parametrize("style", ["matmul_add", "add_first", "gemm_then_add"])
def test_gemm_or_matmul_and_bias_add_merged(style):
    inits = {"W": rand(4, 6), "b": rand(6)}
    mm = (helper.make_node("MatMul", ["x", "W"], ["h"]) if style != "gemm_then_add"
          else helper.make_node("Gemm", ["x", "W"], ["h"]))
    add = helper.make_node("Add", ["b", "h"] if style == "add_first" else ["h", "b"], ["y"])
    raw = load_onnx(onnx_model([mm, add], (1, 4), inits))
    assert ops(raw) == ["linear", "affine"]
    simple = simplify(raw)
    assert ops(simple) == ["linear"] and simple.outputs == ["y"]
    assert_same(raw, simple)


def test_normalisation_folded_into_first_gemm():
    raw = load_onnx(normalised_model("gemm"))
    assert ops(raw) == ["affine", "affine", "linear", "relu", "linear"]
    simple = simplify(raw)
    assert ops(simple) == ["linear", "relu", "linear"]
    assert_same(raw, simple)
    assert_bounds_no_looser(raw, simple)


@pytest.mark.parametrize("group", [1, 3])
def test_normalisation_folded_into_zero_pad_conv(group):
    raw = load_onnx(normalised_model("conv", group=group))
    simple = simplify(raw)
    assert ops(simple) == ["conv2d", "relu"]
    assert_same(raw, simple)
    assert_bounds_no_looser(raw, simple)


@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 0, 1, 0)])
def test_normalisation_not_folded_into_padded_conv(pads):
    raw = load_onnx(normalised_model("conv", pads=pads))
    simple = simplify(raw)
    assert ops(simple) == ["affine", "conv2d", "relu"]  # Sub and Div merged, but kept out of the conv
    assert_same(raw, simple)
    assert_bounds_no_looser(raw, simple)


def test_acas_xu_sub_and_bias_adds_folded(shared):
    raw = load_onnx(shared / "benchmarks" / "vnncomp2021" / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx")
    assert len(raw.nodes) == 22 and ops(raw).count("affine") == 8
    simple = simplify(raw)
    assert len(simple.nodes) == 14
    assert {op: ops(simple).count(op) for op in set(ops(simple))} == {"reshape": 1, "linear": 7, "relu": 6}
    assert simple.outputs == raw.outputs == ["linear_7_Add"]
    assert_same(raw, simple, 0.0, 1.0)
    assert_bounds_no_looser(raw, simple)
    # only the values the simplified graph uses are left
    used = {i for n in simple.nodes for i in n.inputs} | {o for n in simple.nodes for o in n.outputs}
    assert set(simple.values) == used


# --------------------------------------------------------------------------------------------
# folds that must not happen (or only in the right shape)
# --------------------------------------------------------------------------------------------
def test_affine_varying_along_rows_is_not_folded_into_linear():
    b = Builder((2, 4))
    h = b.op("linear", b.x, b.const(rand(3, 4), "param"), b.const(rand(3), "param"))
    y = b.op("affine", h, b.const(rand(2, 1)), b.const(rand(2, 3)))
    g = b.graph(y)
    assert ops(simplify(g)) == ["linear", "affine"]


def test_affine_not_folded_into_linear_with_another_consumer():
    b = Builder((1, 4))
    h = b.op("linear", b.x, b.const(rand(3, 4), "param"))
    y = b.op("affine", h, b.const(rand(3)), b.const(rand(3)))
    g = b.graph(y, h)
    out = fold_affine_into_linear(g)
    assert ops(out) == ["linear", "affine"]
    b = Builder((1, 4))
    h = b.op("linear", b.x, b.const(rand(3, 4), "param"))
    y = b.op("affine", h, b.const(rand(3)), b.const(rand(3)))
    z = b.op("add", h, y)
    assert ops(fold_affine_into_linear(b.graph(z))) == ["linear", "affine", "add"]


def test_affine_into_next_linear_through_reshape():
    # elementwise over a [1, 2, 3] input that is flattened to [1, 6]: foldable
    b = Builder((1, 2, 3))
    a = b.op("affine", b.x, b.const(rand(2, 3)), b.const(rand(2, 3)))
    r = b.op("reshape", a, shape=(1, 6))
    y = b.op("linear", r, b.const(rand(5, 6), "param"), b.const(rand(5), "param"))
    g = b.graph(y)
    out = fold_affine_into_next_linear(g)
    assert ops(out) == ["reshape", "linear"]
    assert_same(g, out)
    assert_bounds_no_looser(g, out)


def test_affine_into_next_linear_not_when_it_varies_across_rows():
    # x [2, 3], scale per row, reshaped to [3, 2]: the linear's rows see different scales
    b = Builder((2, 3))
    a = b.op("affine", b.x, b.const(rand(2, 1)), b.const(rand(2, 1)))
    r = b.op("reshape", a, shape=(3, 2))
    y = b.op("linear", r, b.const(rand(4, 2), "param"))
    g = b.graph(y)
    assert ops(simplify(g)) == ["affine", "reshape", "linear"]
    # and without the reshape, a per-row scale on [2, 3] cannot fold either
    b = Builder((2, 3))
    a = b.op("affine", b.x, b.const(rand(2, 1)), b.const(rand(2, 1)))
    y = b.op("linear", a, b.const(rand(4, 3), "param"))
    assert ops(simplify(b.graph(y))) == ["affine", "linear"]
    # a per-feature scale on [2, 3] does
    b = Builder((2, 3))
    a = b.op("affine", b.x, b.const(rand(3)), b.const(rand(3)))
    y = b.op("linear", a, b.const(rand(4, 3), "param"))
    g = b.graph(y)
    assert ops(simplify(g)) == ["linear"]
    assert_same(g, simplify(g))


def test_affine_feeding_a_graph_output_is_kept():
    b = Builder((1, 3))
    a = b.op("affine", b.x, b.const(rand(3)), b.const(rand(3)))
    y = b.op("linear", a, b.const(rand(4, 3), "param"))
    assert ops(simplify(b.graph(y, a))) == ["affine", "linear"]


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), data=st.data())
def test_affine_folds_preserve_semantics(shape, data):
    """Random broadcast patterns of scale/shift around a linear: whatever folds, values are kept."""
    shape = tuple(shape)

    def pattern(full):  # a random broadcast-compatible shape for a constant on `full`
        return tuple(d if data.draw(st.booleans()) else 1 for d in full)

    b = Builder(shape)
    a = b.op("affine", b.x, b.const(rand(*pattern(shape))), b.const(rand(*pattern(shape))))
    if data.draw(st.booleans()):
        a = b.op("reshape", a, shape=(int(np.prod(shape[:-1])), shape[-1]) if len(shape) > 1 else shape)
    h = b.op("linear", a, b.const(rand(2, shape[-1]), "param"), b.const(rand(2), "param"))
    y = b.op("affine", h, b.const(rand(*pattern(b.values[h].type.shape))), b.const(rand(2)))
    g = b.graph(y)
    out = simplify(g)
    assert_same(g, out)
    assert_bounds_no_looser(g, out)


# --------------------------------------------------------------------------------------------
# the other passes
# --------------------------------------------------------------------------------------------
def test_fold_constants():
    b = Builder((1, 3))
    c = b.const(rand(3))
    r = b.op("relu", c)                                       # constant
    s = b.op("affine", r, b.const(rand(3)), b.const(rand(3)))  # constant
    lin = b.op("linear", b.const(rand(2, 3)), b.const(rand(3, 3), "param"))  # constant [2, 3]
    y = b.op("affine", b.x, s, b.const(np.zeros(3)))
    z = b.op("add", y, b.op("affine", b.x, b.const(1.0), b.const(0.0)))
    w = b.op("affine", z, lin, lin)
    g = b.graph(y, w)
    out = fold_constants(g)
    assert ops(out) == ["affine", "affine", "add", "affine"]
    assert out.values[s].kind == "const" and out.values[s].type.shape == (3,)
    assert out.values[lin].kind == "const" and out.values[lin].type.shape == (2, 3)
    validate(out)
    x = torch.randn(4, 1, 3, generator=torch.Generator().manual_seed(0))
    for u, v in zip(evaluate(g, x), evaluate(out, x)):      # (float32: folding reorders the sums)
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-6 * u.abs().max().item())
    assert ops(simplify(g)) == ["affine", "affine", "add", "affine"]


def test_remove_identity_reshapes():
    b = Builder((1, 4))
    r = b.op("reshape", b.x, shape=(1, 4))
    t = b.op("transpose", r, perm=(0, 1))
    h = b.op("relu", t)
    t2 = b.op("transpose", h, perm=(1, 0))
    y = b.op("reshape", t2, shape=(4, 1))  # a graph output: kept even though it is an identity
    g = b.graph(y)
    out = remove_identity_reshapes(g)
    assert ops(out) == ["relu", "transpose", "reshape"]
    assert out.nodes[0].inputs == ["x"]
    validate(out)
    assert_same(g, out)


def test_merge_affine_chain():
    b = Builder((1, 2, 3))
    a1 = b.op("affine", b.x, b.const(rand(3)), b.const(rand(2, 1)))
    a2 = b.op("affine", a1, b.const(rand(2, 3)), b.const(1.5))
    a3 = b.op("affine", a2, b.const(-2.0), b.const(rand(3)))
    g = b.graph(a3)
    out = merge_affine_chain(g)
    assert ops(out) == ["affine"] and out.nodes[0].inputs[0] == "x" and out.outputs == [a3]
    validate(out)
    assert_same(g, out)
    assert_bounds_no_looser(g, out)
    # an inner affine with another consumer stays
    b = Builder((1, 3))
    a1 = b.op("affine", b.x, b.const(rand(3)), b.const(rand(3)))
    a2 = b.op("affine", a1, b.const(rand(3)), b.const(rand(3)))
    assert ops(merge_affine_chain(b.graph(a2, a1))) == ["affine", "affine"]


def test_remove_dead_nodes():
    b = Builder((1, 4))
    dead = b.op("relu", b.op("linear", b.x, b.const(rand(3, 4), "param")))
    y = b.op("relu", b.x)
    g = b.graph(y)
    out = remove_dead_nodes(g)
    assert ops(out) == ["relu"] and dead not in out.values
    assert set(out.values) == {"x", y}


def test_simplify_keeps_names_and_validates(shared):
    raw = load_onnx(shared / "golden" / "models" / "permute_net.onnx")
    simple = simplify(raw)
    assert simple.inputs == raw.inputs and simple.outputs == raw.outputs
    assert ops(simple).count("affine") == 0
    assert_same(raw, simple)


# --------------------------------------------------------------------------------------------
# purity: no pass mutates its input
# --------------------------------------------------------------------------------------------
def _graphs_for_purity():
    yield load_onnx(conv_bn_model())
    yield load_onnx(normalised_model("gemm"))
    yield load_onnx(normalised_model("conv"))
    b = Builder((1, 3))
    c = b.op("relu", b.const(rand(3)))
    r = b.op("reshape", b.op("affine", b.x, c, b.const(rand(3))), shape=(1, 3))
    b.op("relu", r)  # dead
    y = b.op("affine", b.op("linear", r, b.const(rand(2, 3), "param")), b.const(2.0), b.const(1.0))
    yield b.graph(y)


@pytest.mark.parametrize("fn", list(PASSES) + [simplify], ids=lambda f: f.__name__)
def test_passes_do_not_mutate_their_input(fn):
    for g in _graphs_for_purity():
        before = snapshot(g)
        out = fn(g)
        assert out is not g
        assert_snapshot_equal(before, snapshot(g))
        assert_same(g, out)
