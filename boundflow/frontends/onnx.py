"""ONNX frontend: lower an ONNX model (opsets 8 to 20) to the primal graph.

`load_onnx(path_or_model) -> Graph`

How it works:
  1. Read the protobuf, run `onnx.checker` and strict ONNX shape inference (with a symbolic batch
     dimension fixed to 1). Anything malformed fails here with a `ModelLoadError` naming the file.
  2. Walk the nodes in order. Every ONNX tensor is either a *constant* (an initializer, a
     Constant node, or the result of a node whose inputs are all constants, folded here with
     numpy; the shape of a variable tensor is static, so `Shape(x)` is a constant too) or a
     *variable* (depends on the network input). Constant nodes are evaluated by the functions in
     `FOLDERS`; nodes with a variable input are lowered to primal ops by the functions in
     `LOWERINGS`, one per ONNX op type.
  3. Every primal value gets the shape `boundflow.domains.concrete.infer_shape` computes, which is
     cross-checked against ONNX shape inference; the graph is validated at the end.

Conventions:
  * Per-region shapes are the ONNX shapes as declared (batch dimension 1 included); ONNX axis k
    is per-region axis k.
  * An initializer used verbatim becomes a `param` value under its ONNX name. Tensors derived at
    import (a transposed or scaled weight) are `param` when they are weights or biases of a
    linear/conv2d, `const` otherwise (affine scale and shift).
  * Primal values keep the ONNX tensor names; nodes inserted by a lowering get fresh names
    derived from the ONNX node's name.
  * Float constants keep their precision (float64 stays float64). A constant computed at import
    (1 / divisor, a BatchNorm's scale and shift, a folded constant expression) is computed in
    float64 with a rigorous bound on its distance to the exact value its formula defines
    (`Value.err`, domains/rounding.py), so that sound_fp bounds cover the model's real-arithmetic
    semantics.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from boundflow.domains.concrete import infer_shape, validate
from boundflow.domains.rounding import Enclosed, unit_roundoff
from boundflow.errors import ModelLoadError, UnsupportedOpError
from boundflow.ir.primal import Graph, Node, TensorType, Value

MIN_OPSET, MAX_OPSET = 8, 20

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def load_onnx(model: str | os.PathLike | onnx.ModelProto) -> Graph:
    """Lower an ONNX model (a file path or a ModelProto) to a validated primal Graph."""
    proto, source = _read(model)
    _check(proto, source)
    proto = _fix_batch_dim(proto, source)
    inferred = _infer_shapes(proto, source)
    return _Importer(proto, source, inferred).run()


# --------------------------------------------------------------------------------------------
# reading and checking
# --------------------------------------------------------------------------------------------
def _read(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, f"<ModelProto {model.graph.name or 'unnamed'}>"
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"load_onnx: expected a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError, onnx.checker.ValidationError) as e:
        raise ModelLoadError(f"{path}: cannot parse the ONNX protobuf (truncated or not an ONNX "
                             f"file?): {type(e).__name__}: {e}") from e
    return proto, str(path)


def _check(proto: onnx.ModelProto, source: str) -> None:
    # A truncated file can parse as a valid but partial message, so check for a usable graph.
    if not proto.HasField("graph") or len(proto.graph.node) == 0 or len(proto.graph.output) == 0:
        raise ModelLoadError(f"{source}: the model has no graph, nodes or outputs (empty or truncated file?)")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        # Lenient: the checker also rejects harmless things (a graph output declared without a
        # shape). Real defects still fail below: strict shape inference and the import's own
        # checks (undefined tensors, unsupported ops) raise with the file named.
        warnings.warn(f"{source}: onnx.checker: {str(e).strip()}; importing anyway", stacklevel=3)
    version = _opset(proto, source)
    if not MIN_OPSET <= version <= MAX_OPSET:
        raise UnsupportedOpError(f"{source}: ONNX opset {version} is not supported "
                                 f"(supported: {MIN_OPSET} to {MAX_OPSET})")


def _opset(proto: onnx.ModelProto, source: str) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise ModelLoadError(f"{source}: the model imports no default-domain ONNX opset")


def _network_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def _fix_batch_dim(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Return a copy whose single network input has a static shape (a dynamic dim 0 becomes 1)."""
    inputs = _network_inputs(proto)
    if len(inputs) != 1:
        raise ModelLoadError(f"{source}: exactly one network input (a graph input that is not an "
                             f"initializer) is supported, got {[i.name for i in inputs]}")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    inp = next(i for i in fixed.graph.input if i.name == inputs[0].name)
    tt = inp.type.tensor_type
    if not inp.type.HasField("tensor_type") or not tt.HasField("shape"):
        raise ModelLoadError(f"{source}: network input {inp.name!r} has no declared tensor shape")
    if tt.elem_type not in _FLOAT_TYPES:
        raise UnsupportedOpError(f"{source}: network input {inp.name!r} has element type "
                                 f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; only floating point "
                                 f"inputs are supported")
    for k, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            continue
        if k == 0:  # a symbolic batch dimension: one region is one example
            d.Clear()
            d.dim_value = 1
        else:
            what = d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            raise ModelLoadError(f"{source}: network input {inp.name!r} has a dynamic dimension {what!r} "
                                 f"at axis {k}; only the batch axis 0 may be dynamic")
    return fixed


def _infer_shapes(proto: onnx.ModelProto, source: str) -> dict[str, tuple[int, ...] | None]:
    """ONNX shape inference (strict): name -> static shape, or None where it is not static."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as e:
        raise ModelLoadError(f"{source}: ONNX shape inference failed, so tensor shapes cannot be "
                             f"determined: {e}") from e
    out: dict[str, tuple[int, ...] | None] = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            out[vi.name] = None
            continue
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = (tuple(d.dim_value for d in dims)
                        if all(d.HasField("dim_value") for d in dims) else None)
    return out


# --------------------------------------------------------------------------------------------
# the importer: state shared by the per-op functions
# --------------------------------------------------------------------------------------------
def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index} (output {node.output[0] if node.output else '?'})"


@dataclass
class _Importer:
    proto: onnx.ModelProto
    source: str
    inferred: dict[str, tuple[int, ...] | None]
    graph: Graph = field(init=False)
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # ONNX name -> constant array
    errs: dict[str, np.ndarray] = field(default_factory=dict)    # error bounds of computed float constants
    env: dict[str, str] = field(default_factory=dict)            # ONNX name -> primal value name
    initializers: set[str] = field(default_factory=set)
    taken: set[str] = field(default_factory=set)
    opset: int = 0
    # the node being lowered (for names and error messages)
    node: onnx.NodeProto | None = None
    node_label: str = ""

    def __post_init__(self):
        g = self.proto.graph
        self.opset = _opset(self.proto, self.source)
        self.graph = Graph({}, [], [], [], name=g.name or "model")
        for init in g.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
            self.initializers.add(init.name)
        self.taken |= {n for node in g.node for n in list(node.input) + list(node.output)}
        self.taken |= {i.name for i in g.input} | {o.name for o in g.output} | self.initializers
        inp = _network_inputs(self.proto)[0]
        shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
        self.graph.values[inp.name] = Value(inp.name, TensorType(shape), kind="input")
        self.graph.inputs.append(inp.name)
        self.env[inp.name] = inp.name

    # -- driving -------------------------------------------------------------------------------
    def run(self) -> Graph:
        for index, node in enumerate(self.proto.graph.node):
            self.node, self.node_label = node, _label(node, index)
            self._import_node(node)
        self.node = None
        self._bind_outputs()
        _annotate_layouts(self.graph)
        try:
            validate(self.graph)
        except ValueError as e:  # a lowering bug, not a user error; still fail loudly
            raise ModelLoadError(f"{self.source}: the lowered graph is inconsistent: {e}") from e
        return self.graph

    def _import_node(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx"):
            self.unsupported(f"custom domain {node.domain!r}")
        for name in node.input:
            if name and name not in self.consts and name not in self.env:
                raise ModelLoadError(f"{self.source}: {node.op_type} node {self.node_label!r} reads "
                                     f"{name!r}, which no earlier node or initializer defines")
        inputs = [n for n in node.input if n]
        if node.op_type in FOLDERS and all(n in self.consts for n in inputs):
            try:
                results = _fold(self, node)
            except (ValueError, IndexError, TypeError, KeyError) as e:
                raise ModelLoadError(f"{self.source}: cannot constant-fold {node.op_type} node "
                                     f"{self.node_label!r}: {e}") from e
            for out, (arr, err) in zip(node.output, results):
                if out:
                    self.consts[out] = np.asarray(arr)
                    if err is not None and np.any(err):
                        self.errs[out] = np.asarray(err)
            return
        lower = LOWERINGS.get(node.op_type)
        if lower is None:
            self.unsupported("unsupported op (no sound lowering to the primal ops)")
        if all(n in self.consts for n in inputs):
            self.unsupported("all its inputs are constant, and constant folding of this op is not supported")
        lower(self, node, _attrs(node))
        for out in node.output:
            if out in self.env:
                self._check_shape(out)

    def _check_shape(self, onnx_name: str) -> None:
        want = self.inferred.get(onnx_name)
        got = self.shape(self.env[onnx_name])
        if want is not None and tuple(want) != tuple(got):
            raise ModelLoadError(f"{self.source}: {self.node.op_type} node {self.node_label!r}: lowered "
                                 f"output {onnx_name!r} has shape {list(got)} but ONNX shape inference "
                                 f"says {list(want)}")

    def _bind_outputs(self) -> None:
        onnx_outputs = [o.name for o in self.proto.graph.output]
        for o in onnx_outputs:
            if o in self.consts:
                raise UnsupportedOpError(f"{self.source}: graph output {o!r} does not depend on "
                                         f"the network input (it is a constant)")
            if o not in self.env:
                raise ModelLoadError(f"{self.source}: graph output {o!r} is never computed")
            name = self.env[o]
            if (name != o and self.graph.values[name].kind == "intermediate"
                    and name not in onnx_outputs and name not in self.graph.outputs):
                # the output comes through an Identity/Dropout: keep the ONNX output name
                _rename(self.graph, name, o)
                self.env = {k: (o if v == name else v) for k, v in self.env.items()}
                name = o
            self.graph.outputs.append(name)

    # -- helpers for the lowerings ---------------------------------------------------------------
    def unsupported(self, why: str):
        raise UnsupportedOpError(
            f"{self.source}: {self.node.op_type} node {self.node_label!r}: {why}. Supported ops: "
            f"{', '.join(sorted(LOWERINGS))} (on variable inputs); "
            f"{', '.join(sorted(FOLDERS))} (on constant inputs, folded at import)")

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, name: str, what: str = "input") -> np.ndarray:
        if name not in self.consts:
            self.unsupported(f"{what} {name!r} must be a constant (it depends on the network input)")
        return self.consts[name]

    def enclosed(self, name: str, what: str = "input") -> Enclosed:
        """A float constant with its error bound (zero for initializers)."""
        arr = np.asarray(self.const(name, what), dtype=np.float64)
        err = self.errs.get(name)
        return Enclosed(torch.from_numpy(arr.copy()),
                        torch.zeros(arr.shape, dtype=torch.float64) if err is None else torch.from_numpy(err.copy()))

    def var(self, name: str) -> str:
        """Primal name of a variable ONNX tensor."""
        return self.env[name]

    def shape(self, primal_name: str) -> tuple[int, ...]:
        return self.graph.shape(primal_name)

    def shape_of(self, onnx_name: str) -> tuple[int, ...]:
        return tuple(self.consts[onnx_name].shape) if onnx_name in self.consts else self.shape(self.env[onnx_name])

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def tensor(self, arr: np.ndarray | Enclosed, what: str, kind: str = "const",
               onnx_name: str | None = None) -> str:
        """A param/const value holding `arr` (an exact array, or an Enclosed computed constant,
        stored as Enclosed.stored says). `onnx_name`: the initializer it is verbatim."""
        if onnx_name is not None and onnx_name in self.initializers:
            if onnx_name not in self.graph.values:
                data, _ = Enclosed.exact(torch.from_numpy(_float(self.consts[onnx_name]))).stored()
                self.graph.values[onnx_name] = Value(onnx_name, TensorType(tuple(data.shape)), "param", data)
            return onnx_name
        enc = arr if isinstance(arr, Enclosed) else Enclosed.exact(torch.from_numpy(_float(arr)))
        data, err = enc.stored()
        name = self.fresh(f"{self.node.name or self.node.op_type}/{what}")
        self.graph.values[name] = Value(name, TensorType(tuple(data.shape)), kind, data, err)
        return name

    def emit(self, op: str, inputs: list[str], attrs: dict | None = None, out: str | None = None) -> str:
        """Append a primal node; its output is `out` (an ONNX output name) or a fresh name."""
        name = out if out is not None else self.fresh(f"{self.node.name or self.node.op_type}/{op}")
        node = Node(op, list(inputs), [name], dict(attrs or {}), name=self.node.name or self.node_label)
        try:
            shape = infer_shape(self.graph, node)
        except ValueError as e:
            self.unsupported(f"cannot lower to {op}: {e}")
        self.graph.values[name] = Value(name, TensorType(tuple(shape)))
        self.graph.nodes.append(node)
        return name

    def bind(self, onnx_out: str, primal_name: str) -> None:
        self.env[onnx_out] = primal_name

    def reshape(self, x: str, shape, out: str | None = None) -> str:
        return self.emit("reshape", [x], {"shape": tuple(int(d) for d in shape)}, out)

    def transpose(self, x: str, perm, out: str | None = None) -> str:
        return self.emit("transpose", [x], {"perm": tuple(int(p) for p in perm)}, out)

    def swap_last_two(self, x: str, out: str | None = None) -> str:
        r = len(self.shape(x))
        return self.transpose(x, list(range(r - 2)) + [r - 1, r - 2], out)


def _rename(graph: Graph, old: str, new: str) -> None:
    v = graph.values.pop(old)
    graph.values[new] = dataclasses.replace(v, name=new)
    for n in graph.nodes:
        n.inputs = [new if i == old else i for i in n.inputs]
        n.outputs = [new if o == old else o for o in n.outputs]
    graph.outputs = [new if o == old else o for o in graph.outputs]


def _annotate_layouts(graph: Graph) -> None:
    """Record NCHW on 4-D conv inputs, and NHWC on a tensor transposed to NCHW for a conv."""
    producer = graph.producer()

    def set_layout(name, layout):
        v = graph.values[name]
        if len(v.type.shape) == 4 and v.type.layout is None:
            graph.values[name] = dataclasses.replace(v, type=TensorType(v.type.shape, v.type.dtype, layout))

    for node in graph.nodes:
        if node.op != "conv2d":
            continue
        x = node.inputs[0]
        set_layout(x, "NCHW")
        p = producer.get(x)
        if p is not None and p.op == "transpose" and tuple(p.attrs["perm"]) == (0, 3, 1, 2):
            set_layout(p.inputs[0], "NHWC")


# --------------------------------------------------------------------------------------------
# shared shape arithmetic
# --------------------------------------------------------------------------------------------
def _norm_axis(axis: int, rank: int, imp: _Importer) -> int:
    if not -rank <= axis < rank:
        imp.unsupported(f"axis {axis} is out of range for rank {rank}")
    return axis % rank


def _reshape_target(imp: _Importer, in_shape, spec, allowzero: int) -> tuple[int, ...]:
    """ONNX Reshape semantics: 0 copies the input dim (unless allowzero), -1 is inferred."""
    spec = [int(d) for d in np.asarray(spec).reshape(-1)]
    out = []
    for i, d in enumerate(spec):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                imp.unsupported(f"Reshape target {spec}: 0 at axis {i} has no input dim to copy")
            out.append(int(in_shape[i]))
        else:
            out.append(d)
    total = math.prod(in_shape)
    if out.count(-1) > 1:
        imp.unsupported(f"Reshape target {spec} has more than one -1")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or total % known:
            imp.unsupported(f"cannot reshape {list(in_shape)} to {spec}")
        out[out.index(-1)] = total // known
    if math.prod(out) != total or any(d < 0 for d in out):
        imp.unsupported(f"cannot reshape {list(in_shape)} to {spec}")
    return tuple(out)


def _flatten_shape(imp: _Importer, shape, axis: int) -> tuple[int, int]:
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis <= len(shape):
        imp.unsupported(f"Flatten axis {axis} out of range for rank {len(shape)}")
    return (math.prod(shape[:axis]), math.prod(shape[axis:]))


def _axes(imp: _Importer, node: onnx.NodeProto, attrs: dict) -> list[int] | None:
    """Squeeze/Unsqueeze axes: an attribute before opset 13, an optional input from 13 on."""
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > 1 and node.input[1]:
        return [int(a) for a in imp.const(node.input[1], "axes").reshape(-1)]
    return None


def _squeeze_shape(imp: _Importer, shape, axes) -> tuple[int, ...]:
    if axes is None:
        return tuple(d for d in shape if d != 1)
    axes = {_norm_axis(a, len(shape), imp) for a in axes}
    if any(shape[a] != 1 for a in axes):
        imp.unsupported(f"cannot squeeze axes {sorted(axes)} of shape {list(shape)}")
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _unsqueeze_shape(imp: _Importer, shape, axes) -> tuple[int, ...]:
    if axes is None:
        imp.unsupported("Unsqueeze needs axes")
    rank = len(shape) + len(axes)
    axes = sorted(_norm_axis(a, rank, imp) for a in axes)
    out, it = [], iter(shape)
    for i in range(rank):
        out.append(1 if i in axes else next(it))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# constant folding (all inputs constant): fn(imp, attrs, *arrays) -> list of arrays
# --------------------------------------------------------------------------------------------
def _fold_constant(imp, attrs):
    if "value" in attrs:
        return [numpy_helper.to_array(attrs["value"])]
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return [np.array(attrs[key], dtype=dtype)]
    imp.unsupported(f"Constant with attributes {sorted(attrs)}")


def _int_div(a, b):
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(np.asarray(b).dtype, np.integer):
        q = np.abs(a) // np.abs(b)  # ONNX integer division truncates toward zero
        return (q * np.sign(a) * np.sign(b)).astype(np.result_type(a, b))
    return a / b


def _fold_slice(imp, attrs, data, starts=None, ends=None, axes=None, steps=None):
    if starts is None:  # opset < 10: attributes
        starts, ends, axes = attrs["starts"], attrs["ends"], attrs.get("axes")
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    axes = range(len(starts)) if axes is None else np.asarray(axes).reshape(-1)
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else np.asarray(steps).reshape(-1)
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(e), int(st))  # python slicing clamps like ONNX
    return [data[tuple(index)]]


def _fold_gemm(imp, attrs, a, b, c=None):
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return [(y + attrs.get("beta", 1.0) * c if c is not None else y).astype(a.dtype)]


def _fold_constant_of_shape(imp, attrs, shape):
    value = numpy_helper.to_array(attrs["value"]).reshape(-1) if "value" in attrs else np.zeros(1, np.float32)
    return [np.full([int(d) for d in shape.reshape(-1)], value[0], dtype=value.dtype)]


def _fold_shape(imp, attrs, x):
    return [np.array(x.shape[attrs.get("start", 0):attrs.get("end", None)], dtype=np.int64)]


def _float(arr) -> np.ndarray:
    """A constant as floats, exactly: float64 stays float64 (and integers become float64),
    float32 / float16 / bfloat16 become float32."""
    arr = np.asarray(arr)
    return np.array(arr, dtype=np.float64 if arr.dtype in (np.float64, np.int64, np.int32) else np.float32)


def _is_float(arr) -> bool:
    return arr is not None and np.issubdtype(np.asarray(arr).dtype, np.floating)


def _gemm_enclosed(attrs, a, b, c=None):
    a = a.map(lambda t: t.T) if attrs.get("transA", 0) else a
    b = b.map(lambda t: t.T) if attrs.get("transB", 0) else b
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    y = a.matmul(b) if alpha == 1.0 else a.matmul(b) * alpha
    return y if c is None else y + (c if beta == 1.0 else c * beta)


# float arithmetic folded in float64 with a rigorous error bound (domains/rounding.py)
ENCLOSED_FOLDERS: dict[str, Callable] = {
    "Add": lambda attrs, a, b: a + b,
    "Sub": lambda attrs, a, b: a - b,
    "Mul": lambda attrs, a, b: a * b,
    "Div": lambda attrs, a, b: a * b.reciprocal(),
    "Neg": lambda attrs, x: -x,
    "Sqrt": lambda attrs, x: x.sqrt(),
    "MatMul": lambda attrs, a, b: a.matmul(b),
    "Gemm": _gemm_enclosed,
}


def _fold(imp, node) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(value, error bound or None) of each output of a node whose inputs are all constant.

    Float arithmetic is evaluated on enclosures; the other folders only rearrange, index or
    copy their inputs (or compute integer shapes), so applying them to the inputs' error bounds
    gives the outputs' (Relu too: it is 1-Lipschitz), and a Cast to a float type adds its rounding."""
    attrs = _attrs(node)
    arrays = [imp.consts[n] if n else None for n in node.input]
    op = node.op_type
    floats = [_is_float(a) for a in arrays]
    if op in ENCLOSED_FOLDERS and all(floats):
        y = ENCLOSED_FOLDERS[op](attrs, *(imp.enclosed(n) for n in node.input if n))
        value, err = y.value.numpy(), y.err.expand_as(y.value).numpy()
        return [(value, err)]
    results = FOLDERS[op](imp, attrs, *arrays)
    if not any(n in imp.errs for n in node.input if n):
        return [(r, None) for r in results]
    if op == "Cast":
        return [_cast_err(imp, node, arrays[0], results[0])]
    errs = [imp.errs.get(n, np.zeros(np.shape(a))) if f else a for n, a, f in zip(node.input, arrays, floats)]
    return [(r, e if _is_float(r) else None) for r, e in zip(results, FOLDERS[op](imp, attrs, *errs))]


def _cast_err(imp, node, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Cast of an inexact constant: to a float type, the error grows by the rounding to it."""
    if not _is_float(y):
        imp.unsupported("casting a computed float constant to an integer type (its error has no bound)")
    err = imp.errs[node.input[0]]
    u = unit_roundoff(torch.float64 if y.dtype == np.float64 else torch.float32)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return y, 2 * (err + u * (np.abs(x64) + err) + np.abs(y64 - x64))


FOLDERS: dict[str, Callable] = {
    "Constant": _fold_constant,
    "Identity": lambda imp, attrs, x: [x],
    "Dropout": lambda imp, attrs, x, *_: [x, np.ones(x.shape, dtype=bool)],
    "Shape": _fold_shape,
    "Gather": lambda imp, attrs, x, i: [np.take(x, i, axis=attrs.get("axis", 0))],
    "Unsqueeze": lambda imp, attrs, x, axes=None: [x.reshape(_unsqueeze_shape(
        imp, x.shape, attrs.get("axes", None if axes is None else axes.reshape(-1).tolist())))],
    "Squeeze": lambda imp, attrs, x, axes=None: [x.reshape(_squeeze_shape(
        imp, x.shape, attrs.get("axes", None if axes is None else axes.reshape(-1).tolist())))],
    "Concat": lambda imp, attrs, *xs: [np.concatenate(xs, axis=attrs["axis"])],
    "Cast": lambda imp, attrs, x: [x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))],
    "Reshape": lambda imp, attrs, x, shape=None: [x.reshape(_reshape_target(
        imp, x.shape, attrs["shape"] if shape is None else shape, attrs.get("allowzero", 0)))],
    "ConstantOfShape": _fold_constant_of_shape,
    "Add": lambda imp, attrs, a, b: [a + b],
    "Sub": lambda imp, attrs, a, b: [a - b],
    "Mul": lambda imp, attrs, a, b: [a * b],
    "Div": lambda imp, attrs, a, b: [_int_div(a, b)],
    "Neg": lambda imp, attrs, x: [-x],
    "Sqrt": lambda imp, attrs, x: [np.sqrt(x)],
    "Relu": lambda imp, attrs, x: [np.maximum(x, 0).astype(x.dtype)],
    "Transpose": lambda imp, attrs, x: [np.transpose(x, attrs.get("perm"))],
    "Flatten": lambda imp, attrs, x: [x.reshape(_flatten_shape(imp, x.shape, attrs.get("axis", 1)))],
    "Slice": _fold_slice,
    "MatMul": lambda imp, attrs, a, b: [np.matmul(a, b)],
    "Gemm": _fold_gemm,
}


# --------------------------------------------------------------------------------------------
# lowerings (at least one variable input): fn(imp, node, attrs) binds the node's outputs
# --------------------------------------------------------------------------------------------
def _lower_shape(imp, node, attrs):
    shape = imp.shape_of(node.input[0])  # static: a variable's shape is known at import
    imp.consts[node.output[0]] = _fold_shape(imp, attrs, np.empty(shape, dtype=np.uint8))[0]


def _lower_identity(imp, node, attrs):
    imp.bind(node.output[0], imp.var(node.input[0]))


def _lower_dropout(imp, node, attrs):
    if len(node.input) > 2 and node.input[2] and bool(np.asarray(imp.const(node.input[2], "training_mode")).any()):
        imp.unsupported("Dropout in training mode")
    imp.bind(node.output[0], imp.var(node.input[0]))
    if len(node.output) > 1 and node.output[1]:  # the mask is all ones at inference
        imp.consts[node.output[1]] = np.ones(imp.shape_of(node.input[0]), dtype=bool)


def _lower_relu(imp, node, attrs):
    imp.bind(node.output[0], imp.emit("relu", [imp.var(node.input[0])], out=node.output[0]))


def _linear(imp, x: str, w: np.ndarray | Enclosed, b: np.ndarray | Enclosed | None, out: str | None = None,
            w_name: str | None = None, b_name: str | None = None) -> str:
    """linear over the last axis with W [out, in]; *_name: the initializer a tensor is verbatim."""
    inputs = [x, imp.tensor(w, "weight", "param", w_name)]
    if b is not None:
        inputs.append(imp.tensor(b, "bias", "param", b_name))
    return imp.emit("linear", inputs, out=out)


def _affine(imp, x: str, scale: np.ndarray | Enclosed, shift: np.ndarray | Enclosed, out: str | None = None,
            shift_name: str | None = None) -> str:
    """y = x * scale + shift; reshapes x first if the constants add leading axes of size 1."""
    s_shape = imp.shape(x)
    try:
        full = tuple(np.broadcast_shapes(s_shape, scale.shape, shift.shape))
    except ValueError:
        imp.unsupported(f"constant of shape {list(scale.shape)}/{list(shift.shape)} does not broadcast "
                        f"with the variable of shape {list(s_shape)}")
    if full != s_shape:
        if math.prod(full) != math.prod(s_shape):
            imp.unsupported(f"a constant would broadcast the variable of shape {list(s_shape)} to "
                            f"{list(full)}; only variables of the full shape are supported")
        x = imp.reshape(x, full)  # only leading axes of size 1 are added
    return imp.emit("affine", [x, imp.tensor(scale, "scale"), imp.tensor(shift, "shift", onnx_name=shift_name)],
                    out=out)


def _lower_gemm(imp, node, attrs):
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
    out = node.output[0]
    cc = None if c is None else imp.enclosed(c, "C")
    if cc is not None and beta != 1.0:
        cc = cc * beta
    if not imp.is_const(a) and imp.is_const(b):
        x = imp.var(a)
        if trans_a:
            x = imp.transpose(x, (1, 0))
        bb = imp.enclosed(b, "B")
        w = bb if trans_b else bb.map(lambda t: t.T)  # [N, K]
        w = w if alpha == 1.0 else w * alpha
        n = w.shape[0]
        w_name = b if (trans_b and alpha == 1.0) else None
        if cc is None or len(cc.shape) < 2 or cc.shape[0] == 1:  # C is the same for every row: a bias
            bias = None if cc is None else cc.map(lambda t: t.broadcast_to((1, n)).reshape(n))
            b_name = c if (cc is not None and beta == 1.0 and cc.shape == (n,)) else None
            y = _linear(imp, x, w, bias, out, w_name, b_name)
        else:  # C varies along rows: add it after the product
            y = _linear(imp, x, w, None, w_name=w_name)
            y = _affine(imp, y, _ones(cc), cc, out)
    elif imp.is_const(a) and not imp.is_const(b):
        # Y = A' @ X'  =>  Y^T = X'^T @ A'^T: a linear with W = A' on the rows of X'^T
        aa = imp.enclosed(a, "A")
        w = aa.map(lambda t: t.T) if trans_a else aa  # [M, K]
        w = w if alpha == 1.0 else w * alpha
        x = imp.var(b)
        xt = x if trans_b else imp.transpose(x, (1, 0))  # [N, K]
        y = _linear(imp, xt, w, None)
        if cc is None:
            y = imp.transpose(y, (1, 0), out)
        else:
            y = _affine(imp, imp.transpose(y, (1, 0)), _ones(cc), cc, out)
    elif imp.is_const(a) and imp.is_const(b):  # unreachable: folded
        raise AssertionError("constant Gemm should have been folded")
    else:
        imp.unsupported("both A and B are variables (a product of two variables is not linear; no sound rule)")
    imp.bind(out, y)


def _lower_matmul(imp, node, attrs):
    a, b = node.input[0], node.input[1]
    out = node.output[0]
    if imp.is_const(a) == imp.is_const(b):
        imp.unsupported("both operands are variables (a product of two variables is not linear; "
                        "no sound rule)")
    if imp.is_const(b):  # x @ W
        w = imp.enclosed(b, "B")
        x = imp.var(a)
        if len(w.shape) == 2:
            y = _linear(imp, x, w.map(lambda t: t.T), None, out)
        elif len(w.shape) == 1:  # x [..., k] @ w [k] -> [...]
            y = _linear(imp, x, w.map(lambda t: t[None, :]), None)
            y = imp.reshape(y, imp.shape(x)[:-1], out)
        else:
            imp.unsupported(f"batched constant matrix of shape {list(w.shape)}")
    else:  # W @ x
        w = imp.enclosed(a, "A")
        x = imp.var(b)
        xs = imp.shape(x)
        ndim = len(w.shape)
        if ndim not in (1, 2):
            imp.unsupported(f"batched constant matrix of shape {list(w.shape)}")
        w2 = w if ndim == 2 else w.map(lambda t: t[None, :])
        verbatim = a if ndim == 2 else None
        if len(xs) == 1:  # W [m, k] @ x [k] -> [m]
            y = _linear(imp, x, w2, None, None if ndim == 1 else out, w_name=verbatim)
            if ndim == 1:
                y = imp.reshape(y, (), out)
        else:  # W @ x [..., k, n]: transpose the last two axes, linear, transpose back
            y = _linear(imp, imp.swap_last_two(x), w2, None, w_name=verbatim)  # [..., n, m]
            if ndim == 2:
                y = imp.swap_last_two(y, out)
            else:
                y = imp.reshape(y, xs[:-2] + xs[-1:], out)
    imp.bind(out, y)


def _const_operand(imp, node, var_pos: int) -> Enclosed:
    return imp.enclosed(node.input[1 - var_pos])


def _ones(c: Enclosed) -> np.ndarray:
    return np.ones(c.shape, dtype=np.float32)


def _same_shape_vars(imp, a: str, b: str, verb: str) -> tuple[str, str]:
    x, y = imp.var(a), imp.var(b)
    if imp.shape(x) != imp.shape(y):
        imp.unsupported(f"{verb} two variables of different shapes {list(imp.shape(x))} and "
                        f"{list(imp.shape(y))} (broadcasting between variables is not supported)")
    return x, y


def _lower_add(imp, node, attrs):
    a, b = node.input
    out = node.output[0]
    if not imp.is_const(a) and not imp.is_const(b):
        x, y = _same_shape_vars(imp, a, b, "adding")
        imp.bind(out, imp.emit("add", [x, y], out=out))
        return
    var_pos = 0 if not imp.is_const(a) else 1
    c = _const_operand(imp, node, var_pos)
    imp.bind(out, _affine(imp, imp.var(node.input[var_pos]), _ones(c), c, out,
                          shift_name=node.input[1 - var_pos]))


def _lower_sub(imp, node, attrs):
    a, b = node.input
    out = node.output[0]
    if not imp.is_const(a) and not imp.is_const(b):
        x, y = _same_shape_vars(imp, a, b, "subtracting")
        neg = imp.emit("affine", [y, imp.tensor(np.float32(-1), "minus_one"), imp.tensor(np.float32(0), "zero")])
        imp.bind(out, imp.emit("add", [x, neg], out=out))
    elif not imp.is_const(a):  # x - c
        c = imp.enclosed(b)
        imp.bind(out, _affine(imp, imp.var(a), _ones(c), -c, out))
    else:  # c - x
        c = imp.enclosed(a)
        imp.bind(out, _affine(imp, imp.var(b), -_ones(c), c, out))


def _lower_mul(imp, node, attrs):
    a, b = node.input
    if not imp.is_const(a) and not imp.is_const(b):
        imp.unsupported("both operands are variables (not linear; no sound rule)")
    var_pos = 0 if not imp.is_const(a) else 1
    c = _const_operand(imp, node, var_pos)
    imp.bind(node.output[0], _affine(imp, imp.var(node.input[var_pos]), c, 0 * _ones(c), node.output[0]))


def _lower_div(imp, node, attrs):
    a, b = node.input
    if imp.is_const(a):
        imp.unsupported("dividing by a variable (not linear; no sound rule)")
    if not imp.is_const(b):
        imp.unsupported("both operands are variables (not linear; no sound rule)")
    c = imp.enclosed(b)
    try:
        scale = c.reciprocal()
    except ValueError:
        imp.unsupported("dividing by a constant that is (or may be) zero")
    imp.bind(node.output[0], _affine(imp, imp.var(a), scale, 0 * _ones(c), node.output[0]))


def _same_pads(imp, auto_pad: str, in_hw, kernel, strides, dilations) -> tuple[int, int, int, int]:
    """Explicit (top, left, bottom, right) for auto_pad SAME_UPPER / SAME_LOWER / VALID."""
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for n, k, s, d in zip(in_hw, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def _window_attrs(imp, attrs, x_shape, kernel) -> tuple[tuple, tuple, tuple]:
    """(stride, padding, dilation) of a 2-D Conv/AveragePool from its ONNX attributes."""
    strides = tuple(attrs.get("strides", (1, 1)))
    dilations = tuple(attrs.get("dilations", (1, 1)))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("", "NOTSET"):
        pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
    elif auto_pad in ("VALID", "SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(imp, auto_pad, x_shape[-2:], kernel, strides, dilations)
    else:
        imp.unsupported(f"auto_pad {auto_pad!r}")
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        imp.unsupported("only 2-D windows are supported")
    return strides, tuple(int(p) for p in pads), dilations


def _lower_conv(imp, node, attrs):
    if imp.is_const(node.input[0]):
        raise AssertionError("constant Conv should have been folded")
    x = imp.var(node.input[0])
    w = imp.enclosed(node.input[1], "weight")
    if len(w.shape) != 4 or len(imp.shape(x)) != 4:
        imp.unsupported(f"only 2-D convolutions are supported (weight rank {len(w.shape)}, input rank "
                        f"{len(imp.shape(x))})")
    if "kernel_shape" in attrs and tuple(attrs["kernel_shape"]) != w.shape[2:]:
        imp.unsupported(f"kernel_shape {attrs['kernel_shape']} disagrees with the weight {list(w.shape)}")
    stride, padding, dilation = _window_attrs(imp, attrs, imp.shape(x), w.shape[2:])
    inputs = [x, imp.tensor(w, "weight", "param", node.input[1])]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(imp.tensor(imp.enclosed(node.input[2], "bias"), "bias", "param", node.input[2]))
    y = imp.emit("conv2d", inputs, {"stride": stride, "padding": padding, "dilation": dilation,
                                     "groups": int(attrs.get("group", 1))}, out=node.output[0])
    imp.bind(node.output[0], y)


def _lower_batchnorm(imp, node, attrs):
    if attrs.get("training_mode", 0):
        imp.unsupported("BatchNormalization in training mode")
    if any(o for o in node.output[1:]):
        imp.unsupported("BatchNormalization with running-statistics outputs (training mode)")
    x = imp.var(node.input[0])
    gamma, beta, mean, var = (imp.enclosed(n) for n in node.input[1:5])
    try:
        scale = gamma * (var + float(attrs.get("epsilon", 1e-5))).sqrt().reciprocal()
    except ValueError as e:
        imp.unsupported(f"its variance plus epsilon is (or may be) zero or negative ({e})")
    shift = beta - mean * scale
    xs = imp.shape(x)
    if len(xs) < 2:
        imp.unsupported(f"input of rank {len(xs)} has no channel axis")
    c = xs[1]
    if math.prod(scale.shape) == c:  # per channel (axis 1), broadcast over the spatial axes
        target = (c,) + (1,) * (len(xs) - 2)
    elif scale.shape == xs[1:]:  # opset <= 8 with spatial=0: one statistic per activation
        target = xs[1:]
    else:
        imp.unsupported(f"statistics of shape {list(scale.shape)} for an input of shape {list(xs)}")
    imp.bind(node.output[0], _affine(imp, x, scale.map(lambda t: t.reshape(target)),
                                     shift.map(lambda t: t.reshape(target)), node.output[0]))


def _avg_conv(imp, node, x: str, kernel, stride, padding, dilation) -> str:
    """Average pooling as a depthwise conv2d with weights 1 / (kh * kw)."""
    c = imp.shape(x)[-3]
    w = Enclosed.exact(torch.full((c, 1) + tuple(kernel), float(math.prod(kernel)))).reciprocal()
    return imp.emit("conv2d", [x, imp.tensor(w, "avg_weight", "param")],
                    {"stride": tuple(stride), "padding": tuple(padding), "dilation": tuple(dilation),
                     "groups": c}, out=node.output[0])


def _lower_avgpool(imp, node, attrs):
    x = imp.var(node.input[0])
    xs = imp.shape(x)
    kernel = tuple(attrs.get("kernel_shape", ()))
    if len(kernel) != 2 or len(xs) != 4:
        imp.unsupported("only 2-D average pooling on [N, C, H, W] is supported")
    stride, padding, dilation = _window_attrs(imp, attrs, xs, kernel)
    if attrs.get("count_include_pad", 0) == 0 and any(padding):
        imp.unsupported("count_include_pad=0 with nonzero padding divides border windows by fewer "
                        "elements, which is not a convolution")
    if attrs.get("ceil_mode", 0):
        for n, k, s, d, p0, p1 in zip(xs[-2:], kernel, stride, dilation, padding[:2], padding[2:]):
            span = n + p0 + p1 - d * (k - 1) - 1
            if span % s:  # ceil would add a partial window at the border
                imp.unsupported("ceil_mode=1 where it adds a partial window")
    imp.bind(node.output[0], _avg_conv(imp, node, x, kernel, stride, padding, dilation))


def _lower_global_avgpool(imp, node, attrs):
    x = imp.var(node.input[0])
    xs = imp.shape(x)
    if len(xs) != 4:
        imp.unsupported("only [N, C, H, W] inputs are supported")
    imp.bind(node.output[0], _avg_conv(imp, node, x, xs[-2:], (1, 1), (0, 0, 0, 0), (1, 1)))


def _lower_pad(imp, node, attrs):
    """Zero padding of H and W (torch exports it before pooling) as a depthwise identity conv2d."""
    x = imp.var(node.input[0])
    xs = imp.shape(x)
    if attrs.get("mode", "constant") != "constant":
        imp.unsupported(f"mode {attrs['mode']!r} (only constant zero padding is supported)")
    if "pads" in attrs:  # opset < 11
        pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
    else:
        pads = [int(p) for p in imp.const(node.input[1], "pads").reshape(-1)]
        has_value = len(node.input) > 2 and node.input[2]
        value = float(imp.const(node.input[2], "constant_value").reshape(-1)[0]) if has_value else 0.0
    rank = len(xs)
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:  # opset >= 18: pads only for these axes
        axes = [_norm_axis(int(a), rank, imp) for a in imp.const(node.input[3], "axes").reshape(-1)]
    begin, end = [0] * rank, [0] * rank
    for k, a in enumerate(axes):
        begin[a], end[a] = pads[k], pads[k + len(axes)]
    if not any(begin + end):
        imp.bind(node.output[0], x)
        return
    if value != 0.0 or rank != 4 or any(begin[:2] + end[:2]) or min(begin + end) < 0:
        imp.unsupported("only non-negative zero padding of the last two axes of an [N, C, H, W] tensor "
                        "is supported")
    c = xs[1]
    w = np.ones((c, 1, 1, 1), dtype=np.float32)
    y = imp.emit("conv2d", [x, imp.tensor(w, "pad_identity", "param")],
                 {"stride": (1, 1), "padding": (begin[2], begin[3], end[2], end[3]), "dilation": (1, 1),
                  "groups": c}, out=node.output[0])
    imp.bind(node.output[0], y)


def _lower_flatten(imp, node, attrs):
    x = imp.var(node.input[0])
    shape = _flatten_shape(imp, imp.shape(x), attrs.get("axis", 1))
    imp.bind(node.output[0], imp.reshape(x, shape, node.output[0]))


def _lower_reshape(imp, node, attrs):
    x = imp.var(node.input[0])
    spec = attrs["shape"] if "shape" in attrs else imp.const(node.input[1], "shape")
    shape = _reshape_target(imp, imp.shape(x), spec, attrs.get("allowzero", 0))
    imp.bind(node.output[0], imp.reshape(x, shape, node.output[0]))


def _lower_squeeze(imp, node, attrs):
    x = imp.var(node.input[0])
    shape = _squeeze_shape(imp, imp.shape(x), _axes(imp, node, attrs))
    imp.bind(node.output[0], imp.reshape(x, shape, node.output[0]))


def _lower_unsqueeze(imp, node, attrs):
    x = imp.var(node.input[0])
    shape = _unsqueeze_shape(imp, imp.shape(x), _axes(imp, node, attrs))
    imp.bind(node.output[0], imp.reshape(x, shape, node.output[0]))


def _lower_transpose(imp, node, attrs):
    x = imp.var(node.input[0])
    rank = len(imp.shape(x))
    perm = [int(p) for p in attrs.get("perm", range(rank - 1, -1, -1))]
    if sorted(_norm_axis(p, rank, imp) for p in perm) != list(range(rank)):
        imp.unsupported(f"perm {perm} is not a permutation of {rank} axes")
    imp.bind(node.output[0], imp.transpose(x, [p % rank for p in perm], node.output[0]))


def _lower_concat(imp, node, attrs):
    names = [n for n in node.input if n]
    if any(imp.is_const(n) for n in names):
        imp.unsupported("a constant operand (only concatenation of variables is supported)")
    xs = [imp.var(n) for n in names]
    axis = _norm_axis(int(attrs["axis"]), len(imp.shape(xs[0])), imp)
    imp.bind(node.output[0], imp.emit("concat", xs, {"axis": axis}, out=node.output[0]))


LOWERINGS: dict[str, Callable] = {
    "Gemm": _lower_gemm,
    "MatMul": _lower_matmul,
    "Add": _lower_add,
    "Sub": _lower_sub,
    "Mul": _lower_mul,
    "Div": _lower_div,
    "Relu": _lower_relu,
    "Conv": _lower_conv,
    "BatchNormalization": _lower_batchnorm,
    "AveragePool": _lower_avgpool,
    "GlobalAveragePool": _lower_global_avgpool,
    "Pad": _lower_pad,
    "Flatten": _lower_flatten,
    "Reshape": _lower_reshape,
    "Squeeze": _lower_squeeze,
    "Unsqueeze": _lower_unsqueeze,
    "Transpose": _lower_transpose,
    "Concat": _lower_concat,
    "Identity": _lower_identity,
    "Dropout": _lower_dropout,
    "Shape": _lower_shape,
}
