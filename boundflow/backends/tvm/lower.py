"""Lower the BoundTasks of a BFTaskModule to Relax functions.

Each task becomes one Relax function over the buffers it reads and writes
(``t<task>_<n>([dyn,] *inputs, *weights) -> (outputs...)``), built with ``relax.BlockBuilder``
from a rule table keyed by op name, as ``boundflow.ops.KERNELS`` is. Each rule mirrors its
torch kernel op for op, so the two executors compute the same values up to summation order.
All functions of a module go into one IRModule, so TVM builds a kernel shared by several tasks
once.

Data-dependent output sizes. ``bound.unstable`` returns as many indices as the data has unstable
neurons, so no compiled function can know its output shape. Such ops (``host_ops``, configured
by the executor and counted in its stats) run as their torch kernel on the host between Relax
functions: a task that contains one is cut there into *segments*, each one Relax function.
Every buffer whose ``dynamic_axis`` is set belongs to the *family* of the ``unstable`` output
it derives from and has extent ``factor * k`` on that axis, with ``k`` the family's index
count. Functions that touch a family take ``k`` as a symbolic shape variable through a leading
``R.Shape([k, ...])`` parameter, so one compiled function serves every unstable count, and
``tir_var_upper_bound`` can tell TVM's memory planner the largest ``k`` (see
``MemoryPlanMode.FORCE_STATIC_PLAN``).

Weights are parameters, not constants: the compiled code depends on shapes and attributes only,
which is what the compile cache keys on.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import tvm
from tvm import relax, tirx
from tvm.relax import BlockBuilder, TensorType
from tvm.relax import op as R

from boundflow.domains import patches
from boundflow.errors import UnsupportedOpError
from boundflow.ir.task import BFTaskModule, TaskOp

# ops whose output size depends on the data: run on the host between Relax functions
DATA_DEPENDENT_OPS = frozenset({"bound.unstable"})


class LoweringError(UnsupportedOpError):
    """A task op has no Relax rule, or a rule's result disagrees with the planned buffer."""


# ------------------------------------------------------------------------------------------
# dynamic families and segments
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DynamicExtent:
    """Buffer extent on its dynamic axis: factor * (index count of `family`)."""

    family: int          # buffer id of the bound.unstable output the extent derives from
    factor: int


def dynamic_extents(module: BFTaskModule) -> dict[int, DynamicExtent]:
    """The family and factor of every buffer with a dynamic axis.

    An ``unstable`` output starts a family (factor 1); any other op's dynamic outputs join the
    family of its dynamic inputs, with factor planned extent / the family's planned count."""
    extents: dict[int, DynamicExtent] = {}
    bufs = module.buffers
    for op in module.ops():
        dyn_outs = [b for b in op.outputs if bufs[b].dynamic_axis is not None]
        if not dyn_outs:
            continue
        if op.op in DATA_DEPENDENT_OPS:
            for b in dyn_outs:
                extents[b] = DynamicExtent(b, 1)
            continue
        families = {extents[b].family for b in op.inputs if b in extents}
        if len(families) != 1:
            raise LoweringError(f"{op.op} ({op.source}) writes a dynamic buffer but reads "
                                f"{len(families)} dynamic families; expected exactly one")
        (family,) = families
        count = bufs[family].shape[bufs[family].dynamic_axis]
        for b in dyn_outs:
            extent = bufs[b].shape[bufs[b].dynamic_axis]
            if extent % count:
                raise LoweringError(f"buffer {b} ({bufs[b].name}): dynamic extent {extent} is not a "
                                    f"multiple of its family's count {count}")
            extents[b] = DynamicExtent(family, extent // count)
    return extents


@dataclass
class Segment:
    """A run of one task's ops: one Relax function, or (host=True) one host op."""

    task: int
    ops: list[TaskOp]
    host: bool
    inputs: list[int] = field(default_factory=list)    # buffers read, written before the segment
    outputs: list[int] = field(default_factory=list)   # buffers written and read after it


def split_segments(module: BFTaskModule, host_ops: Sequence[str]) -> list[Segment]:
    """Every task's ops cut into segments at host ops, in execution order, with the buffers
    crossing each segment boundary."""
    host_ops = frozenset(host_ops)
    missing = DATA_DEPENDENT_OPS - host_ops
    used = {op.op for op in module.ops()}
    if missing & used:
        raise LoweringError(f"{sorted(missing & used)} have data-dependent output sizes and cannot be "
                            "compiled; they must be listed in TVMExecutorOptions.host_ops")
    segments: list[Segment] = []
    for task in module.tasks:
        for op in task.ops:
            host = op.op in host_ops
            if host or not segments or segments[-1].host or segments[-1].task != task.id:
                segments.append(Segment(task.id, [], host))
            segments[-1].ops.append(op)
    last_read = {b: len(segments) for b in module.outputs.values()}
    for k, seg in enumerate(segments):
        for op in seg.ops:
            for b in op.inputs:
                last_read[b] = max(last_read.get(b, k), k)
    for k, seg in enumerate(segments):
        written: set[int] = set()
        for op in seg.ops:
            seg.inputs.extend(b for b in op.inputs if b not in written and b not in seg.inputs)
            written.update(op.outputs)
        seg.outputs = [b for op in seg.ops for b in op.outputs if last_read.get(b, -1) > k]
    return segments


# ------------------------------------------------------------------------------------------
# lowering a module
# ------------------------------------------------------------------------------------------
@dataclass
class LoweredFunction:
    """One segment as Relax function `name` of the lowered module, and how to call it."""

    name: str
    task: int
    num_ops: int
    families: list[int]          # family ids, in the order of the leading R.Shape parameter
    inputs: list[int]            # buffer ids, in parameter order
    params: list[str]            # weight names (BFTaskModule.params or derived), in parameter order
    outputs: list[int]           # buffer ids, in the order of the returned tuple
    upper_bounds: dict[str, int] # symbolic var name -> its largest value (the planned count)


@dataclass
class LoweredModule:
    """Every task of a BFTaskModule as Relax functions of one IRModule (compiled together, so
    identical kernels are built once), and the execution order: functions and host segments."""

    ir_mod: tvm.IRModule
    steps: list[LoweredFunction | Segment]
    derived: dict[str, torch.Tensor]   # weights computed from the planner's, by name

    @property
    def functions(self) -> list[LoweredFunction]:
        return [s for s in self.steps if isinstance(s, LoweredFunction)]


class _Ctx:
    """What a rule sees: the block builder, shape helpers, and the function's weights.

    Weights become parameters of the function as rules ask for them. A rule may also ask for
    a weight *derived* from a planner weight (e.g. the kernel taps of one phase of a
    transposed convolution): it is computed here once, in torch, and passed like any weight,
    so the compiled code never recomputes it."""

    def __init__(self, bb: BlockBuilder, module: BFTaskModule, derived: dict[str, torch.Tensor]):
        self.bb = bb
        self.module = module
        self._derived = derived                     # shared by all functions of the module
        self.weights: dict[str, relax.Var] = {}     # name -> parameter, in first-use order
        self._names: dict[relax.Var, str] = {}

    def emit(self, expr: relax.Expr) -> relax.Expr:
        return self.bb.emit(expr)

    @staticmethod
    def shape(x: relax.Expr) -> list:
        """x's shape: ints where static, PrimExprs where symbolic."""
        ty = x.ty
        if not isinstance(ty, TensorType) or ty.shape is None:
            raise LoweringError(f"shape of {x} is unknown to Relax")
        return [int(d) if isinstance(d, tirx.IntImm) else d for d in ty.shape.values]

    def weight(self, name: str | None) -> relax.Var | None:
        """The parameter holding weight `name` (BFTaskModule.params or a derived one)."""
        if name is None:
            return None
        if name not in self.weights:
            t = self._derived[name] if name in self._derived else self.module.params[name]
            var = relax.Var(f"w{len(self.weights)}", TensorType(list(t.shape), str(t.dtype).removeprefix("torch.")))
            self.weights[name] = var
            self._names[var] = name
        return self.weights[name]

    def derived(self, weight: relax.Var, tag: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> relax.Var:
        """The parameter holding fn(weight), computed once; `tag` names fn."""
        source = self._names[weight]
        name = f"{source}#{tag}"
        if name not in self._derived:
            self._derived[name] = fn(self.module.params[source]).contiguous()
        return self.weight(name)


def lower_module(module: BFTaskModule, host_ops: Sequence[str]) -> LoweredModule:
    """Each task's segments as Relax functions "t<task>_<n>", in one IRModule."""
    extents = dynamic_extents(module)
    bb = BlockBuilder()
    steps: list[LoweredFunction | Segment] = []
    derived: dict[str, torch.Tensor] = {}
    per_task: dict[int, int] = {}
    for seg in split_segments(module, host_ops):
        if seg.host:
            steps.append(seg)
            continue
        n = per_task[seg.task] = per_task.get(seg.task, -1) + 1
        steps.append(_lower_segment(_Ctx(bb, module, derived), seg, extents, f"t{seg.task}_{n}"))
    return LoweredModule(bb.get(), steps, derived)


def _lower_segment(ctx: _Ctx, seg: Segment, extents: dict[int, DynamicExtent], name: str) -> LoweredFunction:
    """Relax function `name` computing the segment's outputs from its inputs and weights:
    name([dyn,] *inputs, *weights) -> (outputs...)."""
    bufs = ctx.module.buffers
    families = sorted({extents[b].family for b in seg.inputs if b in extents})
    kvars = {f: tirx.Var(f"k{i}", "int64") for i, f in enumerate(families)}

    def planned_shape(b: int) -> list:
        spec, shape = bufs[b], list(bufs[b].shape)
        if spec.dynamic_axis is not None:
            ext = extents[b]
            if ext.family not in kvars:
                raise LoweringError(f"buffer {b} ({spec.name}) has a dynamic size that no input of its "
                                    "segment determines")
            shape[spec.dynamic_axis] = ext.factor * kvars[ext.family] if ext.factor != 1 else kvars[ext.family]
        return shape

    env: dict[int, relax.Expr] = {b: relax.Var(f"in{i}", TensorType(planned_shape(b), bufs[b].dtype))
                                  for i, b in enumerate(seg.inputs)}
    bb = ctx.bb
    with bb.function(name):
        with bb.dataflow():
            for op in seg.ops:
                rule = RULES.get(op.op)
                if rule is None:
                    raise LoweringError(f"TVMTaskExecutor has no Relax rule for {op.op!r} ({op.source}); "
                                        "add one to boundflow.backends.tvm.lower.RULES")
                if op.attrs.get("lower_only"):       # only branch and bound plans use it
                    raise LoweringError(f"TVMTaskExecutor has no lower-only variant of {op.op!r} ({op.source})")
                if op.attrs.get("fp"):               # sound_fp plans: error terms have no Relax rules
                    raise LoweringError(f"TVMTaskExecutor has no floating-point-sound variant of {op.op!r} "
                                        f"({op.source}); run sound_fp plans with executor='python'")
                results = rule(ctx, [env[b] for b in op.inputs], [ctx.weight(p) for p in op.params], op.attrs)
                if len(results) != len(op.outputs):
                    raise LoweringError(f"Relax rule for {op.op} returned {len(results)} values for "
                                        f"{len(op.outputs)} outputs")
                for b, value in zip(op.outputs, results):
                    env[b] = _check_shape(ctx, op, b, value, planned_shape(b), bufs[b].dtype)
            out = bb.emit_output(relax.Tuple([env[b] for b in seg.outputs]))
        dyn = [relax.Var("dyn", relax.ShapeType([kvars[f] for f in families]))] if families else []
        bb.emit_func_output(out, params=dyn + [env[b] for b in seg.inputs] + list(ctx.weights.values()))
    upper = {kvars[f].name: bufs[f].shape[0] for f in families}
    return LoweredFunction(name, seg.task, len(seg.ops), families, list(seg.inputs), list(ctx.weights),
                           list(seg.outputs), upper)


def _check_shape(ctx: _Ctx, op: TaskOp, b: int, value: relax.Expr, want: list, dtype: str) -> relax.Expr:
    """The rule's result for buffer b, checked against the planned shape and dtype."""
    value = ctx.emit(value) if not isinstance(value, relax.Var) else value
    got = ctx.shape(value)
    same = len(got) == len(want) and all(_same_dim(g, w) for g, w in zip(got, want))
    if not same or str(value.ty.dtype) != dtype:
        raise LoweringError(f"Relax rule for {op.op} ({op.source}) gives {got} {value.ty.dtype} for buffer {b}; "
                            f"the plan has {want} {dtype}")
    return value


# ------------------------------------------------------------------------------------------
# rules: fn(ctx, inputs, weights, attrs) -> tuple of Relax exprs, one per output buffer.
# Each mirrors the torch kernel of the same name in boundflow.domains.
# ------------------------------------------------------------------------------------------
Rule = Callable[[_Ctx, list, list, dict], tuple]


def _f32(v: float) -> relax.Constant:
    return relax.const(v, "float32")


def _prod(dims) -> object:
    n = 1
    for d in dims:
        n = n * d
    return n


def _half(n):
    """n // 2 for an int or a PrimExpr (row counts 2S are even)."""
    return n // 2 if isinstance(n, int) else tvm.sym.Analyzer().simplify(tirx.floordiv(n, 2))


def _same_dim(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    diff = tvm.sym.Analyzer().simplify(a - b)
    return isinstance(diff, tirx.IntImm) and int(diff) == 0


def _index(ctx: _Ctx, x: relax.Expr, i: int) -> relax.Expr:
    """x[i] along axis 0."""
    return ctx.emit(R.squeeze(ctx.emit(R.strided_slice(x, [0], [i], [i + 1])), [0]))


def _to_cr(ctx: _Ctx, s: relax.Expr) -> tuple[relax.Expr, relax.Expr]:
    """(centre, radius) of stack(lower, upper); halving is exact, so these equal the torch
    kernel's 2x2 matmul bit for bit."""
    lo, hi = _index(ctx, s, 0), _index(ctx, s, 1)
    return ctx.emit(R.multiply(R.add(lo, hi), _f32(0.5))), ctx.emit(R.multiply(R.subtract(hi, lo), _f32(0.5)))


def _from_cr(ctx: _Ctx, c: relax.Expr, r: relax.Expr) -> relax.Expr:
    return ctx.emit(R.stack([R.subtract(c, r), R.add(c, r)], 0))


def _flatten_from(ctx: _Ctx, x: relax.Expr, axis: int) -> relax.Expr:
    shape = ctx.shape(x)
    return ctx.emit(R.reshape(x, shape[:axis] + [_prod(shape[axis:])]))


def _conv(ctx: _Ctx, x: relax.Expr, w: relax.Expr, b: relax.Expr | None, attrs: dict) -> relax.Expr:
    """boundflow.ops.conv.conv2d: conv over the last three axes of x."""
    shape = ctx.shape(x)
    lead = shape[:-3]
    xs = ctx.emit(R.reshape(x, [_prod(lead)] + shape[-3:]))
    y = ctx.emit(R.nn.conv2d(xs, w, strides=tuple(attrs["stride"]), padding=tuple(attrs["padding"]),
                             dilation=tuple(attrs["dilation"]), groups=attrs["groups"]))
    if b is not None:
        y = ctx.emit(R.add(y, ctx.emit(R.reshape(b, [-1, 1, 1]))))
    return ctx.emit(R.reshape(y, lead + ctx.shape(y)[1:]))


def _sum_lead(ctx: _Ctx, a: relax.Expr, keep: int) -> relax.Expr:
    """Sum A [B, 2S, ...] over every per-region axis except the last `keep` ones."""
    shape = ctx.shape(a)
    kept = shape[len(shape) - keep:]
    lead = _prod(shape[2:len(shape) - keep])
    if lead == 1:                                   # nothing to add up: a reshape, not a copy
        return ctx.emit(R.reshape(a, shape[:2] + kept))
    return ctx.emit(R.sum(ctx.emit(R.reshape(a, shape[:2] + [lead] + kept)), axis=[2]))


# -- interval ------------------------------------------------------------------------------
def _iv_linear(ctx, ins, ps, attrs):
    (s,) = ins
    w_cr, b_cr = ps[:2]     # [2, in, out], [2, 1, out] (the (l, u) form after them: torch's batch-1 path)
    shape = ctx.shape(s)
    c, r = _to_cr(ctx, s)
    cr = ctx.emit(R.reshape(ctx.emit(R.stack([c, r], 0)), [2, -1, shape[-1]]))
    out = ctx.emit(R.add(ctx.emit(R.matmul(cr, w_cr)), b_cr))
    lo_hi = _from_cr(ctx, _index(ctx, out, 0), _index(ctx, out, 1))
    return (R.reshape(lo_hi, shape[:-1] + [ctx.shape(w_cr)[-1]]),)


def _iv_conv2d(ctx, ins, ps, attrs):
    (s,) = ins
    w, w_abs, b = ps[:3]    # (the pair form after them: torch's batch-1 path)
    c, r = _to_cr(ctx, s)
    return (_from_cr(ctx, _conv(ctx, c, w, b, attrs), _conv(ctx, r, w_abs, None, attrs)),)


def _iv_affine(ctx, ins, ps, attrs):
    """As ops.affine.interval: min and max of scale l and scale u, plus shift."""
    (s,) = ins
    scale, shift = ps
    prod = ctx.emit(R.multiply(s, scale))
    return (R.add(ctx.emit(R.stack([ctx.emit(R.min(prod, axis=[0])), ctx.emit(R.max(prod, axis=[0]))], 0)), shift),)


def _iv_add(ctx, ins, ps, attrs):
    return (R.add(ins[0], ins[1]),)


def _iv_relu(ctx, ins, ps, attrs):
    return (R.maximum(ins[0], _f32(0.0)),)


def _iv_clamp_min(ctx, ins, ps, attrs):
    return (R.maximum(ins[0], ps[0]),)


def _iv_reshape(ctx, ins, ps, attrs):
    (s,) = ins
    return (R.reshape(s, ctx.shape(s)[:2] + list(attrs["shape"])),)


def _iv_transpose(ctx, ins, ps, attrs):
    return (R.permute_dims(ins[0], [0, 1] + [p + 2 for p in attrs["perm"]]),)


def _iv_concat(ctx, ins, ps, attrs):
    return (R.concat(list(ins), axis=attrs["axis"] + 2),)


def _iv_flatten(ctx, ins, ps, attrs):
    return (_flatten_from(ctx, ins[0], 2),)


def _iv_spec_linear(ctx, ins, ps, attrs):
    """C folded into the last linear layer: mid = (C W) c + C b, rad = |C W| r."""
    s, C = ins
    w, b = ps
    c, r = _to_cr(ctx, _flatten_from(ctx, s, 2))               # [B, in]
    cw = ctx.emit(R.matmul(C, w))                              # [B, S, in]
    mid = ctx.emit(R.add(_matvec(ctx, cw, c), R.matmul(C, b)))
    rad = _matvec(ctx, ctx.emit(R.abs(cw)), r)
    return (R.stack([R.subtract(mid, rad), R.add(mid, rad)], 0),)


def _iv_spec_box(ctx, ins, ps, attrs):
    """C+ lo + C- hi and C+ hi + C- lo."""
    s, C = ins
    flat = _flatten_from(ctx, s, 2)
    lo, hi = _index(ctx, flat, 0), _index(ctx, flat, 1)
    pos, neg = ctx.emit(R.maximum(C, _f32(0.0))), ctx.emit(R.minimum(C, _f32(0.0)))
    lower = R.add(_matvec(ctx, pos, lo), _matvec(ctx, neg, hi))
    upper = R.add(_matvec(ctx, pos, hi), _matvec(ctx, neg, lo))
    return (R.stack([lower, upper], 0),)


def _matvec(ctx: _Ctx, m: relax.Expr, v: relax.Expr) -> relax.Expr:
    """Batched m [B, S, n] @ v [B, n] -> [B, S] (torch.bmm(m, v.unsqueeze(-1)).squeeze(-1)).
    Written as a row sum of m * v: one fused kernel whose reduction is contiguous in both
    (a matmul against an [n, 1] matrix leaves the unit axis last)."""
    return ctx.emit(R.sum(ctx.emit(R.multiply(m, ctx.emit(R.expand_dims(v, [1])))), axis=[-1]))


# -- relu relaxation -----------------------------------------------------------------------
def _relu_relax(ctx, ins, ps, attrs):
    lo, hi = _index(ctx, ins[0], 0), _index(ctx, ins[0], 1)
    lo_r = ctx.emit(R.minimum(lo, _f32(0.0)))
    hi_r = ctx.emit(R.maximum(R.maximum(hi, _f32(0.0)), R.add(lo_r, _f32(1e-8))))
    up_slope = ctx.emit(R.divide(hi_r, R.subtract(hi_r, lo_r)))
    up_bias = ctx.emit(R.multiply(R.negative(lo_r), up_slope))
    lo_slope = ctx.emit(R.astype(R.greater(up_slope, _f32(0.5)), "float32"))
    return (R.stack([up_slope, up_bias, lo_slope], 0),)


def _clamp_min_relax(ctx, ins, ps, attrs):
    """Rows (l, u, c, lower slope, lower intercept, upper slope, upper intercept) as
    boundflow.ops.clamp.relax computes them."""
    lo, hi = _index(ctx, ins[0], 0), _index(ctx, ins[0], 1)
    c = ctx.emit(R.broadcast_to(ps[0], ctx.shape(lo)))
    one, zero = _f32(1.0), _f32(0.0)
    crossing = ctx.emit(R.logical_and(R.less(lo, c), R.less(c, hi)))
    above = ctx.emit(R.greater_equal(lo, c))
    above_f = ctx.emit(R.astype(above, "float32"))
    width = ctx.emit(R.where(crossing, R.subtract(hi, lo), one))
    k = ctx.emit(R.where(crossing, R.divide(R.subtract(hi, c), width), above_f))
    crown = ctx.emit(R.astype(R.greater(R.subtract(hi, c), R.subtract(c, lo)), "float32"))
    s = ctx.emit(R.where(crossing, crown, k))
    b_up = ctx.emit(R.where(crossing, R.subtract(c, R.multiply(k, lo)), R.where(above, zero, c)))
    b_lo = ctx.emit(R.where(above, zero, R.subtract(c, R.multiply(s, c))))
    return (R.stack([lo, hi, c, s, b_lo, k, b_up], 0),)


# -- linear (CROWN backward) ---------------------------------------------------------------
def _ln_start_spec(ctx, ins, ps, attrs):
    batch, shape = attrs["batch"], list(attrs["shape"])
    if ins:
        (c,) = ins                                              # [B, S, O]
        a = ctx.emit(R.reshape(c, [batch, ctx.shape(c)[1]] + shape))
    else:
        n = attrs["numel"]
        eye = ctx.emit(R.reshape(ctx.emit(R.eye(n, dtype="float32")), [1, n] + shape))
        a = ctx.emit(R.broadcast_to(eye, [batch, n] + shape))
    a = ctx.emit(R.concat([a, a], axis=1))
    return a, R.zeros([batch, ctx.shape(a)[1]], "float32")


def _ln_start_onehot(ctx, ins, ps, attrs):
    """Rows of the identity: row j of each half is e_idx[j] (every row without an index)."""
    batch, shape, n = attrs["batch"], list(attrs["shape"]), attrs["numel"]
    if ins:
        (idx,) = ins
        rows = ctx.emit(R.concat([idx, idx], axis=0))              # [2k]
        column = ctx.emit(R.expand_dims(rows, [1]))
        onehot = ctx.emit(R.astype(ctx.emit(R.equal(column, ctx.emit(R.arange(0, n, 1, "int64")))), "float32"))
    else:
        eye = ctx.emit(R.eye(n, dtype="float32"))
        onehot = ctx.emit(R.concat([eye, eye], axis=0))
    rows2 = ctx.shape(onehot)[0]
    a = R.broadcast_to(ctx.emit(R.reshape(onehot, [1, rows2] + shape)), [batch, rows2] + shape)
    return a, R.zeros([batch, rows2], "float32")


def _ln_start_rows(ctx, ins, ps, attrs):
    """The selected rows of W (and b) as the coefficients on the linear op's input."""
    w, b = ps
    batch, in_shape = attrs["batch"], list(attrs["in_shape"])
    if ins:
        (idx,) = ins
        w, b = ctx.emit(R.take(w, idx, axis=0)), ctx.emit(R.take(b, idx, axis=0))
    a = ctx.emit(R.concat([w, w], axis=0))
    bias = ctx.emit(R.concat([b, b], axis=0))
    s2 = ctx.shape(a)[0]
    return (R.broadcast_to(ctx.emit(R.reshape(a, [1, s2] + in_shape)), [batch, s2] + in_shape),
            R.broadcast_to(ctx.emit(R.reshape(bias, [1, s2])), [batch, s2]))


def _ln_linear(ctx, ins, ps, attrs):
    a, bias = ins
    w, b = ps
    return R.matmul(a, w), R.add(bias, _matvec_rows(ctx, _sum_lead(ctx, a, 1), b))


def _matvec_rows(ctx: _Ctx, m: relax.Expr, v: relax.Expr) -> relax.Expr:
    """m [B, R, n] @ v [n] -> [B, R], as a row sum (see _matvec)."""
    return ctx.emit(R.sum(ctx.emit(R.multiply(m, v)), axis=[-1]))


def _ln_conv2d(ctx, ins, ps, attrs):
    """A through the transposed convolution (see _conv_transpose), and the bias term (a small
    conv's dense matrix after w, b: the Python kernel's form)."""
    a, bias = ins
    w, b = ps[:2]
    c_in, h, wd = attrs["in_shape"][-3:]
    shape = ctx.shape(a)
    lead = shape[:-3]
    x = _conv_transpose(ctx, ctx.emit(R.reshape(a, [_prod(lead)] + shape[-3:])), w, (h, wd), attrs)
    new_a = R.reshape(x, lead + [c_in, h, wd])
    if b is None:
        return new_a, bias
    per_channel = ctx.emit(R.sum(_sum_lead(ctx, a, 3), axis=[-1, -2]))     # [B, R, c_out]
    return new_a, R.add(bias, _matvec_rows(ctx, per_channel, b))


@dataclass(frozen=True)
class _Phase:
    """One output phase of a transposed convolution along one axis: outputs p, p + s, ...
    are a stride-1 correlation of the input with the kernel taps that land on them."""

    taps: list[int]          # kernel indices, in order of increasing input offset
    dilation: int            # input distance between consecutive taps
    crop: tuple[int, int]    # input positions dropped at the start and the end
    pad: tuple[int, int]     # zero padding at the start and the end


def _axis_phases(n_in: int, n_out: int, k: int, s: int, pad: int, d: int) -> list[_Phase | None]:
    """Phases p = 0..s-1 of the transposed convolution along one axis, each producing
    ceil(n_out / s) outputs; None when no tap reaches phase p.

    Output y = p + s t reads input (y + pad - j d) / s for the taps j where that is whole."""
    count = -(-n_out // s)
    phases: list[_Phase | None] = []
    for p in range(s):
        taps = sorted((j for j in range(k) if (p + pad - j * d) % s == 0), reverse=True)
        if not taps:
            phases.append(None)
            continue
        first = (p + pad - taps[0] * d) // s
        step = (taps[0] - taps[1]) * d // s if len(taps) > 1 else 1
        crop_lo, pad_lo = max(first, 0), max(-first, 0)
        pad_hi = count - (n_in - crop_lo) - pad_lo + step * (len(taps) - 1)
        crop_hi, pad_hi = max(-pad_hi, 0), max(pad_hi, 0)
        if n_in - crop_lo - crop_hi <= 0:
            phases.append(None)         # every tap lands outside the input
            continue
        phases.append(_Phase(taps, step, (crop_lo, crop_hi), (pad_lo, pad_hi)))
    return phases


def _phase_kernel(w: torch.Tensor, rows: list[int], cols: list[int], groups: int) -> torch.Tensor:
    """The taps (rows x cols) of conv weight w [c_out, c_in/g, kh, kw] as the weight of the
    stride-1 convolution that computes one phase of its transpose: [c_in, c_out/g, my, mx]."""
    c_out, cin_g = w.shape[:2]
    taps = w[:, :, rows][:, :, :, cols]
    grouped = taps.reshape(groups, c_out // groups, cin_g, len(rows), len(cols))
    return grouped.transpose(1, 2).reshape(groups * cin_g, c_out // groups, len(rows), len(cols))


def _conv_transpose(ctx: _Ctx, a: relax.Expr, w: relax.Expr, out_hw: tuple[int, int], attrs: dict) -> relax.Expr:
    """The transpose of conv2d(attrs) applied to a [N, c_out, h_out, w_out]: [N, c_in, h, w].

    Computed by phases: for stride s the outputs split into s x s interleaved grids, each a
    stride-1 convolution of `a` with the kernel taps that reach it, so no multiply-add is
    spent on the zeros a dilated-input formulation (TVM's conv2d_transpose) inserts."""
    n, c_out, h_out, w_out = ctx.shape(a)
    h, wd = out_hw
    top, left, _, _ = attrs["padding"]
    (sh, sw), (dh, dw), groups = attrs["stride"], attrs["dilation"], attrs["groups"]
    _, cin_g, kh, kw = ctx.shape(w)
    c_in = cin_g * groups
    rows = _axis_phases(h_out, h, kh, sh, top, dh)
    cols = _axis_phases(w_out, wd, kw, sw, left, dw)
    t_rows, t_cols = -(-h // sh), -(-wd // sw)
    grid = []
    for ph in rows:
        line = []
        for pw in cols:
            if ph is None or pw is None:
                line.append(ctx.emit(R.zeros([n, c_in, t_rows, t_cols], "float32")))
                continue
            x = a
            if ph.crop != (0, 0) or pw.crop != (0, 0):
                x = ctx.emit(R.strided_slice(x, [2, 3], [ph.crop[0], pw.crop[0]],
                                             [h_out - ph.crop[1], w_out - pw.crop[1]]))
            kernel = ctx.derived(w, f"phase{ph.taps}x{pw.taps}g{groups}",
                                 functools.partial(_phase_kernel, rows=ph.taps, cols=pw.taps, groups=groups))
            line.append(ctx.emit(R.nn.conv2d(x, kernel, strides=(1, 1),
                                             padding=(ph.pad[0], pw.pad[0], ph.pad[1], pw.pad[1]),
                                             dilation=(ph.dilation, pw.dilation), groups=groups)))
        grid.append(ctx.emit(R.stack(line, axis=4)))                 # [N, c_in, T, U, sw]
    woven = ctx.emit(R.stack(grid, axis=3))                           # [N, c_in, T, sh, U, sw]
    x = ctx.emit(R.reshape(woven, [n, c_in, t_rows * sh, t_cols * sw]))
    if (t_rows * sh, t_cols * sw) != (h, wd):
        x = ctx.emit(R.strided_slice(x, [2, 3], [0, 0], [h, wd]))
    return x


def _ln_affine(ctx, ins, ps, attrs):
    a, bias = ins
    scale, shift = ps
    term = _flatten_from(ctx, ctx.emit(R.multiply(a, shift)), 2)
    return R.multiply(a, scale), R.add(bias, R.sum(term, axis=[-1]))


def _lower_half_mask(ndim: int) -> relax.Constant:
    """[1, 2, 1, ...] bools, True on the lower-bound half of A's rows."""
    return relax.const(np.array([True, False]).reshape((1, 2) + (1,) * (ndim - 2)), "bool")


def _ln_relu(ctx, ins, ps, attrs):
    """Lower-bound rows: positive coefficients take the lower line, negative ones the upper
    line; upper-bound rows the other way round (boundflow.ops.relu._back). Done on A viewed as
    [B, 2, S, ...] so both halves are one elementwise kernel."""
    a, bias, relaxation = ins
    batch, rows, *shape = ctx.shape(a)
    s = _half(rows)
    a4 = ctx.emit(R.reshape(a, [batch, 2, s] + shape))
    up_slope, up_bias, lo_slope = (_index(ctx, relaxation, i) for i in range(3))   # [B, *shape]
    pos_slope = ctx.emit(R.expand_dims(ctx.emit(R.stack([lo_slope, up_slope], 1)), [2]))   # [B, 2, 1, *shape]
    neg_slope = ctx.emit(R.expand_dims(ctx.emit(R.stack([up_slope, lo_slope], 1)), [2]))
    slope = ctx.emit(R.where(ctx.emit(R.greater_equal(a4, _f32(0.0))), pos_slope, neg_slope))
    new_a = ctx.emit(R.multiply(a4, slope))
    # the intercept enters where the upper line was taken: A- on lower rows, A+ on upper rows
    chosen = ctx.emit(R.where(_lower_half_mask(len(shape) + 3), ctx.emit(R.minimum(a4, _f32(0.0))),
                              ctx.emit(R.maximum(a4, _f32(0.0)))))
    biased = ctx.emit(R.multiply(chosen, ctx.emit(R.expand_dims(up_bias, [1, 2]))))
    extra = ctx.emit(R.sum(ctx.emit(R.reshape(biased, [batch, 2, s, -1])), axis=[-1]))
    return R.reshape(new_a, [batch, rows] + shape), R.add(bias, ctx.emit(R.reshape(extra, [batch, rows])))


def _ln_clamp_min(ctx, ins, ps, attrs):
    """_ln_relu with both lines' intercepts (boundflow.ops.s_shaped._back)."""
    a, bias, relaxation = ins
    batch, rows, *shape = ctx.shape(a)
    s = _half(rows)
    a4 = ctx.emit(R.reshape(a, [batch, 2, s] + shape))
    k_lo, b_lo, k_up, b_up = (_index(ctx, relaxation, i) for i in range(3, 7))      # [B, *shape]

    def pair(lower_rows, upper_rows):                      # [B, 2, 1, *shape]: per half, its line
        return ctx.emit(R.expand_dims(ctx.emit(R.stack([lower_rows, upper_rows], 1)), [2]))
    positive = ctx.emit(R.greater_equal(a4, _f32(0.0)))
    new_a = ctx.emit(R.multiply(a4, ctx.emit(R.where(positive, pair(k_lo, k_up), pair(k_up, k_lo)))))
    icpt = ctx.emit(R.multiply(a4, ctx.emit(R.where(positive, pair(b_lo, b_up), pair(b_up, b_lo)))))
    extra = ctx.emit(R.sum(ctx.emit(R.reshape(icpt, [batch, 2, s, -1])), axis=[-1]))
    return R.reshape(new_a, [batch, rows] + shape), R.add(bias, ctx.emit(R.reshape(extra, [batch, rows])))


def _ln_reshape(ctx, ins, ps, attrs):
    a, bias = ins
    return R.reshape(a, ctx.shape(a)[:2] + list(attrs["in_shape"])), bias


def _ln_transpose(ctx, ins, ps, attrs):
    a, bias = ins
    inverse = [0] * len(attrs["perm"])
    for i, p in enumerate(attrs["perm"]):
        inverse[p] = i
    return R.permute_dims(a, [0, 1] + [i + 2 for i in inverse]), bias


def _ln_concat(ctx, ins, ps, attrs):
    a, bias = ins
    cuts, at = [], 0
    for size in attrs["sizes"][:-1]:
        at += size
        cuts.append(at)
    parts = ctx.emit(R.split(a, cuts, axis=attrs["axis"] + 2))
    return (*(relax.TupleGetItem(parts, i) for i in range(len(attrs["sizes"]))), bias)


def _ln_accumulate(ctx, ins, ps, attrs):
    return (R.add(ins[0], ins[1]),)


def _ln_concretize(ctx, ins, ps, attrs):
    """stack(lower, upper) of A x + bias over the box: A c -/+ |A| r."""
    a, bias, box = ins
    batch, rows = ctx.shape(a)[:2]
    s = _half(rows)
    a3 = _flatten_from(ctx, a, 2)                               # [B, R, n]
    flat = _flatten_from(ctx, box, 2)                           # [2, B, n]
    lo, hi = _index(ctx, flat, 0), _index(ctx, flat, 1)
    c = ctx.emit(R.divide(R.add(hi, lo), _f32(2.0)))
    r = ctx.emit(R.divide(R.subtract(hi, lo), _f32(2.0)))
    mid = ctx.emit(R.reshape(ctx.emit(R.add(_matvec(ctx, a3, c), bias)), [batch, 2, s]))
    rad = ctx.emit(R.reshape(_matvec(ctx, ctx.emit(R.abs(a3)), r), [batch, 2, s]))
    sign = relax.const(np.array([[[-1.0], [1.0]]], dtype="float32"))   # lower: mid - rad, upper: mid + rad
    return (R.permute_dims(ctx.emit(R.add(mid, ctx.emit(R.multiply(sign, rad)))), [1, 0, 2]),)


def _ln_concretize_const(ctx, ins, ps, attrs):
    (bias,) = ins
    batch, rows = ctx.shape(bias)
    return (R.permute_dims(ctx.emit(R.reshape(bias, [batch, 2, _half(rows)])), [1, 0, 2]),)


# -- patches (linear.patch_*): A as one receptive-field window per row ----------------------
def _i64(v: int) -> relax.Constant:
    return relax.const(v, "int64")


def _patch_index(ctx: _Ctx, ins: list, at: int, attrs: dict) -> relax.Expr:
    """The target neurons: the index input, or all of them."""
    return ins[at] if len(ins) > at else ctx.emit(R.arange(0, math.prod(attrs["target"]), 1, "int64"))


def _patch_windows(ctx: _Ctx, x: relax.Expr, idx: relax.Expr, attrs: dict, ph: int, pw: int) -> relax.Expr:
    """linear._windows: x [L, C, H, W] (a unit axis before C dropped) at the windows of the
    neurons idx [k], zeros outside: [L, k, C, ph, pw]. A gather from the padded, flattened
    value (the padding is static: patches.patch_margins)."""
    shape = ctx.shape(x)
    if len(shape) == 6:
        x = ctx.emit(R.reshape(x, shape[:2] + shape[3:]))
        shape = ctx.shape(x)
    lead, (c, h, w) = shape[:-3], shape[-3:]
    mt, mb, ml, mr = patches.patch_margins(attrs, h, w, ph, pw)
    _, ht, wt = attrs["target"]
    s, t, p, q = attrs["grid"]
    hp, wp = h + mt + mb, w + ml + mr
    xp = ctx.emit(R.nn.pad(x, [0, 0] * (len(lead) + 1) + [mt, mb, ml, mr]))
    flat = ctx.emit(R.reshape(xp, lead + [c, hp * wp]))
    pix = ctx.emit(R.floor_mod(idx, _i64(ht * wt)))
    top = ctx.emit(R.add(R.multiply(R.floor_divide(pix, _i64(wt)), _i64(s)), _i64(mt - p)))
    left = ctx.emit(R.add(R.multiply(R.floor_mod(pix, _i64(wt)), _i64(t)), _i64(ml - q)))
    origin = ctx.emit(R.add(R.multiply(top, _i64(wp)), left))                       # [k]
    offsets = relax.const((np.arange(ph)[:, None] * wp + np.arange(pw)[None, :]).astype("int64"), "int64")
    where = ctx.emit(R.add(ctx.emit(R.reshape(origin, [-1, 1, 1])), offsets))       # [k, ph, pw]
    k = ctx.shape(idx)[0]
    # in range by construction; "clip" keeps a wrong index from reading out of bounds
    got = ctx.emit(R.take(flat, ctx.emit(R.reshape(where, [-1])), axis=len(lead) + 1, mode="clip"))
    got = ctx.emit(R.reshape(got, lead + [c, k, ph, pw]))
    n = len(lead)
    return ctx.emit(R.permute_dims(got, list(range(n)) + [n + 1, n, n + 2, n + 3]))


def _ln_patch_start(ctx, ins, ps, attrs):
    w, b = ps
    idx = _patch_index(ctx, ins, 0, attrs)
    _, ht, wt = attrs["target"]
    c = ctx.emit(R.floor_divide(idx, _i64(ht * wt)))
    c2 = ctx.emit(R.concat([c, c], axis=0))
    rows = ctx.emit(R.take(w, c2, axis=0, mode="clip"))          # [2k, C_in, kh, kw]
    shape = ctx.shape(rows)
    batch = attrs["batch"]
    a = R.broadcast_to(ctx.emit(R.reshape(rows, [1] + shape)), [batch] + shape)
    bias = (R.zeros([batch, shape[0]], "float32") if b is None else
            R.broadcast_to(ctx.emit(R.reshape(ctx.emit(R.take(b, c2, axis=0, mode="clip")), [1, shape[0]])),
                           [batch, shape[0]]))
    return a, bias


def _ln_patch_start_onehot(ctx, ins, ps, attrs):
    """patches.patch_start_onehot: rows of the identity as 1 x 1 windows, one-hot along C."""
    idx = _patch_index(ctx, ins, 0, attrs)
    c, ht, wt = attrs["target"]
    channel = ctx.emit(R.floor_divide(idx, _i64(ht * wt)))
    column = ctx.emit(R.expand_dims(ctx.emit(R.concat([channel, channel], axis=0)), [1]))       # [2k, 1]
    onehot = ctx.emit(R.astype(ctx.emit(R.equal(column, ctx.emit(R.arange(0, c, 1, "int64")))), "float32"))
    rows2 = ctx.shape(onehot)[0]
    batch = attrs["batch"]
    a = R.broadcast_to(ctx.emit(R.reshape(onehot, [1, rows2, c, 1, 1])), [batch, rows2, c, 1, 1])
    return a, R.zeros([batch, rows2], "float32")


def _ln_patch_pad(ctx, ins, ps, attrs):
    top, bottom, left, right = attrs["pad"]
    return (R.nn.pad(ins[0], [0, 0] * 3 + [top, bottom, left, right]),)


def _ln_patch_add(ctx, ins, ps, attrs):
    return (R.add(ins[0], _ln_patch_pad(ctx, ins[1:], ps, attrs)[0]),)


def _ln_patch_relu(ctx, ins, ps, attrs):
    a, bias, relaxation = ins[:3]
    batch, rows, c, ph, pw = ctx.shape(a)
    k = _half(rows)
    win = _patch_windows(ctx, relaxation, _patch_index(ctx, ins, 3, attrs), attrs, ph, pw)  # [3, B, k, C, ph, pw]
    up_slope, up_bias, lo_slope = (ctx.emit(R.expand_dims(_index(ctx, win, i), [1])) for i in range(3))
    a6 = ctx.emit(R.reshape(a, [batch, 2, k, c, ph, pw]))
    lower = _lower_half_mask(6)
    pos_slope = ctx.emit(R.where(lower, lo_slope, up_slope))
    neg_slope = ctx.emit(R.where(lower, up_slope, lo_slope))
    slope = ctx.emit(R.where(ctx.emit(R.greater_equal(a6, _f32(0.0))), pos_slope, neg_slope))
    chosen = ctx.emit(R.where(lower, ctx.emit(R.minimum(a6, _f32(0.0))), ctx.emit(R.maximum(a6, _f32(0.0)))))
    extra = ctx.emit(R.sum(ctx.emit(R.multiply(chosen, up_bias)), axis=[-1, -2, -3]))     # [B, 2, k]
    return (R.reshape(ctx.emit(R.multiply(a6, slope)), [batch, rows, c, ph, pw]),
            R.add(bias, ctx.emit(R.reshape(extra, [batch, rows]))))


def _ln_patch_clamp_min(ctx, ins, ps, attrs):
    """_ln_patch_relu with both lines' intercepts (boundflow.ops.clamp.patch_backward)."""
    a, bias, relaxation = ins[:3]
    batch, rows, c, ph, pw = ctx.shape(a)
    k = _half(rows)
    win = _patch_windows(ctx, relaxation, _patch_index(ctx, ins, 3, attrs), attrs, ph, pw)  # [7, B, k, C, ph, pw]
    k_lo, b_lo, k_up, b_up = (ctx.emit(R.expand_dims(_index(ctx, win, i), [1])) for i in range(3, 7))
    a6 = ctx.emit(R.reshape(a, [batch, 2, k, c, ph, pw]))
    lower, positive = _lower_half_mask(6), ctx.emit(R.greater_equal(a6, _f32(0.0)))

    def taken(lo_line, up_line):             # per coefficient, the line its row and sign take
        return ctx.emit(R.where(positive, ctx.emit(R.where(lower, lo_line, up_line)),
                                ctx.emit(R.where(lower, up_line, lo_line))))
    extra = ctx.emit(R.sum(ctx.emit(R.multiply(a6, taken(b_lo, b_up))), axis=[-1, -2, -3]))          # [B, 2, k]
    return (R.reshape(ctx.emit(R.multiply(a6, taken(k_lo, k_up))), [batch, rows, c, ph, pw]),
            R.add(bias, ctx.emit(R.reshape(extra, [batch, rows]))))


def _ln_patch_affine(ctx, ins, ps, attrs):
    """Scale and shift at each row's window (boundflow.ops.affine.patch_backward)."""
    a, bias = ins[:2]
    batch, rows, c, ph, pw = ctx.shape(a)
    k = _half(rows)
    idx = _patch_index(ctx, ins, 2, attrs)
    scale, shift = (ctx.emit(R.expand_dims(_patch_windows(
        ctx, ctx.emit(R.broadcast_to(p, [1] + list(attrs["shape"])[-3:])), idx, attrs, ph, pw), [1])) for p in ps)
    a6 = ctx.emit(R.reshape(a, [batch, 2, k, c, ph, pw]))
    extra = ctx.emit(R.sum(ctx.emit(R.multiply(a6, shift)), axis=[-1, -2, -3]))                    # [B, 2, k]
    return (R.reshape(ctx.emit(R.multiply(a6, scale)), [batch, rows, c, ph, pw]),
            R.add(bias, ctx.emit(R.reshape(extra, [batch, rows]))))


def _ln_patch_conv(ctx, ins, ps, attrs):
    a, bias = ins
    w, b = ps
    batch, rows, c_out, ph, pw = ctx.shape(a)
    _, c_in, kh, kw = ctx.shape(w)
    sh, sw = attrs["stride"]
    out_hw = ((ph - 1) * sh + kh, (pw - 1) * sw + kw)
    conv = {"padding": (0, 0, 0, 0), "stride": (sh, sw), "dilation": (1, 1), "groups": 1}
    x = _conv_transpose(ctx, ctx.emit(R.reshape(a, [_prod([batch, rows]), c_out, ph, pw])), w, out_hw, conv)
    new_a = R.reshape(x, [batch, rows, c_in, out_hw[0], out_hw[1]])
    if b is None:
        return new_a, bias
    per_channel = ctx.emit(R.sum(a, axis=[-1, -2]))                 # [B, 2k, c_out]
    return new_a, R.add(bias, _matvec_rows(ctx, per_channel, b))


def _ln_patch_concretize(ctx, ins, ps, attrs):
    a, bias, box = ins[:3]
    batch, rows, c, ph, pw = ctx.shape(a)
    k = _half(rows)
    win = _patch_windows(ctx, box, _patch_index(ctx, ins, 3, attrs), attrs, ph, pw)       # [2, B, k, C, ph, pw]
    lo, hi = _index(ctx, win, 0), _index(ctx, win, 1)
    centre = ctx.emit(R.expand_dims(ctx.emit(R.multiply(R.add(hi, lo), _f32(0.5))), [1]))
    radius = ctx.emit(R.expand_dims(ctx.emit(R.multiply(R.subtract(hi, lo), _f32(0.5))), [1]))
    a6 = ctx.emit(R.reshape(a, [batch, 2, k, c, ph, pw]))
    mid = ctx.emit(R.add(ctx.emit(R.sum(ctx.emit(R.multiply(a6, centre)), axis=[-1, -2, -3])),
                         ctx.emit(R.reshape(bias, [batch, 2, k]))))
    rad = ctx.emit(R.sum(ctx.emit(R.multiply(ctx.emit(R.abs(a6)), radius)), axis=[-1, -2, -3]))
    sign = relax.const(np.array([[[-1.0], [1.0]]], dtype="float32"))
    return (R.permute_dims(ctx.emit(R.add(mid, ctx.emit(R.multiply(sign, rad)))), [1, 0, 2]),)


# -- bound bookkeeping ---------------------------------------------------------------------
def _ordered(ctx: _Ctx, lo: relax.Expr, hi: relax.Expr) -> relax.Expr:
    """As domains.bound.ordered: stack(lo, hi) with crossed ends swapped."""
    return R.stack([ctx.emit(R.minimum(lo, hi)), ctx.emit(R.maximum(lo, hi))], 0)


def _met(ctx: _Ctx, s: relax.Expr, lo: relax.Expr, hi: relax.Expr) -> relax.Expr:
    """As domains.bound.met: an intersection with s whose crossed ends meet at s's nearer end."""
    lo = ctx.emit(R.minimum(lo, _index(ctx, s, 1)))
    return R.stack([lo, ctx.emit(R.maximum(hi, lo))], 0)


def _merge_sparse(ctx, ins, ps, attrs):
    """The selected neurons take their CROWN bounds (intersected with the interval ones when
    attrs["intersect"]): a scatter along the flattened neuron axis. Crossed ends as in
    domains.bound."""
    s, idx, crown = ins
    flat = _flatten_from(ctx, s, 2)                             # [2, B, n]
    if attrs["intersect"]:
        old = ctx.emit(R.take(flat, idx, axis=2))               # [2, B, k]
        crown = ctx.emit(_met(ctx, old, ctx.emit(R.maximum(_index(ctx, old, 0), _index(ctx, crown, 0))),
                              ctx.emit(R.minimum(_index(ctx, old, 1), _index(ctx, crown, 1)))))
    else:
        crown = ctx.emit(_ordered(ctx, _index(ctx, crown, 0), _index(ctx, crown, 1)))
    where = ctx.emit(R.broadcast_to(ctx.emit(R.reshape(idx, [1, 1, -1])), ctx.shape(crown)))
    merged = ctx.emit(R.scatter_elements(flat, where, crown, axis=2))
    return (R.reshape(merged, ctx.shape(s)),)


def _intersect(ctx, ins, ps, attrs):
    """CROWN bounds of every neuron intersected with the interval ones (crossed ends met)."""
    s, crown = ins
    crown = ctx.emit(R.reshape(crown, ctx.shape(s)))
    return (_met(ctx, s, ctx.emit(R.maximum(_index(ctx, s, 0), _index(ctx, crown, 0))),
                 ctx.emit(R.minimum(_index(ctx, s, 1), _index(ctx, crown, 1)))),)


def _replace(ctx, ins, ps, attrs):
    s, crown = ins
    crown = ctx.emit(R.reshape(crown, ctx.shape(s)))
    return (_ordered(ctx, _index(ctx, crown, 0), _index(ctx, crown, 1)),)


RULES: dict[str, Rule] = {
    "interval.linear": _iv_linear,
    "interval.conv2d": _iv_conv2d,
    "interval.affine": _iv_affine,
    "interval.add": _iv_add,
    "interval.relu": _iv_relu,
    "interval.clamp_min": _iv_clamp_min,
    "interval.reshape": _iv_reshape,
    "interval.transpose": _iv_transpose,
    "interval.concat": _iv_concat,
    "interval.spec_linear": _iv_spec_linear,
    "interval.spec_box": _iv_spec_box,
    "interval.flatten": _iv_flatten,
    "relu.relax": _relu_relax,
    "clamp_min.relax": _clamp_min_relax,
    "linear.linear": _ln_linear,
    "linear.conv2d": _ln_conv2d,
    "linear.affine": _ln_affine,
    "linear.relu": _ln_relu,
    "linear.clamp_min": _ln_clamp_min,
    "linear.reshape": _ln_reshape,
    "linear.transpose": _ln_transpose,
    "linear.concat": _ln_concat,
    "linear.start_spec": _ln_start_spec,
    "linear.start_onehot": _ln_start_onehot,
    "linear.start_rows": _ln_start_rows,
    "linear.accumulate": _ln_accumulate,
    "linear.concretize": _ln_concretize,
    "linear.concretize_const": _ln_concretize_const,
    "linear.patch_start": _ln_patch_start,
    "linear.patch_start_onehot": _ln_patch_start_onehot,
    "linear.patch_pad": _ln_patch_pad,
    "linear.patch_add": _ln_patch_add,
    "linear.patch_relu": _ln_patch_relu,
    "linear.patch_clamp_min": _ln_patch_clamp_min,
    "linear.patch_affine": _ln_patch_affine,
    "linear.patch_conv": _ln_patch_conv,
    "linear.patch_concretize": _ln_patch_concretize,
    "bound.merge_sparse": _merge_sparse,
    "bound.intersect": _intersect,
    "bound.replace": _replace,
}
