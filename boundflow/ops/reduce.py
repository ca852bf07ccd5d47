"""reduce_sum: y = x summed over some per-region axes (attrs axes: sorted, non-negative;
keepdims). A linear map whose backward rule is exact (A broadcast back over the summed axes);
its sums round, which the fp rule bounds (gamma(n) sum |x|, n the terms per output). Frontends
lower ReduceSum, ReduceMean (a sum and a scale by 1 / n) and aten sum / mean to it."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from boundflow.domains import fp
from boundflow.domains.linear import sound
from boundflow.domains.rounding import Enclosed, gamma, magnitude
from boundflow.ops.registry import Op, onnx_lowering, register, torch_lowering

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder

aten = torch.ops.aten


def _dims(attrs, lead: int) -> list[int]:
    return [a + lead for a in attrs["axes"]]


def forward(x, attrs=None):
    return x.sum(_dims(attrs, 1), keepdim=attrs["keepdims"])


def interval(ins, ps, attrs):
    return (ins[0].sum(_dims(attrs, 2), keepdim=attrs["keepdims"]),)


def backward(ins, ps, attrs):
    """A on each input element is A on the sum it went into: broadcast back."""
    a, bias = ins
    if not attrs["keepdims"]:
        for d in _dims(attrs, 2):
            a = a.unsqueeze(d)
    return a.expand(tuple(a.shape[:2]) + tuple(attrs["in_shape"])).contiguous(), bias


def fp_error(ins, ps, attrs):
    """The sum of n terms in any order is off by at most gamma(n) sum |x|."""
    s, raw = ins
    n = math.prod(s.shape[d] for d in _dims(attrs, 2))
    mag = magnitude(s).sum(_dims(attrs, 1), keepdim=attrs["keepdims"])
    return fp.finish(raw, gamma(n, raw.dtype) * mag, attrs["n"])


# the backward rule hands the bias on as it is (a view of its input)
REDUCE_SUM = register(Op("reduce_sum", forward, interval, sound(backward), fp_error, mixing=True,
                         fp_params=lambda graph, node, dtype: [], aliasing=frozenset({"linear.reduce_sum"})))


# -- frontends --------------------------------------------------------------------------------------

def reduce(b: Builder, x: str, axes, keepdims: bool, mean: bool = False) -> str:
    """The sum (or the mean) of x over `axes` (None or empty: every axis)."""
    rank = len(b.shape(x))
    axes = sorted({b.axis(int(a), rank) for a in axes}) if axes else list(range(rank))
    if not axes:                                # a rank-0 tensor: nothing to reduce
        return x
    n = math.prod(b.shape(x)[a] for a in axes)
    y = b.emit("reduce_sum", [x], {"axes": tuple(axes), "keepdims": bool(keepdims)},
               out=None if mean else b.output)
    if not mean:
        return y
    return b.affine(y, b.literal(Enclosed.exact(torch.tensor(float(n))).reciprocal()), out=b.output)


def onnx_axes(b, attr_until: int) -> list[int] | None:
    """ONNX reduce axes: an attribute before opset `attr_until`, an optional input from it on."""
    if b.opset < attr_until:
        return b.attr("axes")
    if b.attr("axes") is not None:
        b.unsupported(f"an axes attribute at opset {b.opset} (from opset {attr_until} on, axes is an input)")
    return None if b.input(1) is None else [int(a) for a in np.asarray(b.array(b.input(1), "axes")).reshape(-1)]


def _onnx_reduce(b, attr_until: int, mean: bool) -> str:
    x = b.var(b.input(0))
    axes = onnx_axes(b, attr_until)
    if not axes and b.attr("noop_with_empty_axes", 0):
        return x
    return reduce(b, x, axes, b.attr("keepdims", 1), mean)


@onnx_lowering("ReduceSum")
def _onnx_reduce_sum(b) -> str:
    return _onnx_reduce(b, 13, mean=False)


@onnx_lowering("ReduceMean")
def _onnx_reduce_mean(b) -> str:
    return _onnx_reduce(b, 18, mean=True)


def _torch_reduce(b, mean: bool) -> str:
    # sum.dim_IntList / mean.dim (x, dims, keepdim=False, dtype=None); sum.default / mean.default (x)
    x = b.var(b.arg(0))
    dtype = b.kwarg("dtype")
    if dtype is not None and not dtype.is_floating_point:
        b.unsupported(f"a reduction to {dtype}")
    return reduce(b, x, b.arg(1, "dim"), b.arg(2, "keepdim", False), mean)


@torch_lowering(aten.sum.dim_IntList, aten.sum.default)
def _torch_sum(b) -> str:
    return _torch_reduce(b, mean=False)


@torch_lowering(aten.mean.dim, aten.mean.default)
def _torch_mean(b) -> str:
    return _torch_reduce(b, mean=True)
