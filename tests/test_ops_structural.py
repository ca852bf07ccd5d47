"""Linear structural ops: ConvTranspose (conv_transpose2d, ops/conv.py), and the ops that only
select, sum or copy (ops/select.py, ops/reduce.py). For each: the forward rule equals
onnxruntime on ONNX models built here (several attribute combinations, hypothesis where
natural), the backward rule is the adjoint of the forward rule, every method (IBP, CROWN-IBP,
CROWN, alpha-CROWN; float32 and sound_fp) contains sampled points of the box (corners included)
inside a small net with a ReLU after the op, the torch frontend lowers the same ops, and
attributes we do not handle are refused by name."""
from __future__ import annotations

import contextlib
import math
import os

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
from boundflow import ops
from boundflow.domains import native
from boundflow.ops import conv, gelu, linear
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



@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2),
       st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_transposed_equals_torch(c_in, c_out, sh, sw, taps, h, w, groups_or_one, dil, seed):
    """conv.transposed (stride phases as one conv2d when the stride divides the kernel, a 1x1
    conv per tap when the kernel is no larger than the stride) equals F.conv_transpose2d, in
    float64, for kernels the stride divides (taps per phase), smaller ones, and others."""
    g = torch.Generator().manual_seed(seed)
    groups = groups_or_one if seed % 3 == 0 else 1
    dilation = (dil, 1) if seed % 5 == 0 else (1, 1)
    if seed % 4 == 3:                                   # no larger than the stride
        kh, kw = 1 + seed // 4 % sh, 1 + seed // 16 % sw
    else:
        kh, kw = (sh * taps, sw * taps) if seed % 2 == 0 else (sh * taps + 1, sw)
    x = torch.randn((2 if seed % 7 else 0, c_out * groups, h, w), generator=g, dtype=torch.float64)
    weight = torch.randn((c_out * groups, c_in, kh, kw), generator=g, dtype=torch.float64)
    want = F.conv_transpose2d(x, weight, stride=(sh, sw), dilation=dilation, groups=groups)
    got = conv.transposed(x, weight, (sh, sw), dilation, groups)
    assert got.shape == want.shape
    assert torch.allclose(got, want)
    # a window of it (past the end: zeros), written into a given tensor (NaN: every entry written)
    full_h, full_w = want.shape[-2:]
    top, left = seed % (full_h + 2), seed // 7 % (full_w + 2)
    height, width = 1 + seed // 11 % (full_h + 3), 1 + seed // 13 % (full_w + 3)
    padded = F.pad(want, (0, left + width, 0, top + height))
    out = torch.full(want.shape[:2] + (height, width), math.nan, dtype=torch.float64)
    windowed = conv.transposed(x, weight, (sh, sw), dilation, groups, window=(top, left, height, width), out=out)
    assert windowed is out
    assert torch.allclose(out, padded[:, :, top:top + height, left:left + width])
    assert torch.allclose(conv.transposed(x, weight, (sh, sw), dilation, groups, window=(top, left, height, width)), out)



@pytest.mark.parametrize("c_in,c_out,k,s,h,w", [(3, 8, 4, 2, 16, 16), (2, 3, 3, 2, 5, 7), (1, 2, 6, 3, 4, 3),
                                                 (2, 2, 4, 2, 1, 1)])
def test_transposed_window_is_contiguous_and_differentiable(c_in, c_out, k, s, h, w):
    """The phases are gathered into the window in one step: a contiguous result, the values of
    torch's transposed conv cropped (one row past the end: zero), and autograd's gradient
    through it torch's too (alpha-CROWN differentiates the backward passes)."""
    g = torch.Generator().manual_seed(c_in * 100 + k)
    x = torch.randn((5, c_out, h, w), generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn((c_out, c_in, k, k), generator=g, dtype=torch.float64)
    want = F.conv_transpose2d(x, weight, stride=(s, s))
    window = (1, 2, want.shape[-2], want.shape[-1] - 3)       # a conv's padding off, a row past the end
    want = F.pad(want, (0, 0, 0, 1))[:, :, 1:, 2:-1]
    got = conv.transposed(x, weight, (s, s), window=window)
    assert got.is_contiguous() and torch.allclose(got, want)
    probe = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (grad_got,) = torch.autograd.grad((got * probe).sum(), x)
    (grad_want,) = torch.autograd.grad((want * probe).sum(), x)
    assert torch.allclose(grad_got, grad_want)


def test_a_phase_kernel_cached_in_inference_mode_serves_autograd_later():
    """The executor runs plans in inference mode, alpha-CROWN and branch and bound the same
    parameters under autograd: the cached phase kernel must be an ordinary tensor."""
    weight = torch.randn(3, 2, 4, 4)
    x = torch.randn(1, 3, 5, 5)
    with torch.inference_mode():
        conv.transposed(x, weight, (2, 2))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(conv.transposed(x, weight, (2, 2)).sum(), x)
    assert torch.allclose(grad, torch.autograd.grad(F.conv_transpose2d(x, weight, stride=(2, 2)).sum(), x)[0])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(64, 300), st.floats(0, 1), st.integers(0, 2**16))
def test_linear_backward_drops_dead_columns(batch, rows, n_out, dead, seed):
    """linear's backward rule skips the columns of A that are zero in every row (large products
    only): the result equals the full product, whichever share of columns is dead."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((batch, rows, n_out), generator=g, dtype=torch.float64)
    a[..., torch.rand(n_out, generator=g) < dead] = 0
    w = torch.randn((n_out, 500), generator=g, dtype=torch.float64)
    b = torch.randn(n_out, generator=g, dtype=torch.float64)
    got, bias = linear.backward([a, torch.ones(batch, rows, dtype=torch.float64)], [w, b], {})
    assert torch.allclose(got, a @ w)
    assert torch.allclose(bias, 1 + a @ b)

@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3),
       st.lists(st.integers(0, 2), min_size=4, max_size=4), st.integers(3, 9), st.integers(0, 2**16))
def test_conv_backward_is_the_adjoint(c_in, c_out, kh, kw, stride, pads, size, seed):
    """<backward(a), x> = <a, conv2d(x)> for strides, asymmetric pads and inputs the strided
    windows do not reach to the end (their rows of A x are zero)."""
    assume(size + pads[0] + pads[2] >= kh and size + pads[1] + pads[3] >= kw)
    g = torch.Generator().manual_seed(seed)
    attrs = {"stride": [stride, stride], "padding": pads, "dilation": [1, 1], "groups": 1,
             "in_shape": [1, c_in, size, size + 1]}
    w = torch.randn((c_out, c_in, kh, kw), generator=g, dtype=torch.float64)
    x = torch.randn((1, c_in, size, size + 1), generator=g, dtype=torch.float64)
    y = conv.conv2d(x, w, None, attrs)
    a = torch.randn((1, 2) + tuple(y.shape[1:]), generator=g, dtype=torch.float64)
    ax, _ = conv.backward([a, torch.zeros(1, 2, dtype=torch.float64)], [w, None], attrs)
    assert ax.shape == (1, 2) + tuple(x.shape[1:])
    assert torch.allclose((ax * x.unsqueeze(1)).flatten(2).sum(-1), (a * y.unsqueeze(1)).flatten(2).sum(-1))

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


def test_conv_transpose_torch_frontend():
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(4, 2, (2, 3), stride=(1, 2), dilation=(2, 1), groups=2, bias=False),
                        nn.ReLU(), nn.Flatten(), nn.Linear(108, 2))
    graph = assert_torch_lowering(net, (1, 2, 2, 2), eps=0.2)
    assert [n.op for n in graph.nodes].count("conv_transpose2d") == 2


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


# -- selections and sums: forward = onnxruntime ------------------------------------------------------

def ints(*v):
    return np.array(v, dtype=np.int64)


def node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


# (id, nodes, input shape, initializers, opset, outputs, primal ops wanted)
FORWARD_CASES = [
    ("reduce_sum_axes_input", [node("ReduceSum", ["x", "ax"], keepdims=0)], (1, 3, 4, 2), {"ax": ints(1, -1)}, 13,
     ("y",), {"reduce_sum"}),
    ("reduce_sum_all", [node("ReduceSum", ["x"])], (1, 3, 4), {}, 13, ("y",), {"reduce_sum"}),
    ("reduce_sum_noop", [node("ReduceSum", ["x"], noop_with_empty_axes=1)], (1, 3), {}, 13, ("y",), set()),
    ("reduce_sum_attr", [node("ReduceSum", ["x"], axes=[2], keepdims=1)], (1, 3, 4), {}, 11, ("y",), {"reduce_sum"}),
    ("reduce_mean_attr", [node("ReduceMean", ["x"], axes=[2, 3])], (1, 3, 4, 5), {}, 17, ("y",), {"reduce_sum", "affine"}),
    ("reduce_mean_input", [node("ReduceMean", ["x", "ax"], keepdims=0)], (1, 3, 4), {"ax": ints(-2)}, 18, ("y",),
     {"reduce_sum", "affine"}),
    ("reduce_max_attr", [node("ReduceMax", ["x"], axes=[1, -1], keepdims=0)], (1, 3, 4, 2), {}, 13, ("y",),
     {"transpose", "reshape", "maxpool2d"}),
    ("reduce_min_all", [node("ReduceMin", ["x"])], (1, 3, 4), {}, 13, ("y",), {"affine", "reshape", "maxpool2d"}),
    ("reduce_max_input", [node("ReduceMax", ["x", "ax"], keepdims=1)], (1, 3, 4), {"ax": ints(-2)}, 18, ("y",),
     {"transpose", "reshape", "maxpool2d"}),
    ("slice_negative_step", [node("Slice", ["x", "s", "e", "a", "t"])], (1, 3, 5, 6),
     {"s": ints(-1, 1), "e": ints(-100, 5), "a": ints(3, 2), "t": ints(-2, 3)}, 13, ("y",), {"select"}),
    ("slice_clamped", [node("Slice", ["x", "s", "e"])], (1, 3, 5), {"s": ints(0, 1), "e": ints(9, 2**62)}, 13,
     ("y",), {"select"}),
    ("slice_attrs", [node("Slice", ["x"], starts=[1], ends=[-1], axes=[2])], (1, 3, 5), {}, 9, ("y",), {"select"}),
    ("gather_scalar", [node("Gather", ["x", "i"], axis=1)], (1, 3, 4), {"i": np.array(-2, np.int64)}, 13, ("y",),
     {"select", "reshape"}),
    ("gather_repeats", [node("Gather", ["x", "i"], axis=2)], (1, 3, 4), {"i": ints(3, 0, 3)}, 13, ("y",), {"gather"}),
    ("gather_2d", [node("Gather", ["x", "i"], axis=-1)], (1, 2, 4), {"i": ints(1, 0, 2, 3).reshape(2, 2)}, 13, ("y",),
     {"select", "reshape"}),
    ("split_input", [node("Split", ["x", "sp"], ["y", "z"], axis=1)], (1, 3, 4), {"sp": ints(1, 2)}, 13,
     ("y", "z"), {"select"}),
    ("split_attr", [node("Split", ["x"], ["y", "z"], axis=-1, split=[3, 1])], (1, 3, 4), {}, 11, ("y", "z"), {"select"}),
    ("split_equal", [node("Split", ["x"], ["y", "z", "w"], axis=2, num_outputs=3)], (1, 2, 7), {}, 18, ("y", "z", "w"),
     {"select"}),
    ("pad_value", [node("Pad", ["x", "p", "v"])], (1, 2, 3, 3), {"p": ints(0, 1, 1, 0, 0, 0, 2, -1),
                                                                 "v": np.float32(0.5)}, 13, ("y",), {"select", "affine"}),
    ("pad_reflect", [node("Pad", ["x", "p"], mode="reflect")], (1, 2, 3, 4), {"p": ints(0, 0, 2, 3, 0, 0, 1, 0)}, 13,
     ("y",), {"gather"}),
    ("pad_edge_axes", [node("Pad", ["x", "p", "", "a"], mode="edge")], (1, 2, 3, 4),
     {"p": ints(2, 1, 0, 3), "a": ints(-1, 1)}, 18, ("y",), {"gather"}),
    ("pad_wrap", [node("Pad", ["x", "p"], mode="wrap")], (1, 2, 3), {"p": ints(0, 0, 2, 0, 0, 4)}, 19, ("y",), {"gather"}),
    ("pad_opset9", [node("Pad", ["x"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=-1.0)], (1, 2, 3, 3), {}, 9, ("y",),
     {"select", "affine"}),
    ("expand", [node("Expand", ["x", "s"])], (1, 1, 3), {"s": ints(2, 4, 1)}, 13, ("y",), {"gather"}),
    ("expand_rank", [node("Expand", ["x", "s"])], (1, 3), {"s": ints(2, 1, 1)}, 13, ("y",), {"gather", "reshape"}),
    ("tile", [node("Tile", ["x", "r"])], (1, 2, 3), {"r": ints(1, 2, 3)}, 13, ("y",), {"gather"}),
    ("resize_asymmetric_floor", [node("Resize", ["x", "", "sc"], coordinate_transformation_mode="asymmetric",
                                      nearest_mode="floor")], (1, 2, 3, 3), {"sc": np.array([1, 1, 2, 3], np.float32)},
     13, ("y",), {"gather"}),
    ("resize_half_pixel", [node("Resize", ["x", "", "sc"], mode="nearest")], (1, 2, 3, 2),
     {"sc": np.array([1, 1, 3, 2], np.float32)}, 13, ("y",), {"gather"}),
    ("resize_sizes_ceil", [node("Resize", ["x", "", "", "sz"], mode="nearest", nearest_mode="round_prefer_ceil",
                                coordinate_transformation_mode="pytorch_half_pixel")], (1, 2, 3, 2),
     {"sz": ints(1, 2, 6, 8)}, 13, ("y",), {"gather"}),
    ("resize_opset10", [node("Resize", ["x", "sc"], mode="nearest")], (1, 1, 2, 3),
     {"sc": np.array([1, 1, 2, 2], np.float32)}, 10, ("y",), {"gather"}),
    ("upsample_opset9", [node("Upsample", ["x", "sc"], mode="nearest")], (1, 1, 2, 3),
     {"sc": np.array([1, 1, 3, 2], np.float32)}, 9, ("y",), {"gather"}),
    ("cast_double", [node("Cast", ["x"], ["c"], to=TensorProto.DOUBLE), node("Cast", ["c"], to=TensorProto.FLOAT)],
     (1, 3), {}, 13, ("y",), set()),
]


@pytest.mark.parametrize("nodes,in_shape,inits,opset,outputs,want", [c[1:] for c in FORWARD_CASES],
                         ids=[c[0] for c in FORWARD_CASES])
def test_forward_equals_onnxruntime(nodes, in_shape, inits, opset, outputs, want):
    if outputs == ("y",) and not want:      # an identity: a graph output must be computed by a node
        nodes = nodes + [node("Relu", ["y"], ["r"])]
        outputs = ("r",)
        want = {"relu"}
    graph = assert_forward_equals_ort(model_of(nodes, in_shape, inits, opset, outputs))
    assert {n.op for n in graph.nodes} == want


# -- selections and sums: the rules ------------------------------------------------------------------

@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 5), st.lists(st.integers(-1, 4), min_size=1, max_size=7), st.integers(0, 2), st.integers(0, 2**16))
def test_select_backward_is_the_adjoint(n, index, axis, seed):
    """<backward(a), x> = <a, forward(x)> for any index list (repeats and zeros included)."""
    from boundflow.ops import select
    index = [i if i < n else -1 for i in index]
    g = torch.Generator().manual_seed(seed)
    in_shape = [2, 3, 2]
    in_shape[axis] = n
    x = torch.randn([1] + in_shape, generator=g, dtype=torch.float64)
    attrs = {"axis": axis, "index": tuple(index), "in_shape": in_shape}
    y = select.forward(x, attrs)
    a = torch.randn((1, 3) + tuple(y.shape[1:]), generator=g, dtype=torch.float64)
    ax, _ = select.backward([a, torch.zeros(1, 3, dtype=torch.float64)], [], attrs)
    assert torch.allclose((ax * x.unsqueeze(1)).flatten(2).sum(-1), (a * y.unsqueeze(1)).flatten(2).sum(-1))
    s = torch.stack((x - 1, x + 1))
    assert torch.equal(select.interval([s], [], attrs)[0], torch.stack([select.forward(t, attrs) for t in s]))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sets(st.integers(0, 2), min_size=1), st.booleans(), st.integers(0, 2**16))
def test_reduce_sum_backward_is_the_adjoint(axes, keepdims, seed):
    from boundflow.ops import reduce
    g = torch.Generator().manual_seed(seed)
    attrs = {"axes": tuple(sorted(axes)), "keepdims": keepdims, "in_shape": [2, 3, 4]}
    x = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    y = reduce.forward(x, attrs)
    a = torch.randn((1, 3) + tuple(y.shape[1:]), generator=g, dtype=torch.float64)
    ax, _ = reduce.backward([a, torch.zeros(1, 3, dtype=torch.float64)], [], attrs)
    assert torch.allclose((ax * x.unsqueeze(1)).reshape(1, 3, -1).sum(-1), (a * y.unsqueeze(1)).reshape(1, 3, -1).sum(-1))


# -- selections and sums: every method is sound in small nets with ReLUs -----------------------------

def conv_front(rng, c_in=2, c_out=3):
    """x -> Conv 2x2 (a mixing layer, so that the ReLUs after the op under test are unstable)."""
    return [node("Conv", ["x", "cw", "cb"], ["c"])], {"cw": rand(rng, c_out, c_in, 2, 2), "cb": rand(rng, c_out)}


SOUND_CASES = {
    # Conv -> Pad(0.5) -> Relu -> Slice(negative steps) -> Gather(repeats) -> Relu -> ReduceMean -> head
    "pad_slice_gather_mean": lambda rng: (
        [node("Pad", ["c", "p", "v"], ["p1"]), node("Relu", ["p1"], ["r1"]),
         node("Slice", ["r1", "s", "e", "a", "st"], ["s1"]), node("Gather", ["s1", "gi"], ["g1"], axis=1),
         node("Sigmoid", ["g1"], ["q"]), node("ReduceMean", ["q", "ax"], ["t"], keepdims=0)],
        {"p": ints(0, 0, 1, 0, 0, 0, 0, 2), "v": np.float32(0.5), "s": ints(-1, 0), "e": ints(-100, 9),
         "a": ints(3, 2), "st": ints(-1, 2), "gi": ints(2, 0, 2), "ax": ints(2)}, 18),
    # Conv -> Pad(reflect) -> Split -> Add of the parts -> Relu -> ReduceSum -> head
    "reflect_split_sum": lambda rng: (
        [node("Pad", ["c", "p"], ["p1"], mode="reflect"), node("Split", ["p1", "sp"], ["u", "w"], axis=3),
         node("Add", ["u", "w"], ["a1"]), node("Relu", ["a1"], ["r1"]), node("ReduceSum", ["r1", "ax"], ["t"])],
        {"p": ints(0, 0, 1, 1, 0, 0, 0, 0), "sp": ints(2, 2), "ax": ints(1)}, 13),
    # Conv -> Resize(nearest) -> Relu -> Tile -> Expand -> Relu -> head
    "resize_tile_expand": lambda rng: (
        [node("Resize", ["c", "", "sc"], ["z"], mode="nearest"), node("Relu", ["z"], ["r1"]),
         node("Tile", ["r1", "rep"], ["t1"]), node("Mul", ["t1", "m"], ["t2"]), node("ReduceSum", ["t2", "ax"], ["s2"], keepdims=1),
         node("Expand", ["s2", "sh"], ["t"])],
        {"sc": np.array([1, 1, 2, 2], np.float32), "rep": ints(1, 2, 1, 1), "m": rand(rng, 1, 6, 1, 6),
         "ax": ints(2), "sh": ints(1, 6, 3, 6)}, 13),
    # Conv -> ReduceMax over the channels -> Relu -> ReduceMin over a row, broadcast back by Add
    "reduce_max_min": lambda rng: (
        [node("ReduceMax", ["c", "ax1"], ["m1"]), node("Relu", ["m1"], ["r1"]),
         node("ReduceMin", ["r1", "ax"], ["m2"], keepdims=1), node("Add", ["r1", "m2"], ["t"])],
        {"ax1": ints(1), "ax": ints(-1)}, 18),
}


@pytest.mark.parametrize("name", sorted(SOUND_CASES))
def test_structural_nets_are_sound(name):
    rng = np.random.default_rng(5)
    front, front_inits = conv_front(rng)
    nodes, inits, opset = SOUND_CASES[name](rng)
    in_shape = (1, 2, 4, 4)
    probe = model_of(front + nodes, in_shape, {**front_inits, **inits}, opset, ("t",))
    numel = int(np.prod([d.dim_value for d in probe.graph.output[0].type.tensor_type.shape.dim]))
    head, head_inits = relu_head("t", 3, rng, numel)
    model = model_of(front + nodes + head, in_shape, {**front_inits, **inits, **head_inits}, opset)
    assert_forward_equals_ort(model)
    assert_onnx_sound(model, eps=0.3)


# -- selections and sums: the torch frontend ---------------------------------------------------------

class SliceMix(nn.Module):
    """reflect pad, fancy indexing, strided and negative slices, flip, repeat, sum."""
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 2), nn.Linear(9, 2)

    def forward(self, x):
        h = torch.relu(F.pad(self.conv(x), (1, 0, 0, 1), mode="reflect"))
        h = torch.flip(h[:, [2, 0, 2], ::2, -3:], [3]).repeat(1, 1, 2, 1)
        return self.fc(torch.relu(h).sum(2).flatten(1) - 0.5)


class ResizeMix(nn.Module):
    """nearest upsampling (plain and exact), replicate and valued constant pads, split, select,
    mean, expand."""
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 2, 2), nn.Linear(12, 2)

    def forward(self, x):
        h = F.interpolate(self.conv(x), scale_factor=2, mode="nearest")
        h = F.pad(torch.relu(F.interpolate(h, scale_factor=(1, 2), mode="nearest-exact")), (0, 2, 1, 0), value=0.5)
        h = F.pad(h, (1, 1, 0, 0), mode="replicate")
        a, b = torch.split(h, [1, 1], dim=1)
        h = torch.relu(a + b - 1.0)[:, 0].mean(-1, keepdim=True)            # [1, 5, 1]
        return self.fc(torch.cat([h.expand(-1, 5, 2).flatten(1), h[:, :2, 0]], 1))


class ExtremeMix(nn.Module):
    """amax / amin, max / min along a dim, and sums of variables that broadcast."""
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)                                                    # [1, 3, 2, 2]
        a = torch.relu(h.amax(1)) + h.min(dim=3, keepdim=True)[0].amin((1,))  # [1, 2, 2] + [1, 2, 1]
        return self.fc(torch.relu(a - torch.max(h, 1)[0].amin(-1, keepdim=True)).flatten(1))


@pytest.mark.parametrize("module", [SliceMix, ResizeMix, ExtremeMix])
def test_torch_frontend_structural(module):
    torch.manual_seed(0)
    graph = assert_torch_lowering(module(), (1, 2, 3, 3))
    assert {"select", "gather", "reduce_sum", "maxpool2d"} & {n.op for n in graph.nodes}


# -- refused, by name ---------------------------------------------------------------------------------

@pytest.mark.parametrize("nodes,inits,opset,match", [
    ([node("Resize", ["x", "", "sc"], name="r", mode="linear")], {"sc": np.array([1, 1, 2, 2], np.float32)}, 13,
     "Resize node 'r'.*mode 'linear'"),
    ([node("Resize", ["x", "", "sc"], name="r", mode="nearest")], {"sc": np.array([1, 1, 1.5, 2], np.float32)}, 13,
     "Resize node 'r'.*integer"),
    ([node("Resize", ["x", "", "sc"], name="r", coordinate_transformation_mode="align_corners")],
     {"sc": np.array([1, 1, 2, 2], np.float32)}, 13, "Resize node 'r'.*align_corners"),
    ([node("Cast", ["x"], ["h"], name="c", to=TensorProto.FLOAT16), node("Cast", ["h"], to=TensorProto.FLOAT)], {}, 13,
     "Cast node 'c'.*FLOAT16"),
    ([node("Pad", ["x", "p"], name="p", mode="reflect")], {"p": ints(0, 0, 0, 3, 0, 0, 0, 0)}, 13,
     "Pad node 'p'.*reflect padding by 3"),
    ([node("Shape", ["x"], ["s"]), node("Gather", ["x", "s"], name="g", axis=1)], {}, 13, None),
])
def test_unsupported_attributes_are_refused(nodes, inits, opset, match):
    model = model_of(nodes, (1, 2, 3, 3), inits, opset)
    with pytest.raises(UnsupportedOpError, match=match or "Gather node 'g'.*out of range"):
        load_onnx(model)


@pytest.mark.parametrize("fn,match", [
    (lambda x: x.half().float(), "float16"),
    (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), "upsample_bilinear2d"),
    (lambda x: F.pad(x, (1, 1, 0, 0), mode="circular"), "not supported"),
])
def test_torch_unsupported(fn, match):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)
    with pytest.raises(UnsupportedOpError, match=match):
        load_torch(M(), torch.randn(1, 2, 3, 3))


def test_conv_transpose_dense_start_on_a_leading_axis():
    """A biased ConvTranspose on [N > 1, C, H, W] refined by CROWN from its dense matrix (the
    fuzzer's find: the bias must cover every leading entry)."""
    rng = np.random.default_rng(2)
    nodes = [node("Relu", ["x"], ["r"]), node("ConvTranspose", ["r", "w", "b"], ["t"], strides=[2, 1])]
    head, head_inits = relu_head("t", 1, rng, 9)
    model = model_of(nodes + head, (2, 1, 5, 1), {"w": rand(rng, 1, 1, 1, 1), "b": rand(rng, 1), **head_inits})
    assert_onnx_sound(model, eps=0.5, methods=("crown",))



def _interval_forms(onnx_node, inits: dict, in_shape, fn, batch: int, seed: int):
    """The IBP kernel of the one-node model `onnx_node` (weights `inits`, input "x" of
    [1, *in_shape]) with all its float32 params (the batch-1 form, where the layer gets one) and
    with only the general ones, on a random box of `batch` regions; and fn (the layer in
    float64) at 64 points of the box, corners among them."""
    g = torch.Generator().manual_seed(seed)
    graph = load_onnx(model_of([onnx_node], (1,) + in_shape, {k: v.numpy() for k, v in inits.items()}))
    (node,) = [n for n in graph.nodes if n.op in ("linear", "conv2d", "conv_transpose2d")]
    op = ops.get(node.op)
    ps = op.interval_params(graph, node, torch.float32)
    lo = torch.randn((batch, 1) + in_shape, generator=g)
    hi = lo + torch.rand((batch, 1) + in_shape, generator=g) * torch.rand(1, generator=g)
    general = 2 if node.op == "linear" else 3
    with _torch_forms():
        both = [op.interval([torch.stack((lo, hi))], p, node.attrs)[0] for p in (ps, ps[:general])]
    t = torch.rand((64, batch, 1) + in_shape, generator=g, dtype=torch.float64)
    t[:4] = (torch.arange(4, dtype=torch.float64) % 2).view(4, *[1] * (t.dim() - 1))     # two corners
    ys = fn((lo.double() + t * (hi - lo).double()).flatten(0, 2)).reshape((64,) + tuple(both[1].shape[1:]))
    forms = ps[general + 1:] if node.op == "linear" else ps[general:]     # (linear's ps[2]: W for the loop)
    form = None if not forms else (
        "lu" if forms[0].dim() == 2 else "lu_conv" if forms[0].shape[1] == 2 * ps[0].shape[1] else "pair")
    return form, both, ys


@contextlib.contextmanager
def _torch_forms():
    """The rules keep to their torch forms (the compiled loops of domains/native.py step
    aside, as where numba is not installed or on a GPU)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "dense_interval_run", lambda *args: None)
        mp.setattr(native, "elementwise_run", lambda *args: None)
        yield


def _holds(bounds: torch.Tensor, ys: torch.Tensor, tol: torch.Tensor) -> bool:
    return bool(torch.all(ys >= bounds[0] - tol[0]) and torch.all(ys <= bounds[1] + tol[1]))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 3), st.integers(0, 2**16))
def test_linear_interval_forms_agree_and_hold(n_in, n_out, batch, seed):
    """Small layers of float32 plans also get the (l, u) form, used at batch 1 where the
    compiled loop is not, and the loop takes float32 CPU boxes of one or a few rows: the same
    bounds as the centre/radius form up to float32 rounding, and all hold at points of the box."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn((n_in, n_out), generator=g), torch.randn(n_out, generator=g)
    form, (fast, general), ys = _interval_forms(node("Gemm", ["x", "w", "b"]), {"w": w, "b": b}, (n_in,),
                                                lambda x: x @ w.double() + b.double(), batch, seed)
    assert form == ("lu" if n_in * n_out <= linear.LU_FORM_MAX else None)
    loop = native.dense_interval_run(w.t().contiguous(), b, torch.zeros(2, batch, 1, n_in), None)
    assert (loop is None) == (batch > 1 and batch * n_in * n_out > native.ROWS_MAX_MACS)
    tol = 1e-5 * (1 + general.abs().amax()) * torch.ones_like(general)
    assert torch.all((fast - general).abs() <= tol)
    assert _holds(fast, ys, tol) and _holds(general, ys, tol)


def _gemm_params(n_in: int, n_out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn((n_out, n_in), generator=g), torch.randn(n_out, generator=g)
    graph = load_onnx(model_of([node("Gemm", ["x", "w", "b"], transB=1)], (1, n_in), {"w": w.numpy(), "b": b.numpy()}))
    (gemm,) = graph.nodes
    return linear.LINEAR.interval_params(graph, gemm, torch.float32), g


@pytest.mark.parametrize("rows, n_in, n_out", [(1, 300, 200), (1, 784, 256), (3, 100, 60), (1, 9, 1), (2, 33, 5),
                                              (1, 256, 10), (3, 17, 7)])
def test_linear_compiled_loop_bound_once_reads_each_run(rows, n_in, n_out):
    """The compiled loop (numba, a dependency) bound once to a planned destination, as in the
    executor, computes each run from that run's values: what the centre/radius form gives on
    them, up to float32 rounding, and bounds that hold at the box's corners (outputs in blocks
    of four and the rest)."""
    assert native.available()
    ps, g = _gemm_params(n_in, n_out, 3)
    s, dest = torch.zeros(2, rows, n_in), torch.empty(2, rows, n_out)
    assert native.dense_interval_run(ps[2], ps[1][0, 0], s, dest) is not None
    run = linear.interval.bind([s], ps, {}, (dest,))
    for _ in range(2):
        lo = torch.randn(rows, n_in, generator=g)
        s.copy_(torch.stack((lo, lo + torch.rand(rows, n_in, generator=g))))
        (got,) = run()
        assert got is dest
        with _torch_forms():
            (want,) = linear.interval([s.clone()], ps[:2], {})
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
        w, b = ps[2].double(), ps[1][0, 0].double()
        corner = torch.where(torch.rand(rows, n_in, generator=g) < 0.5, s[0], s[1]).double()
        y = (corner @ w.t() + b).float()
        assert torch.all(got[0] <= y + 1e-4) and torch.all(y <= got[1] + 1e-4)
    (fresh,) = linear.interval([s], ps, {})
    assert fresh is not dest and torch.equal(fresh, dest)


def test_linear_compiled_loop_without_a_cache_directory():
    """Where numba finds no writable cache directory (a read-only install, no home), the loop
    is compiled in the process instead, and computes the same bounds."""
    import subprocess
    import sys

    code = ("import torch\nfrom boundflow.domains import native\n"
            "w, b = torch.randn(3, 4), torch.randn(3)\n"
            "s = torch.randn(2, 1, 4).sort(0).values\n"
            "(got,) = native.dense_interval_run(w, b, s, None)()\n"
            "c, r = (s[0] + s[1]) / 2, (s[1] - s[0]) / 2\n"
            "mid, rad = c @ w.t() + b, r @ w.abs().t()\n"
            "assert torch.allclose(got, torch.stack((mid - rad, mid + rad)), atol=1e-5)\n"
            "print(native._compiled(native._dense_interval, native.SUMS)._cache.__class__.__name__)\n")
    # (a locator class that finds nothing for a .py file: numba then has no cache directory)
    env = dict(os.environ, NUMBA_CACHE_LOCATOR_CLASSES="numba.core.caching.ZipCacheLocator")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "NullCache"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 9), st.integers(0, 2**16))
def test_spec_linear_loop_agrees_and_holds(n_in, n_out, n_spec, seed):
    """C folded into a last linear layer (IBP's spec_linear): the compiled loop for one region
    gives the torch form's bounds up to float32 rounding, and both hold at points of the box
    (corners among them)."""
    from boundflow.domains import interval

    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn((n_out, n_in), generator=g), torch.randn(n_out, generator=g)
    C = torch.randn((1, n_spec, n_out), generator=g)
    lo = torch.randn((1, 1, n_in), generator=g)
    s = torch.stack((lo, lo + torch.rand((1, 1, n_in), generator=g)))
    assert native.spec_interval_run(C[0], w, b, s.flatten(2), None) is not None
    (loop,) = interval.spec_linear([s, C], [w, b], {})
    with _torch_forms(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "spec_interval_run", lambda *args: None)
        (torch_form,) = interval.spec_linear([s, C], [w, b], {})
    tol = 1e-5 * (1 + torch_form.abs().amax())
    assert torch.all((loop - torch_form).abs() <= tol)
    t = torch.rand((64, n_in), generator=g, dtype=torch.float64)
    t[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1)
    x = s[0, 0, 0].double() + t * (s[1, 0, 0] - s[0, 0, 0]).double()
    ys = (x @ w.double().t() + b.double()) @ C[0].double().t()
    assert torch.all(ys >= loop[0, 0].double() - tol) and torch.all(ys <= loop[1, 0].double() + tol)


def test_linear_compiled_loop_steps_aside():
    """Where the loop cannot serve (autograd, float64, more rows than ROWS_MAX_MACS allows)
    the rule takes its torch forms, which still bound the layer; a strided box is copied per
    run, the same bits as a contiguous one (the executor's arena run and its functional run
    agree bit for bit)."""
    ps, g = _gemm_params(100, 60, 4)
    w, b = ps[2], ps[1][0, 0]
    box = torch.randn(2, 1, 100, generator=g).sort(0).values
    for s in (box.clone().requires_grad_(True), box.double(), box.expand(2, 64, 100).contiguous()):
        assert native.dense_interval_run(w.to(s.dtype), b.to(s.dtype), s, None) is None
        (got,) = linear.interval([s], [p.to(s.dtype) for p in ps], {})
        with _torch_forms():
            (want,) = linear.interval([s], [p.to(s.dtype) for p in ps], {})
        assert torch.equal(got, want) and got.requires_grad == s.requires_grad
    strided = torch.stack((box[0], box[1]), -1).movedim(-1, 0)
    assert not strided.is_contiguous()
    (got,) = linear.interval([strided], ps, {})
    (want,) = linear.interval([box], ps, {})
    assert torch.equal(got, want)


ELEMENTWISE = [("sin", {}), ("cos", {}), ("exp", {}), ("log", {}), ("reciprocal", {}), ("sqrt", {}),
               ("softplus", {}), ("gelu", {}), ("gelu", {"approximate": "tanh"})] + \
    [("pow", {"exponent": p}) for p in (2.0, 3.0, 4.0, -1.0, -2.0, 0.5, 1.5, -0.5, 0.3)]


def _elementwise(name: str, attrs: dict, ins: list, fell_back: list):
    """(the rule's result or the DomainError it raises, with the compiled loop; the same
    with the torch rule), each also through a planned destination bound once; fell_back
    collects a True per run the loop left to the torch rule."""
    real = native.elementwise_run

    def spied(loop, ins, dest, fallback, *args):
        def torch_rule():
            fell_back.append(True)
            return fallback()
        return real(loop, ins, dest, torch_rule, *args)

    def outcome(bound_to):
        try:
            kernel = ops.get(name).interval
            return kernel([t.clone() for t in ins], [], attrs) if bound_to is None else \
                kernel.bind([t.clone() for t in ins], [], attrs, (bound_to,))()
        except boundflow.errors.DomainError as e:
            return str(e)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "elementwise_run", spied)
        got = outcome(None), outcome(torch.full_like(ins[0], math.nan))
    with _torch_forms():
        want = outcome(None), outcome(torch.full_like(ins[0], math.nan))
    return got, want


def _same(got, want) -> bool:
    """The same error, or the same bounds up to an ulp of f (torch's library functions round
    an element by where it falls in a vectorised loop, which the rules' shapes move)."""
    if isinstance(got, str) or isinstance(want, str):
        return got == want
    return torch.allclose(got[0], want[0], rtol=3e-7, atol=1e-37)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.sampled_from(ELEMENTWISE + [("mul", {})]), st.integers(1, 40), st.sampled_from([1e-3, 0.3, 3.0, 40.0]),
       st.sampled_from([0.0, 1e-6, 0.5, 4.0, 20.0]), st.integers(0, 2**16))
def test_elementwise_loops_agree_with_the_torch_rules(op, n, scale, width, seed):
    """The elementwise rules' compiled loop (float32 CPU boxes; native.py) gives the torch
    rule's bounds, also bound once to a planned destination, and where it meets
    an interval outside the domain or a value that overflows, the same DomainError. Boxes
    from tiny to wide, points, ends at multiples of pi / 2 (sin and cos's peaks)."""
    name, attrs = op
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(1, n, generator=g) * scale
    if name in ("sin", "cos"):                          # some ends at multiples of pi / 2
        peaks = (torch.randint(-40, 40, (1, n), generator=g) * (math.pi / 2)).float()
        lo = torch.where(torch.rand(1, n, generator=g) < 0.3, peaks, lo)
    if name == "gelu":                                  # some ends at its minimum
        m = torch.tensor(gelu.SHAPES[attrs.get("approximate", "none")].m).float().expand(1, n)
        lo = torch.where(torch.rand(1, n, generator=g) < 0.3, m, lo)
    hi = lo + torch.rand(1, n, generator=g) * width
    hi = torch.where(torch.rand(1, n, generator=g) < 0.2, lo, hi)                     # points
    box = torch.stack((lo, hi))
    ins = [box] if name != "mul" else [box, torch.stack((lo.flip(1), hi.flip(1))) - 0.5]
    assert native.elementwise_run(native._product_range if name == "mul" else native._curve_range, tuple(ins),
                                  None, None) is not None
    fell_back = []
    got, want = _elementwise(name, attrs, ins, fell_back)
    for a, b in zip(got, want):
        assert _same(a, b), (a, b)
    assert len(fell_back) == (2 if isinstance(want[0], str) else 0)    # the loop took every box in the domain


@pytest.mark.parametrize("name, attrs, lo, hi, falls", [
    ("log", {}, [0.5, -1.0], [2.0, 1.0], True), ("log", {}, [0.0], [1.0], True),
    ("sqrt", {}, [-2.0, 1.0], [-1.0, 4.0], True), ("sqrt", {}, [-2.0], [3.0], False),
    ("reciprocal", {}, [1.0, -1.0], [2.0, 1.0], True), ("reciprocal", {}, [0.0], [1.0], True),
    ("pow", {"exponent": -2.0}, [-1.0], [0.0], True), ("pow", {"exponent": 0.5}, [-3.0], [-1.0], True),
    ("exp", {}, [1.0, 80.0], [2.0, 100.0], True), ("pow", {"exponent": 3.0}, [1.0], [1e20], True),
    ("sin", {}, [0.0, math.nan], [1.0, 2.0], True), ("exp", {}, [math.nan], [1.0], True),
    ("exp", {}, [-math.inf], [0.0], False), ("cos", {}, [-math.inf], [0.0], True),
    ("sin", {}, [3e38], [3.4e38], False), ("mul", {}, [1e30, -1.0], [1e30, 1.0], True),
    ("mul", {}, [math.nan], [1.0], True), ("mul", {}, [0.0], [math.inf], True),
    ("gelu", {}, [math.nan, 0.0], [1.0, 1.0], True), ("gelu", {}, [-1.0], [math.inf], True),
])
def test_elementwise_loops_leave_the_rest_to_the_torch_rules(name, attrs, lo, hi, falls):
    """Intervals outside the domain, values that overflow, NaN and infinite bounds: the loop
    returns and the torch rule gives the result or the error (the same as without the loop);
    a lower end below sqrt's closed domain (raised to 0), exp of -inf (0) and huge finite sin
    intervals stay with the loop."""
    box = torch.tensor([lo, hi]).unsqueeze(1)
    fell_back = []
    got, want = _elementwise(name, attrs, [box] * (2 if name == "mul" else 1), fell_back)
    assert fell_back == [True, True] * falls
    for a, b in zip(got, want):
        assert type(a) is type(b)
        assert a == b if isinstance(a, str) else torch.equal(a[0].nan_to_num(), b[0].nan_to_num())


def test_elementwise_loops_step_aside():
    """Autograd, float64 (sound_fp plans), strided boxes and broadcast products keep the torch
    rules."""
    box = torch.tensor([[-1.0, 0.5, 2.0], [0.5, 0.7, 3.0]]).unsqueeze(1)
    strided = torch.stack((box[0], box[1]), -1).movedim(-1, 0)
    for s in (box.clone().requires_grad_(True), box.double(), strided):
        assert native.elementwise_run(native._periodic_range, (s,), None, None) is None
    assert native.elementwise_run(native._product_range, (box, box[:, :, :1]), None, None) is None
    assert native.elementwise_run(native._product_range, (box, box), torch.empty(2, 3, 1), None) is None
    (got,) = ops.get("sin").interval([box.requires_grad_(True)], [], {})
    assert got.requires_grad


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(3, 5), st.integers(1, 2), st.integers(1, 2),
       st.integers(1, 3), st.sampled_from([(15, 16), (7, 8)]), st.integers(0, 2**16))
def test_conv_interval_forms_agree_and_hold(c_in, c_out, k, stride, groups, batch, size, seed):
    """Convs with one group and at most LU_CONV_MAX_MACS get the lu conv (stack(l, u) as one
    image of twice the channels through [[W+, W-], [W-, W+]]), other small ones the lu form
    (their dense matrix), else with kernels of PAIR_MIN_KERNEL or more the pair form (one conv
    of twice the groups over stacked centre and radius); each used at batch 1: the same bounds
    as two convs up to float32 rounding, and both hold at points of the box."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((c_out * groups, c_in, k, k), generator=g)
    b = torch.randn(c_out * groups, generator=g)
    attrs = dict(strides=[stride, stride], pads=[1, 0, 1, 2], group=groups)
    fn = lambda x: F.conv2d(F.pad(x, (0, 2, 1, 1)), w.double(), b.double(), stride, groups=groups)   # noqa: E731
    form, (fast, general), ys = _interval_forms(node("Conv", ["x", "w", "b"], **attrs), {"w": w, "b": b},
                                                (c_in * groups,) + size, fn, batch, seed)
    n_in, n_out = c_in * groups * math.prod(size), math.prod(fn(torch.zeros((1, c_in * groups) + size, dtype=torch.float64)).shape)
    expected = ("lu_conv" if groups == 1 and n_out * c_in * k * k <= conv.LU_CONV_MAX_MACS else
                "lu" if n_in * n_out <= conv.LU_FORM_MAX else "pair" if k >= conv.PAIR_MIN_KERNEL else None)
    assert form == expected
    tol = 1e-5 * (1 + general.abs().amax()) * torch.ones_like(general)
    assert torch.all((fast - general).abs() <= tol)
    assert _holds(fast, ys, tol) and _holds(general, ys, tol)


@pytest.mark.parametrize("size", [(15, 16), (128, 128)])
def test_every_conv_interval_form_is_taken(size):
    """The forms test_conv_interval_forms_agree_and_hold compares are all reachable: a 3x3 conv
    onto 4 channels of 15x16 takes the lu conv, of 128x128 (more multiply-adds) two convs, and
    a 4x4 one of 128x128 the pair."""
    forms = []
    for k in (3, 4):
        w = torch.randn(4, 4, k, k)
        graph = load_onnx(model_of([node("Conv", ["x", "w"], pads=[1, 1, 1, 1])], (1, 4) + size, {"w": w.numpy()}))
        (conv_node,) = graph.nodes
        ps = conv.CONV2D.interval_params(graph, conv_node, torch.float32)
        forms.append(None if len(ps) == 3 else "lu_conv" if ps[3].shape[1] == 8 else "pair")
    assert forms == (["lu_conv", "lu_conv"] if size == (15, 16) else [None, "pair"])


def test_lu_conv_weight_is_channels_last_from_its_threshold():
    """The lu conv's weight is stored channels-last (torch then runs oneDNN's convolution, not
    its im2col loop) from LU_CONV_CHANNELS_LAST_MIN_MACS multiply-adds on, and the plan keeps
    that layout; the bounds are the NCHW weight's up to float32 rounding."""
    from boundflow import api
    for c_out in (1, 8):
        macs = c_out * 15 * 16 * 4 * 9
        w = torch.randn(c_out, 4, 3, 3)
        model = model_of([node("Conv", ["x", "w"], pads=[1, 1, 1, 1])], (1, 4, 15, 16), {"w": w.numpy()})
        x = torch.rand(1, 4, 15, 16)
        lb, ub = boundflow.compute_bounds(model, x - 0.1, x + 0.1, method="ibp", device="cpu")
        (w_lu,) = [t for t in list(api._plans.values())[-1].params.values() if t.dim() == 4 and t.shape[1] == 8]
        assert conv.LU_CONV_CHANNELS_LAST_MIN_MACS <= 69120 <= conv.LU_CONV_MAX_MACS
        assert w_lu.is_contiguous(memory_format=torch.channels_last) == (macs >= conv.LU_CONV_CHANNELS_LAST_MIN_MACS)
        assert w_lu.is_contiguous() == (macs < conv.LU_CONV_CHANNELS_LAST_MIN_MACS)
        c, r = F.conv2d(x, w, padding=1), F.conv2d(torch.full_like(x, 0.1), w.abs(), padding=1)
        assert torch.allclose(lb, (c - r).flatten(1), atol=1e-5) and torch.allclose(ub, (c + r).flatten(1), atol=1e-5)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2**16))
def test_conv_transpose_interval_forms_agree_and_hold(c_in, c_out, k, stride, batch, seed):
    """Small transposed convs get the lu form too (their dense matrix), used at batch 1."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn((c_in, c_out, k, k), generator=g), torch.randn(c_out, generator=g)
    attrs = dict(strides=[stride, stride], pads=[0, 0, 0, 0])
    fn = lambda x: F.conv_transpose2d(x, w.double(), b.double(), stride)    # noqa: E731
    form, (fast, general), ys = _interval_forms(node("ConvTranspose", ["x", "w", "b"], **attrs), {"w": w, "b": b},
                                                (c_in, 5, 4), fn, batch, seed)
    n_out = math.prod(fn(torch.zeros(1, c_in, 5, 4, dtype=torch.float64)).shape)
    assert form == ("lu" if c_in * 5 * 4 * n_out <= conv.LU_FORM_MAX else None)
    tol = 1e-5 * (1 + general.abs().amax()) * torch.ones_like(general)
    assert torch.all((fast - general).abs() <= tol)
    assert _holds(fast, ys, tol) and _holds(general, ys, tol)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_large_transposed_conv_with_a_large_kernel(method):
    """A transposed conv too large for the lu form, with a kernel of PAIR_MIN_KERNEL: its
    interval rule takes the general params (conv2d's pair form is not for it; giving it that
    failed every float32 plan before), and the bounds hold at points of the box."""
    torch.manual_seed(0)
    net = nn.ConvTranspose2d(4, 3, conv.PAIR_MIN_KERNEL, stride=2)
    x = torch.randn(1, 4, 12, 12)
    lb, ub = boundflow.compute_bounds(net, x - 0.05, x + 0.05, method=method)
    with torch.no_grad():
        ys = net(x + 0.05 * (2 * torch.rand((64, 4, 12, 12)) - 1)).flatten(1)
    assert lb.shape == (1, ys.shape[1])
    assert (ys >= lb - 1e-5).all() and (ys <= ub + 1e-5).all()


@pytest.mark.parametrize("attrs,c_in,c_out,k,size", [
    (dict(strides=[2, 2], pads=[1, 1, 1, 1]), 2, 3, 3, 7), (dict(strides=[1, 2], pads=[0, 1, 2, 0]), 1, 2, 4, 6),
    (dict(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[2, 1]), 2, 2, 3, 5),
    (dict(strides=[2, 2], pads=[0, 0, 0, 0], group=2), 2, 4, 2, 6)])
def test_conv_backward_through_its_dense_matrix(attrs, c_in, c_out, k, size):
    """A small conv's dense CROWN passes go through its dense matrix (one product): the same A
    and bias as the transposed conv, up to float32 rounding."""
    g = torch.Generator().manual_seed(k * 10 + c_out)
    groups = attrs.get("group", 1)
    w, b = torch.randn((c_out, c_in // groups, k, k), generator=g), torch.randn(c_out, generator=g)
    graph = load_onnx(model_of([node("Conv", ["x", "w", "b"], **attrs)], (1, c_in, size, size),
                               {"w": w.numpy(), "b": b.numpy()}))
    (conv_node,) = graph.nodes
    m, _ = conv.matrix(graph, conv_node, torch.float32, 1 << 20)
    out_shape = tuple(graph.shape(conv_node.outputs[0]))
    a = torch.randn((2, 6) + out_shape, generator=g)
    attrs_in = dict(conv_node.attrs, in_shape=list(graph.shape(conv_node.inputs[0])))
    plain = conv.backward([a, torch.zeros(2, 6)], [w, b], attrs_in)
    dense = conv.backward([a, torch.zeros(2, 6)], [w, b, m], attrs_in)
    for x, y in zip(plain, dense):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)


def test_small_convs_get_their_dense_matrix_in_float32_plans_only(shared):
    """cnn_small's convs are small enough: the float32 CROWN plan's conv backward rules carry the
    dense matrix (bounds as with the transposed conv, up to rounding); a sound_fp plan's do not."""
    from golden import load_fixture
    fx = load_fixture(shared, "cnn_small__eps0.02")
    graph, _ = boundflow.load_model(str(fx.model))

    def conv_params(config):
        module = boundflow.plan(graph, "crown", config)
        return module, [len(op.params) for op in module.ops() if op.op == "linear.conv2d"]

    assert conv_params(PlannerConfig())[1] and all(n == 3 for n in conv_params(PlannerConfig())[1])
    assert all(n == 2 for n in conv_params(PlannerConfig(dense_conv_backward_bytes=0))[1])
    assert all(n == 2 for n in conv_params(PlannerConfig(sound_fp=True))[1])
    bounds = [boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method="crown",
                                       config=PlannerConfig(dense_conv_backward_bytes=n)) for n in (0, 512 << 10)]
    for x, y in zip(*bounds):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-5)


def test_affine_interval_is_exact_per_coordinate():
    """An affine op's interval is min/max of scale l and scale u, plus shift: no centre/radius
    cancellation (nightly fuzz seed 3145025985: a LayerNorm's variance [0, 1944] / 6 + 0.1 came
    out at 0.1000061, and 1 / sqrt of it below the network's value at a constant input)."""
    from boundflow.ops import affine
    s = torch.tensor([[0.0, -3.0, 5.0], [1944.0, -1.0, 7.0]]).unsqueeze(1)          # [2, B=1, 3]
    scale, shift = torch.tensor([1 / 6, -2.0, 0.5]), torch.tensor([0.1, 0.0, -1.0])
    (got,) = affine.interval([s], [scale, shift], {})
    want = torch.stack((torch.minimum(s[0] * scale, s[1] * scale), torch.maximum(s[0] * scale, s[1] * scale))) + shift
    assert torch.equal(got, want) and got[0, 0, 0].item() == torch.tensor(0.1).item()


@pytest.mark.parametrize("scale", [[1 / 6, 2.0, 0.5], [0.0, 3.0, 1e-3], [1 / 6, -2.0, 0.5], [-1.0, -0.5, -3.0]])
def test_affine_interval_with_scales_of_one_sign_is_the_general_rule(scale):
    """Scales all >= 0 take one product and one sum (decided when the kernel is bound), bit for
    bit the general rule's min/max; any negative scale takes the general rule."""
    from boundflow.ops import affine
    g = torch.Generator().manual_seed(5)
    c, w = torch.randn(1, 40, 3, generator=g) * 100, torch.rand(1, 40, 3, generator=g) * 10
    s = torch.stack((c - w, c + w))
    scale, shift = torch.tensor(scale), torch.randn(3, generator=g)
    p = s * scale
    want = torch.stack((torch.minimum(p[0], p[1]), torch.maximum(p[0], p[1]))) + shift
    bound = affine.interval.bind([s], [scale, shift], {})
    for (got,) in (affine.interval([s], [scale, shift], {}), bound()):
        assert torch.equal(got, want)
    s.copy_(s.flip(2))                                    # a bound kernel reads each run's values
    assert torch.equal(bound()[0], want.flip(2))
