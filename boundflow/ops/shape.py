"""Ops that only move values: reshape (attrs shape: the full per-region target shape), transpose
(attrs perm over per-region axes), concat (attrs axis, per-region, non-negative). Their rules are
exact (no rounding, no fp kernel); reshapes may return views. Frontends lower every reshape-like
op (flatten, view, squeeze, unsqueeze), permutations and concatenations to them, and pass
identities (Identity, Dropout at inference, clone, float casts) through."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch

from boundflow.ops.registry import Op, onnx_lowering, register, torch_lowering

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder

aten = torch.ops.aten


def _reshape_forward(x, attrs):
    return x.reshape((x.shape[0],) + tuple(attrs["shape"]))


def _reshape_interval(ins, ps, attrs):
    (s,) = ins
    return (s.reshape(tuple(s.shape[:2]) + tuple(attrs["shape"])),)


def _reshape_backward(ins, ps, attrs):
    a, bias = ins
    return a.reshape(tuple(a.shape[:2]) + tuple(attrs["in_shape"])), bias


def _transpose_forward(x, attrs):
    return x.permute((0,) + tuple(p + 1 for p in attrs["perm"]))


def _transpose_interval(ins, ps, attrs):
    return (ins[0].permute((0, 1) + tuple(p + 2 for p in attrs["perm"])),)


def _transpose_backward(ins, ps, attrs):
    a, bias = ins
    inverse = [0] * len(attrs["perm"])
    for i, p in enumerate(attrs["perm"]):
        inverse[p] = i
    return a.permute((0, 1) + tuple(i + 2 for i in inverse)), bias


def _concat_forward(*xs, attrs):
    return torch.cat(xs, dim=attrs["axis"] + 1)


def _concat_interval(ins, ps, attrs):
    return (torch.cat(ins, dim=attrs["axis"] + 2),)


def _concat_backward(ins, ps, attrs):
    """A split back into the inputs' parts (attrs sizes: each input's extent along the axis)."""
    a, bias = ins
    parts = torch.split(a, attrs["sizes"], dim=attrs["axis"] + 2)
    return (*parts, bias)


def _concat_attrs(graph, node) -> dict:
    return {"sizes": [graph.shape(i)[node.attrs["axis"]] for i in node.inputs]}


RESHAPE = register(Op("reshape", _reshape_forward, _reshape_interval, _reshape_backward, coordinatewise=True,
                      aliasing=frozenset({"interval.reshape", "linear.reshape"}),
                      views=frozenset({"interval.reshape", "linear.reshape"})))
TRANSPOSE = register(Op("transpose", _transpose_forward, _transpose_interval, _transpose_backward,
                        coordinatewise=True,
                        aliasing=frozenset({"interval.transpose", "linear.transpose"})))
CONCAT = register(Op("concat", _concat_forward, _concat_interval, _concat_backward, backward_attrs=_concat_attrs,
                     aliasing=frozenset({"linear.concat"})))


# -- frontends: shape arithmetic of the ONNX ops (also used to fold them on constants) ---------------

def onnx_reshape_target(b: Builder, in_shape, spec, allowzero: int) -> tuple[int, ...]:
    """ONNX Reshape semantics: 0 copies the input dim (unless allowzero), -1 is inferred."""
    spec = [int(d) for d in np.asarray(spec).reshape(-1)]
    out = []
    for i, d in enumerate(spec):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                b.unsupported(f"Reshape target {spec}: 0 at axis {i} has no input dim to copy")
            out.append(int(in_shape[i]))
        else:
            out.append(d)
    total = math.prod(in_shape)
    if out.count(-1) > 1:
        b.unsupported(f"Reshape target {spec} has more than one -1")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or total % known:
            b.unsupported(f"cannot reshape {list(in_shape)} to {spec}")
        out[out.index(-1)] = total // known
    if math.prod(out) != total or any(d < 0 for d in out):
        b.unsupported(f"cannot reshape {list(in_shape)} to {spec}")
    return tuple(out)


def onnx_flatten_shape(b: Builder, shape, axis: int) -> tuple[int, int]:
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis <= len(shape):
        b.unsupported(f"Flatten axis {axis} out of range for rank {len(shape)}")
    return (math.prod(shape[:axis]), math.prod(shape[axis:]))


def onnx_squeeze_shape(b: Builder, shape, axes) -> tuple[int, ...]:
    if axes is None:
        return tuple(d for d in shape if d != 1)
    axes = {b.axis(a, len(shape)) for a in axes}
    if any(shape[a] != 1 for a in axes):
        b.unsupported(f"cannot squeeze axes {sorted(axes)} of shape {list(shape)}")
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def onnx_unsqueeze_shape(b: Builder, shape, axes) -> tuple[int, ...]:
    if axes is None:
        b.unsupported("Unsqueeze needs axes")
    rank = len(shape) + len(axes)
    axes = sorted(b.axis(a, rank) for a in axes)
    out, it = [], iter(shape)
    for i in range(rank):
        out.append(1 if i in axes else next(it))
    return tuple(out)


def onnx_shape(shape, attrs: dict) -> np.ndarray:
    """ONNX Shape: the (sliced, opset 15) shape as an int64 array."""
    return np.array(shape[attrs.get("start", 0):attrs.get("end", None)], dtype=np.int64)


def _onnx_axes(b) -> list[int] | None:
    """Squeeze / Unsqueeze axes: an attribute before opset 13, an optional input from 13 on."""
    if b.attr("axes") is not None:
        return [int(a) for a in b.attr("axes")]
    if b.input(1) is not None:
        return [int(a) for a in b.array(b.input(1), "axes").reshape(-1)]
    return None


# -- frontends: the mappings ------------------------------------------------------------------------

@onnx_lowering("Flatten")
def _onnx_flatten(b) -> str:
    x = b.var(b.input(0))
    return b.reshape(x, onnx_flatten_shape(b, b.shape(x), b.attr("axis", 1)), b.output)


@onnx_lowering("Reshape")
def _onnx_reshape(b) -> str:
    x = b.var(b.input(0))
    spec = b.attr("shape") if b.attr("shape") is not None else b.array(b.input(1), "shape")
    return b.reshape(x, onnx_reshape_target(b, b.shape(x), spec, b.attr("allowzero", 0)), b.output)


@onnx_lowering("Squeeze")
def _onnx_squeeze(b) -> str:
    x = b.var(b.input(0))
    return b.reshape(x, onnx_squeeze_shape(b, b.shape(x), _onnx_axes(b)), b.output)


@onnx_lowering("Unsqueeze")
def _onnx_unsqueeze(b) -> str:
    x = b.var(b.input(0))
    return b.reshape(x, onnx_unsqueeze_shape(b, b.shape(x), _onnx_axes(b)), b.output)


@onnx_lowering("Transpose")
def _onnx_transpose(b) -> str:
    x = b.var(b.input(0))
    rank = len(b.shape(x))
    perm = [int(p) for p in b.attr("perm", range(rank - 1, -1, -1))]
    if sorted(b.axis(p, rank) for p in perm) != list(range(rank)):
        b.unsupported(f"perm {perm} is not a permutation of {rank} axes")
    return b.transpose(x, [p % rank for p in perm], b.output)


@onnx_lowering("Concat")
def _onnx_concat(b) -> str:
    names = [n for n in b.inputs if n]
    if any(b.is_const(n) for n in names):
        b.unsupported("a constant operand (only concatenation of variables is supported)")
    xs = [b.var(n) for n in names]
    return b.emit("concat", xs, {"axis": b.axis(int(b.attr("axis")), len(b.shape(xs[0])))}, out=b.output)


@onnx_lowering("Identity")
def _onnx_identity(b) -> str:
    return b.var(b.input(0))


@onnx_lowering("Dropout")
def _onnx_dropout(b) -> str:
    if b.input(2) is not None and bool(np.asarray(b.array(b.input(2), "training_mode")).any()):
        b.unsupported("Dropout in training mode")
    x = b.var(b.input(0))
    if len(b.outputs) > 1 and b.outputs[1]:     # the mask is all ones at inference
        b.define_constant(b.outputs[1], np.ones(b.shape(x), dtype=bool))
    return x


@onnx_lowering("Shape")
def _onnx_shape(b) -> None:
    """A variable's shape is static: a constant."""
    b.define_constant(b.output, onnx_shape(b.shape(b.var(b.input(0))), b.attrs))


@torch_lowering(aten.clone.default, aten.alias.default, aten.detach.default)
def _torch_passthrough(b):
    return b.entry(b.arg(0))                    # the same values; a pending pad stays pending


@torch_lowering(aten._to_copy.default)
def _torch_to_copy(b):
    dtype = b.kwarg("dtype")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        b.unsupported(f"cast of a variable to {dtype} ({_CAST_WHY})")
    return b.entry(b.arg(0))                    # float casts: the primal graph is float32 throughout


_CAST_WHY = ("only casts to float32 or float64 are supported, which keep every float32 value; a cast to a "
             "narrower float rounds by far more than float32 does and has no sound rule")


@onnx_lowering("Cast")
def _onnx_cast(b) -> str:
    if b.attr("to") not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        b.unsupported(f"cast to {onnx.TensorProto.DataType.Name(b.attr('to'))} ({_CAST_WHY})")
    return b.var(b.input(0))


@torch_lowering(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dims,
                aten.squeeze.dim, aten.squeeze.default, aten.unsqueeze.default)
def _torch_reshape_like(b) -> str:
    # all keep row-major order: a reshape to the static shape torch recorded (it already resolved
    # -1 and squeezed axes)
    x = b.var(b.arg(0))
    target = b.expected_shape()
    return x if target == b.shape(x) else b.reshape(x, target, b.output)


@torch_lowering(aten.permute.default)
def _torch_permute(b) -> str:
    x = b.var(b.arg(0))
    n = len(b.shape(x))
    perm = tuple(int(d) % n for d in b.arg(1)) if n else ()
    return x if perm == tuple(range(n)) else b.transpose(x, perm, b.output)


@torch_lowering(aten.cat.default)
def _torch_cat(b) -> str:
    tensors = list(b.arg(0))
    if any(b.is_const(t) for t in tensors):
        b.unsupported("concatenation with a constant tensor")
    xs = [b.var(t) for t in tensors]
    if len(xs) == 1:
        return xs[0]
    axis = int(b.arg(1, "dim", 0)) % len(b.shape(xs[0]))
    return b.emit("concat", xs, {"axis": axis}, out=b.output)
