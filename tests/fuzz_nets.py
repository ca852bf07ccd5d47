"""Random ONNX graphs for the fuzzers in tests/test_fuzz.py, built directly with onnx.helper.

`build_net(pick, seed, ...)` grows a DAG from the network input: each step applies one ONNX op
the frontend (boundflow/frontends/onnx.py) lowers, to a tensor of the pool of tensors made so
far (usually the newest, sometimes an older one: fan-out), or to two or three of them (Add /
Sub of two variables, Concat), so graphs have residual adds and concats, not only chains.
Layers (ACTIVATED) are often followed by a Relu. At the end every tensor nothing reads (a
leaf) is flattened and mapped by a Gemm to the outputs and the heads are summed, sometimes
leaving a leaf dead; or a single small leaf is itself the output.

Opsets 10, 11, 13, 17, 18 and 20; each op in the form its opset wants (attributes or inputs).
Input shapes: [1, n], [n], [m, k] (m > 1), [1, c, h, w], [a, b, c]; "tiny" ones (at most 4
values) for the verdict fuzzer. FAMILIES bias the input shapes and ops: "cnn", "convchain"
(only Conv + Relu: the patches path of CROWN), "mlp", "layout", "double" (DOUBLE tensors).

Op variants (OPS):
  Gemm           variable A or variable B, transA / transB, alpha, beta, C absent (opset >= 11),
                 scalar, [1], [N], [1, N], [M, 1] or [M, N]
  MatMul         x @ W and W @ x, W 2-D or 1-D, x of rank 1 to 4
  Add, Sub       variable with a broadcast constant on either side (full, per axis, scalar,
                 rank 0, last axis, an extra leading axis), or two variables of one shape
                 (also the same tensor twice: x + x, x - x)
  Mul, Div       variable times / divided by a broadcast constant (either side for Mul); Mul
                 also of two different variables (not one tensor twice, nor through Identity or
                 Dropout: a square), with broadcasting
  Relu
  Conv           kernel 1..3 (rectangular), strides, asymmetric pads or auto_pad
                 (SAME_UPPER / SAME_LOWER / VALID), dilations, groups (also depthwise), bias
                 or none, kernel_shape given or not, on [N, C, H, W] with N >= 1
  BatchNormalization  per channel, on rank 2 to 4, epsilon given or not, negative scales
  AveragePool    kernel, strides, pads (count_include_pad), ceil_mode where exact, auto_pad,
                 dilations (opset >= 19)
  GlobalAveragePool
  Pad            padding of H and W: attribute (opset 10), input (11+), with the axes
                 input (18+), mode / constant_value given or not, all-zero pads
  Flatten        any axis, negative too (11+)
  Reshape        targets with 0 and -1, allowzero (14+); the target from an initializer, a
                 Constant node, or torch's Shape -> Gather -> Unsqueeze -> Concat pattern
  Squeeze        given axes (attribute before opset 13, input after; negative too) or all unit
                 axes
  Unsqueeze      one or two new axes, negative too
  Transpose      random perm, or none (reverse)
  Concat         two or three variables along any axis (negative too), also x with itself
  Identity, Dropout (ratio / training_mode inputs, mask output)
  ConvTranspose  kernel 1..3, strides, dilations, pads, output_padding, groups, bias or none
  ReduceSum, ReduceMean, ReduceMax, ReduceMin  axes (attribute or input by opset, negative too) or none, keepdims
  Slice          several axes, negative starts / ends / steps, clamped ends
  Gather         a scalar or 1-D constant index (negative, repeated)
  Split          two parts: split attribute / input, or num_outputs (18+)
  Pad            also valued constant, reflect, edge and wrap (19+) padding
  Expand, Tile   size-1 axes broadcast and new leading axes; repeats per axis
  Resize         nearest, integer scales or sizes, every coordinate transform and rounding
                 of nearest_mode but align_corners
  Cast           to the network's own float type
Constants (weights, biases, shifts) are sometimes constant subgraphs the importer folds:
Constant, Neg, Add, Sub, Mul, Div, Transpose, Reshape, Slice, Cast (from float16), Concat,
Unsqueeze, Squeeze, Flatten, MatMul, Gemm, Relu, Sqrt, ConstantOfShape, Identity, Dropout
(and Shape, Gather in the Reshape pattern).

All structural choices come from a picker (tests/nets.py: DrawPicker, so hypothesis shrinks
the structure); weights from a numpy generator seeded by `seed`. Weights are scaled by
1/sqrt(fan_in) and constants kept O(1), so activations stay O(1) and float32 round-off stays
far below the tests' tolerances. Every tensor holds at most MAX_NUMEL values.

Left out on purpose: combinations onnxruntime itself refuses or computes differently (SAME
padding with dilations, pools where its SAME padding is negative, pads of a pool as large as
its kernel, ops it lacks in double), max pools with a window of padding only (the frontend
refuses them), and MaxPool ceil_mode where ONNX's shape inference and
onnxruntime disagree (_pool_out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from boundflow.ops.pool import padding_only_window

MAX_NUMEL = 96
OPSETS = (10, 11, 13, 17, 18, 20)
# per-region input shapes (the ONNX input shape, batch axis included where there is one)
INPUT_SHAPES = ("image", "vector", "flat", "rows", "image", "rank3")
TINY_SHAPES = ((1, 1), (1, 2), (1, 3), (1, 4), (2,), (3,), (2, 2), (1, 1, 2, 2), (1, 2, 1, 2), (1, 1, 1, 3))


@dataclass
class FuzzNet:
    model: onnx.ModelProto
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    opset: int
    dtype: str = "float"                                # or "double"
    lines: list[str] = field(default_factory=list)     # one line per ONNX node, for messages

    @property
    def num_inputs(self) -> int:
        return math.prod(self.input_shape)

    @property
    def num_outputs(self) -> int:
        return math.prod(self.output_shape)

    @property
    def op_types(self) -> set[str]:
        return {n.op_type for n in self.model.graph.node}

    def __repr__(self) -> str:
        return (f"FuzzNet(opset {self.opset}, {self.dtype}, input {list(self.input_shape)} -> output "
                f"{list(self.output_shape)}):\n    " + "\n    ".join(self.lines))


class Builder:
    """The graph under construction: ONNX nodes, initializers and the shapes of variables."""

    def __init__(self, pick, rng: np.random.Generator, opset: int, dtype=np.float32):
        self.pick, self.rng, self.opset, self.dtype = pick, rng, opset, dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}      # variable tensors
        self.const_shapes: dict[str, tuple[int, ...]] = {}
        self.var_ops: list[str] = []                       # op type of each variable node
        self.readers: dict[str, int] = {}
        self.alias: dict[str, str] = {}                    # Identity / Dropout output -> its input
        self.lines: list[str] = []
        self.count = 0

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    # -- emitting ----------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.fresh(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh("n"), **attrs))
        for i in inputs:
            if i in self.shapes:
                self.readers[i] = self.readers.get(i, 0) + 1
        return outs

    def op(self, op: str, inputs: list[str], shape: tuple[int, ...], note: str = "", **attrs) -> str:
        """A node with one variable output of the given shape."""
        out = self.node(op, inputs, **attrs)[0]
        self.shapes[out] = tuple(shape)
        self.var_ops.append(op)
        shown = ", ".join(f"{k}={v}" for k, v in attrs.items())
        self.lines.append(f"{out}{list(shape)} = {op}({', '.join(inputs)}) {shown} {note}".rstrip())
        return out

    def root(self, t: str) -> str:
        """The tensor t passes through unchanged (itself unless made by Identity or Dropout)."""
        while t in self.alias:
            t = self.alias[t]
        return t

    def init(self, arr: np.ndarray, base: str = "c") -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def ints(self, values) -> str:
        return self.init(np.asarray(values, dtype=np.int64), "i")

    def float(self, arr) -> np.ndarray:
        """`arr` in the network's float type."""
        return np.asarray(arr, dtype=self.dtype)

    def const(self, arr: np.ndarray, base: str = "w") -> str:
        """A float constant: usually an initializer, sometimes a constant subgraph the importer
        folds to the same array (to float16 precision for Cast)."""
        arr = self.float(arr)
        name = self._const_expr(arr, base)
        self.const_shapes[name] = arr.shape
        return name

    def _const_expr(self, arr: np.ndarray, base: str) -> str:
        kind = self.pick.choice(["init", "init", "init", "init", "constant", "neg", "add", "mul",
                                 "div", "transpose", "reshape", "slice", "cast", "concat",
                                 "unsqueeze", "matmul", "gemm", "relu", "identity", "filled", "sqrt",
                                 "squeeze", "flatten", "dropout"])
        if kind == "constant":
            return self._const_node(arr)
        if kind == "neg":
            return self._fold("Neg", [self.init(-arr, base)], f"-{base}")
        if kind == "add":
            a = self.float(self.rng.normal(size=arr.shape))
            return self._fold("Add", [self.init(a, base), self.init(arr - a, base)], "a + (w - a)")
        if kind == "mul":
            return self._fold("Mul", [self.init(arr / 4, base), self._const_node(self.float(4))], "w/4 * 4")
        if kind == "div":
            return self._fold("Div", [self.init(arr * 2, base), self.init(self.float(2), base)], "2w / 2")
        if kind == "transpose" and arr.ndim >= 2:
            perm = [int(p) for p in self.rng.permutation(arr.ndim)]
            inv = [int(p) for p in np.argsort(perm)]
            return self._fold("Transpose", [self.init(np.transpose(arr, inv), base)], f"perm {perm}", perm=perm)
        if kind == "reshape":
            return self._fold("Reshape", [self.init(arr.reshape(-1), base), self.ints(arr.shape)], "flat -> shape")
        if kind == "slice" and arr.ndim >= 1:
            big = np.concatenate([arr, self.float(self.rng.normal(size=arr.shape))], axis=0)
            n = arr.shape[0]
            return self._fold("Slice", [self.init(big, base), self.ints([0]), self.ints([n]), self.ints([0])],
                              "rows 0:n")
        if kind == "cast":
            return self._fold("Cast", [self.init(arr.astype(np.float16), base)], "float16 -> float",
                              to=helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype)))
        if kind == "concat" and arr.ndim >= 1 and arr.shape[0] >= 2:
            k = arr.shape[0] // 2
            return self._fold("Concat", [self.init(arr[:k], base), self.init(arr[k:], base)], "halves", axis=0)
        if kind == "unsqueeze" and arr.ndim >= 1 and arr.shape[0] == 1:
            src = self.init(arr[0], base)
            if self.opset >= 13:
                return self._fold("Unsqueeze", [src, self.ints([0])], "axis 0")
            return self._fold("Unsqueeze", [src], "axis 0", axes=[0])
        if kind == "matmul" and arr.ndim == 2:
            eye = np.eye(arr.shape[1], dtype=self.dtype)
            return self._fold("MatMul", [self.init(arr, base), self.init(eye, "eye")], "w @ I")
        if kind == "gemm" and arr.ndim == 2 and self.opset >= 11:      # C optional from 11
            eye = np.eye(arr.shape[0], dtype=self.dtype)
            return self._fold("Gemm", [self.init(eye, "eye"), self.init(arr.T.copy(), base)], "I @ (w^T)^T",
                              transB=1)
        if kind == "relu" and arr.ndim >= 1:             # w = relu(w) - relu(-w)
            p = self._fold("Relu", [self.init(arr, base)], "relu(w)")
            m = self._fold("Relu", [self.init(-arr, base)], "relu(-w)")
            return self._fold("Sub", [p, m], "relu(w) - relu(-w)")
        if kind == "identity":
            return self._fold("Identity", [self.init(arr, base)], "")
        if kind == "dropout":
            return self._fold("Dropout", [self.init(arr, base)], "")
        if kind == "sqrt":
            root = self._fold("Sqrt", [self.init(arr * arr, base)], "sqrt(w^2)")
            return self._fold("Mul", [root, self.init(np.sign(arr), "sign")], "|w| * sign(w)")
        if kind == "squeeze":
            src = self.init(arr[None], base)
            if self.opset >= 13:
                return self._fold("Squeeze", [src, self.ints([0])], "axis 0")
            return self._fold("Squeeze", [src], "axis 0", axes=[0])
        if kind == "flatten" and arr.ndim == 2:
            return self._fold("Flatten", [self.init(arr[:, :, None], base)], "[a, b, 1] -> [a, b]", axis=1)
        if kind == "filled" and arr.size and np.all(arr == arr.reshape(-1)[0]):
            value = numpy_helper.from_array(self.float([arr.reshape(-1)[0]]))
            return self._fold("ConstantOfShape", [self.ints(arr.shape)], "fill", value=value)
        return self.init(arr, base)

    def _const_node(self, arr) -> str:
        arr = self.float(arr)
        return self.node("Constant", [], value=numpy_helper.from_array(arr))[0]

    def _fold(self, op: str, inputs: list[str], note: str, **attrs) -> str:
        out = self.node(op, inputs, **attrs)[0]
        self.lines.append(f"{out} = {op}({', '.join(inputs)}) [constant: {note}]")
        return out


# --------------------------------------------------------------------------------------------
# ops: each takes the builder and the pool, returns the new variable or None (not applicable)
# --------------------------------------------------------------------------------------------
def _numel(shape) -> int:
    return math.prod(shape)


def _choose_input(b: Builder, pool: list[str], ok) -> str | None:
    """A pool tensor that `ok(shape)` accepts, preferring the newest (shrinks to the newest)."""
    cands = [t for t in reversed(pool) if ok(b.shapes[t])]
    if not cands:
        return None
    if len(cands) == 1 or b.pick.int(0, 3) < 3:
        return cands[0]
    return b.pick.choice(cands)


def _normal(b: Builder, shape, scale: float) -> np.ndarray:
    return b.float(b.rng.normal(size=shape) * scale)


def _broadcast_shape(b: Builder, shape) -> tuple[int, ...]:
    """A constant shape that broadcasts against `shape` without growing it: each axis full or 1,
    maybe fewer axes, maybe extra leading axes of size 1."""
    kind = b.pick.choice(["full", "per_axis", "scalar", "last", "lead1", "rank0"])
    if kind == "scalar":
        return (1,)
    if kind == "rank0":
        return ()
    if kind == "last":
        return tuple(shape[-1:])
    if kind == "lead1":
        return (1,) + tuple(shape)
    if kind == "per_axis":
        return tuple(d if b.pick.bool() else 1 for d in shape)
    return tuple(shape)


def op_relu(b, x, pool):
    return b.op("Relu", [x], b.shapes[x])


def op_sigmoid(b, x, pool):
    return b.op("Sigmoid", [x], b.shapes[x])


def op_tanh(b, x, pool):
    return b.op("Tanh", [x], b.shapes[x])


FLOAT32_MAX = float(np.finfo(np.float32).max)


def op_clip(b, x, pool):
    """min and/or max (attributes before opset 11, optional inputs after); sometimes ONNX's
    default bound, the float32 range, spelled out."""
    lo = b.pick.choice([None, -0.5, 0.0, 0.3, -FLOAT32_MAX])
    hi = b.pick.choice([None, 0.5, 1.0, 2.0, FLOAT32_MAX])
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    if b.opset < 11:
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        return b.op("Clip", [x], b.shapes[x], **attrs)
    inputs = [x, "" if lo is None else b.init(b.float(lo), "min"), "" if hi is None else b.init(b.float(hi), "max")]
    while inputs[-1] == "":
        inputs.pop()
    return b.op("Clip", inputs, b.shapes[x])


def op_gemm(b, x, pool):
    r0, r1 = b.shapes[x]
    trans_a, trans_b = b.pick.int(0, 1), b.pick.int(0, 1)
    alpha = b.pick.choice([1.0, 1.0, 0.5, -1.5])
    beta = b.pick.choice([1.0, 1.0, 0.7])
    attrs = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    if b.pick.bool():            # variable A: Y[M, N] = A' @ B'
        m, k = (r1, r0) if trans_a else (r0, r1)
        n = b.pick.int(1, 8)
        if m * n > MAX_NUMEL:
            return None
        w = _normal(b, (k, n), 1 / math.sqrt(k))
        inputs = [x, b.const(w.T.copy() if trans_b else w)]
        note = "variable A"
    else:                        # variable B
        n, k = (r0, r1) if trans_b else (r1, r0)
        m = b.pick.int(1, 6)
        if m * n > MAX_NUMEL:
            return None
        w = _normal(b, (m, k), 1 / math.sqrt(k))
        inputs = [b.const(w.T.copy() if trans_a else w), x]
        note = "variable B"
    c_shape = b.pick.choice(["none", "none", (n,), (1, n), (m, 1), (m, n), (), (1,)])
    if c_shape == "none" and b.opset < 11:
        c_shape = (n,)                       # C is optional from opset 11
    if c_shape != "none":
        inputs.append(b.const(_normal(b, c_shape, 0.5), "bias"))
    return b.op("Gemm", inputs, (m, n), note, **attrs)


def op_matmul(b, x, pool):
    s = b.shapes[x]
    one_d = b.pick.int(0, 3) == 0            # W of rank 1: the product drops an axis
    if one_d and len(s) == 1:
        return None                          # the result would be a scalar
    if b.pick.bool():                        # x @ W
        k = s[-1]
        n = 1 if one_d else b.pick.int(1, 6)
        w_shape, shape = ((k,), s[:-1]) if one_d else ((k, n), s[:-1] + (n,))
        if _numel(shape) > MAX_NUMEL:
            return None
        return b.op("MatMul", [x, b.const(_normal(b, w_shape, 1 / math.sqrt(k)))], shape, "x @ W")
    k = s[0] if len(s) == 1 else s[-2]       # W @ x
    m = 1 if one_d else b.pick.int(1, 6)
    if one_d:
        w_shape, shape = (k,), s[:-2] + s[-1:]
    else:
        w_shape, shape = (m, k), ((m,) if len(s) == 1 else s[:-2] + (m, s[-1]))
    if _numel(shape) > MAX_NUMEL:
        return None
    return b.op("MatMul", [b.const(_normal(b, w_shape, 1 / math.sqrt(k))), x], shape, "W @ x")


def _partner(b, x, pool):
    partners = [t for t in reversed(pool) if b.shapes[t] == b.shapes[x]]
    return b.pick.choice(partners)         # x itself is always a partner


def op_add(b, x, pool):
    if b.pick.bool():
        return b.op("Add", [x, _partner(b, x, pool)], b.shapes[x], "two variables")
    c = b.const(_normal(b, _broadcast_shape(b, b.shapes[x]), 0.5), "shift")
    inputs = [x, c] if b.pick.bool() else [c, x]
    return b.op("Add", inputs, _bshape(b, x, c))


def op_sub(b, x, pool):
    if b.pick.bool():
        return b.op("Sub", [x, _partner(b, x, pool)], b.shapes[x], "two variables")
    c = b.const(_normal(b, _broadcast_shape(b, b.shapes[x]), 0.5), "shift")
    inputs = [x, c] if b.pick.bool() else [c, x]
    return b.op("Sub", inputs, _bshape(b, x, c))


def _factors(b, x, pool) -> list[str]:
    """Variables that x may be multiplied by: another value (x * x is a square), of a shape
    that broadcasts with x's to at most MAX_NUMEL values."""
    def fits(t):
        try:
            return _numel(np.broadcast_shapes(b.shapes[x], b.shapes[t])) <= MAX_NUMEL
        except ValueError:
            return False
    return [t for t in reversed(pool) if b.root(t) != b.root(x) and fits(t)]


def op_mul(b, x, pool):
    factors = _factors(b, x, pool)
    if factors and b.pick.bool():
        y = b.pick.choice(factors)
        inputs = [x, y] if b.pick.bool() else [y, x]
        return b.op("Mul", inputs, tuple(np.broadcast_shapes(b.shapes[x], b.shapes[y])), "two variables")
    c = b.const(b.rng.uniform(-1.5, 1.5, size=_broadcast_shape(b, b.shapes[x])), "scale")
    inputs = [x, c] if b.pick.bool() else [c, x]
    return b.op("Mul", inputs, _bshape(b, x, c))


def op_div(b, x, pool):
    if b.dtype == np.float32 and b.pick.int(0, 3) == 0:    # by a variable >= 0.5 (normalise.py: x * 1/y)
        return b.op("Div", [x, _positive(b, _partner(b, x, pool))], b.shapes[x], "two variables")
    shape = _broadcast_shape(b, b.shapes[x])
    c = b.rng.uniform(0.5, 2.0, size=shape) * np.where(b.rng.random(size=shape) < 0.3, -1, 1)
    c = b.const(c, "divisor")
    return b.op("Div", [x, c], _bshape(b, x, c))


def _bshape(b, x, c) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(b.shapes[x], b.const_shapes[c]))


def _image(s) -> bool:
    return len(s) == 4


def _conv_out(n, k, s, p0, p1, d) -> int:
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


def _window(b, x_shape, kmax: int, dilate: bool, pool: bool):
    """(kernel, strides, dilations, pads, auto_pad) of a 2-D window over x, or None."""
    h, w = x_shape[2:]
    kernel = (b.pick.int(1, min(kmax, h + 2)), b.pick.int(1, min(kmax, w + 2)))
    strides = (b.pick.int(1, 2), b.pick.int(1, 2))
    dil = (b.pick.int(1, 2), b.pick.int(1, 2)) if dilate and b.pick.int(0, 3) == 0 else (1, 1)
    auto_pad = b.pick.choice(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
    if auto_pad.startswith("SAME") and dil != (1, 1):
        auto_pad = "NOTSET"                  # onnxruntime refuses dilations with SAME padding
    if auto_pad == "NOTSET":
        limit = [k - 1 for k in kernel] if pool else [2, 2]    # pooling: a pad below the kernel
        pads = (b.pick.int(0, limit[0]), b.pick.int(0, limit[1]), b.pick.int(0, limit[0]),
                b.pick.int(0, limit[1]))
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    else:
        begin, end = [], []
        for n, k, s, d in zip((h, w), kernel, strides, dil):
            total = (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n
            if pool and total < 0:
                return None                  # onnxruntime's pools compute a negative pad here
            total = max(total, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
        pads = (begin[0], begin[1], end[0], end[1])
        if pool and any(p >= k for p, k in zip(pads, kernel + kernel)):
            return None
    out = (_conv_out(h, kernel[0], strides[0], pads[0], pads[2], dil[0]),
           _conv_out(w, kernel[1], strides[1], pads[1], pads[3], dil[1]))
    if min(out) < 1:
        return None
    return kernel, strides, dil, pads, auto_pad, out


def _window_attrs(kernel, strides, dil, pads, auto_pad, b) -> dict:
    attrs = {}
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    elif any(pads) or b.pick.bool():
        attrs["pads"] = list(pads)
    if strides != (1, 1) or b.pick.bool():
        attrs["strides"] = list(strides)
    if dil != (1, 1):
        attrs["dilations"] = list(dil)
    return attrs


def op_conv(b, x, pool):
    n, c, h, w = b.shapes[x]
    win = _window(b, b.shapes[x], 3, dilate=True, pool=False)
    if win is None:
        return None
    kernel, strides, dil, pads, auto_pad, (oh, ow) = win
    groups = b.pick.choice([g for g in (1, 1, 1, 1, 2, 3, c) if c % g == 0])
    co = groups * b.pick.int(1, max(1, 6 // groups))
    if n * co * oh * ow > MAX_NUMEL:
        return None
    fan_in = (c // groups) * kernel[0] * kernel[1]
    inputs = [x, b.const(_normal(b, (co, c // groups) + kernel, 1 / math.sqrt(fan_in)))]
    if b.pick.bool():
        inputs.append(b.const(_normal(b, (co,), 0.3), "bias"))
    attrs = _window_attrs(kernel, strides, dil, pads, auto_pad, b)
    if groups != 1:
        attrs["group"] = groups
    if b.pick.bool():
        attrs["kernel_shape"] = list(kernel)
    return b.op("Conv", inputs, (n, co, oh, ow), **attrs)


def op_batchnorm(b, x, pool):
    c = b.shapes[x][1]
    gamma = b.rng.uniform(0.5, 1.5, c) * np.where(b.rng.random(c) < 0.2, -1, 1)
    stats = [gamma, b.rng.normal(size=c) * 0.3, b.rng.normal(size=c) * 0.3, b.rng.uniform(0.5, 2.0, c)]
    inputs = [x] + [b.const(s, "bn") for s in stats]
    attrs = {"epsilon": b.pick.choice([1e-5, 1e-3])} if b.pick.bool() else {}
    return b.op("BatchNormalization", inputs, b.shapes[x], **attrs)


def op_avgpool(b, x, pool):
    n, c, h, w = b.shapes[x]
    win = _window(b, b.shapes[x], 3, dilate=b.opset >= 19, pool=True)
    if win is None:
        return None
    kernel, strides, dil, pads, auto_pad, (oh, ow) = win
    attrs = {"kernel_shape": list(kernel), **_window_attrs(kernel, strides, dil, pads, auto_pad, b)}
    if any(pads):
        attrs["count_include_pad"] = 1      # 0 with padding is refused (not a convolution)
    elif b.pick.bool():
        attrs["count_include_pad"] = b.pick.int(0, 1)
    exact = all((n_ + p0 + p1 - d * (k - 1) - 1) % s == 0 for n_, k, s, d, p0, p1 in
                zip((h, w), kernel, strides, dil, pads[:2], pads[2:]))
    if exact and auto_pad == "NOTSET" and b.pick.bool():
        attrs["ceil_mode"] = 1              # only where it adds no partial window
    return b.op("AveragePool", [x], (n, c, oh, ow), **attrs)


def _pool_out(n, k, s, d, p0, p1, ceil_mode: bool) -> int | None:
    """ONNX pooling output size, or None where ceil_mode's last window would start in the end
    padding: ONNX's shape inference counts that window, torch's rule (boundflow's) drops it, and
    the frontend refuses the model (ModelLoadError: "lowered output ... has shape ... but ONNX
    shape inference says ...")."""
    span = n + p0 + p1 - d * (k - 1) - 1
    count = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (count - 1) * s >= n + p0:
        return None
    return count


def op_maxpool(b, x, pool):
    n, c, h, w = b.shapes[x]
    win = _window(b, b.shapes[x], 3, dilate=b.opset >= 10, pool=True)
    if win is None:
        return None
    kernel, strides, dil, pads, auto_pad, _ = win
    ceil_mode = auto_pad == "NOTSET" and b.pick.int(0, 2) == 0
    out = tuple(_pool_out(m, k, s, d, p0, p1, ceil_mode) for m, k, s, d, p0, p1 in
                zip((h, w), kernel, strides, dil, pads[:2], pads[2:]))
    if None in out or min(out) < 1:
        return None
    if any(padding_only_window(m, k, s, d, p0, p1, ceil_mode) for m, k, s, d, p0, p1 in
           zip((h, w), kernel, strides, dil, pads[:2], pads[2:])):
        return None                          # refused by the frontend (tests/test_onnx_frontend.py)
    attrs = {"kernel_shape": list(kernel), **_window_attrs(kernel, strides, dil, pads, auto_pad, b)}
    if ceil_mode:
        attrs["ceil_mode"] = 1
    return b.op("MaxPool", [x], (n, c) + out, **attrs)


def op_global_maxpool(b, x, pool):
    n, c = b.shapes[x][:2]
    return b.op("GlobalMaxPool", [x], (n, c, 1, 1))


def op_global_avgpool(b, x, pool):
    n, c = b.shapes[x][:2]
    return b.op("GlobalAveragePool", [x], (n, c, 1, 1))


def op_pad(b, x, pool):
    n, c, h, w = b.shapes[x]
    hw = [b.pick.int(0, 2) for _ in range(4)] if b.pick.int(0, 4) else [0, 0, 0, 0]   # t, l, b, r
    if n * c * (h + hw[0] + hw[2]) * (w + hw[1] + hw[3]) > MAX_NUMEL:
        return None
    pads = [0, 0, hw[0], hw[1], 0, 0, hw[2], hw[3]]
    mode = b.pick.choice(["constant", "constant", "reflect", "edge"] + (["wrap"] if b.opset >= 19 else []))
    if mode == "reflect" and (max(hw[0], hw[2]) > h - 1 or max(hw[1], hw[3]) > w - 1):
        mode = "edge"                        # reflection reaches at most the far edge
    value = 0.0 if mode != "constant" or b.pick.bool() else float(b.pick.choice([0.5, -1.0]))
    attrs = {"mode": mode} if mode != "constant" or b.pick.bool() else {}
    shape = (n, c, h + hw[0] + hw[2], w + hw[1] + hw[3])
    if b.opset < 11:
        if value or b.pick.bool():
            attrs["value"] = value
        return b.op("Pad", [x], shape, pads=pads, **attrs)
    inputs = [x]
    if b.opset >= 18 and b.pick.bool():
        axes = b.pick.choice([[2, 3], [-2, -1], [3, 2]])
        order = {2: (hw[0], hw[2]), 3: (hw[1], hw[3]), -2: (hw[0], hw[2]), -1: (hw[1], hw[3])}
        pads_in = [order[a][0] for a in axes] + [order[a][1] for a in axes]
        inputs += [b.ints(pads_in), b.init(b.float(value), "pad_value") if value or b.pick.bool() else "",
                   b.ints(axes)]
    else:
        inputs.append(b.ints(pads))
        if value or b.pick.bool():
            inputs.append(b.init(b.float(value), "pad_value"))
    return b.op("Pad", inputs, shape, **attrs)


def op_flatten(b, x, pool):
    s = b.shapes[x]
    axis = b.pick.int(-len(s) if b.opset >= 11 else 0, len(s))    # negative from opset 11
    a = axis + len(s) if axis < 0 else axis
    attrs = {"axis": axis} if axis != 1 or b.pick.bool() else {}
    return b.op("Flatten", [x], (_numel(s[:a]), _numel(s[a:])), **attrs)


def _factorise(b, n: int, rank: int) -> list[int]:
    dims = [1] * rank
    k, f = n, 2
    while k > 1:
        while k % f == 0:
            dims[b.pick.int(0, rank - 1)] *= f
            k //= f
        f += 1
    return dims


def op_reshape(b, x, pool):
    s = b.shapes[x]
    if b.pick.int(0, 3) == 0 and len(s) >= 1:     # torch's flatten: Shape -> Gather -> Unsqueeze -> Concat
        shp = b.node("Shape", [x])[0]
        first = b.node("Gather", [shp, b.ints(0)], axis=0)[0]
        lead = b.node("Unsqueeze", [first, b.ints([0])])[0] if b.opset >= 13 else \
            b.node("Unsqueeze", [first], axes=[0])[0]
        target = b.node("Concat", [lead, b.ints([-1])], axis=0)[0]
        b.lines.append(f"{target} = Concat(Unsqueeze(Gather(Shape({x}), 0)), [-1]) [constant]")
        return b.op("Reshape", [x, target], (s[0], _numel(s[1:])), "torch flatten")
    dims = _factorise(b, _numel(s), b.pick.int(1, 4))
    spec = list(dims)
    allowzero = b.opset >= 14 and b.pick.int(0, 3) == 0
    if not allowzero:
        for i in range(min(len(s), len(spec))):
            if spec[i] == s[i] and b.pick.bool():
                spec[i] = 0
    if b.pick.bool():
        spec[b.pick.int(0, len(spec) - 1)] = -1
    attrs = {"allowzero": 1} if allowzero else {}
    target = b.ints(spec) if b.pick.bool() else b.node("Constant", [], value=numpy_helper.from_array(
        np.asarray(spec, dtype=np.int64)))[0]
    return b.op("Reshape", [x, target], tuple(dims), f"target {spec}", **attrs)


def op_squeeze(b, x, pool):
    s = b.shapes[x]
    units = [i for i, d in enumerate(s) if d == 1]
    if b.pick.int(0, 3) == 0 and len(units) < len(s):
        axes = None
    else:
        axes = sorted({b.pick.choice(units) for _ in range(b.pick.int(1, len(units)))})
        if len(axes) == len(s):
            axes = axes[:-1]
    kept = [d for i, d in enumerate(s) if (i not in axes if axes is not None else d != 1)]
    if axes is None:
        return b.op("Squeeze", [x], tuple(kept))
    axes = [a - len(s) if b.opset >= 11 and b.pick.bool() else a for a in axes]
    if b.opset >= 13:
        return b.op("Squeeze", [x, b.ints(axes)], tuple(kept))
    return b.op("Squeeze", [x], tuple(kept), axes=axes)


def op_unsqueeze(b, x, pool):
    s = b.shapes[x]
    rank = len(s) + b.pick.int(1, 2 if len(s) <= 3 else 1)
    axes = sorted({b.pick.int(0, rank - 1) for _ in range(rank - len(s))})
    while len(axes) < rank - len(s):
        axes = sorted(set(axes) | {min(set(range(rank)) - set(axes))})
    it = iter(s)
    shape = tuple(1 if i in axes else next(it) for i in range(rank))
    axes = [a - rank if b.opset >= 11 and b.pick.bool() else a for a in axes]
    if b.opset >= 13:
        return b.op("Unsqueeze", [x, b.ints(axes)], shape)
    return b.op("Unsqueeze", [x], shape, axes=axes)


def op_transpose(b, x, pool):
    s = b.shapes[x]
    if b.pick.int(0, 3) == 0:
        return b.op("Transpose", [x], s[::-1], "default perm")
    perm = list(range(len(s)))
    for i in range(len(perm) - 1, 0, -1):      # Fisher-Yates with drawn swaps
        j = b.pick.int(0, i)
        perm[i], perm[j] = perm[j], perm[i]
    return b.op("Transpose", [x], tuple(s[p] for p in perm), perm=perm)


def op_concat(b, x, pool):
    s = b.shapes[x]
    axis = b.pick.int(0, len(s) - 1)

    def fits(t):
        u = b.shapes[t]
        return len(u) == len(s) and all(p == q for i, (p, q) in enumerate(zip(u, s)) if i != axis)

    partners = [t for t in reversed(pool) if fits(t)]
    inputs = [x] + [b.pick.choice(partners) for _ in range(b.pick.int(1, 2))]
    shape = list(s)
    shape[axis] = sum(b.shapes[t][axis] for t in inputs)
    if _numel(shape) > MAX_NUMEL:
        return None
    if b.pick.bool():
        inputs = inputs[::-1]
    shown = axis - len(s) if b.opset >= 11 and b.pick.bool() else axis
    return b.op("Concat", inputs, tuple(shape), axis=shown)


def op_identity(b, x, pool):
    y = b.op("Identity", [x], b.shapes[x])
    b.alias[y] = x
    return y


def op_dropout(b, x, pool):
    if b.opset < 12:
        attrs = {"ratio": 0.3} if b.pick.bool() else {}
        inputs = [x]
    else:
        attrs = {}
        inputs = [x]
        if b.pick.bool():
            inputs.append(b.init(b.float(0.25), "ratio"))
            if b.pick.bool():
                inputs.append(b.init(np.asarray(False), "training_mode"))
    with_mask = b.pick.bool()
    outs = b.node("Dropout", inputs, n_out=2 if with_mask else 1, **attrs)
    b.shapes[outs[0]] = b.shapes[x]
    b.var_ops.append("Dropout")
    b.lines.append(f"{', '.join(outs)} = Dropout({', '.join(inputs)}) {attrs}")
    b.alias[outs[0]] = x
    return outs[0]


def _unary(op_type: str):
    def make(b, x, pool):
        return b.op(op_type, [x], b.shapes[x])
    return make


def _clip(b, x, lo: float, hi: float) -> str:
    return b.op("Clip", [x], b.shapes[x], min=lo, max=hi) if b.opset < 11 else \
        b.op("Clip", [x, b.init(b.float(lo), "min"), b.init(b.float(hi), "max")], b.shapes[x])


def op_exp(b, x, pool):
    """exp of x clipped to [-4, 2]: nested exponentials stay far from float32 overflow."""
    return b.op("Exp", [_clip(b, x, -4.0, 2.0)], b.shapes[x])


def _periodic(op_type: str):
    """sin / cos of x clipped to [-8, 8] (two and a half periods: every shape of relaxation):
    at a large argument (x^3 of a wide box: ~1000) float32's rounding of the argument (an ulp
    of 6e-5 there) moves the value by more than the checks' 1e-5 tolerance, between torch and
    onnxruntime alike (nightly seed 414795687: Sin(Pow(x, 3)) differed by 1.9e-5)."""
    def make(b, x, pool):
        return b.op(op_type, [_clip(b, x, -8.0, 8.0)], b.shapes[x])
    return make


def _positive(b, x) -> str:
    """softplus(x) + 0.5 >= 0.5: an input inside the domain of log, sqrt, 1/x, x^0.5."""
    sp = b.op("Softplus", [x], b.shapes[x])
    return b.op("Add", [sp, b.init(b.float(0.5), "half")], b.shapes[x], "positive")


def op_log(b, x, pool):
    return b.op("Log", [_positive(b, x)], b.shapes[x])


def op_reciprocal(b, x, pool):
    return b.op("Reciprocal", [_positive(b, x)], b.shapes[x])


def op_sqrt(b, x, pool):
    return b.op("Sqrt", [_positive(b, x)], b.shapes[x])


def op_pow(b, x, pool):
    """x^2 or x^3 of any x, x^p (p = 0.5, 1.5, -1, -2) of a positive one."""
    p = b.pick.choice([2.0, 3.0, 2.0, 0.5, 1.5, -1.0, -2.0])
    base = x if p in (2.0, 3.0) else _positive(b, x)
    return b.op("Pow", [base, b.init(b.float(p), "exponent")], b.shapes[x], f"p={p}")


def op_leaky_relu(b, x, pool):
    alpha = b.pick.choice([0.01, 0.1, 0.5, -0.3, 2.0])
    attrs = {"alpha": alpha} if alpha != 0.01 or b.pick.bool() else {}
    return b.op("LeakyRelu", [x], b.shapes[x], **attrs)


def op_prelu(b, x, pool):
    """A slope per channel (axis 1, broadcast from the right as ONNX wants) or one slope."""
    s = b.shapes[x]
    shape = (s[1],) + (1,) * (len(s) - 2) if len(s) >= 2 and b.pick.bool() else (1,)
    # an initializer: a slope folded at import with a rounding error is refused (exact ones only)
    return b.op("PRelu", [x, b.init(b.float(b.rng.uniform(-0.5, 1.5, size=shape)), "slope")], b.shapes[x])


def op_extreme(b, x, pool):
    """Min or Max of x and a broadcast constant (either order)."""
    kind = b.pick.choice(["Min", "Max"])
    # an initializer: a bound folded at import with a rounding error is refused (exact ones only)
    arr = _normal(b, _broadcast_shape(b, b.shapes[x]), 0.5)
    c = b.init(arr, "bound")
    b.const_shapes[c] = arr.shape
    inputs = [x, c] if b.pick.bool() else [c, x]
    return b.op(kind, inputs, _bshape(b, x, c))


def op_gelu(b, x, pool):
    if b.opset < 20:
        return None
    attrs = {"approximate": b.pick.choice(["none", "tanh"])} if b.pick.bool() else {}
    return b.op("Gelu", [x], b.shapes[x], **attrs)


def op_softmax(b, x, pool):
    if b.opset < 13:                         # refused before 13 (flattened trailing axes)
        return None
    s = b.shapes[x]
    return b.op("Softmax", [x], s, axis=b.pick.int(-len(s), len(s) - 1))


def op_layer_norm(b, x, pool):
    if b.opset < 17:
        return None
    s = b.shapes[x]
    axis = b.pick.int(-len(s), len(s) - 1)
    inner = s[axis:]
    inputs = [x, b.init(b.float(b.rng.uniform(0.5, 1.5, size=inner)), "gamma")]
    if b.pick.bool():
        inputs.append(b.init(b.float(b.rng.normal(size=inner) * 0.3), "beta"))
    # epsilon well above float32's round-off of a near-constant input's variance: with 1e-5 a
    # float32 layer norm (onnxruntime's) amplifies its own rounding 300x, beyond the tolerances
    return b.op("LayerNormalization", inputs, s, axis=axis, epsilon=b.pick.choice([0.1, 0.5]))


def op_square(b, x, pool):
    """Mul(x, x): the square, not a product of two perturbed tensors."""
    return b.op("Mul", [x, x], b.shapes[x], "square")


# -- linear structural ops (boundflow/ops/select.py, reduce.py, conv.py's conv_transpose2d) ----------

def op_conv_transpose(b, x, pool):
    n, c, h, w = b.shapes[x]
    groups = b.pick.choice([g for g in (1, 1, 2, c) if c % g == 0])
    co = groups * b.pick.int(1, max(1, 4 // groups))
    kernel = (b.pick.int(1, 3), b.pick.int(1, 3))
    strides = (b.pick.int(1, 2), b.pick.int(1, 2))
    dil = (b.pick.int(1, 2), b.pick.int(1, 2)) if b.pick.int(0, 3) == 0 else (1, 1)
    reach = [d * (k - 1) for k, d in zip(kernel, dil)]
    pads = [b.pick.int(0, reach[0]), b.pick.int(0, reach[1]), b.pick.int(0, reach[0]), b.pick.int(0, reach[1])]
    out_pad = [b.pick.int(0, s - 1) for s in strides]       # onnxruntime: below the stride
    out = [(m - 1) * s + r + 1 + o - p0 - p1 for m, s, r, o, p0, p1 in zip((h, w), strides, reach, out_pad, pads[:2],
                                                                          pads[2:])]
    if min(out) < 1 or n * co * out[0] * out[1] > MAX_NUMEL:
        return None
    fan_in = (c // groups) * kernel[0] * kernel[1]
    inputs = [x, b.const(_normal(b, (c, co // groups) + kernel, 1 / math.sqrt(fan_in)))]
    if b.pick.bool():
        inputs.append(b.const(_normal(b, (co,), 0.3), "bias"))
    attrs = {"strides": list(strides), "pads": pads}
    if dil != (1, 1):
        attrs["dilations"] = list(dil)
    if any(out_pad):
        attrs["output_padding"] = out_pad
    if groups != 1:
        attrs["group"] = groups
    return b.op("ConvTranspose", inputs, (n, co, out[0], out[1]), **attrs)


def _reduce_axes(b, s) -> list[int]:
    axes = sorted({b.pick.int(0, len(s) - 1) for _ in range(b.pick.int(1, len(s)))})
    return [a - len(s) if b.pick.bool() else a for a in axes]


def op_reduce(b, x, pool, op: str, input_from: int):
    s = b.shapes[x]
    keep = b.pick.bool()
    axes = _reduce_axes(b, s) if b.pick.int(0, 3) else None
    dims = set(range(len(s))) if axes is None else {a % len(s) for a in axes}
    shape = tuple(1 if i in dims else d for i, d in enumerate(s) if keep or i not in dims)
    if not shape:
        return None
    attrs = {} if keep and b.pick.bool() else {"keepdims": int(keep)}
    if axes is None:
        return b.op(op, [x], shape, **attrs)
    if b.opset >= input_from:
        return b.op(op, [x, b.ints(axes)], shape, **attrs)
    return b.op(op, [x], shape, axes=axes, **attrs)


def op_reduce_sum(b, x, pool):
    return op_reduce(b, x, pool, "ReduceSum", 13)


def op_reduce_mean(b, x, pool):
    return op_reduce(b, x, pool, "ReduceMean", 18)


def op_reduce_max(b, x, pool):
    return op_reduce(b, x, pool, "ReduceMax", 18)


def op_reduce_min(b, x, pool):
    return op_reduce(b, x, pool, "ReduceMin", 18)


def op_slice(b, x, pool):
    s = b.shapes[x]
    axes = sorted({b.pick.int(0, len(s) - 1) for _ in range(b.pick.int(1, len(s)))})
    starts, ends, steps, shape = [], [], [], list(s)
    for a in axes:
        step = b.pick.choice([1, 1, 2, -1, -2])
        start, end = b.pick.int(-s[a] - 1, s[a] + 1), b.pick.choice([b.pick.int(-s[a] - 1, s[a] + 1), 2**31, -2**31])
        length = len(range(*slice(start, end, step).indices(s[a])))
        if length == 0:
            return None
        starts.append(start), ends.append(end), steps.append(step)
        shape[a] = length
    inputs = [x, b.ints(starts), b.ints(ends), b.ints([a - len(s) if b.pick.bool() else a for a in axes])]
    if any(t != 1 for t in steps) or b.pick.bool():
        inputs.append(b.ints(steps))
    return b.op("Slice", inputs, tuple(shape))


def op_gather(b, x, pool):
    s = b.shapes[x]
    axis = b.pick.int(0, len(s) - 1)
    if b.pick.int(0, 2) == 0:
        index = np.asarray(b.pick.int(-s[axis], s[axis] - 1), dtype=np.int64)
        if len(s) == 1:
            return None
    else:
        index = np.asarray([b.pick.int(-s[axis], s[axis] - 1) for _ in range(b.pick.int(1, 4))], dtype=np.int64)
    shape = tuple(s[:axis]) + index.shape + tuple(s[axis + 1:])
    if _numel(shape) > MAX_NUMEL:
        return None
    return b.op("Gather", [x, b.init(index, "idx")], shape, axis=axis - len(s) if b.pick.bool() else axis)


def op_split(b, x, pool):
    s = b.shapes[x]
    axis = b.pick.int(0, len(s) - 1)
    if s[axis] < 2:
        return None
    cut = b.pick.int(1, s[axis] - 1)
    sizes = [cut, s[axis] - cut]
    attrs = {"axis": axis}
    if b.opset < 13:
        inputs, attrs["split"] = [x], sizes
    elif b.opset >= 18 and b.pick.bool():
        inputs, attrs["num_outputs"] = [x], 2
        sizes = [-(-s[axis] // 2), s[axis] - -(-s[axis] // 2)]
    else:
        inputs = [x, b.ints(sizes)]
    outs = b.node("Split", inputs, n_out=2, **attrs)
    for o, size in zip(outs, sizes):
        b.shapes[o] = tuple(size if i == axis else d for i, d in enumerate(s))
        b.var_ops.append("Split")
    b.lines.append(f"{', '.join(outs)} = Split({', '.join(inputs)}) {attrs}")
    pool.append(outs[1])
    return outs[0]


def op_expand(b, x, pool):
    s = b.shapes[x]
    target = [d if d != 1 or b.pick.bool() else b.pick.int(2, 3) for d in s]
    target = [1] * b.pick.int(0, 4 - len(s)) + target if len(s) < 4 else target
    spec = [1 if d == t and b.pick.int(0, 2) == 0 else t for d, t in zip((1,) * (len(target) - len(s)) + s, target)]
    if _numel(target) > MAX_NUMEL:
        return None
    return b.op("Expand", [x, b.ints(spec)], tuple(target))


def op_tile(b, x, pool):
    s = b.shapes[x]
    repeats = [b.pick.choice([1, 1, 2, 3]) for _ in s]
    shape = tuple(d * r for d, r in zip(s, repeats))
    if _numel(shape) > MAX_NUMEL:
        return None
    return b.op("Tile", [x, b.ints(repeats)], shape)


def op_resize(b, x, pool):
    n, c, h, w = b.shapes[x]
    scales = [1, 1, b.pick.int(1, 3), b.pick.int(1, 3)]
    shape = (n, c, h * scales[2], w * scales[3])
    if _numel(shape) > MAX_NUMEL:
        return None
    sc = b.init(np.asarray(scales, np.float32), "scales")
    if b.opset < 11:
        return b.op("Resize", [x, sc], shape, mode="nearest")
    attrs = {"mode": "nearest",
             "coordinate_transformation_mode": b.pick.choice(["half_pixel", "asymmetric", "pytorch_half_pixel",
                                                              "tf_half_pixel_for_nn"]),
             "nearest_mode": b.pick.choice(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])}
    roi = b.init(np.zeros(0, np.float32), "roi") if b.opset < 13 else ""    # required (maybe empty) before 13
    if b.pick.bool():
        no_scales = b.init(np.zeros(0, np.float32), "scales") if b.opset < 13 else ""
        return b.op("Resize", [x, roi, no_scales, b.ints(list(shape))], shape, **attrs)
    return b.op("Resize", [x, roi, sc], shape, **attrs)


def op_cast(b, x, pool):
    return b.op("Cast", [x], b.shapes[x], to=TensorProto.DOUBLE if b.dtype == np.float64 else TensorProto.FLOAT)


def _any(s) -> bool:
    return True


# op -> (builder, which input shapes it applies to); Relu first: hypothesis favours the first
OP_FUNCS = {
    "Relu": (op_relu, _any),
    "Conv": (op_conv, _image),
    "Gemm": (op_gemm, lambda s: len(s) == 2),
    "Add": (op_add, _any),
    "MatMul": (op_matmul, lambda s: 1 <= len(s) <= 4),
    "Concat": (op_concat, _any),
    "Sub": (op_sub, _any),
    "Mul": (op_mul, _any),
    "Div": (op_div, _any),
    "BatchNormalization": (op_batchnorm, lambda s: 2 <= len(s) <= 4),
    "AveragePool": (op_avgpool, _image),
    "GlobalAveragePool": (op_global_avgpool, _image),
    "MaxPool": (op_maxpool, _image),
    "GlobalMaxPool": (op_global_maxpool, _image),
    "Sigmoid": (op_sigmoid, _any),
    "Tanh": (op_tanh, _any),
    "Clip": (op_clip, _any),
    "Pad": (op_pad, _image),
    "Flatten": (op_flatten, _any),
    "Reshape": (op_reshape, _any),
    "Squeeze": (op_squeeze, lambda s: 1 in s and len(s) >= 2),
    "Unsqueeze": (op_unsqueeze, lambda s: len(s) <= 4),
    "Transpose": (op_transpose, lambda s: len(s) >= 2),
    "Identity": (op_identity, _any),
    "Dropout": (op_dropout, _any),
    "Exp": (op_exp, _any),
    "Log": (op_log, _any),
    "Reciprocal": (op_reciprocal, _any),
    "Sqrt": (op_sqrt, _any),
    "Pow": (op_pow, _any),
    "Softplus": (_unary("Softplus"), _any),
    "Square": (op_square, _any),
    "LeakyRelu": (op_leaky_relu, _any),
    "PRelu": (op_prelu, _any),
    "Abs": (_unary("Abs"), _any),
    "Sign": (_unary("Sign"), _any),
    "MinMax": (op_extreme, _any),
    "Sin": (_periodic("Sin"), _any),
    "Cos": (_periodic("Cos"), _any),
    "Gelu": (op_gelu, _any),
    "Softmax": (op_softmax, _any),
    "LayerNormalization": (op_layer_norm, _any),
    "ConvTranspose": (op_conv_transpose, _image),
    "ReduceSum": (op_reduce_sum, _any),
    "ReduceMean": (op_reduce_mean, _any),
    "ReduceMax": (op_reduce_max, _any),
    "ReduceMin": (op_reduce_min, _any),
    "Slice": (op_slice, _any),
    "Gather": (op_gather, _any),
    "Split": (op_split, lambda s: max(s, default=0) >= 2),
    "Expand": (op_expand, lambda s: len(s) <= 4),
    "Tile": (op_tile, _any),
    "Resize": (op_resize, _image),
    "Cast": (op_cast, _any),
}
# the elementwise nonlinear ops (ops/convex.py, leaky_relu.py, sign.py, periodic.py, gelu.py)
ELEMENTWISE = ("Exp", "Log", "Reciprocal", "Sqrt", "Pow", "Softplus", "Square", "LeakyRelu", "PRelu", "Abs",
               "Sign", "MinMax", "Sin", "Cos", "Gelu", "Softmax", "LayerNormalization")
OPS = tuple(OP_FUNCS)

# what follows a layer, when something does
ACTIVATIONS = ("Relu", "Relu", "Relu", "Relu", "Sigmoid", "Tanh", "Clip")
# ops that are often followed by an activation, as layers are
ACTIVATED = ("Gemm", "MatMul", "Conv", "Add", "Sub", "BatchNormalization", "AveragePool", "Concat", "Mul",
             "ConvTranspose", "ReduceSum", "ReduceMean")

# families of networks: input shapes, and ops drawn three times as often as the others
FAMILIES = {
    "cnn": dict(input_kinds=("image",), favour=("Relu", "Conv", "AveragePool", "MaxPool", "Pad",
                                                "BatchNormalization", "Add", "Concat", "ConvTranspose", "Resize")),
    # plain conv / relu chains: CROWN keeps A as receptive-field windows there ("patches")
    "convchain": dict(input_kinds=("image",), ops=("Conv",), activate="always"),
    "mlp": dict(input_kinds=("vector", "flat", "rows"), favour=("Relu", "Gemm", "MatMul", "Add", "Sub",
                                                               "Concat")),
    "layout": dict(input_kinds=("image", "rank3", "rows"), favour=("Relu", "Transpose", "Reshape", "Flatten",
                                                                   "Squeeze", "Unsqueeze", "Concat", "Slice", "Gather",
                                                                   "Split", "Expand", "Tile", "ReduceSum")),
    # DOUBLE tensors throughout, with the ops onnxruntime runs in double (no Conv, AveragePool,
    # GlobalAveragePool, GlobalMaxPool; no Clip, which it lacks before opset 11)
    "double": dict(input_kinds=("vector", "flat", "rows", "rank3"), dtypes=("double",),
                   ops=tuple(op for op in OPS if op not in ("Conv", "AveragePool", "GlobalAveragePool",
                                                            "GlobalMaxPool", "Clip", "ConvTranspose", "Resize") + ELEMENTWISE),
                   favour=("Relu", "Gemm", "MatMul", "Add", "Sigmoid")),
}


# --------------------------------------------------------------------------------------------
# whole networks
# --------------------------------------------------------------------------------------------
def _input_shape(pick, kind: str) -> tuple[int, ...]:
    if kind == "tiny":                       # at most 4 values: the verdict fuzzer samples densely
        return pick.choice(TINY_SHAPES)
    if kind == "vector":
        return (1, pick.int(1, 8))
    if kind == "flat":
        return (pick.int(1, 8),)
    if kind == "rows":
        return (pick.int(2, 3), pick.int(1, 5))
    if kind == "image":
        c = pick.int(1, 3)
        return (1, c, pick.int(1, 5), pick.int(1, 5))
    return (pick.int(1, 4), pick.int(1, 4), pick.int(1, 4))


def build_net(pick, seed: int, *, input_kinds=INPUT_SHAPES, ops=OPS, favour=("Relu",), max_steps: int = 8,
              opsets=OPSETS, max_outputs: int = 16, head: str = "auto", activate: str = "sometimes",
              dtypes=("float",)) -> FuzzNet:
    """A random ONNX network (see the module docstring). `head`: "auto" (the output is a single
    small leaf itself, sometimes), or "always" (Flatten + Gemm heads, summed). `activate`:
    whether a layer (ACTIVATED) is followed by an activation: "sometimes" or "always".
    `dtypes`: the element types to choose from, "float" and "double"."""
    rng = np.random.default_rng(seed)
    opset = pick.choice(list(opsets))
    dtype = pick.choice(list(dtypes))
    b = Builder(pick, rng, opset, np.float64 if dtype == "double" else np.float32)
    elem = TensorProto.DOUBLE if dtype == "double" else TensorProto.FLOAT
    b.shapes["x"] = in_shape = _input_shape(pick, pick.choice(list(input_kinds)))
    pool = ["x"]
    for _ in range(pick.int(min(2, max_steps), max_steps)):
        for _attempt in range(3):            # some choices do not fit (too large, no window)
            usable = [op for op in ops if any(OP_FUNCS[op][1](b.shapes[t]) for t in pool)]
            if not usable:
                break
            usable += [op for op in usable if op in favour] * 2
            op = pick.choice(usable)
            make, applies = OP_FUNCS[op]
            y = make(b, _choose_input(b, pool, applies), pool)
            if y is not None:
                pool.append(y)
                if op in ACTIVATED and (activate == "always" or pick.bool()):
                    acts = [a for a in ACTIVATIONS if a in ops] or ["Relu"]
                    pool.append(OP_FUNCS[pick.choice(acts)][0](b, y, pool))
                break
    leaves = [t for t in pool if b.readers.get(t, 0) == 0]
    if (head == "auto" and leaves != ["x"] and len(leaves) == 1 and _numel(b.shapes[leaves[0]]) <= max_outputs
            and pick.bool()):
        out = leaves[0]
    else:
        k = pick.int(1, min(4, max_outputs))
        heads = []
        for t in leaves:
            if heads and t != leaves[-1] and pick.int(0, 5) == 0:
                b.lines.append(f"(leaf {t} left dead)")
                continue
            flat = b.op("Flatten", [t], (1, _numel(b.shapes[t])), "head", axis=0)
            n = _numel(b.shapes[t])
            w = b.init(_normal(b, (k, n), 1 / math.sqrt(n)), "head_w")
            heads.append(b.op("Gemm", [flat, w, b.init(_normal(b, (k,), 0.3), "head_b")], (1, k), "head",
                              transB=1))
        out = heads[0]
        for h in heads[1:]:
            out = b.op("Add", [out, h], (1, k), "head")
    graph = helper.make_graph(
        b.nodes, "fuzz", [helper.make_tensor_value_info("x", elem, list(in_shape))],
        [helper.make_tensor_value_info(out, elem, list(b.shapes[out]))], b.inits)
    opsets_ = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets_, producer_name="boundflow-fuzz")
    model.ir_version = max(4, helper.find_min_ir_version_for(opsets_))
    return FuzzNet(model, in_shape, b.shapes[out], opset, dtype, b.lines)
