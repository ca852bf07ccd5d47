"""PyTorch frontend: lower an ``nn.Module`` to the primal graph via ``torch.export``.

    graph = load_torch(module, example_input)

The module is exported with ``torch.export.export(module.eval(), (example_input,))`` and then
decomposed to the *core ATen* op set (``run_decompositions``), keeping only ``aten.linear`` and
``aten.matmul`` whole. Core ATen is the small op contract torch keeps stable, so the many
spellings of one computation arrive as one op: every flavour of flatten/view/reshape/squeeze as
``view`` / ``squeeze`` / ``unsqueeze``; transpose/t as ``permute``; conv2d (``padding='same'``
included) as ``convolution`` (plus ``constant_pad_nd`` for asymmetric 'same' padding); eval
batch norm as ``_native_batch_norm_legit_no_training``; dropout in eval and ``contiguous`` as
``clone`` or nothing at all. linear/matmul are kept because their decompositions depend on
strides (view+mm+view, or expand+bmm) while the whole op is exactly the primal ``linear`` on the
model's own shapes.

Lowering (same meaning as the ONNX frontend):

* Anything computed from constants alone (``W.t()``, ``torch.ones(3)``, ...) is folded by
  running the aten op itself, so rules only ever see "variable op constant".
* Every other node is lowered by the mapping of its target that an op module of boundflow.ops
  registered (``TORCH_LOWERINGS``: linear/matmul/mm/bmm/addmm in ops/linear.py, convolution,
  avg_pool2d and constant_pad_nd in ops/conv.py, arithmetic and eval batch norm in
  ops/affine.py, relu in ops/relu.py, clamp/hardtanh in ops/clamp.py, view-like ops, permute, cat and
  pass-throughs in ops/shape.py), through a ``_Lowering``, its ``Builder``
  (frontends/builder.py). A zero ``constant_pad_nd`` stays pending (``ZeroPad``) so that a
  following convolution or average pool takes it into its own padding.
* Parameters, buffers and lifted constants become ``Value(kind="param")`` float32 tensors
  (detached copies); a folded tensor that equals one of the module tensors it came from reuses
  that tensor's value (so ``linear(x, l.weight, l.bias)`` keeps its names). Tensors the frontend
  makes up from Python literals (pool kernels, scalar scales) are ``kind="const"``.

Shapes: the per-region shape of the input is ``example_input.shape`` exactly (e.g. [1, 8]); the
runtime's region axis never appears here. Every value's shape comes from ``infer_shape`` and is
cross-checked against the shape torch recorded in ``node.meta["val"]``.
"""
from __future__ import annotations

import operator
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.fx

from boundflow.domains.concrete import validate
from boundflow.domains.rounding import Enclosed
from boundflow.errors import ModelLoadError, ShapeError, UnsupportedOpError
from boundflow.frontends.builder import Builder, Constant
from boundflow.ir.primal import Graph, TensorType, Value
from boundflow.ops import TORCH_LOWERINGS, torch_lowering
from boundflow.ops.registry import TORCH_KEEP_WHOLE
from boundflow.ops.conv import ZeroPad, materialise

aten = torch.ops.aten

__all__ = ["load_torch", "supported_ops"]


# --------------------------------------------------------------------------------------------
# environment entries
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Const:
    """An FX value that does not depend on the network input (folded at load time)."""

    data: Any  # usually a tensor; a tuple for folded multi-output ops
    roots: frozenset[str]  # module tensors (params/buffers/lifted constants) it was computed from
    err: Any = None  # for a computed float tensor: a bound on its distance to the exact value


_Entry = Any  # str (primal value name) | _Const | ZeroPad (pending) | tuple of entries (multi-output ops)


def _tensor_inputs(fx: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((fx.args, fx.kwargs), lambda n: found.append(n))
    return found


def _meta_shape(fx: torch.fx.Node) -> tuple[int, ...] | None:
    val = fx.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0] if val else None
    if isinstance(val, torch.Tensor):
        return tuple(int(d) for d in val.shape)
    return None


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')


def _source_location(fx: torch.fx.Node) -> str:
    """Where in the user's model an FX node came from: submodule path and innermost user frame."""
    parts = []
    stack = fx.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        parts.append(f"in module {path or '<root>'!r} of type {kind.rsplit('.', 1)[-1]}")
    lines = (fx.meta.get("stack_trace") or "").splitlines()
    torch_dir = os.path.dirname(torch.__file__)
    for i in range(len(lines) - 1, -1, -1):  # innermost frame outside torch itself
        m = _FRAME.search(lines[i])
        if m and not os.path.abspath(m["file"]).startswith(torch_dir):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            parts.append(f"at {m['file']}:{m['line']}: {code}")
            break
    return ", ".join(parts)


def _as_data(t: torch.Tensor) -> torch.Tensor:
    """Graph constants are detached, contiguous CPU copies (float64 stays float64, other floats
    become float32), never aliases of the module."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # e.g. "aten.add.Tensor"
    return getattr(target, "__name__", str(target))


# --------------------------------------------------------------------------------------------
# the lowering state: the builder the lowerings in boundflow.ops work through
# --------------------------------------------------------------------------------------------
def _unsupported(fx: torch.fx.Node, reason: str | None = None) -> UnsupportedOpError:
    msg = f"torch frontend: op {_op_name(fx.target)} at FX node {fx.name!r}"
    msg += f": {reason}" if reason else " is not supported"
    where = _source_location(fx)
    if where:
        msg += f" ({where})"
    return UnsupportedOpError(f"{msg}. Supported ops: {', '.join(supported_ops())}")


class _Lowering(Builder):
    def __init__(self, ep: torch.export.ExportedProgram, name: str):
        self.ep = ep
        self.graph = Graph(values={}, nodes=[], inputs=[], outputs=[], name=name)
        self.env: dict[str, _Entry] = {}
        # FX names are reserved up front so that helper values we invent never take the name
        # a later FX node wants.
        self.reserved: set[str] = {n.name for n in ep.graph.nodes}
        self.module_tensors: dict[str, torch.Tensor] = {}  # state name -> tensor
        self._module_values: dict[str, str] = {}  # state name -> value name
        self.fx: torch.fx.Node | None = None  # the node being lowered

    def lower(self, fx: torch.fx.Node) -> _Entry:
        lowering = TORCH_LOWERINGS.get(fx.target)
        if lowering is None:
            raise _unsupported(fx)
        self.fx = fx
        return lowering(self)

    # -- the Builder ---------------------------------------------------------------------------
    @property
    def output(self) -> str:
        return self.fx.name

    @property
    def node_name(self) -> str:
        return self.fx.name

    def unsupported(self, why: str) -> NoReturn:
        raise _unsupported(self.fx, why)

    def fresh(self, role: str) -> str:
        name, k = f"{self.fx.name}_{role}", 1
        while name in self.graph.values or name in self.reserved:
            name, k = f"{self.fx.name}_{role}_{k}", k + 1
        self.reserved.add(name)
        return name

    def constant(self, c: Constant, role: str, weight: bool = False) -> str:
        """A param (computed from module tensors) or const (made from literals) value; one equal
        to a module tensor it was computed from (W.t().t(), ...) is that tensor, under its name,
        so that the graph reads like the module."""
        data, err = c.value.stored()
        for root in sorted(c.origin) if err is None else ():
            src = self.module_tensors[root]
            if src.shape == data.shape and src.dtype.is_floating_point and torch.equal(_as_data(src), _as_data(data)):
                return self._module_value(root)
        name = self.fresh(role)
        kind = "param" if c.origin else "const"
        self.graph.values[name] = Value(name, TensorType(tuple(data.shape)), kind, _as_data(data), err)
        return name

    def _module_value(self, state_name: str) -> str:
        if state_name in self._module_values:
            return self._module_values[state_name]
        src = self.module_tensors[state_name]
        name = state_name
        k = 1
        while name in self.graph.values or name in self.reserved:
            name, k = f"{state_name}_{k}", k + 1
        self.graph.values[name] = Value(name, TensorType(tuple(src.shape)), "param", _as_data(src))
        self._module_values[state_name] = name
        return name

    def is_const(self, arg: Any) -> bool:
        return isinstance(self.entry(arg), _Const)

    def var(self, arg: Any) -> str:
        """The primal value of a variable argument (materialising a pending pad)."""
        e = self.entry(arg)
        if isinstance(e, ZeroPad):
            return self.materialise_pad(arg, e)
        if not isinstance(e, str):
            self.unsupported(f"expected a tensor that depends on the input, got {e!r}")
        return e

    def const(self, arg: Any, what: str) -> Constant:
        """A constant argument in float64 with its error bound (zero unless computed)."""
        c = self.entry(arg)
        if not isinstance(c, _Const):
            self.unsupported(f"{what} must be a constant (parameter, buffer or literal), but it depends on the "
                             "network input")
        data = c.data
        if isinstance(data, (bool, int, float)):
            data = torch.tensor(float(data), dtype=torch.float64)
        if not isinstance(data, torch.Tensor):
            self.unsupported(f"{what} must be a tensor or number, got {type(data).__name__}")
        value = data.detach().to("cpu", torch.float64)
        err = torch.zeros_like(value) if c.err is None else c.err.to(torch.float64)
        return Constant(Enclosed(value, err), c.roots)

    # -- FX accessors for the lowerings --------------------------------------------------------
    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument `index` of the node, or its keyword `name`."""
        if len(self.fx.args) > index:
            return self.fx.args[index]
        return self.fx.kwargs.get(name, default)

    def kwarg(self, name: str, default: Any = None) -> Any:
        return self.fx.kwargs.get(name, default)

    def expected_shape(self) -> tuple[int, ...] | None:
        """The output shape torch recorded for the node."""
        return _meta_shape(self.fx)

    def entry(self, arg: Any) -> _Entry:
        """What an argument is: a primal value name, a _Const, a pending ZeroPad or a tuple."""
        if isinstance(arg, torch.fx.Node):
            return self.env[arg.name]
        return _Const(arg, frozenset())

    def var_and_pad(self, arg: Any) -> tuple[str, tuple[int, int, int, int]]:
        """For conv2d / avg_pool2d: the variable and any zero padding it can absorb."""
        e = self.entry(arg)
        if isinstance(e, ZeroPad):
            return e.src, e.pads
        return self.var(arg), (0, 0, 0, 0)

    def materialise_pad(self, pad_fx: torch.fx.Node, pad: ZeroPad) -> str:
        """A zero pad no conv absorbed, emitted as the node that made it; later readers reuse it."""
        reader, self.fx = self.fx, pad_fx
        try:
            out = materialise(self, pad, out=pad_fx.name)
        finally:
            self.fx = reader
        self.env[pad_fx.name] = out
        return out


@torch_lowering(operator.getitem)
def _getitem(L: _Lowering) -> _Entry:
    """An output of a multi-output node (BatchNorm's (y, save_mean, save_invstd))."""
    src = L.entry(L.arg(0))
    item = src[L.arg(1)] if isinstance(src, tuple) else None
    if item is None:
        L.unsupported(f"output {L.arg(1)} of {L.arg(0)} is not available")
    return item


def supported_ops() -> list[str]:
    return sorted({_op_name(op) for op in TORCH_LOWERINGS})


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def _decomposition_table() -> dict:
    """Core-ATen decompositions, except linear, matmul and the targets an op keeps whole
    (registry.TORCH_KEEP_WHOLE).

    Decomposed, those two become view/mm/view chains or expand+bmm (depending on strides) and
    the bias an add after a reshape; kept whole, a linear over [1, T, D] stays one op on the
    model's own shapes, which is both the smaller graph and exactly the primal linear.
    """
    table = torch.export.default_decompositions()
    for op in (aten.linear.default, aten.matmul.default, *TORCH_KEEP_WHOLE):
        if op in table:
            del table[op]
    return table


def _export(module: torch.nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    name = type(module).__name__
    modes = {m: m.training for m in module.modules()}
    try:
        with warnings.catch_warnings():
            # torch-internal pytree deprecation noise from run_decompositions
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            ep = torch.export.export(module.eval(), (example_input,))
            return ep.run_decompositions(_decomposition_table())
    except Exception as e:  # torch raises many unrelated types here (UserError, Unsupported, ...)
        raise ModelLoadError(f"torch.export could not export {name}: {type(e).__name__}: {e}") from e
    finally:
        for m, training in modes.items():  # leave the caller's module as we found it
            m.training = training


def load_torch(module: torch.nn.Module, example_input: torch.Tensor) -> Graph:
    """Lower `module` (run in eval mode on inputs shaped like `example_input`) to a primal Graph.

    The graph's single input has per-region shape ``example_input.shape``. The module is
    exported in eval mode; its own train/eval flags are restored afterwards. Raises
    ModelLoadError when torch.export fails and UnsupportedOpError for ops (or configurations,
    such as a product of two input-dependent tensors) with no primal lowering.
    """
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"load_torch expects a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(example_input, torch.Tensor) or not example_input.dtype.is_floating_point:
        raise ShapeError("load_torch: example_input must be a floating-point torch.Tensor, got "
                         f"{getattr(example_input, 'dtype', type(example_input).__name__)}")
    input_shape = tuple(int(d) for d in example_input.shape)
    ep = _export(module, example_input.detach())
    L = _Lowering(ep, type(module).__name__)
    sig = ep.graph_signature

    # Placeholders: the one user input, then module tensors (params, buffers, lifted constants).
    state = dict(ep.state_dict)
    state.update(ep.constants)
    user_inputs = []
    for spec in sig.input_specs:
        arg_name = spec.arg.name
        kind = spec.kind.name
        if kind == "USER_INPUT":
            user_inputs.append(arg_name)
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            tensor = state[spec.target]
            if isinstance(tensor, torch.Tensor):
                L.module_tensors[spec.target] = tensor.detach()
                L.env[arg_name] = _Const(tensor.detach(), frozenset([spec.target]))
            else:  # e.g. a script object: usable only if nothing reads it
                L.env[arg_name] = _Const(tensor, frozenset())
        else:
            raise ModelLoadError(f"torch frontend: unsupported exported input kind {kind} ({arg_name})")
    if len(user_inputs) != 1:
        raise ModelLoadError(f"torch frontend: expected exactly one tensor input, got {user_inputs}")
    in_name = user_inputs[0]
    L.graph.values[in_name] = Value(in_name, TensorType(input_shape), "input")
    L.graph.inputs.append(in_name)
    L.env[in_name] = in_name

    output_names = {s.arg.name for s in sig.output_specs if s.kind.name == "USER_OUTPUT"}
    for fx in ep.graph.nodes:
        if fx.op in ("placeholder", "output"):
            continue
        if fx.op != "call_function":
            raise _unsupported(fx, f"FX {fx.op} nodes are not supported")
        if not fx.users and fx.name not in output_names:
            continue  # dead code (and runtime metadata assertions) cannot affect the outputs
        deps = [L.env[n.name] for n in _tensor_inputs(fx)]
        if all(isinstance(d, _Const) for d in deps):
            L.env[fx.name] = _fold(L, fx, deps)
            continue
        result = L.lower(fx)
        if result is None:
            continue
        L.env[fx.name] = result
        _check_shape(L, fx, result)

    for spec in sig.output_specs:
        if spec.kind.name != "USER_OUTPUT":
            continue  # buffer mutations etc. are not outputs of the function we bound
        arg_name = getattr(spec.arg, "name", None)
        entry = L.env.get(arg_name) if arg_name else None
        if isinstance(entry, ZeroPad):
            entry = L.materialise_pad(next(n for n in ep.graph.nodes if n.name == arg_name), entry)
        if not isinstance(entry, str):
            raise UnsupportedOpError(f"torch frontend: model output {arg_name!r} does not depend on "
                                     "the input (constant outputs are not supported)")
        L.graph.outputs.append(entry)

    validate(L.graph)
    return L.graph


# aten ops that fold constants exactly (they rearrange, select or copy): applied to the error
# bounds of their inputs, they give the error bound of their output
_EXACT_FOLDS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.t.default,
    aten.transpose.int, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.clone.default, aten.alias.default, aten.detach.default, aten.slice.Tensor,
    aten.select.int, aten.cat.default, aten.lift_fresh_copy.default, aten.index_select.default,
}
# float arithmetic on constants, folded on enclosures (domains/rounding.py)
_ENCLOSED_FOLDS = {
    aten.add.Tensor: lambda a, b, alpha=1: a + (b if alpha == 1 else b * float(alpha)),
    aten.sub.Tensor: lambda a, b, alpha=1: a - (b if alpha == 1 else b * float(alpha)),
    aten.mul.Tensor: lambda a, b: a * b,
    aten.div.Tensor: lambda a, b: a * Enclosed.lift(b).reciprocal(),
    aten.neg.default: lambda a: -a,
    aten.sqrt.default: lambda a: a.sqrt(),
    aten.rsqrt.default: lambda a: a.sqrt().reciprocal(),
    aten.reciprocal.default: lambda a: a.reciprocal(),
}


def _fold(L: _Lowering, fx: torch.fx.Node, deps: list[_Const]) -> _Const:
    """Evaluate an op whose inputs are all constants by running the op itself; a float result
    also gets an error bound (domains/rounding.py): arithmetic is redone on enclosures, exact
    rearrangements move their inputs' errors, and any other op's result is marked unbounded
    (err = inf), which sound_fp plans refuse."""
    roots = frozenset().union(*(d.roots for d in deps)) if deps else frozenset()
    args, kwargs = torch.fx.node.map_arg((fx.args, fx.kwargs), lambda n: L.env[n.name].data)
    try:
        with torch.no_grad():
            value = fx.target(*args, **kwargs)
    except Exception as e:
        raise _unsupported(fx, f"could not fold constant expression: {e}") from e
    if not (isinstance(value, torch.Tensor) and value.dtype.is_floating_point):
        return _Const(value, roots)
    inexact = any(d.err is not None for d in deps)
    if fx.target in _ENCLOSED_FOLDS:
        def enclosed(n):
            c = L.env[n.name]
            return Enclosed(c.data.double(), torch.zeros_like(c.data, dtype=torch.float64) if c.err is None else c.err)
        eargs, ekwargs = torch.fx.node.map_arg((fx.args, fx.kwargs), enclosed)
        y = _ENCLOSED_FOLDS[fx.target](*eargs, **ekwargs)
        return _Const(y.value, roots, y.err.expand_as(y.value))
    if fx.target in _EXACT_FOLDS or (fx.target == aten._to_copy.default and value.dtype == torch.float64):
        if not inexact:
            return _Const(value, roots)
        errs, ekwargs = torch.fx.node.map_arg(
            (fx.args, fx.kwargs), lambda n: L.env[n.name].err if L.env[n.name].err is not None
            else torch.zeros_like(L.env[n.name].data, dtype=torch.float64))
        with torch.no_grad():
            return _Const(value, roots, fx.target(*errs, **ekwargs).to(torch.float64))
    return _Const(value, roots, torch.full(value.shape, torch.inf, dtype=torch.float64))


def _check_shape(L: _Lowering, fx: torch.fx.Node, result: _Entry) -> None:
    """Cross-check the lowered value's shape with the shape torch recorded for this node."""
    want = _meta_shape(fx)
    if want is None:
        return
    if isinstance(result, tuple):
        result = result[0]
    got = result.shape if isinstance(result, ZeroPad) else L.shape(result) if isinstance(result, str) else None
    if got is not None and tuple(got) != want:
        raise _unsupported(fx, f"lowering produced shape {list(got)} but torch computes {list(want)}")
