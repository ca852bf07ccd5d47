"""ONNX frontend: lower an ONNX model (opsets 8 to 20) to the primal graph.

`load_onnx(path_or_model) -> Graph`

How it works:
  1. Read the protobuf, run `onnx.checker` and strict ONNX shape inference (with a symbolic batch
     dimension fixed to 1). Anything malformed fails here with a `ModelLoadError` naming the file.
  2. Walk the nodes in order. Every ONNX tensor is either a *constant* (an initializer, a
     Constant node, or the result of a node whose inputs are all constants, folded here with
     numpy; the shape of a variable tensor is static, so `Shape(x)` is a constant too) or a
     *variable* (depends on the network input). Constant nodes are evaluated by the functions in
     `FOLDERS`; nodes with a variable input are lowered to primal ops by the mapping of their op
     type that an op module of boundflow.ops registered (`ONNX_LOWERINGS`), through the importer,
     which is their `Builder` (frontends/builder.py).
  3. Every primal value gets the shape `boundflow.domains.concrete.infer_shape` computes, which is
     cross-checked against ONNX shape inference; the graph is validated at the end.

Conventions:
  * Per-region shapes are the ONNX shapes as declared (batch dimension 1 included); ONNX axis k
    is per-region axis k.
  * A constant identical to an initializer it was read from (used as it is) becomes a `param`
    value under the initializer's name. Tensors derived at import (a transposed or scaled weight) are `param`
    when they are weights or biases of a linear/conv2d, `const` otherwise (affine scale and
    shift).
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
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from boundflow.domains.concrete import validate
from boundflow.domains.rounding import Enclosed, unit_roundoff
from boundflow.errors import ModelLoadError, UnsupportedOpError
from boundflow.frontends.builder import Builder, Constant
from boundflow.ir.primal import Graph, TensorType, Value
from boundflow.ops import ONNX_LOWERINGS, ONNX_REWRITES
from boundflow.ops.shape import (onnx_flatten_shape, onnx_reshape_target, onnx_shape, onnx_squeeze_shape,
                                 onnx_unsqueeze_shape)

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
# the importer: the builder the lowerings in boundflow.ops work through
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
class _Importer(Builder):
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
    # the node being lowered, its attributes and label (for names and error messages)
    node: onnx.NodeProto | None = None
    attrs: dict = field(default_factory=dict)
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
        for index, node in enumerate(self._rewritten()):
            self.node, self.attrs, self.node_label = node, _attrs(node), _label(node, index)
            self._import_node(node)
        self.node = None
        self._bind_outputs()
        _annotate_layouts(self.graph)
        try:
            validate(self.graph)
        except ValueError as e:  # a lowering bug, not a user error; still fail loudly
            raise ModelLoadError(f"{self.source}: the lowered graph is inconsistent: {e}") from e
        return self.graph

    def _rewritten(self) -> list[onnx.NodeProto]:
        """The graph's nodes after the ops' rewrites (ONNX_REWRITES: fused patterns), which see
        the initializers' and Constant nodes' values."""
        nodes = list(self.proto.graph.node)
        consts = dict(self.consts)
        for n in nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        for rewrite in ONNX_REWRITES:
            nodes = rewrite(nodes, consts)
        return nodes

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
        lower = ONNX_LOWERINGS.get(node.op_type)
        if lower is None:
            self.unsupported("unsupported op (no sound lowering to the primal ops)")
        if all(n in self.consts for n in inputs):
            self.unsupported("all its inputs are constant, and constant folding of this op is not supported")
        result = lower(self)
        if result is not None:
            self.env[node.output[0]] = result
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

    # -- the Builder ---------------------------------------------------------------------------
    @property
    def output(self) -> str:
        return self.node.output[0]

    @property
    def node_name(self) -> str:
        return self.node.name or self.node_label

    def unsupported(self, why: str) -> NoReturn:
        raise UnsupportedOpError(
            f"{self.source}: {self.node.op_type} node {self.node_label!r}: {why}. Supported ops: "
            f"{', '.join(sorted(ONNX_LOWERINGS))} (on variable inputs); "
            f"{', '.join(sorted(FOLDERS))} (on constant inputs, folded at import)")

    def fresh(self, role: str) -> str:
        base = f"{self.node.name or self.node.op_type}/{role}"
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def constant(self, c: Constant, role: str, weight: bool = False) -> str:
        """An initializer that c is (bit for bit) keeps its name, as a param; any other constant
        is a new value, a param when it is a weight or bias, a const otherwise (affine scale and
        shift)."""
        verbatim = self._initializer_identical_to(c)
        if verbatim is not None:
            return verbatim
        data, err = c.value.stored()
        name = self.fresh(role)
        self.graph.values[name] = Value(name, TensorType(tuple(data.shape)), "param" if weight else "const", data, err)
        return name

    def _initializer_identical_to(self, c: Constant) -> str | None:
        if c.value.err.any():
            return None
        bits = c.value.value.view(torch.int64)      # bit for bit: -0.0 (of a negated zero) is not 0.0
        for name in sorted(c.origin):
            init = torch.from_numpy(_float(self.consts[name])).to(torch.float64)
            if tuple(init.shape) == c.shape and torch.equal(init.view(torch.int64), bits):
                if name not in self.graph.values:
                    data, _ = Enclosed.exact(init).stored()
                    self.graph.values[name] = Value(name, TensorType(tuple(data.shape)), "param", data)
                return name
        return None

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def var(self, name: str) -> str:
        if name in self.consts:
            self.unsupported(f"input {name!r} must depend on the network input (it is a constant)")
        return self.env[name]

    def const(self, name: str, what: str) -> Constant:
        """A float constant with its error bound (zero for initializers)."""
        return Constant(self.enclosed(name, what), frozenset({name} & self.initializers))

    # -- ONNX accessors for the lowerings ------------------------------------------------------
    def input(self, index: int) -> str | None:
        """The name of the node's input `index`, None where it is absent (optional inputs)."""
        names = self.node.input
        return names[index] if index < len(names) and names[index] else None

    @property
    def inputs(self) -> list[str]:
        return list(self.node.input)

    @property
    def outputs(self) -> list[str]:
        return list(self.node.output)

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)

    def array(self, name: str, what: str = "input") -> np.ndarray:
        """A constant input as it is stored (integer shapes, pads, axes, ...)."""
        if name not in self.consts:
            self.unsupported(f"{what} {name!r} must be a constant (it depends on the network input)")
        return self.consts[name]

    def define_constant(self, onnx_name: str, arr: np.ndarray) -> None:
        """An output of the node that is a constant after all (a shape, a Dropout mask)."""
        self.consts[onnx_name] = arr

    def define_variable(self, onnx_name: str, value: str) -> None:
        """A further output of the node (Split's parts): the primal value it is."""
        self.env[onnx_name] = value

    def enclosed(self, name: str, what: str = "input") -> Enclosed:
        """A float constant with its error bound (zero for initializers)."""
        arr = np.asarray(self.array(name, what), dtype=np.float64)
        err = self.errs.get(name)
        return Enclosed(torch.from_numpy(arr.copy()),
                        torch.zeros(arr.shape, dtype=torch.float64) if err is None else torch.from_numpy(err.copy()))


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
    "Shape": lambda imp, attrs, x: [onnx_shape(x.shape, attrs)],
    "Gather": lambda imp, attrs, x, i: [np.take(x, i, axis=attrs.get("axis", 0))],
    "Unsqueeze": lambda imp, attrs, x, axes=None: [x.reshape(onnx_unsqueeze_shape(
        imp, x.shape, attrs.get("axes", None if axes is None else axes.reshape(-1).tolist())))],
    "Squeeze": lambda imp, attrs, x, axes=None: [x.reshape(onnx_squeeze_shape(
        imp, x.shape, attrs.get("axes", None if axes is None else axes.reshape(-1).tolist())))],
    "Concat": lambda imp, attrs, *xs: [np.concatenate(xs, axis=attrs["axis"])],
    "Cast": lambda imp, attrs, x: [x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))],
    "Reshape": lambda imp, attrs, x, shape=None: [x.reshape(onnx_reshape_target(
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
    "Flatten": lambda imp, attrs, x: [x.reshape(onnx_flatten_shape(imp, x.shape, attrs.get("axis", 1)))],
    "Slice": _fold_slice,
    "MatMul": lambda imp, attrs, a, b: [np.matmul(a, b)],
    "Gemm": _fold_gemm,
}
