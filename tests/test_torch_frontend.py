"""PyTorch frontend: modules lowered by load_torch must compute what the module computes.

Each test lowers a module, evaluates the primal graph with the concrete semantics on a batch
of random points (evaluate takes [B, *example_input.shape]) and compares with module(x) point
by point.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from boundflow.domains.concrete import evaluate, infer_shape
from boundflow.errors import ModelLoadError, UnsupportedOpError
from boundflow.frontends.torch import load_torch, supported_ops

TOL = 1e-5


def _randomise_bn(module: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding BN is really tested."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.normal_()
                    m.bias.normal_()
    return module


def check(module: nn.Module, example: torch.Tensor, points: int = 4):
    """Lower `module` and compare evaluate(graph) with module(x) on random points."""
    module = _randomise_bn(module).eval()
    graph = load_torch(module, example)
    assert graph.shape(graph.inputs[0]) == tuple(example.shape)
    xs = torch.randn((points,) + tuple(example.shape))
    outs = evaluate(graph, xs)
    with torch.no_grad():
        for i in range(points):
            ref = module(xs[i])
            ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
            assert len(ref) == len(outs)
            for got, want in zip(outs, ref):
                assert got[i].shape == want.shape
                diff = (got[i] - want).abs().max().item()
                assert diff <= TOL, f"max abs diff {diff} > {TOL}\n{graph}"
    return graph


def ops(graph) -> list[str]:
    return [n.op for n in graph.nodes]


# ---------------------------------------------------------------------------------------------
# supported modules
# ---------------------------------------------------------------------------------------------
def test_mlp_linear_relu():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    g = check(mlp, torch.randn(1, 8))
    assert ops(g) == ["linear", "relu", "linear", "relu", "linear"]
    # parameters keep their module names, are float32 copies and kind "param"
    w = g.values["0.weight"]
    assert w.kind == "param" and w.data.dtype == torch.float32
    assert torch.equal(w.data, mlp[0].weight.detach())
    with torch.no_grad():
        mlp[0].weight.add_(1.0)
    assert not torch.equal(w.data, mlp[0].weight.detach()), "parameters must be cloned"


def test_linear_without_bias_and_2d_batch():
    m = nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 2))
    g = check(m, torch.randn(3, 6))  # per-region shape [3, 6]: three rows per region
    assert ops(g) == ["linear", "relu", "linear"]
    assert len(g.nodes[0].inputs) == 2


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.c3 = nn.Conv2d(8, 6, (3, 1), stride=(1, 2), padding=(1, 0), bias=False)
        self.pool = nn.AvgPool2d(2)
        self.pool2 = nn.AvgPool2d(3, stride=1, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6 * 2 * 1, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.c2(x)))
        x = self.pool2(x)
        x = self.pool(F.relu(self.c3(x)))
        return self.fc(self.flat(x))


def test_cnn_conv_bn_pool_flatten():
    g = check(CNN(), torch.randn(1, 3, 8, 8))
    assert set(ops(g)) == {"conv2d", "affine", "relu", "reshape", "linear"}
    convs = [n for n in g.nodes if n.op == "conv2d"]
    assert convs[0].attrs == {"stride": (2, 2), "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1}
    assert convs[1].attrs["dilation"] == (2, 2) and convs[1].attrs["groups"] == 4
    # avg pools become depthwise convs with weight 1/(kh*kw)
    pool = convs[2]  # pool2 runs after c1, c2
    assert pool.attrs["groups"] == 8 and pool.attrs["padding"] == (1, 1, 1, 1)
    assert torch.allclose(g.data(pool.inputs[1]).float(), torch.full((8, 1, 3, 3), 1 / 9))
    # eval batch norm -> affine with [C, 1, 1] constants
    bn = next(n for n in g.nodes if n.op == "affine")
    assert g.shape(bn.inputs[1]) == (8, 1, 1) and g.shape(bn.inputs[2]) == (8, 1, 1)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (4, 1), (2, 2), (5, 1)])
def test_conv_padding_same(kernel, dilation):
    m = nn.Sequential(nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation), nn.ReLU())
    g = check(m, torch.randn(1, 2, 7, 7))
    assert ops(g) == ["conv2d", "relu"]  # an asymmetric 'same' pad is merged into the conv
    total = dilation * (kernel - 1)
    top, left, bottom, right = g.nodes[0].attrs["padding"]
    assert (top + bottom, left + right) == (total, total)


def test_explicit_zero_pad_merged_or_materialised():
    class Pad(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 2, 3)

        def forward(self, x):
            p = F.pad(x, (1, 0, 2, 1))
            return self.c(p), F.relu(p)  # the conv absorbs the pad, relu needs it materialised

    g = check(Pad(), torch.randn(1, 2, 5, 5))
    conv = next(n for n in g.nodes if n.op == "conv2d" and n.name == "convolution")
    assert conv.attrs["padding"] == (2, 1, 1, 0)


def test_avg_pool_variants():
    class Pools(nn.Module):
        def forward(self, x):
            return (F.avg_pool2d(x, 2, stride=1),
                    F.avg_pool2d(x, (3, 2), stride=(2, 1), padding=(1, 0)),
                    F.avg_pool2d(x, 2, count_include_pad=False),
                    F.avg_pool2d(x, 3, padding=1, divisor_override=4))

    check(Pools(), torch.randn(1, 3, 6, 6))


class Residual(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.c2(F.relu(self.bn(self.c1(x))))
        y = F.relu(x + h)
        return y - h  # sub of two variables


def test_residual_block():
    g = check(Residual(), torch.randn(1, 4, 5, 5))
    assert ops(g).count("add") == 2


class PermuteMLP(nn.Module):
    """Token-mixing style: linears over both axes of a [1, T, D] input."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(5, 3)
        self.l3 = nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.l1(x))           # [1, 5, 6]
        h = F.relu(self.l2(h.permute(0, 2, 1)))  # [1, 6, 3]
        h = h.transpose(1, 2)            # [1, 3, 6]
        return self.l3(h)


def test_permutes_between_linears():
    g = check(PermuteMLP(), torch.randn(1, 5, 4))
    # linear stays one op on the model's own [1, T, D] shapes: no reshapes around it
    assert ops(g) == ["linear", "relu", "transpose", "linear", "relu", "transpose", "linear"]
    linears = [n for n in g.nodes if n.op == "linear"]
    assert [n.inputs[1] for n in linears] == ["l1.weight", "l2.weight", "l3.weight"]


def test_cat():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)
            self.b = nn.Linear(6, 4)
            self.ca = nn.Conv2d(2, 3, 1)

        def forward(self, x):
            flat = x.flatten(1)
            h = torch.cat([self.a(flat), F.relu(self.b(flat))], dim=1)
            c = torch.cat([x, self.ca(x), x], dim=-3)  # channel concat, negative dim
            return h, c

    g = check(Cat(), torch.randn(1, 2, 1, 3))
    cats = [n for n in g.nodes if n.op == "concat"]
    assert [n.attrs["axis"] for n in cats] == [1, 1]


class MatmulParams(nn.Module):
    def __init__(self, n=4, m=5):
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, n))   # W @ x
        self.V = nn.Parameter(torch.randn(m, 2))   # x @ V
        self.b = nn.Parameter(torch.randn(2))

    def forward(self, x):
        return torch.relu(self.W @ x) @ self.V + self.b


@pytest.mark.parametrize("shape", [(4, 5), (1, 4, 5), (2, 4, 5)])
def test_matmul_with_parameters_either_side(shape):
    g = check(MatmulParams(), torch.randn(*shape))
    assert "linear" in ops(g)


def test_matmul_variants():
    class Mats(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(3, 8))
            self.B = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return (torch.matmul(x, self.W.t()), F.linear(x, self.W), torch.mm(x, self.W.T),
                    torch.addmm(torch.ones(3), x, self.W.t(), beta=2, alpha=0.5),
                    x @ self.B.t(),
                    (self.B @ x.t()).t())

    check(Mats(), torch.randn(4, 8))


def test_matmul_rank1_and_batched_constants():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.randn(5))
            self.u = nn.Parameter(torch.randn(4))
            self.R = nn.Parameter(torch.randn(5, 3))
            self.L = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):  # [2, 4, 5]
            return (x @ self.v, self.u @ x,
                    torch.bmm(x, self.R.expand(2, 5, 3)),   # same matrix for every batch entry
                    torch.bmm(self.L.expand(2, 3, 4), x))

    check(M(), torch.randn(2, 4, 5))


def test_matmul_with_rank1_input():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(3, 8))
            self.v = nn.Parameter(torch.randn(8))

        def forward(self, x):  # [8]
            return self.W @ x, x @ self.W.t(), self.v @ x, F.linear(x, self.W)

    g = check(M(), torch.randn(8))
    assert g.shape(g.outputs[2]) == ()


@pytest.mark.parametrize("shared,shape,match", [
    (False, (2, 4, 5), "different constant matrix per batch entry"),  # bmm, distinct matrices
    (True, (4, 5), "broadcasts the variable"),  # constant batch axes would broadcast x
])
def test_matmul_unsupported_constant_batches(shared, shape, match):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            c = torch.randn(1, 5, 3).repeat(2, 1, 1) if shared else torch.randn(2, 5, 3)
            self.C = nn.Parameter(c)

        def forward(self, x):
            return x @ self.C

    with pytest.raises(UnsupportedOpError, match=match):
        load_torch(M(), torch.randn(*shape))


def test_addmm_full_bias_matrix():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(6, 3))
            self.C = nn.Parameter(torch.randn(2, 3))

        def forward(self, x):
            return torch.addmm(self.C, x, self.W)

    g = check(M(), torch.randn(2, 6))
    assert ops(g) == ["linear", "affine"]  # a per-row bias cannot be linear's bias


def test_scalar_normalisation():
    m = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = m

        def forward(self, x):
            return self.net((x - 0.5) / 0.25)

    g = check(Norm(), torch.rand(1, 8))
    assert ops(g)[:2] == ["affine", "affine"]
    assert all(g.values[i].kind == "const" for i in g.nodes[0].inputs[1:])


def test_buffer_normalisation_and_constant_ops():
    class Ops(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1))
            self.register_buffer("std", torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1))
            self.s = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            y = (x - self.mean) / self.std
            y = 2 * y + 1
            y = 1 - y * self.s
            y = -y + torch.tensor([1.0, 2.0, 3.0, 4.0])  # lifted constant
            y = y.mul(torch.full((4,), 0.5)).sub(x, alpha=0.5)
            return y.clamp_min(0)

    g = check(Ops(), torch.randn(1, 3, 2, 4))
    # constants derived from module tensors are params; ones made from Python literals are consts
    sub = g.nodes[0]
    assert g.values[sub.inputs[2]].kind == "param"  # shift = -mean
    assert torch.equal(g.data(sub.inputs[2]), -torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1))
    assert g.values[sub.inputs[1]].kind == "const"  # scale = 1


def test_constant_with_leading_unit_axes():
    """A constant may add leading axes of size 1 to the variable (the affine lowering shared with
    the ONNX frontend reshapes the variable to them)."""
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.randn(1, 1, 4))

        def forward(self, x):
            return F.relu(x + self.c)

    g = check(Shift(), torch.randn(1, 4))
    assert ops(g) == ["reshape", "affine", "relu"]


def test_nhwc_input_permuted_to_nchw():
    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            x = x.permute(0, 3, 1, 2)
            return self.fc(F.relu(self.conv(x)).reshape(1, -1))

    g = check(NHWC(), torch.randn(1, 6, 6, 3))
    assert g.nodes[0].op == "transpose" and g.nodes[0].attrs["perm"] == (0, 3, 1, 2)


def test_pass_through_and_shape_ops():
    class Shapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.id = nn.Identity()
            self.bn = nn.BatchNorm1d(6)
            self.fc = nn.Linear(6, 6)

        def forward(self, x):                       # [1, 6]
            h = self.id(self.drop(self.bn(x)))
            h = F.dropout(h, p=0.3, training=self.training).contiguous().clone()
            h = self.fc(h).unsqueeze(0).unsqueeze(-1)  # [1, 1, 6, 1]
            h = h.squeeze(-1).squeeze(0)               # [1, 6]
            h = h.view(2, 3).t().reshape(3, 2)         # transpose of a view
            h = torch.transpose(h, 0, 1).float()
            return F.relu6(h), F.hardtanh(h), h.clamp(max=0.25), h.clamp(-0.5, 0.5), x.detach()

    g = check(Shapes(), torch.randn(1, 6))
    assert set(ops(g)) <= {"affine", "linear", "reshape", "transpose", "relu", "clamp_min"}
    assert g.outputs[-1] == g.inputs[0]  # identity output is the input itself


def test_batchnorm1d_on_sequence():
    m = nn.Sequential(nn.BatchNorm1d(3))
    g = check(m, torch.randn(1, 3, 7))
    assert g.shape(g.nodes[0].inputs[1]) == (3, 1)


def test_values_typed_by_infer_shape():
    g = load_torch(CNN().eval(), torch.randn(1, 3, 8, 8))
    for node in g.nodes:
        assert tuple(infer_shape(g, node)) == g.shape(node.outputs[0])
    for v in g.values.values():
        if v.kind in ("param", "const"):
            # float32, or float64 with an error bound for a constant computed at import (BatchNorm)
            assert v.data.dtype == (torch.float32 if v.err is None else torch.float64)
            assert tuple(v.data.shape) == v.type.shape
            assert not v.data.requires_grad


def test_training_mode_is_restored():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    m[2].eval()
    g = load_torch(m, torch.randn(2, 4))
    assert m.training and m[1].training and not m[2].training
    # the graph is the eval-mode function (dropout off, running statistics)
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        want = torch.stack([m.eval()(xi) for xi in x])
    assert (evaluate(g, x)[0] - want).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_unsupported_op_names_op_node_and_list():
    class Rounded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.round(self.fc(x))

    with pytest.raises(UnsupportedOpError) as err:
        load_torch(Rounded(), torch.randn(1, 4))
    msg = str(err.value)
    assert "aten.round" in msg and "'round_1'" in msg
    assert "Supported ops" in msg and "aten.convolution.default" in msg and "aten.relu.default" in msg


def test_products_of_variables():
    """x * x is the square (ops/convex.py), x * (x + 1) and x @ x.T products of two values
    (ops/mul.py); each computes what torch computes."""
    class Products(nn.Module):
        def forward(self, x):
            return torch.cat([x * x, x * (x + 1), (x @ x.t()).reshape(1, -1)[:, :4]], 1)

    x = torch.randn(1, 4)
    graph = load_torch(Products(), x)
    assert {"pow", "mul"} <= {n.op for n in graph.nodes}, sorted({n.op for n in graph.nodes})
    from boundflow.domains.concrete import evaluate
    pts = torch.randn(5, 1, 4)
    got = evaluate(graph, pts)[0]
    want = torch.stack([Products()(p) for p in pts])
    assert torch.allclose(got.reshape(want.shape), want, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.Hardshrink(), nn.AvgPool2d(3, ceil_mode=True),
                                   nn.AvgPool2d(3, padding=1, count_include_pad=False),
                                   nn.Upsample(scale_factor=1.5)])
def test_other_layers_are_unsupported(layer):
    with pytest.raises(UnsupportedOpError):
        load_torch(nn.Sequential(layer), torch.randn(1, 2, 5, 5))


def test_export_failure_is_model_load_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(ModelLoadError, match="torch.export"):
        load_torch(DataDependent(), torch.randn(1, 4))


def test_supported_ops_listed():
    names = supported_ops()
    assert "aten.addmm.default" in names and "aten.permute.default" in names


# ---------------------------------------------------------------------------------------------
# random modules
# ---------------------------------------------------------------------------------------------
_HYP = settings(max_examples=6, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_HYP
@given(widths=st.lists(st.integers(1, 12), min_size=2, max_size=5), rows=st.integers(1, 3),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_mlp(widths, rows, bias, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias or i == 0))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    g = check(nn.Sequential(*layers), torch.randn(rows, widths[0]))
    assert ops(g).count("linear") == len(widths) - 1


@st.composite
def _conv_layers(draw):
    c = draw(st.integers(1, 3))
    h = draw(st.integers(4, 9))
    w = draw(st.integers(4, 9))
    layers: list[nn.Module] = []
    ch, hh, ww = c, h, w
    for _ in range(draw(st.integers(1, 3))):
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if ch % g == 0]))
        out = groups * draw(st.integers(1, 3))
        k = draw(st.integers(1, 3))
        s = draw(st.integers(1, 2))
        p = draw(st.integers(0, 2))
        d = draw(st.integers(1, 2))
        hh = (hh + 2 * p - d * (k - 1) - 1) // s + 1
        ww = (ww + 2 * p - d * (k - 1) - 1) // s + 1
        assume(hh >= 1 and ww >= 1)
        layers.append(nn.Conv2d(ch, out, k, stride=s, padding=p, dilation=d, groups=groups,
                                bias=draw(st.booleans())))
        ch = out
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(ch))
        layers.append(nn.ReLU())
        if draw(st.booleans()) and hh >= 2 and ww >= 2:
            layers.append(nn.AvgPool2d(2, stride=draw(st.integers(1, 2))))
            st_ = layers[-1].stride
            hh, ww = (hh - 2) // st_ + 1, (ww - 2) // st_ + 1
    layers += [nn.Flatten(), nn.Linear(ch * hh * ww, draw(st.integers(1, 4)))]
    return (c, h, w), layers


@_HYP
@given(spec=_conv_layers(), seed=st.integers(0, 2**16))
def test_random_cnn(spec, seed):
    (c, h, w), layers = spec
    torch.manual_seed(seed)
    for layer in layers:  # re-initialise under the drawn seed
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    check(nn.Sequential(*layers), torch.randn(1, c, h, w))
