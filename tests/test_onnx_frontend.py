"""ONNX frontend: every benchmark model and a small model per supported op agree with onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from boundflow.domains.concrete import evaluate, infer_shape, validate
from boundflow.errors import ModelLoadError, UnsupportedOpError
from boundflow.frontends.onnx import load_onnx
from boundflow.passes.simplify import simplify

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def rand(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def make_model(nodes, in_shape, outputs=("y",), inits=(), opset=17, in_name="x", out_shape=None) -> onnx.ModelProto:
    """A one-input float model. Output shapes come from ONNX shape inference unless given."""
    graph = helper.make_graph(
        list(nodes), "test",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, out_shape) for o in outputs],
        initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = max(4, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
    if out_shape is not None:
        return model
    # declare the output shapes (the checker wants them); lenient inference leaves broken models as they are
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    return model


def ort_outputs(model_bytes: bytes, points: np.ndarray) -> list[list[np.ndarray]]:
    """onnxruntime on each point separately (the models have a fixed batch dim)."""
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: p}) for p in points]


def assert_close(graph, refs, points) -> None:
    outs = evaluate(graph, torch.from_numpy(points))
    assert len(outs) == len(refs[0])
    for b, ref in enumerate(refs):
        for o, r in zip(outs, ref):
            got = o[b].numpy()
            assert got.shape == r.shape, (got.shape, r.shape)
            tol = 1e-5 * np.maximum(1.0, np.abs(r))
            assert np.all(np.abs(got - r) <= tol), float(np.max(np.abs(got - r)))


def check(model: onnx.ModelProto, lo=-1.0, hi=1.0, batch=4):
    """Load, simplify, and compare both graphs to onnxruntime on `batch` random points."""
    graph = load_onnx(model)
    validate(graph)
    for node in graph.nodes:
        assert tuple(infer_shape(graph, node)) == graph.shape(node.outputs[0])
    shape = graph.shape(graph.inputs[0])
    points = RNG.uniform(lo, hi, size=(batch,) + shape).astype(np.float32)
    refs = ort_outputs(model.SerializeToString(), points)
    assert_close(graph, refs, points)
    simple = simplify(graph)
    assert_close(simple, refs, points)
    return graph, simple


def ops(graph) -> list[str]:
    return [n.op for n in graph.nodes]


# --------------------------------------------------------------------------------------------
# the shared benchmark and golden models
# --------------------------------------------------------------------------------------------
GROUPS = {"acasxu": 45, "mnistfc": 3, "oval21": 3, "test": 5}


@pytest.mark.parametrize("group", sorted(GROUPS) + ["golden"])
def test_shared_models_match_onnxruntime(shared, group):
    folder = shared / "golden" / "models" if group == "golden" else shared / "benchmarks" / "vnncomp2021" / group
    files = sorted(folder.rglob("*.onnx"))
    assert len(files) == GROUPS.get(group, 7), files
    for path in files:
        model = onnx.load(str(path))
        graph = load_onnx(path)
        simple = simplify(graph)
        shape = graph.shape(graph.inputs[0])
        ranges = [(-1.0, 1.0)]
        if group in ("acasxu", "mnistfc", "test") or "ACAS" in path.name or "mnist" in path.name:
            ranges.append((0.0, 1.0))
        for lo, hi in ranges:
            points = RNG.uniform(lo, hi, size=(4,) + shape).astype(np.float32)
            refs = ort_outputs(model.SerializeToString(), points)
            assert_close(graph, refs, points)
            assert_close(simple, refs, points)


def test_vnncomp_count(shared):
    assert len(list((shared / "benchmarks" / "vnncomp2021").rglob("*.onnx"))) == sum(GROUPS.values())


def test_acas_lowering_shapes_and_names(shared):
    graph = load_onnx(shared / "golden" / "models" / "ACASXU_run2a_1_1_batch_2000.onnx")
    assert graph.inputs == ["input"] and graph.shape("input") == (1, 1, 1, 5)
    assert graph.outputs == ["linear_7_Add"] and graph.shape("linear_7_Add") == (1, 5)
    assert ops(graph)[:4] == ["affine", "reshape", "linear", "affine"]
    avg = numpy_helper.to_array(next(i for i in onnx.load(
        str(shared / "golden" / "models" / "ACASXU_run2a_1_1_batch_2000.onnx")).graph.initializer
        if i.name == "input_AvgImg"))
    shift = graph.values[graph.nodes[0].inputs[2]]
    assert shift.kind == "const" and np.array_equal(shift.data.numpy(), -avg)


def test_mnist_keeps_declared_input_shape_and_param_names(shared):
    graph = load_onnx(shared / "golden" / "models" / "mnist-net_256x2.onnx")
    assert graph.shape(graph.inputs[0]) == (1, 784, 1)
    w = graph.values["layers.0.weight"]
    assert w.kind == "param" and w.type.shape == (256, 784) and w.data.dtype == torch.float32


def test_cnn_layout_recorded(shared):
    graph = load_onnx(shared / "golden" / "models" / "cnn_small.onnx")
    assert graph.values[graph.inputs[0]].type.layout == "NCHW"
    assert graph.values[graph.nodes[-1].outputs[0]].type.layout is None


# --------------------------------------------------------------------------------------------
# Gemm and MatMul
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, -2.0)])
@pytest.mark.parametrize("c_shape", [None, (4,), (1, 4), (), (3, 4), (3, 1)])
def test_gemm_variable_a(trans_a, trans_b, alpha, beta, c_shape):
    m, k, n = 3, 5, 4
    b = rand(n, k) if trans_b else rand(k, n)
    inits = [init("B", b)]
    inputs = ["x", "B"]
    if c_shape is not None:
        inits.append(init("C", rand(*c_shape)))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b,
                            alpha=alpha, beta=beta)
    graph, simple = check(make_model([node], (k, m) if trans_a else (m, k), inits=inits, opset=13))
    per_column = c_shape is None or len(c_shape) < 2 or c_shape[0] == 1
    assert ("affine" in ops(simple)) == (not per_column)  # a row-varying C is not a bias


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("c_shape", [None, (4, 3), (4, 1)])
def test_gemm_variable_b(trans_a, trans_b, c_shape):
    m, k, n = 4, 5, 3
    a = rand(k, m) if trans_a else rand(m, k)
    inits = [init("A", a)]
    inputs = ["A", "x"]
    if c_shape is not None:
        inits.append(init("C", rand(*c_shape)))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=0.7)
    check(make_model([node], (n, k) if trans_b else (k, n), inits=inits, opset=11))


def test_gemm_opset8_mnist_style():
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1)]
    graph, _ = check(make_model(nodes, (1, 12, 1), inits=[init("W", rand(6, 12)), init("b", rand(6))], opset=8))
    assert ops(graph) == ["reshape", "linear"]
    assert graph.nodes[1].inputs[1:] == ["W", "b"]  # verbatim initializers keep their names


@pytest.mark.parametrize("x_shape,w_shape,const_left", [
    ((1, 5), (5, 4), False),
    ((2, 3, 5), (5, 4), False),
    ((5,), (5, 4), False),
    ((1,), (1, 3), False),
    ((1, 5), (5,), False),
    ((5,), (5,), False),
    ((3, 6), (4, 3), True),
    ((2, 3, 6), (4, 3), True),
    ((5,), (4, 5), True),
    ((1,), (2, 1), True),
    ((2, 3, 6), (3,), True),
    ((3,), (3,), True),
])
@pytest.mark.parametrize("opset", [9, 13, 20])
def test_matmul(x_shape, w_shape, const_left, opset):
    inputs = ["W", "x"] if const_left else ["x", "W"]
    nodes = [helper.make_node("MatMul", inputs, ["y"], name="mm")]
    graph, _ = check(make_model(nodes, x_shape, inits=[init("W", rand(*w_shape))], opset=opset))
    assert graph.shape("y") == np.matmul(*(np.zeros(w_shape), np.zeros(x_shape))[:: 1 if const_left else -1]).shape


def test_matmul_batched_constant_is_unsupported():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="bmm")]
    with pytest.raises(UnsupportedOpError, match="batched"):
        load_onnx(make_model(nodes, (2, 3, 5), inits=[init("W", rand(2, 5, 4))]))


def test_matmul_with_the_same_matrix_in_every_batch_entry():
    """The matrix product is written once for both frontends (ops/linear.py): a batched
    constant that repeats one matrix is that matrix, as torch's bmm of an expanded weight."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="bmm")]
    graph, _ = check(make_model(nodes, (2, 3, 5), inits=[init("W", np.stack([rand(5, 4)] * 2))]))
    assert ops(graph) == ["linear"]


# --------------------------------------------------------------------------------------------
# elementwise arithmetic
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,const_first", [("Add", False), ("Add", True), ("Sub", False), ("Sub", True),
                                             ("Mul", False), ("Mul", True), ("Div", False)])
@pytest.mark.parametrize("c_shape", [(), (6,), (3, 1), (1, 2, 3, 6)])
def test_binary_with_constant(op, const_first, c_shape):
    c = rand(*c_shape) + (3.0 if op == "Div" else 0.0)
    inputs = ["c", "x"] if const_first else ["x", "c"]
    nodes = [helper.make_node(op, inputs, ["y"], name="bin")]
    graph, simple = check(make_model(nodes, (2, 3, 6), inits=[init("c", c)], opset=13))
    assert "affine" in ops(graph)


@pytest.mark.parametrize("op", ["Add", "Sub"])
def test_binary_two_variables(op):
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node(op, ["x", "r"], ["y"], name="two")]
    graph, _ = check(make_model(nodes, (1, 3, 4)))
    assert "add" in ops(graph)


@pytest.mark.parametrize("op", ["Add", "Sub"])
def test_two_variables_with_broadcasting(op):
    """x [1, 3, 4] and r [1, 3, 1]: r is broadcast (a selection of its entries), then added."""
    nodes = [helper.make_node("ReduceSum", ["x"], ["r"], keepdims=1, axes=[2]),
             helper.make_node(op, ["r", "x"], ["y"], name="bcast")]
    graph, _ = check(make_model(nodes, (1, 3, 4), opset=11))
    assert {"add", "gather"} <= set(ops(graph))


@pytest.mark.parametrize("opset,bounds", [(9, dict(min=0.0)), (9, dict(min=-0.5, max=0.25)), (9, dict(max=0.5)),
                                          (13, dict(min=0.0)), (13, dict(min=-0.5, max=0.25)), (13, dict(max=0.5))])
def test_clip(opset, bounds):
    """Clip lowers to clamp_min, exact in floating point, a minimum between negations; to relu
    where a bound is 0."""
    if opset < 11:
        node, inits = helper.make_node("Clip", ["h"], ["y"], name="clip", **bounds), []
    else:
        names = [n if n in bounds else "" for n in ("min", "max")]
        node = helper.make_node("Clip", ["h"] + names, ["y"], name="clip")
        inits = [init(n, np.float32(v)) for n, v in bounds.items()]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), node]
    graph, _ = check(make_model(nodes, (1, 4), inits=[init("W", rand(4, 3))] + inits, opset=opset))
    kinds = ["relu" if v == 0 else "clamp_min" for v in bounds.values()]
    assert sorted(op for op in ops(graph) if op in ("relu", "clamp_min")) == sorted(kinds)


def test_constant_node_and_identity_and_dropout():
    nodes = [helper.make_node("Constant", [], ["c"], value=init("v", rand(4))),
             helper.make_node("Identity", ["x"], ["i"]),
             helper.make_node("Add", ["i", "c"], ["a"]),
             None,
             helper.make_node("Identity", ["d"], ["y"])]
    for opset in (8, 12, 17):
        nodes[3] = (helper.make_node("Dropout", ["a"], ["d", "mask"], ratio=0.5) if opset < 12 else
                    helper.make_node("Dropout", ["a", "ratio"], ["d"]))
        graph, _ = check(make_model(nodes, (2, 4), opset=opset, inits=[init("ratio", np.float32(0.3))]))
        assert graph.outputs == ["y"]  # the Identity's output name is kept


def test_constant_folding_of_torch_style_shape_chain():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape (what torch.onnx exports for x.view(n, -1))."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Constant", [], ["zero"], value=init("z", np.array(0, dtype=np.int64))),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Constant", [], ["ax"], value=init("a", np.array([0], dtype=np.int64))),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
             helper.make_node("Constant", [], ["m1"], value=init("m", np.array([-1], dtype=np.int64))),
             helper.make_node("Concat", ["n1", "m1"], ["shape"], axis=0),
             helper.make_node("Cast", ["shape"], ["shape64"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "shape64"], ["y"])]
    graph, _ = check(make_model(nodes, (1, 3, 4, 4), opset=13, out_shape=[1, 48]))
    assert ops(graph) == ["reshape"] and graph.shape("y") == (1, 48)


def test_constant_folding_old_opset_unsqueeze_and_const_arithmetic():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
             helper.make_node("Mul", ["c", "two"], ["c2"]),
             helper.make_node("Unsqueeze", ["c2"], ["c2u"], axes=[0]),
             helper.make_node("Concat", ["one", "c2u", "minus"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [init("i1", np.array(1, np.int64)), init("two", np.array(2, np.int64)),
             init("one", np.array([1], np.int64)), init("minus", np.array([-1], np.int64))]
    graph, _ = check(make_model(nodes, (1, 4, 6), inits=inits, opset=11, out_shape=[1, 8, 3]))
    assert graph.shape("y") == (1, 8, 3)


def test_constant_of_shape_and_float_chain():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["ones"], value=init("v", np.array([2.0], np.float32))),
             helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("Sub", ["ones", "half"], ["c"]),
             helper.make_node("Mul", ["x", "c"], ["xc"]),
             helper.make_node("MatMul", ["xc", "wt"], ["y"])]
    inits = [init("half", np.float32(0.5)), init("w", rand(3, 5))]
    check(make_model(nodes, (2, 5), inits=inits, opset=11))


# --------------------------------------------------------------------------------------------
# convolution, normalisation, pooling
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(pads=[1, 1, 1, 1], strides=[1, 1]),
    dict(pads=[0, 1, 2, 1], strides=[2, 3]),
    dict(pads=[1, 0, 0, 2], dilations=[2, 1]),
    dict(group=2, pads=[1, 1, 1, 1]),
    dict(group=4),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER", strides=[2, 1]),
    dict(auto_pad="VALID", dilations=[1, 2]),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv(kw, bias):
    group = kw.get("group", 1)
    w = rand(4, 4 // group, 3, 2)
    inits = [init("W", w)] + ([init("b", rand(4))] if bias else [])
    node = helper.make_node("Conv", ["x", "W"] + (["b"] if bias else []), ["c"], name="conv", **kw)
    graph, _ = check(make_model([node, helper.make_node("Relu", ["c"], ["y"])], (1, 4, 9, 8),
                                inits=inits, opset=11))
    attrs = graph.nodes[0].attrs
    assert set(attrs) == {"stride", "padding", "dilation", "groups"} and attrs["groups"] == group


def test_conv_asymmetric_pad_order():
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[0, 1, 2, 3])
    graph, _ = check(make_model([node], (1, 1, 5, 5), inits=[init("W", rand(2, 1, 3, 3))], opset=9))
    assert graph.nodes[0].attrs["padding"] == (0, 1, 2, 3)


def test_conv_1d_is_unsupported():
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv1d")
    with pytest.raises(UnsupportedOpError, match="conv1d"):
        load_onnx(make_model([node], (1, 2, 9), inits=[init("W", rand(3, 2, 3))]))


def test_nhwc_input_transposed_to_nchw():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "W", "b"], ["y"], pads=[1, 1, 1, 1])]
    inits = [init("W", rand(5, 3, 3, 3)), init("b", rand(5))]
    graph, _ = check(make_model(nodes, (1, 6, 7, 3), inits=inits))
    assert graph.values["x"].type.layout == "NHWC" and graph.values["t"].type.layout == "NCHW"


@pytest.mark.parametrize("opset", [9, 14, 15])
@pytest.mark.parametrize("in_shape", [(1, 3, 5, 5), (2, 3), (1, 3, 7)])
def test_batchnorm(opset, in_shape):
    c = 3
    inits = [init("g", rand(c)), init("be", rand(c)), init("m", rand(c)),
             init("v", np.abs(rand(c)) + 0.5)]
    node = helper.make_node("BatchNormalization", ["x", "g", "be", "m", "v"], ["y"], epsilon=1e-3)
    graph, _ = check(make_model([node], in_shape, inits=inits, opset=opset))
    assert ops(graph) == ["affine"]
    assert graph.values[graph.nodes[0].inputs[1]].type.shape == (c,) + (1,) * (len(in_shape) - 2)


def test_batchnorm_training_mode_is_unsupported():
    inits = [init(n, np.ones(3, np.float32)) for n in ("g", "be", "m", "v")]
    node = helper.make_node("BatchNormalization", ["x", "g", "be", "m", "v"], ["y", "rm", "rv"], name="bn",
                            training_mode=1)
    with pytest.raises((UnsupportedOpError, ModelLoadError), match="train"):
        load_onnx(make_model([node], (1, 3, 4, 4), inits=inits, opset=15))


@pytest.mark.parametrize("kw", [
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 2], strides=[1, 2], pads=[1, 0, 1, 0], count_include_pad=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 3], auto_pad="VALID"),
])
def test_average_pool(kw):
    node = helper.make_node("AveragePool", ["x"], ["y"], **kw)
    graph, _ = check(make_model([node], (1, 3, 6, 8), opset=11))
    assert ops(graph) == ["conv2d"] and graph.nodes[0].attrs["groups"] == 3


def test_average_pool_opset8():
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    check(make_model([node], (1, 2, 4, 4), opset=8))


def test_average_pool_excluding_pads_is_unsupported():
    node = helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=[3, 3],
                            pads=[1, 1, 1, 1], count_include_pad=0)
    with pytest.raises(UnsupportedOpError, match="count_include_pad"):
        load_onnx(make_model([node], (1, 2, 6, 6), opset=11))


@pytest.mark.parametrize("kw,shape", [
    # a nightly fuzz find: taps at padded columns 0 and 2 skip the one input column
    (dict(kernel_shape=[1, 2], pads=[0, 1, 0, 1], strides=[1, 2], dilations=[1, 2], ceil_mode=1), (1, 1, 1, 1)),
    (dict(kernel_shape=[2, 2], pads=[2, 0, 2, 0]), (1, 1, 3, 3)),
])
def test_max_pool_with_a_window_of_padding_only_is_unsupported(kw, shape):
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", **kw)
    with pytest.raises(UnsupportedOpError, match="padding only"):
        load_onnx(make_model([node], shape, opset=12))


def test_max_pool_dilated_taps_that_reach_the_input_load():
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[1, 2], pads=[0, 1, 0, 1], strides=[1, 1],
                            dilations=[1, 2])
    check(make_model([node], (1, 1, 2, 3), opset=12))


def test_global_average_pool():
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["y"])]
    check(make_model(nodes, (1, 3, 5, 4), opset=11))


@pytest.mark.parametrize("pads", [[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 1, 1]])
@pytest.mark.parametrize("opset", [9, 11, 18])
def test_zero_pad_before_pooling(pads, opset):
    """torch exports AvgPool2d(padding=p) at opset 9/10 as Pad + AveragePool."""
    if opset < 11:
        pad = helper.make_node("Pad", ["x"], ["p"], pads=pads, mode="constant", value=0.0)
        inits = []
    else:
        pad = helper.make_node("Pad", ["x", "pads", "zero"], ["p"], mode="constant")
        inits = [init("pads", np.array(pads, np.int64)), init("zero", np.float32(0))]
    if opset >= 18:  # pads for the spatial axes only
        pad = helper.make_node("Pad", ["x", "pads", "zero", "axes"], ["p"])
        inits = [init("pads", np.array(pads[2:4] + pads[6:8], np.int64)), init("zero", np.float32(0)),
                 init("axes", np.array([2, -1], np.int64))]
    nodes = [pad, helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    graph, _ = check(make_model(nodes, (1, 3, 6, 6), inits=inits, opset=opset))
    assert ops(graph) == (["conv2d"] if not any(pads) else ["select", "select", "conv2d"])


@pytest.mark.parametrize("kw,pads,match", [(dict(mode="reflect"), [0, 0, 4, 1, 0, 0, 1, 1], "reflect padding by 4"),
                                           (dict(mode="edge"), [0, 0, 1, -1, 0, 0, 1, 1], "negative pads"),
                                           (dict(mode="mirror"), [0, 0, 1, 1, 0, 0, 1, 1], "mirror")])
def test_unsupported_pads(kw, pads, match):
    """Pad of any mode is a selection (tests/test_ops_structural.py); what it cannot say is refused."""
    node = helper.make_node("Pad", ["x"], ["y"], name="pad", pads=pads, **kw)
    with pytest.raises(UnsupportedOpError, match=f"Pad node 'pad'.*{match}"):
        load_onnx(make_model([node], (1, 2, 4, 4), opset=9))


# --------------------------------------------------------------------------------------------
# shape ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_flatten(axis):
    graph, _ = check(make_model([helper.make_node("Flatten", ["x"], ["y"], axis=axis)], (1, 2, 3, 4)))
    assert ops(graph) in (["reshape"], [])


@pytest.mark.parametrize("spec,allowzero", [([0, -1], 0), ([1, 0, -1], 0), ([-1], 0), ([2, 1, 12], 1),
                                            ([0, 3, 2, 4], 0)])
@pytest.mark.parametrize("opset", [8, 14])
def test_reshape(spec, allowzero, opset):
    kw = {"allowzero": allowzero} if opset >= 14 else {}
    node = helper.make_node("Reshape", ["x", "s"], ["y"], **kw)
    graph, _ = check(make_model([node], (1, 2, 3, 4), inits=[init("s", np.array(spec, np.int64))], opset=opset))
    assert graph.shape("y") == tuple(np.zeros((1, 2, 3, 4)).reshape([d if d else s for d, s in
                                                                    zip(spec, (1, 2, 3, 4, 0))]).shape)


@pytest.mark.parametrize("opset", [8, 11, 13, 20])
def test_squeeze_unsqueeze(opset):
    if opset >= 13:
        nodes = [helper.make_node("Squeeze", ["x", "a1"], ["s"]),
                 helper.make_node("Unsqueeze", ["s", "a2"], ["u"]),
                 helper.make_node("Squeeze", ["u"], ["y"])]
        inits = [init("a1", np.array([2], np.int64)), init("a2", np.array([0, -1], np.int64))]
    else:
        nodes = [helper.make_node("Squeeze", ["x"], ["s"], axes=[2]),
                 helper.make_node("Unsqueeze", ["s"], ["u"], axes=[0, 4] if opset >= 11 else [0, 4]),
                 helper.make_node("Squeeze", ["u"], ["y"])]
        inits = []
    graph, _ = check(make_model(nodes, (1, 3, 1, 4), inits=inits, opset=opset))
    assert graph.shape("s") == (1, 3, 4) and graph.shape("u") == (1, 1, 3, 4, 1) and graph.shape("y") == (3, 4)


@pytest.mark.parametrize("perm", [None, [0, 2, 1, 3], [3, 1, 0, 2]])
def test_transpose(perm):
    kw = {} if perm is None else {"perm": perm}
    graph, _ = check(make_model([helper.make_node("Transpose", ["x"], ["y"], **kw)], (1, 2, 3, 4)))
    assert graph.nodes[0].attrs["perm"] == tuple(perm or [3, 2, 1, 0])


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_concat(axis):
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 2]),
             helper.make_node("Concat", ["x", "r", "t"], ["y"], axis=axis)]
    graph, _ = check(make_model(nodes, (1, 3, 4), opset=11))
    assert graph.nodes[-1].op == "concat" and graph.nodes[-1].attrs["axis"] == axis % 3


def test_concat_with_constant_is_unsupported():
    node = helper.make_node("Concat", ["x", "c"], ["y"], name="cat", axis=1)
    with pytest.raises(UnsupportedOpError, match="Concat"):
        load_onnx(make_model([node], (1, 3), inits=[init("c", rand(1, 2))]))


def test_multiple_outputs_and_opset_variety():
    for opset in (8, 10, 12, 16, 18, 20):
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1),
                 helper.make_node("Relu", ["h"], ["y1"]),
                 helper.make_node("MatMul", ["y1", "V"], ["y2"])]
        inits = [init("W", rand(6, 4)), init("b", rand(6)), init("V", rand(6, 2))]
        graph, _ = check(make_model(nodes, (1, 4), outputs=("y1", "y2"), inits=inits, opset=opset))
        assert graph.outputs == ["y1", "y2"]


def test_dynamic_batch_dimension_becomes_one():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], ("N", 3))
    graph = load_onnx(model)
    assert graph.shape("x") == (1, 3)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def test_unsupported_op_names_op_and_node():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Round", ["r"], ["y"], name="my_round")]
    with pytest.raises(UnsupportedOpError) as e:
        load_onnx(make_model(nodes, (1, 3)))
    assert "Round" in str(e.value) and "my_round" in str(e.value) and "Gemm" in str(e.value)


def test_truncated_file(tmp_path, shared):
    data = (shared / "golden" / "models" / "mlp_small.onnx").read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as e:
        load_onnx(path)
    assert str(path) in str(e.value)


def test_truncated_built_model(tmp_path):
    model = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], (1, 64),
                       inits=[init("W", rand(64, 64))])
    data = model.SerializeToString()
    for cut in (len(data) // 2, len(data) - 3, 10):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=str(path)):
            load_onnx(str(path))


def test_garbage_and_empty_files(tmp_path):
    for name, data in (("garbage.onnx", b"\xff\xfe not a protobuf at all"), ("empty.onnx", b"")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelLoadError, match=name):
            load_onnx(path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.onnx"):
        load_onnx(tmp_path / "nope.onnx")


@pytest.mark.filterwarnings("ignore:.*onnx.checker")
def test_two_network_inputs():
    graph = helper.make_graph([helper.make_node("Add", ["x", "z"], ["y"])], "two",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3]) for n in "xz"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises((ModelLoadError, UnsupportedOpError), match="exactly one network input"):
        load_onnx(model)


def test_dynamic_non_batch_dimension():
    with pytest.raises(ModelLoadError, match="dynamic"):
        load_onnx(make_model([helper.make_node("Relu", ["x"], ["y"])], (1, "L")))


@pytest.mark.filterwarnings("ignore:.*onnx.checker")
def test_undefined_tensor_is_a_load_error():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], (1, 3))
    model.graph.node[0].input[0] = "missing"
    with pytest.raises(ModelLoadError):
        load_onnx(model)


def test_unsupported_opset():
    with pytest.raises(UnsupportedOpError, match="opset"):
        load_onnx(make_model([helper.make_node("Relu", ["x"], ["y"])], (1, 3), opset=7))


def test_output_without_declared_shape_warns_but_loads():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "noshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.warns(UserWarning, match="checker"):
        assert load_onnx(model).shape("y") == (1, 3)


def test_every_mapping_lives_in_an_op_module():
    """The frontends keep only their format machinery: each ONNX op type and aten target is
    mapped by the module of boundflow.ops that defines its primal op."""
    import operator

    import boundflow.frontends.torch  # noqa: F401  (registers operator.getitem, FX machinery)
    from boundflow.ops import ONNX_LOWERINGS, TORCH_LOWERINGS
    modules = {fn.__module__ for fn in list(ONNX_LOWERINGS.values()) + list(TORCH_LOWERINGS.values())}
    assert modules == {"boundflow.ops.linear", "boundflow.ops.conv", "boundflow.ops.affine", "boundflow.ops.relu",
                       "boundflow.ops.shape", "boundflow.ops.s_shaped", "boundflow.ops.pool", "boundflow.ops.convex",
                       "boundflow.ops.leaky_relu", "boundflow.ops.sign", "boundflow.ops.periodic", "boundflow.ops.gelu",
                       "boundflow.ops.clamp",
                       "boundflow.ops.select", "boundflow.ops.reduce", "boundflow.ops.normalise", "boundflow.ops.softmax",
                       "boundflow.frontends.torch"}
    assert [k for k, fn in TORCH_LOWERINGS.items() if fn.__module__ == "boundflow.frontends.torch"] == [
        operator.getitem]


def test_a_second_mapping_of_one_op_type_is_refused():
    from boundflow.ops import onnx_lowering
    with pytest.raises(ValueError, match="Gemm has two lowerings"):
        onnx_lowering("Gemm")(lambda b: None)
