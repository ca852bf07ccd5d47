"""Random small torch networks for property tests.

Every builder takes a `Picker` (structural choices: widths, strides, ...) and returns a `Net`
whose weights come from a seeded torch generator, so a network is reproducible from
(structure, seed). Two pickers exist:

  * `SeedPicker(seed)`: every choice from a numpy generator; `build(kind, seed)` uses it.
  * `DrawPicker(draw)`: every choice is a hypothesis draw (so hypothesis shrinks the structure);
    the `networks()` strategy uses it.

Weights are normal with std gain/sqrt(fan_in), so activations stay O(1) and bounds stay finite.
All modules accept any leading batch size (the per-region input shape has batch 1), so sampled
points can be evaluated in one call: `net.module(points)` with points [N, *input_shape[1:]].

`export_onnx(module, example, path)` writes an ONNX file with the TorchScript exporter
(`dynamo=False`, opset 17: needs no onnxscript) and returns the path.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

KINDS = ("mlp", "cnn", "residual", "bn_cnn", "permute", "nhwc_cnn", "keras_cnn", "normalized_mlp",
         "normalized_cnn", "clamp_cnn")


# --------------------------------------------------------------------------------------------
# choices
# --------------------------------------------------------------------------------------------
class SeedPicker:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.seed = int(seed)

    def int(self, lo: int, hi: int) -> int:           # inclusive bounds
        return int(self.rng.integers(lo, hi + 1))

    def choice(self, options):
        return options[int(self.rng.integers(0, len(options)))]

    def bool(self) -> bool:
        return bool(self.rng.integers(0, 2))


class DrawPicker:
    def __init__(self, draw: Callable, seed: int):
        from hypothesis import strategies as st

        self._st, self._draw, self.seed = st, draw, int(seed)

    def int(self, lo: int, hi: int) -> int:
        return self._draw(self._st.integers(lo, hi))

    def choice(self, options):
        return self._draw(self._st.sampled_from(list(options)))

    def bool(self) -> bool:
        return self._draw(self._st.booleans())


@dataclass
class Net:
    module: nn.Module
    input_shape: tuple[int, ...]     # per region, batch 1 first
    kind: str
    desc: str

    @property
    def num_outputs(self) -> int:
        with torch.no_grad():
            return int(self.module(torch.zeros(self.input_shape)).numel())

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Flattened outputs [N, O] for points [N, *input_shape[1:]]."""
        with torch.no_grad():
            return self.module(points).reshape(points.shape[0], -1)

    def __repr__(self) -> str:
        return f"Net({self.kind}: {self.desc}, input {list(self.input_shape)})"


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
def _init(module: nn.Module, gen: torch.Generator, gain: float = 1.0) -> nn.Module:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (gain / math.sqrt(fan_in)))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(c, generator=gen) * 0.5 + 1.0)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return module.eval()


def _conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _mlp_layers(p, d_in: int, d_out: int) -> tuple[list[nn.Module], list[int]]:
    widths = [p.int(2, 16) for _ in range(p.int(1, 3))]
    layers: list[nn.Module] = []
    prev = d_in
    for w in widths:
        layers += [nn.Linear(prev, w, bias=p.int(0, 4) > 0), nn.ReLU()]
        prev = w
    layers.append(nn.Linear(prev, d_out))
    return layers, widths


def _conv_block(p, c_in: int, h: int, w: int):
    """A Conv2d with random stride/padding/dilation/groups that fits an h x w input."""
    for _ in range(20):
        groups = p.choice((1, 2)) if c_in % 2 == 0 else 1
        c_out = groups * p.int(1, 3)
        k, s, pad, d = p.int(1, 3), p.int(1, 2), p.int(0, 1), p.int(1, 2)
        oh, ow = _conv_out(h, k, s, pad, d), _conv_out(w, k, s, pad, d)
        if oh >= 1 and ow >= 1:
            conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=pad, dilation=d, groups=groups,
                             bias=p.int(0, 4) > 0)
            return conv, c_out, oh, ow, f"conv{c_in}->{c_out} k{k} s{s} p{pad} d{d} g{groups}"
    conv = nn.Conv2d(c_in, c_in, 1)
    return conv, c_in, h, w, f"conv{c_in}->{c_in} k1"


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class _Normalize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


class _CNN(nn.Module):
    def __init__(self, convs: nn.Sequential, head: nn.Sequential, nhwc: bool = False):
        super().__init__()
        self.convs, self.head, self.nhwc = convs, head, nhwc

    def forward(self, x):
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        return self.head(self.convs(x).flatten(1))


class _KerasCNN(nn.Module):
    """A Keras CNN as tf2onnx exports it: NHWC tensors, a transpose to NCHW before each conv and
    back after it, ReLU in NHWC, and an NHWC flatten before the dense head."""

    def __init__(self, convs: nn.ModuleList, head: nn.Sequential):
        super().__init__()
        self.convs, self.head = convs, head

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return self.head(x.flatten(1))


class _Residual(nn.Module):
    def __init__(self, c: int, pool: int, flat: int, hidden: int, out: int, bn: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.AvgPool2d(pool)
        self.fc1 = nn.Linear(flat, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        h = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        h = torch.relu(h + x)
        h = self.pool(h).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


class _Permute(nn.Module):
    """[1, a, b] -> linear on b -> relu -> permute -> linear on a -> relu -> (permute) -> linear."""

    def __init__(self, a: int, b: int, c: int, d: int, out: int, permute_back: bool):
        super().__init__()
        self.l1 = nn.Linear(b, c)
        self.l2 = nn.Linear(a, d)
        self.permute_back = permute_back
        self.l3 = nn.Linear(c * d, out)

    def forward(self, x):
        h = torch.relu(self.l1(x))                  # [N, a, c]
        h = torch.relu(self.l2(h.permute(0, 2, 1)))  # [N, c, d]
        if self.permute_back:
            h = h.transpose(1, 2)                   # [N, d, c]
        return self.l3(h.flatten(1))


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------
def _gen(p) -> torch.Generator:
    return torch.Generator().manual_seed(p.seed)


def build_mlp(p) -> Net:
    d_in, d_out = p.int(1, 8), p.int(1, 5)
    layers, widths = _mlp_layers(p, d_in, d_out)
    module = _init(nn.Sequential(*layers), _gen(p), gain=p.choice((1.0, 1.5)))
    return Net(module, (1, d_in), "mlp", f"{d_in}-{'-'.join(map(str, widths))}-{d_out}")


def _activation(p, clamps: bool) -> tuple[nn.Module, str]:
    """ReLU, or with clamps ReLU6 or a hardtanh with random bounds, then maybe a BatchNorm (an
    affine map no conv absorbs)."""
    if not clamps:
        return nn.ReLU(), ""
    lo = p.int(-10, 2) / 10
    return p.choice(((nn.ReLU6(), " relu6"), (nn.Hardtanh(lo, lo + 0.6), f" hardtanh({lo}, {lo + 0.6:.1f})")))


def _build_cnn(p, kind: str, bn: bool = False, nhwc: bool = False, normalize: bool = False,
               clamps: bool = False) -> Net:
    c, h, w = p.choice((1, 2, 3, 4)), p.int(3, 7), p.int(3, 7)
    convs: list[nn.Module] = []
    descs = []
    if normalize:
        g = torch.Generator().manual_seed(p.seed + 1)
        convs.append(_Normalize(torch.rand(1, c, 1, 1, generator=g) - 0.5,
                                torch.rand(1, c, 1, 1, generator=g) * 0.5 + 0.25))
        descs.append("normalize")
    ch, hh, ww = c, h, w
    for _ in range(p.int(1, 2)):
        conv, ch, hh, ww, d = _conv_block(p, ch, hh, ww)
        convs.append(conv)
        if bn:
            convs.append(nn.BatchNorm2d(ch))
            d += " bn"
        act, act_desc = _activation(p, clamps)
        convs.append(act)
        if clamps and p.bool():
            convs.append(nn.BatchNorm2d(ch))
            act_desc += " bn"
        descs.append(d + act_desc)
    head_layers, widths = _mlp_layers(p, ch * hh * ww, p.int(1, 4))
    module = _init(_CNN(nn.Sequential(*convs), nn.Sequential(*head_layers), nhwc), _gen(p))
    shape = (1, h, w, c) if nhwc else (1, c, h, w)
    return Net(module, shape, kind, "; ".join(descs) + f"; fc {widths}")


def build_cnn(p) -> Net:
    return _build_cnn(p, "cnn")


def build_bn_cnn(p) -> Net:
    return _build_cnn(p, "bn_cnn", bn=True)


def build_nhwc_cnn(p) -> Net:
    return _build_cnn(p, "nhwc_cnn", nhwc=True)


def build_keras_cnn(p) -> Net:
    c, h, w = p.choice((1, 2, 3)), p.int(3, 6), p.int(3, 6)
    convs, descs = [], []
    ch, hh, ww = c, h, w
    for _ in range(p.int(1, 2)):
        conv, ch, hh, ww, d = _conv_block(p, ch, hh, ww)
        convs.append(conv)
        descs.append(d)
    head_layers, widths = _mlp_layers(p, ch * hh * ww, p.int(1, 4))
    module = _init(_KerasCNN(nn.ModuleList(convs), nn.Sequential(*head_layers)), _gen(p))
    return Net(module, (1, h, w, c), "keras_cnn", "; ".join(descs) + f"; NHWC flatten; fc {widths}")


def build_normalized_cnn(p) -> Net:
    return _build_cnn(p, "normalized_cnn", normalize=True)


def build_clamp_cnn(p) -> Net:
    return _build_cnn(p, "clamp_cnn", clamps=True)


def build_residual(p) -> Net:
    c, hw, pool, bn = p.int(1, 3), p.choice((2, 4)), 2, p.bool()
    hidden, out = p.int(2, 8), p.int(1, 4)
    flat = c * (hw // pool) ** 2
    module = _init(_Residual(c, pool, flat, hidden, out, bn), _gen(p), gain=p.choice((0.7, 1.0)))
    return Net(module, (1, c, hw, hw), "residual", f"c{c} hw{hw} bn={bn} fc{hidden}->{out}")


def build_permute(p) -> Net:
    a, b, c, d, out = p.int(1, 5), p.int(1, 5), p.int(2, 6), p.int(2, 6), p.int(1, 4)
    back = p.bool()
    module = _init(_Permute(a, b, c, d, out, back), _gen(p))
    return Net(module, (1, a, b), "permute", f"a{a} b{b} c{c} d{d} out{out} back={back}")


def build_normalized_mlp(p) -> Net:
    d_in, d_out = p.int(1, 8), p.int(1, 5)
    g = _gen(p)
    mean = torch.rand(d_in, generator=g) - 0.5
    std = torch.rand(d_in, generator=g) * 0.5 + 0.25
    layers, widths = _mlp_layers(p, d_in, d_out)
    module = _init(nn.Sequential(_Normalize(mean, std), *layers), g)
    return Net(module, (1, d_in), "normalized_mlp", f"norm {d_in}-{'-'.join(map(str, widths))}-{d_out}")


BUILDERS: dict[str, Callable] = {
    "mlp": build_mlp, "cnn": build_cnn, "residual": build_residual, "bn_cnn": build_bn_cnn,
    "permute": build_permute, "nhwc_cnn": build_nhwc_cnn, "keras_cnn": build_keras_cnn,
    "normalized_mlp": build_normalized_mlp,
    "normalized_cnn": build_normalized_cnn, "clamp_cnn": build_clamp_cnn,
}


def build(kind: str, seed: int) -> Net:
    """A random network of `kind` fully determined by `seed`."""
    return BUILDERS[kind](SeedPicker(seed))


def networks(kinds=KINDS):
    """Hypothesis strategy: a random Net (structure drawn by hypothesis, weights by a seed)."""
    from hypothesis import strategies as st

    @st.composite
    def _net(draw):
        kind = draw(st.sampled_from(list(kinds)))
        seed = draw(st.integers(0, 2**31 - 1))
        return BUILDERS[kind](DrawPicker(draw, seed))

    return _net()


# --------------------------------------------------------------------------------------------
# boxes and samples
# --------------------------------------------------------------------------------------------
def box_around(centre: torch.Tensor, eps: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = (centre - eps).float(), (centre + eps).float()
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


def sample_box(lo: torch.Tensor, hi: torch.Tensor, n: int = 1200, corners: int = 300,
               gen: torch.Generator | None = None) -> torch.Tensor:
    """[n, *lo.shape] float32 points of the box: the centre, `corners` random vertices (the
    2**d vertices of a box with d <= 8 free coordinates, all of them, when they fit), points
    with each coordinate at a random end or uniform, and uniform points."""
    gen = gen or torch.Generator().manual_seed(0)
    lo64, hi64 = lo.double().reshape(-1), hi.double().reshape(-1)
    d = lo64.numel()
    pts = [(lo64 + hi64) / 2]
    free = (hi64 > lo64).nonzero().flatten()
    if 0 < len(free) <= 8 and 2 ** len(free) <= corners:
        bits = ((torch.arange(2 ** len(free))[:, None] >> torch.arange(len(free))) & 1).bool()
        v = lo64.repeat(len(bits), 1)
        v[:, free] = torch.where(bits, hi64[free], lo64[free])
        verts = v
    else:
        bits = torch.rand(corners, d, generator=gen, dtype=torch.float64) < 0.5
        verts = torch.where(bits, hi64, lo64)
    pts.append(verts.reshape(-1, d))
    m = (n - 1 - len(verts)) // 2
    if m > 0:
        u = lo64 + (hi64 - lo64) * torch.rand(m, d, generator=gen, dtype=torch.float64)
        ends = torch.where(torch.rand(m, d, generator=gen, dtype=torch.float64) < 0.5, hi64, lo64)
        pts.append(torch.where(torch.rand(m, d, generator=gen, dtype=torch.float64) < 0.5, ends, u))
    rest = n - sum(len(x) if x.dim() == 2 else 1 for x in pts)
    if rest > 0:
        pts.append(lo64 + (hi64 - lo64) * torch.rand(rest, d, generator=gen, dtype=torch.float64))
    out = torch.cat([x.reshape(-1, d) for x in pts]).float()
    out = torch.minimum(torch.maximum(out, lo.reshape(-1)), hi.reshape(-1))   # float32 rounding
    return out.reshape((-1,) + tuple(lo.shape))


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------
def export_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> str:
    """Write `module` as ONNX (TorchScript exporter, opset 17, static input shape = example's)."""
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    return path


def onnx_runner(path: str | os.PathLike):
    """f(points [N, *shape[1:]]) -> [N, O] float64 outputs by onnxruntime, one point per run
    (the exported input has batch 1), fed in the model's input type (float or double)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64}[inp.type]

    def run(points: torch.Tensor) -> torch.Tensor:
        x = points.detach().cpu().numpy().astype(dtype)
        outs = [sess.run(None, {inp.name: x[i].reshape(shape)})[0].reshape(-1) for i in range(len(x))]
        return torch.from_numpy(np.stack(outs)).double()

    return run


def onnx_file(nodes, inits: dict, in_shape, out_shape, path: str | os.PathLike,
              elem_type: int | None = None) -> str:
    """Write a hand-made ONNX graph (onnx.helper nodes, initializers {name: array}) with input "x"
    and output "y" of `elem_type` (default FLOAT), opset 17, and return the path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem_type = TensorProto.FLOAT if elem_type is None else elem_type
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", elem_type, list(in_shape))],
                              [helper.make_tensor_value_info("y", elem_type, list(out_shape))],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))
    return os.fspath(path)
