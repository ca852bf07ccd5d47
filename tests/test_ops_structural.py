"""Linear structural ops: ConvTranspose (conv_transpose2d, ops/conv.py), and the ops that only
select, sum or copy (ops/select.py, ops/reduce.py). For each: the forward rule equals
onnxruntime on ONNX models built here (several attribute combinations, hypothesis where
natural), the backward rule is the adjoint of the forward rule, every method (IBP, CROWN-IBP,
CROWN, alpha-CROWN; float32 and sound_fp) contains sampled points of the box (corners included)
inside a small net with a ReLU after the op, the torch frontend lowers the same ops, and
attributes we do not handle are refused by name."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import boundflow
from boundflow.domains.concrete import evaluate
from boundflow.errors import UnsupportedOpError
from boundflow.frontends.onnx import load_onnx
from boundflow.frontends.torch import load_torch
from boundflow.ops import conv
from boundflow.planner.config import PlannerConfig
from boundflow.verify.alpha import AlphaConfig
from nets import export_onnx

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
QUICK_ALPHA = AlphaConfig(iterations=5)


# -- helpers ---------------------------------------------------------------------------------------

def rand(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def model_of(nodes, in_shape, inits=(), opset=17, outputs=("y",)) -> onnx.ModelProto:
    """A one-input float model; output shapes from ONNX shape inference."""
    graph = helper.make_graph(list(nodes), "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = max(4, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    return model


def ort_run(model: onnx.ModelProto, points: torch.Tensor) -> list[torch.Tensor]:
    """onnxruntime on each point [N, *input shape]: one tensor [N, *out shape] per output."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    runs = [sess.run(None, {name: p.numpy().astype(np.float32)}) for p in points]
    return [torch.from_numpy(np.stack([r[k] for r in runs])) for k in range(len(runs[0]))]


def assert_forward_equals_ort(model: onnx.ModelProto, seed: int = 0, n: int = 3):
    graph = load_onnx(model)
    shape = graph.shape(graph.inputs[0])
    x = torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed))
    ours, want = evaluate(graph, x), ort_run(model, x)
    assert len(ours) == len(want)
    for o, w in zip(ours, want):
        assert o.shape == w.shape
        assert torch.allclose(o, w, rtol=1e-5, atol=1e-5), (o - w).abs().max()
    return graph


def samples(lo: torch.Tensor, hi: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n uniform points and n random corners of the box [lo, hi]: [2n, *lo.shape]."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) + tuple(lo.shape)
    uniform = lo + (hi - lo) * torch.rand(shape, generator=g)
    corners = torch.where(torch.rand(shape, generator=g) < 0.5, lo, hi)
    return torch.cat([uniform, corners])


def assert_sound(model, lo, hi, ys: torch.Tensor, methods=METHODS, **options):
    """Every method, float32 and sound_fp, contains the outputs ys [N, ...] of sampled points."""
    ys = ys.reshape(ys.shape[0], -1).double()
    for method in methods:
        for sound_fp in (False, True):
            extra = {"alpha": QUICK_ALPHA} if method == "alpha-crown" else {}
            lb, ub = boundflow.compute_bounds(model, lo, hi, method=method, sound_fp=sound_fp, **extra, **options)
            tol = 1e-5 * ys.abs().clamp(min=1)
            assert (ys >= lb.double() - tol).all(), (method, sound_fp, (lb - ys).max())
            assert (ys <= ub.double() + tol).all(), (method, sound_fp, (ys - ub).max())


def assert_onnx_sound(model: onnx.ModelProto, eps: float = 0.3, seed: int = 0, n: int = 100, **options):
    shape = tuple(load_onnx(model).shape("x"))
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    lo, hi = x0 - eps, x0 + eps
    pts = samples(lo, hi, n, seed + 1)
    assert_sound(model, lo, hi, ort_run(model, pts)[0], **options)


def assert_torch_lowering(module: nn.Module, shape, eps: float = 0.3, methods=METHODS, n: int = 100):
    """The torch frontend's graph computes the module, and every method contains its samples."""
    module = module.eval()
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    graph = load_torch(module, x0)
    pts = samples(x0 - eps, x0 + eps, n, 4)
    with torch.no_grad():
        want = module(pts.flatten(0, 1))        # the batch axis of the module is the region's 1
    got = evaluate(graph, pts)[0]
    assert torch.allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)
    assert_sound(module, x0 - eps, x0 + eps, want, methods=methods)
    return graph


def relu_head(y: str, n_out: int, rng, in_features: int, out: str = "y") -> tuple[list, dict]:
    """y -> Relu -> Flatten -> Gemm(n_out): the ReLU after the op under test, and a mixing layer."""
    nodes = [helper.make_node("Relu", [y], [y + "_r"]), helper.make_node("Flatten", [y + "_r"], [y + "_f"]),
             helper.make_node("Gemm", [y + "_f", "head_w", "head_b"], [out], transB=1)]
    return nodes, {"head_w": rand(rng, n_out, in_features), "head_b": rand(rng, n_out)}


# -- ConvTranspose ---------------------------------------------------------------------------------

@st.composite
def conv_transpose_configs(draw):
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = [draw(st.integers(0, dh * (kh - 1))), draw(st.integers(0, dw * (kw - 1))),
            draw(st.integers(0, dh * (kh - 1))), draw(st.integers(0, dw * (kw - 1)))]
    out_pad = [draw(st.integers(0, sh - 1)), draw(st.integers(0, sw - 1))]      # onnxruntime: < stride
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    for n, k, s, d, p0, p1, o in zip((h, w), (kh, kw), (sh, sw), (dh, dw), pads[:2], pads[2:], out_pad):
        assume((n - 1) * s + d * (k - 1) + 1 + o - p0 - p1 > 0)          # a non-empty output
    attrs = dict(strides=[sh, sw], dilations=[dh, dw], pads=pads, output_padding=out_pad, group=groups)
    return attrs, (c_in, c_out, kh, kw), (1, c_in, h, w), draw(st.booleans())


def conv_transpose_model(attrs, dims, in_shape, bias, seed=0, head=False, opset=17):
    rng = np.random.default_rng(seed)
    c_in, c_out, kh, kw = dims
    inits = {"w": rand(rng, c_in, c_out // attrs["group"], kh, kw)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = rand(rng, c_out)
        inputs.append("b")
    nodes = [helper.make_node("ConvTranspose", inputs, ["t" if head else "y"], **attrs)]
    if head:
        shape = onnx.shape_inference.infer_shapes(model_of(nodes[:1], in_shape, inits, opset, ("t",))).graph.output[0]
        numel = int(np.prod([d.dim_value for d in shape.type.tensor_type.shape.dim]))
        more, head_inits = relu_head("t", 3, rng, numel)
        nodes += more
        inits.update(head_inits)
    return model_of(nodes, in_shape, inits, opset)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(conv_transpose_configs(), st.integers(0, 2**16))
def test_conv_transpose_forward_equals_onnxruntime(config, seed):
    attrs, dims, in_shape, bias = config
    graph = assert_forward_equals_ort(conv_transpose_model(attrs, dims, in_shape, bias, seed), seed)
    assert [n.op for n in graph.nodes] == ["conv_transpose2d"]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(conv_transpose_configs(), st.integers(0, 2**16))
def test_conv_transpose_backward_is_the_adjoint(config, seed):
    """<backward(a), x> = <a, forward(x)> (no bias), and the bias term is <a, b>."""
    attrs, (c_in, c_out, kh, kw), in_shape, _ = config
    g = torch.Generator().manual_seed(seed)
    ours = {"stride": attrs["strides"], "dilation": attrs["dilations"], "padding": attrs["pads"],
            "output_padding": attrs["output_padding"], "groups": attrs["group"]}
    w = torch.randn((c_in, c_out // attrs["group"], kh, kw), generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    x = torch.randn((1,) + in_shape[1:], generator=g, dtype=torch.float64)
    y = conv.conv_transpose2d(x, w, None, ours)
    a = torch.randn((1, 2) + tuple(y.shape[1:]), generator=g, dtype=torch.float64)
    ax, bias = conv.transpose_backward([a, torch.zeros(1, 2, dtype=torch.float64)], [w, b], ours)
    assert torch.allclose((ax * x.unsqueeze(1)).flatten(2).sum(-1), (a * y.unsqueeze(1)).flatten(2).sum(-1))
    assert torch.allclose(bias, (a * b.reshape(-1, 1, 1)).flatten(2).sum(-1))


@pytest.mark.parametrize("attrs,dims,in_shape,bias", [
    (dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), (2, 3, 3, 3), (1, 2, 3, 3), True),
    (dict(strides=[2, 1], dilations=[1, 2], pads=[0, 1, 2, 0], group=2), (2, 4, 3, 2), (1, 2, 3, 2), False),
    (dict(strides=[3, 2], dilations=[2, 1], pads=[2, 0, 1, 0], output_padding=[1, 0]), (1, 2, 2, 3), (1, 1, 2, 3), True),
], ids=["stride2", "groups_dilation_asym", "output_padding"])
def test_conv_transpose_net_is_sound(attrs, dims, in_shape, bias):
    attrs = {"group": 1, **attrs}
    assert_onnx_sound(conv_transpose_model(attrs, dims, in_shape, bias, seed=1, head=True), eps=0.3)


def test_conv_transpose_in_a_conv_chain_keeps_the_patch_bounds():
    """conv -> relu -> convT -> relu -> conv -> relu -> linear: the patch chains stop at the
    transposed conv (it is not a conv2d), and the bounds are the dense passes' ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(2, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).eval()
    x0 = torch.randn(1, 2, 5, 5)
    for method, extra in (("crown", {}), ("alpha-crown", {"alpha": QUICK_ALPHA})):
        dense, patched = (boundflow.compute_bounds(net, x0 - 0.1, x0 + 0.1, method=method,
                                                   config=PlannerConfig(patches=p), **extra) for p in (False, True))
        for d, p in zip(dense, patched):
            assert torch.allclose(d, p, rtol=1e-4, atol=1e-5)
    graph = load_torch(net, x0)
    assert [n.op for n in graph.nodes][:4] == ["conv2d", "relu", "conv_transpose2d", "relu"]


@pytest.mark.parametrize("module", [
    nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
    nn.ConvTranspose2d(2, 4, (2, 3), stride=(1, 2), dilation=(2, 1), groups=2, bias=False),
], ids=["stride2", "groups_dilation"])
def test_conv_transpose_torch_frontend(module):
    torch.manual_seed(0)
    net = nn.Sequential(module, nn.ReLU(), nn.Flatten())
    graph = assert_torch_lowering(net, (1, 2, 3, 3))
    assert "conv_transpose2d" in [n.op for n in graph.nodes]


@pytest.mark.parametrize("extra,match", [
    (dict(output_shape=[7, 7]), "output_shape"),
    (dict(auto_pad="SAME_UPPER"), "auto_pad"),
])
def test_conv_transpose_unsupported_attributes(extra, match):
    rng = np.random.default_rng(0)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct", strides=[2, 2], **extra)
    model = model_of([node], (1, 2, 3, 3), {"w": rand(rng, 2, 2, 3, 3)})
    with pytest.raises(UnsupportedOpError, match=f"ConvTranspose node 'ct'.*{match}"):
        load_onnx(model)


def test_conv_transpose_3d_is_unsupported():
    rng = np.random.default_rng(0)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct3")
    with pytest.raises(UnsupportedOpError, match="ConvTranspose node 'ct3'.*2-D"):
        load_onnx(model_of([node], (1, 2, 3, 3, 3), {"w": rand(rng, 2, 2, 2, 2, 2)}))


def test_verify_conv_transpose_net(tmp_path):
    """boundflow verify on a ConvTranspose net: a bound beyond the reachable outputs holds, one
    inside them is violated with a counterexample onnxruntime confirms."""
    from boundflow.verify.verifier import verify
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(1, 2, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 1)).eval()
    path = tmp_path / "ct.onnx"
    export_onnx(net, torch.zeros(1, 1, 2, 2), path)
    lo, hi = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    _, ub = boundflow.compute_bounds(str(path), lo, hi, method="crown")
    with torch.no_grad():
        reached = net(samples(lo, hi, 200, 0).flatten(0, 1)).max().item()
    box = "".join(f"(declare-const X_{i} Real)\n" for i in range(4)) + "(declare-const Y_0 Real)\n" + \
        "".join(f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 0.5))\n" for i in range(4))
    safe, unsafe = tmp_path / "safe.vnnlib", tmp_path / "unsafe.vnnlib"
    safe.write_text(box + f"(assert (>= Y_0 {ub.item() + 0.01}))\n")
    unsafe.write_text(box + f"(assert (>= Y_0 {reached - 0.01}))\n")
    assert verify(path, safe, timeout=20).verdict == "holds"
    res = verify(path, unsafe, timeout=20)
    assert res.verdict == "violated"
    x, y = res.counterexample
    y_ort = ort_run(onnx.load(str(path)), torch.tensor(np.asarray(x, np.float32)).reshape(1, 1, 1, 2, 2))[0]
    assert y_ort.item() >= reached - 0.01 and np.all((np.asarray(x) >= 0) & (np.asarray(x) <= 0.5))
