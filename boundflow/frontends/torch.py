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
* Parameters, buffers and lifted constants become ``Value(kind="param")`` float32 tensors
  (detached copies); a folded tensor that equals one of the module tensors it came from reuses
  that tensor's value (so ``linear(x, l.weight, l.bias)`` keeps its names). Tensors the frontend
  makes up from Python literals (pool kernels, scalar scales) are ``kind="const"``.
* ``linear`` with a constant weight -> ``linear``; ``matmul``/``mm``/``addmm``/``bmm`` with one
  constant side -> ``linear`` (constant on the left: transpose the last two axes, linear,
  transpose back); two variable sides -> UnsupportedOpError.
* ``convolution`` -> ``conv2d``; a zero ``constant_pad_nd`` feeding it is merged into its padding.
* eval batch norm -> ``affine`` with scale gamma/sqrt(var+eps), shift beta-mean*scale, shaped
  [C, 1, ...] so it broadcasts over the channel axis (axis 1 of the per-region shape).
* ``avg_pool2d`` (zero padding counted, floor mode) -> depthwise ``conv2d`` with weight 1/(kh*kw).
* add/sub of two variables -> ``add`` (sub: ``add(x, affine(y, -1, 0))``); add/sub/mul/div with a
  constant, ``neg`` -> ``affine``; ``relu``, ``clamp(min=0)`` -> ``relu``; other clamps /
  ``hardtanh`` -> relu sandwiched between affines (exact identities).
* view-like ops -> ``reshape`` to the static shape torch recorded; ``permute`` -> ``transpose``;
  ``cat`` -> ``concat``; ``clone``/``alias``/no-op ``expand``/float casts -> pass-through.

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
from typing import Any, Callable

import torch
import torch.fx

from boundflow.domains.concrete import infer_shape, validate
from boundflow.domains.rounding import Enclosed
from boundflow.errors import ModelLoadError, ShapeError, UnsupportedOpError
from boundflow.ir.primal import Graph, Node, TensorType, Value

aten = torch.ops.aten

__all__ = ["load_torch", "LOWERINGS", "supported_ops"]


# --------------------------------------------------------------------------------------------
# environment entries
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Const:
    """An FX value that does not depend on the network input (folded at load time)."""

    data: Any  # usually a tensor; a tuple for folded multi-output ops
    roots: frozenset[str]  # module tensors (params/buffers/lifted constants) it was computed from
    err: Any = None  # for a computed float tensor: a bound on its distance to the exact value


@dataclass(frozen=True)
class _Pad:
    """A pending zero pad of the last two axes of variable `src`.

    Kept lazy so that the following conv2d / avg_pool2d can absorb it into its own padding
    (that is how torch decomposes ``padding='same'`` with even kernels); any other consumer
    materialises it as an identity depthwise conv2d with that padding.
    """

    src: str
    pads: tuple[int, int, int, int]  # (top, left, bottom, right), primal conv2d order
    shape: tuple[int, ...]


_Entry = Any  # str (primal value name) | _Const | _Pad | tuple of entries (multi-output ops)


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
# the lowering state
# --------------------------------------------------------------------------------------------
class _Lowering:
    def __init__(self, ep: torch.export.ExportedProgram, name: str):
        self.ep = ep
        self.graph = Graph(values={}, nodes=[], inputs=[], outputs=[], name=name)
        self.env: dict[str, _Entry] = {}
        # FX names are reserved up front so that helper values we invent never take the name
        # a later FX node wants.
        self.reserved: set[str] = {n.name for n in ep.graph.nodes}
        self.module_tensors: dict[str, torch.Tensor] = {}  # state name -> tensor
        self._module_values: dict[str, str] = {}  # state name -> value name

    # -- names and values ------------------------------------------------------------------
    def helper_name(self, fx: torch.fx.Node, suffix: str) -> str:
        """A name for an intermediate value/constant invented while lowering `fx`."""
        name, k = f"{fx.name}_{suffix}", 1
        while name in self.graph.values or name in self.reserved:
            name, k = f"{fx.name}_{suffix}_{k}", k + 1
        return name

    def tensor_value(self, data: torch.Tensor | Enclosed, roots: frozenset[str], fx: torch.fx.Node,
                     role: str) -> str:
        """Materialise a constant tensor (exact, or an Enclosed computed one) as a param/const
        Value; reuse module tensors' names."""
        data, err = data.stored() if isinstance(data, Enclosed) else (data.detach(), None)
        # A folded tensor identical to a module tensor it was computed from (W.t().t(), ...)
        # is that tensor: keep its name so the graph reads like the module.
        for root in sorted(roots) if err is None else ():
            src = self.module_tensors[root]
            if src.shape == data.shape and src.dtype.is_floating_point and \
                    torch.equal(_as_data(src), _as_data(data)):
                return self._module_value(root)
        name = self.helper_name(fx, role)
        kind = "param" if roots else "const"
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

    def emit(self, op: str, inputs: list[str], attrs: dict, fx: torch.fx.Node,
             out: str | None = None) -> str:
        """Append a primal node; its output shape comes from the concrete shape rule."""
        out = out or fx.name
        if out in self.graph.values:
            raise AssertionError(f"torch frontend bug: value {out!r} defined twice")
        node = Node(op, list(inputs), [out], dict(attrs), name=fx.name)
        try:
            shape = infer_shape(self.graph, node)
        except ValueError as e:
            raise self.unsupported(fx, f"lowering to {op} failed: {e}") from e
        self.graph.values[out] = Value(out, TensorType(tuple(shape)), "intermediate")
        self.graph.nodes.append(node)
        return out

    # -- reading arguments -----------------------------------------------------------------
    def entry(self, arg: Any) -> _Entry:
        if isinstance(arg, torch.fx.Node):
            return self.env[arg.name]
        return _Const(arg, frozenset())

    def is_var(self, arg: Any) -> bool:
        e = self.entry(arg)
        return isinstance(e, (str, _Pad))

    def var(self, arg: Any, fx: torch.fx.Node) -> str:
        """The primal value of a variable argument (materialising a pending pad)."""
        e = self.entry(arg)
        if isinstance(e, _Pad):
            return self.materialise_pad(arg, e, fx)
        if not isinstance(e, str):
            raise self.unsupported(fx, f"expected a tensor that depends on the input, got {e!r}")
        return e

    def var_and_pad(self, arg: Any, fx: torch.fx.Node) -> tuple[str, tuple[int, int, int, int]]:
        """For conv2d / avg_pool2d: the variable and any zero padding it can absorb."""
        e = self.entry(arg)
        if isinstance(e, _Pad):
            return e.src, e.pads
        return self.var(arg, fx), (0, 0, 0, 0)

    def const(self, arg: Any, fx: torch.fx.Node, what: str) -> _Const:
        e = self.entry(arg)
        if not isinstance(e, _Const):
            raise self.unsupported(fx, f"{what} must be a constant (parameter, buffer or literal), "
                                       "but it depends on the network input")
        return e

    def const_tensor(self, arg: Any, fx: torch.fx.Node, what: str) -> tuple[Enclosed, frozenset[str]]:
        """A constant argument in float64 with its error bound (zero unless computed)."""
        c = self.const(arg, fx, what)
        data = c.data
        if isinstance(data, (bool, int, float)):
            data = torch.tensor(float(data), dtype=torch.float64)
        if not isinstance(data, torch.Tensor):
            raise self.unsupported(fx, f"{what} must be a tensor or number, got {type(data).__name__}")
        value = data.detach().to("cpu", torch.float64)
        err = torch.zeros_like(value) if c.err is None else c.err.to(torch.float64)
        return Enclosed(value, err), c.roots

    def shape(self, name: str) -> tuple[int, ...]:
        return self.graph.shape(name)

    def materialise_pad(self, arg: torch.fx.Node, pad: _Pad, fx: torch.fx.Node) -> str:
        """A zero pad no conv absorbed: identity depthwise conv2d with that padding."""
        src_shape = self.shape(pad.src)
        if len(src_shape) < 3:
            raise self.unsupported(fx, f"zero padding of a rank-{len(src_shape)} tensor is only "
                                       "supported when a conv2d / avg_pool2d consumes it")
        channels = src_shape[-3]
        w = torch.ones(channels, 1, 1, 1)
        wname = self.helper_name(arg, "identity")
        self.graph.values[wname] = Value(wname, TensorType(tuple(w.shape)), "const", w)
        out = self.emit("conv2d", [pad.src, wname],
                        {"stride": (1, 1), "padding": pad.pads, "dilation": (1, 1), "groups": channels},
                        arg)
        self.env[arg.name] = out  # later consumers reuse it
        return out

    # -- errors ------------------------------------------------------------------------------
    def unsupported(self, fx: torch.fx.Node, reason: str | None = None) -> UnsupportedOpError:
        op = _op_name(fx.target)
        msg = f"torch frontend: op {op} at FX node {fx.name!r}"
        msg += f": {reason}" if reason else " is not supported"
        where = _source_location(fx)
        if where:
            msg += f" ({where})"
        msg += f". Supported ops: {', '.join(supported_ops())}"
        return UnsupportedOpError(msg)

    # -- shared lowerings --------------------------------------------------------------------
    def affine(self, x: str, scale: Any, shift: Any, fx: torch.fx.Node,
               scale_roots: frozenset[str] = frozenset(), shift_roots: frozenset[str] = frozenset(),
               out: str | None = None) -> str:
        """y = x * scale + shift with constants that broadcast to x without enlarging it."""
        xshape = self.shape(x)
        scale, shift = (c if isinstance(c, Enclosed) else Enclosed.exact(torch.as_tensor(c, dtype=torch.float64))
                        for c in (scale, shift))
        for c in (scale, shift):
            try:
                ok = tuple(torch.broadcast_shapes(xshape, tuple(c.shape))) == xshape
            except RuntimeError:
                ok = False
            if not ok:
                raise self.unsupported(fx, f"constant of shape {list(c.shape)} would broadcast the "
                                           f"variable of shape {list(xshape)} to a larger shape")
        # Drop leading singleton axes beyond x's rank: the runtime prepends the region axis,
        # so a constant may not have more axes than the per-region shape.
        scale, shift = (c.map(lambda t: t.reshape(tuple(t.shape[max(0, t.dim() - len(xshape)):])))
                        for c in (scale, shift))
        s_name = self.tensor_value(scale, scale_roots, fx, "scale")
        b_name = self.tensor_value(shift, shift_roots, fx, "shift")
        return self.emit("affine", [x, s_name, b_name], {}, fx,
                         out=out or self.helper_name(fx, "affine"))

    def linear(self, x: str, w: Enclosed, b: Enclosed | None, roots: frozenset[str],
               fx: torch.fx.Node, out: str) -> str:
        inputs = [x, self.tensor_value(w, roots, fx, "weight")]
        if b is not None:
            inputs.append(self.tensor_value(b, roots, fx, "bias"))
        return self.emit("linear", inputs, {}, fx, out=out)

    def swap_last2(self, x: str, fx: torch.fx.Node, out: str | None = None) -> str:
        n = len(self.shape(x))
        if n < 2:
            raise self.unsupported(fx, "matrix product with a rank-1 variable")
        perm = tuple(range(n - 2)) + (n - 1, n - 2)
        return self.emit("transpose", [x], {"perm": perm}, fx, out=out or self.helper_name(fx, "T"))

    def matmul(self, fx: torch.fx.Node, a: Any, b: Any, bias: Any = None, beta: float = 1.0,
               alpha: float = 1.0) -> str:
        """alpha * (a @ b) + beta * bias, torch.matmul semantics, exactly one of a, b constant.

        variable @ C -> linear(x, C^T); C @ variable -> transpose the last two axes, linear with
        C, transpose back ((C x)^T = x^T C^T). Rank-1 constants are a one-row weight followed by a
        reshape that drops the unit axis, as torch.matmul does.
        """
        a_var, b_var = self.is_var(a), self.is_var(b)
        if a_var and b_var:
            raise self.unsupported(fx, "product of two tensors that both depend on the input "
                                       "(only products with constant matrices are linear)")
        out_shape = _meta_shape(fx)
        bias_t, bias_roots = (None, frozenset()) if bias is None else self.const_tensor(bias, fx, "bias")
        if bias_t is not None and beta != 1.0:
            bias_t = bias_t * beta
        final = fx.name if bias_t is None else self.helper_name(fx, "matmul")

        def expect(shape: tuple[int, ...]) -> None:
            # A constant with more batch axes than the variable would broadcast the variable.
            if out_shape is not None and tuple(shape) != out_shape:
                raise self.unsupported(fx, f"constant operand of shape {list(mat.shape)} broadcasts "
                                           f"the variable of shape {list(xs)} to {list(out_shape)}")

        if a_var:
            x = self.var(a, fx)
            xs = self.shape(x)
            mat, roots = self.const_tensor(b, fx, "right-hand matrix")
            if len(mat.shape) == 1:  # [..., k] @ [k] -> [...]
                expect(xs[:-1])
                y = self.linear(x, _scaled(mat.map(lambda t: t[None, :]), alpha), None, roots, fx,
                                out=self.helper_name(fx, "linear"))
                y = self.emit("reshape", [y], {"shape": tuple(xs[:-1])}, fx, out=final)
            else:
                w = _scaled(_shared_matrix(mat, self, fx).map(lambda t: t.transpose(0, 1)), alpha)  # [out, in]
                expect(xs[:-1] + (w.shape[0],))
                # A bias that is the same for every row is linear's own bias; otherwise add it after.
                vec = None
                if bias_t is not None and out_shape:
                    full = bias_t.map(lambda t: t.expand(out_shape))
                    row = full.map(lambda t: t.reshape(-1, out_shape[-1])[0])
                    if torch.equal(full.value, row.value.expand(out_shape)) and \
                            torch.equal(full.err, row.err.expand(out_shape)):
                        vec, bias_t = row, None
                        final = fx.name
                y = self.linear(x, w, vec, roots | bias_roots, fx, out=final)
        else:
            x = self.var(b, fx)
            xs = self.shape(x)
            mat, roots = self.const_tensor(a, fx, "left-hand matrix")
            rank = len(mat.shape)
            if len(xs) == 1:  # C @ v is linear(v, C); a rank-1 C is a dot product
                w = _scaled(mat.map(lambda t: t[None, :]) if rank == 1 else _shared_matrix(mat, self, fx), alpha)
                expect(() if rank == 1 else (w.shape[0],))
                if rank == 1:
                    y = self.linear(x, w, None, roots, fx, out=self.helper_name(fx, "linear"))
                    y = self.emit("reshape", [y], {"shape": ()}, fx, out=final)
                else:
                    y = self.linear(x, w, None, roots, fx, out=final)
            elif rank == 1:  # [k] @ [..., k, n] -> [..., n]
                expect(xs[:-2] + (xs[-1],))
                xt = self.swap_last2(x, fx)
                y = self.linear(xt, _scaled(mat.map(lambda t: t[None, :]), alpha), None, roots, fx,
                                out=self.helper_name(fx, "linear"))
                y = self.emit("reshape", [y], {"shape": tuple(xs[:-2] + (xs[-1],))}, fx, out=final)
            else:
                w = _scaled(_shared_matrix(mat, self, fx), alpha)  # [out, in] already
                expect(xs[:-2] + (w.shape[0], xs[-1]))
                xt = self.swap_last2(x, fx)
                yt = self.linear(xt, w, None, roots, fx, out=self.helper_name(fx, "linear"))
                y = self.swap_last2(yt, fx, out=final)
        if bias_t is not None:
            y = self.affine(y, 1.0, bias_t, fx, shift_roots=bias_roots, out=fx.name)
        return y


def _shared_matrix(mat: Enclosed, L: _Lowering, fx: torch.fx.Node) -> Enclosed:
    """The single 2-D matrix of a (possibly batched but batch-constant) constant operand."""
    if len(mat.shape) == 2:
        return mat
    if len(mat.shape) < 2:
        raise L.unsupported(fx, "matrix product with a rank-1 constant")
    flat = mat.map(lambda t: t.reshape(-1, *t.shape[-2:]))
    if not torch.equal(flat.value, flat.value[:1].expand_as(flat.value)):
        raise L.unsupported(fx, "batched product with a different constant matrix per batch entry")
    return Enclosed(flat.value[0], flat.err.amax(0))


def _scaled(c: Enclosed, k: float) -> Enclosed:
    """k * c, with no rounding when k is 1."""
    return c if k == 1.0 else c * k


# --------------------------------------------------------------------------------------------
# one lowering per aten op: fn(L, fx) -> entry for fx (primal value name, _Pad, tuple or None)
# --------------------------------------------------------------------------------------------
def _arg(fx: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(fx.args) > i:
        return fx.args[i]
    return fx.kwargs.get(name, default)


def _passthrough(L: _Lowering, fx: torch.fx.Node) -> _Entry:
    # clone / alias / detach: same values. Keep a pending pad pending.
    return L.entry(fx.args[0])


def _to_copy(L: _Lowering, fx: torch.fx.Node) -> _Entry:
    dtype = fx.kwargs.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        raise L.unsupported(fx, f"cast of a variable to {dtype}")
    return L.entry(fx.args[0])  # float casts: the primal graph is float32 throughout


def _expand(L: _Lowering, fx: torch.fx.Node) -> _Entry:
    x = L.var(fx.args[0], fx)
    if _meta_shape(fx) != L.shape(x):
        raise L.unsupported(fx, "broadcasting a variable tensor to a larger shape")
    return x


def _reshape_like(L: _Lowering, fx: torch.fx.Node) -> str:
    # view / squeeze / unsqueeze all keep row-major order: a reshape to the static shape torch
    # recorded (it already resolved -1 and squeezed axes).
    x = L.var(fx.args[0], fx)
    target = _meta_shape(fx)
    if target == L.shape(x):
        return x
    return L.emit("reshape", [x], {"shape": target}, fx)


def _permute(L: _Lowering, fx: torch.fx.Node) -> str:
    x = L.var(fx.args[0], fx)
    n = len(L.shape(x))
    perm = tuple(int(d) % n for d in fx.args[1]) if n else ()
    if perm == tuple(range(n)):
        return x
    return L.emit("transpose", [x], {"perm": perm}, fx)


def _cat(L: _Lowering, fx: torch.fx.Node) -> str:
    tensors = list(fx.args[0])
    if not all(L.is_var(t) for t in tensors):
        raise L.unsupported(fx, "concatenation with a constant tensor")
    xs = [L.var(t, fx) for t in tensors]
    if len(xs) == 1:
        return xs[0]
    n = len(L.shape(xs[0]))
    axis = int(_arg(fx, 1, "dim", 0)) % n
    return L.emit("concat", xs, {"axis": axis}, fx)


def _relu(L: _Lowering, fx: torch.fx.Node) -> str:
    return L.emit("relu", [L.var(fx.args[0], fx)], {}, fx)


def _clamp_scalars(L: _Lowering, fx: torch.fx.Node, x: str, lo: float | None, hi: float | None) -> str:
    """clamp via exact identities on relu:
    max(x, a) = relu(x - a) + a;  min(x, b) = b - relu(b - x);  both: min(max(x, a), b)."""
    if lo is None and hi is None:
        return x
    if lo is not None and hi is not None and lo > hi:
        raise L.unsupported(fx, f"clamp with min {lo} > max {hi}")
    if lo is not None:
        if lo == 0:
            t = L.emit("relu", [x], {}, fx, out=fx.name if hi is None else L.helper_name(fx, "relu"))
        else:
            u = L.affine(x, 1.0, -lo, fx)
            t = L.emit("relu", [u], {}, fx, out=L.helper_name(fx, "relu"))
        if hi is None:
            return t if lo == 0 else L.affine(t, 1.0, lo, fx, out=fx.name)
        # t = max(x, a) - a;  min(t + a, b) = b - relu(b - a - t)
        u = L.affine(t, -1.0, Enclosed.exact(torch.tensor(hi, dtype=torch.float64)) - lo, fx)
    else:
        u = L.affine(x, -1.0, hi, fx)
    r = L.emit("relu", [u], {}, fx, out=L.helper_name(fx, "relu"))
    return L.affine(r, -1.0, hi, fx, out=fx.name)


def _scalar_or_none(L: _Lowering, fx: torch.fx.Node, v: Any, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise L.unsupported(fx, f"clamp {what} must be a Python number")


def _clamp(L: _Lowering, fx: torch.fx.Node) -> str:
    lo = _scalar_or_none(L, fx, _arg(fx, 1, "min"), "min")
    hi = _scalar_or_none(L, fx, _arg(fx, 2, "max"), "max")
    return _clamp_scalars(L, fx, L.var(fx.args[0], fx), lo, hi)


def _clamp_min(L: _Lowering, fx: torch.fx.Node) -> str:
    return _clamp_scalars(L, fx, L.var(fx.args[0], fx), _scalar_or_none(L, fx, fx.args[1], "min"), None)


def _clamp_max(L: _Lowering, fx: torch.fx.Node) -> str:
    return _clamp_scalars(L, fx, L.var(fx.args[0], fx), None, _scalar_or_none(L, fx, fx.args[1], "max"))


def _hardtanh(L: _Lowering, fx: torch.fx.Node) -> str:
    lo = _scalar_or_none(L, fx, _arg(fx, 1, "min_val", -1.0), "min")
    hi = _scalar_or_none(L, fx, _arg(fx, 2, "max_val", 1.0), "max")
    return _clamp_scalars(L, fx, L.var(fx.args[0], fx), lo, hi)


def _add_sub(L: _Lowering, fx: torch.fx.Node, sign: float) -> str:
    """a + sign * alpha * b."""
    a, b = fx.args[0], fx.args[1]
    alpha = float(fx.kwargs.get("alpha", 1))
    k = sign * alpha
    if L.is_var(a) and L.is_var(b):
        x, y = L.var(a, fx), L.var(b, fx)
        if L.shape(x) != L.shape(y):
            raise L.unsupported(fx, f"broadcasting add of variables of shapes {list(L.shape(x))} "
                                    f"and {list(L.shape(y))}")
        if k != 1.0:
            y = L.affine(y, k, 0.0, fx)
        return L.emit("add", [x, y], {}, fx)
    if L.is_var(a):
        c, roots = L.const_tensor(b, fx, "operand")
        return L.affine(L.var(a, fx), 1.0, _scaled(c, k), fx, shift_roots=roots, out=fx.name)
    c, roots = L.const_tensor(a, fx, "operand")
    return L.affine(L.var(b, fx), k, c, fx, shift_roots=roots, out=fx.name)


def _add(L: _Lowering, fx: torch.fx.Node) -> str:
    return _add_sub(L, fx, 1.0)


def _sub(L: _Lowering, fx: torch.fx.Node) -> str:
    return _add_sub(L, fx, -1.0)


def _rsub(L: _Lowering, fx: torch.fx.Node) -> str:
    # rsub(x, other, alpha) = other - alpha * x
    alpha = float(fx.kwargs.get("alpha", 1))
    c, roots = L.const_tensor(fx.args[1], fx, "operand")
    return L.affine(L.var(fx.args[0], fx), -alpha, c, fx, shift_roots=roots, out=fx.name)


def _mul(L: _Lowering, fx: torch.fx.Node) -> str:
    a, b = fx.args[0], fx.args[1]
    if L.is_var(a) and L.is_var(b):
        raise L.unsupported(fx, "product of two tensors that both depend on the input "
                                "(only multiplication by constants is supported)")
    x, c = (a, b) if L.is_var(a) else (b, a)
    scale, roots = L.const_tensor(c, fx, "factor")
    return L.affine(L.var(x, fx), scale, 0.0, fx, scale_roots=roots, out=fx.name)


def _div(L: _Lowering, fx: torch.fx.Node) -> str:
    a, b = fx.args[0], fx.args[1]
    if fx.kwargs.get("rounding_mode") is not None:
        raise L.unsupported(fx, "division with rounding")
    if L.is_var(b):
        raise L.unsupported(fx, "division by a tensor that depends on the input")
    c, roots = L.const_tensor(b, fx, "divisor")
    try:
        scale = c.reciprocal()
    except ValueError:
        raise L.unsupported(fx, "division by a constant that is (or may be) zero") from None
    return L.affine(L.var(a, fx), scale, 0.0, fx, scale_roots=roots, out=fx.name)


def _neg(L: _Lowering, fx: torch.fx.Node) -> str:
    return L.affine(L.var(fx.args[0], fx), -1.0, 0.0, fx, out=fx.name)


def _mm(L: _Lowering, fx: torch.fx.Node) -> str:
    # mm / bmm / matmul differ only in which ranks torch accepts
    return L.matmul(fx, fx.args[0], fx.args[1])


def _linear(L: _Lowering, fx: torch.fx.Node) -> str:
    x = L.var(fx.args[0], fx)
    w, w_roots = L.const_tensor(fx.args[1], fx, "linear weight")
    if len(w.shape) != 2:
        raise L.unsupported(fx, f"linear weight of rank {len(w.shape)}")
    bias = _arg(fx, 2, "bias")
    b, b_roots = (None, frozenset()) if bias is None else L.const_tensor(bias, fx, "linear bias")
    return L.linear(x, w, b, w_roots | b_roots, fx, out=fx.name)


def _addmm(L: _Lowering, fx: torch.fx.Node) -> str:
    beta = float(fx.kwargs.get("beta", 1))
    alpha = float(fx.kwargs.get("alpha", 1))
    return L.matmul(fx, fx.args[1], fx.args[2], bias=fx.args[0], beta=beta, alpha=alpha)


def _pair(v: Any) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


def _convolution(L: _Lowering, fx: torch.fx.Node) -> str:
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    x, extra = L.var_and_pad(fx.args[0], fx)
    w, w_roots = L.const_tensor(fx.args[1], fx, "convolution weight")
    if len(w.shape) != 4:
        raise L.unsupported(fx, f"only 2-D convolutions are supported (weight has rank {len(w.shape)})")
    if bool(fx.args[6]):
        raise L.unsupported(fx, "transposed convolution")
    stride, (ph, pw), dilation = _pair(fx.args[3]), _pair(fx.args[4]), _pair(fx.args[5])
    groups = int(fx.args[8])
    pads = (ph + extra[0], pw + extra[1], ph + extra[2], pw + extra[3])
    inputs = [x, L.tensor_value(w, w_roots, fx, "weight")]
    if fx.args[2] is not None:
        b, b_roots = L.const_tensor(fx.args[2], fx, "convolution bias")
        inputs.append(L.tensor_value(b, b_roots, fx, "bias"))
    return L.emit("conv2d", inputs, {"stride": stride, "padding": pads, "dilation": dilation,
                                     "groups": groups}, fx)


def _constant_pad_nd(L: _Lowering, fx: torch.fx.Node) -> _Pad:
    x = L.var(fx.args[0], fx)
    pad = [int(p) for p in fx.args[1]]
    value = float(_arg(fx, 2, "value", 0.0))
    if value != 0.0:
        raise L.unsupported(fx, f"padding with value {value} (only zero padding)")
    if len(pad) > 4 or len(pad) % 2 or any(p < 0 for p in pad):
        raise L.unsupported(fx, f"padding {pad}: only non-negative zero padding of the last two axes")
    pad = pad + [0] * (4 - len(pad))
    left, right, top, bottom = pad
    shape = L.shape(x)
    if len(shape) < 2:
        raise L.unsupported(fx, "padding a tensor of rank < 2")
    out = shape[:-2] + (shape[-2] + top + bottom, shape[-1] + left + right)
    return _Pad(x, (top, left, bottom, right), out)


def _avg_pool2d(L: _Lowering, fx: torch.fx.Node) -> str:
    # avg_pool2d(x, kernel_size, stride=[], padding=0, ceil_mode=False, count_include_pad=True,
    #            divisor_override=None)
    x, extra = L.var_and_pad(fx.args[0], fx)
    kh, kw = _pair(fx.args[1])
    stride_arg = _arg(fx, 2, "stride", [])
    stride = _pair(stride_arg) if stride_arg else (kh, kw)
    ph, pw = _pair(_arg(fx, 3, "padding", 0))
    ceil_mode = bool(_arg(fx, 4, "ceil_mode", False))
    include_pad = bool(_arg(fx, 5, "count_include_pad", True))
    divisor = _arg(fx, 6, "divisor_override", None)
    if not include_pad and (ph or pw):
        raise L.unsupported(fx, "avg_pool2d with count_include_pad=False and non-zero padding")
    shape = L.shape(x)
    if len(shape) < 3:
        raise L.unsupported(fx, "avg_pool2d needs a [..., C, H, W] input")
    channels = shape[-3]
    count = float(divisor if divisor else kh * kw)
    w = Enclosed.exact(torch.full((channels, 1, kh, kw), count, dtype=torch.float64)).reciprocal()
    wname = L.tensor_value(w, frozenset(), fx, "weight")
    pads = (ph + extra[0], pw + extra[1], ph + extra[2], pw + extra[3])
    out = L.emit("conv2d", [x, wname], {"stride": stride, "padding": pads, "dilation": (1, 1),
                                        "groups": channels}, fx)
    if ceil_mode and L.shape(out) != _meta_shape(fx):
        # ceil mode adds partial windows with a different divisor: not a fixed convolution.
        raise L.unsupported(fx, "avg_pool2d with ceil_mode=True where it changes the output shape")
    return out


def _batch_norm_eval(L: _Lowering, fx: torch.fx.Node) -> tuple:
    # _native_batch_norm_legit_no_training(x, weight, bias, running_mean, running_var, momentum, eps)
    x = L.var(fx.args[0], fx)
    mean, r1 = L.const_tensor(fx.args[3], fx, "running mean")
    var, r2 = L.const_tensor(fx.args[4], fx, "running var")
    eps = float(fx.args[6])
    roots = r1 | r2
    gamma = Enclosed.exact(torch.ones_like(mean.value))
    beta = Enclosed.exact(torch.zeros_like(mean.value))
    if fx.args[1] is not None:
        gamma, r = L.const_tensor(fx.args[1], fx, "weight")
        roots |= r
    if fx.args[2] is not None:
        beta, r = L.const_tensor(fx.args[2], fx, "bias")
        roots |= r
    try:
        scale = gamma * (var + eps).sqrt().reciprocal()
    except ValueError as e:
        raise L.unsupported(fx, f"batch norm whose variance plus eps is (or may be) zero or negative ({e})") from e
    shift = beta - mean * scale
    ndim = len(L.shape(x))
    if ndim < 2:
        raise L.unsupported(fx, "batch norm of a rank < 2 tensor")
    bshape = (scale.value.numel(),) + (1,) * (ndim - 2)  # channel axis is per-region axis 1
    y = L.affine(x, scale.map(lambda t: t.reshape(bshape)), shift.map(lambda t: t.reshape(bshape)), fx,
                 scale_roots=roots, shift_roots=roots, out=fx.name)
    return (y, None, None)  # (output, save_mean, save_invstd): only the output is meaningful


def _getitem(L: _Lowering, fx: torch.fx.Node) -> _Entry:
    src = L.entry(fx.args[0])
    item = src[fx.args[1]] if isinstance(src, tuple) else None
    if item is None:
        raise L.unsupported(fx, f"output {fx.args[1]} of {fx.args[0]} is not available")
    return item


LOWERINGS: dict[Any, Callable[[_Lowering, torch.fx.Node], _Entry]] = {
    # matrix products with a constant side
    aten.linear.default: _linear,
    aten.matmul.default: _mm,
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.bmm.default: _mm,
    # convolution, pooling, normalisation
    aten.convolution.default: _convolution,
    aten.constant_pad_nd.default: _constant_pad_nd,
    aten.avg_pool2d.default: _avg_pool2d,
    aten._native_batch_norm_legit_no_training.default: _batch_norm_eval,
    operator.getitem: _getitem,
    # activations
    aten.relu.default: _relu,
    aten.clamp.default: _clamp,
    aten.clamp_min.default: _clamp_min,
    aten.clamp_max.default: _clamp_max,
    aten.hardtanh.default: _hardtanh,
    # elementwise arithmetic
    aten.add.Tensor: _add,
    aten.add.Scalar: _add,
    aten.sub.Tensor: _sub,
    aten.sub.Scalar: _sub,
    aten.rsub.Scalar: _rsub,
    aten.mul.Tensor: _mul,
    aten.mul.Scalar: _mul,
    aten.div.Tensor: _div,
    aten.div.Scalar: _div,
    aten.neg.default: _neg,
    # shape ops
    aten.view.default: _reshape_like,
    aten._unsafe_view.default: _reshape_like,
    aten.reshape.default: _reshape_like,
    aten.squeeze.dims: _reshape_like,
    aten.squeeze.dim: _reshape_like,
    aten.squeeze.default: _reshape_like,
    aten.unsqueeze.default: _reshape_like,
    aten.permute.default: _permute,
    aten.cat.default: _cat,
    aten.expand.default: _expand,
    # value-preserving
    aten.clone.default: _passthrough,
    aten.alias.default: _passthrough,
    aten.detach.default: _passthrough,
    aten._to_copy.default: _to_copy,
}


def supported_ops() -> list[str]:
    return sorted({_op_name(op) for op in LOWERINGS})


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def _decomposition_table() -> dict:
    """Core-ATen decompositions, except linear and matmul.

    Decomposed, those two become view/mm/view chains or expand+bmm (depending on strides) and
    the bias an add after a reshape; kept whole, a linear over [1, T, D] stays one op on the
    model's own shapes, which is both the smaller graph and exactly the primal linear.
    """
    table = torch.export.default_decompositions()
    for op in (aten.linear.default, aten.matmul.default):
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
            raise L.unsupported(fx, f"FX {fx.op} nodes are not supported")
        if not fx.users and fx.name not in output_names:
            continue  # dead code (and runtime metadata assertions) cannot affect the outputs
        deps = [L.env[n.name] for n in _tensor_inputs(fx)]
        if all(isinstance(d, _Const) for d in deps):
            L.env[fx.name] = _fold(L, fx, deps)
            continue
        lower = LOWERINGS.get(fx.target)
        if lower is None:
            raise L.unsupported(fx)
        result = lower(L, fx)
        if result is None:
            continue
        L.env[fx.name] = result
        _check_shape(L, fx, result)

    for spec in sig.output_specs:
        if spec.kind.name != "USER_OUTPUT":
            continue  # buffer mutations etc. are not outputs of the function we bound
        arg_name = getattr(spec.arg, "name", None)
        entry = L.env.get(arg_name) if arg_name else None
        if isinstance(entry, _Pad):
            out_fx = next(n for n in ep.graph.nodes if n.name == arg_name)
            entry = L.materialise_pad(out_fx, entry, out_fx)
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
        raise L.unsupported(fx, f"could not fold constant expression: {e}") from e
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
    got = result.shape if isinstance(result, _Pad) else L.shape(result) if isinstance(result, str) else None
    if got is not None and tuple(got) != want:
        raise L.unsupported(fx, f"lowering produced shape {list(got)} but torch computes {list(want)}")
