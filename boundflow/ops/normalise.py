"""LayerNormalization and the quotient of two variables: frontend mappings only, composed of
registered ops, so each piece keeps its own relaxation (as auto_LiRPA decomposes them):

  layer_norm(x)  = (x - mean x) * 1 / sqrt(mean (x - mean x)^2 + eps) * gamma + beta
  x / y          = x * 1 / y                                           reciprocal, mul

(Softmax is one op of its own, softmax.py.)

Every bound method then follows from the pieces' rules; an input interval that leaves a
piece's domain (a divisor whose interval holds 0) fails with the piece's DomainError."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from boundflow.domains.rounding import Enclosed
from boundflow.ops import mul, select
from boundflow.ops.registry import onnx_lowering, torch_lowering

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder

aten = torch.ops.aten


def _sum(b: Builder, x: str, axes: tuple[int, ...]) -> str:
    return b.emit("reduce_sum", [x], {"axes": axes, "keepdims": True})


def _mean(b: Builder, x: str, axes: tuple[int, ...]) -> str:
    n = math.prod(b.shape(x)[a] for a in axes)
    return b.affine(_sum(b, x, axes), b.literal(Enclosed.exact(torch.tensor(float(n))).reciprocal()))


def quotient(b: Builder, x: str, y: str, out: str | None) -> str:
    """x / y of two variables (broadcasting as numpy)."""
    return mul.product(b, x, b.emit("reciprocal", [y]), out)


def layer_norm(b: Builder, x: str, axis: int, eps: float, gamma, beta, out: str | None) -> str:
    """Normalised over the axes from `axis` on; gamma and beta (Constants or None) broadcast over
    those axes."""
    shape = b.shape(x)
    axes = tuple(range(b.axis(axis, len(shape)), len(shape)))
    centred = b.emit("add", [x, b.affine(select.broadcast(b, _mean(b, x, axes), shape), b.literal(-1.0))])
    var = _mean(b, b.emit("pow", [centred], {"exponent": 2.0}), axes)
    inv_std = b.emit("reciprocal", [b.emit("sqrt", [b.affine(var, shift=b.literal(float(eps)))])])
    normal = mul.product(b, centred, inv_std, None if gamma is not None or beta is not None else out)
    if gamma is None and beta is None:
        return normal
    inner = tuple(shape[axes[0]:])
    scale = gamma if gamma is not None else b.literal(np.ones(inner))
    return b.affine(normal, scale, beta, out=out)


@onnx_lowering("LayerNormalization")
def _onnx_layer_norm(b) -> str:
    names = list(b.inputs) + [""] * 3
    if int(b.attr("stash_type", 1)) != 1:
        b.unsupported("stash_type other than float32")
    if len([n for n in b.outputs if n]) > 1:
        b.unsupported("the Mean / InvStdDev outputs (only Y is supported)")
    gamma = b.const(names[1], "scale") if names[1] else None
    beta = b.const(names[2], "bias") if names[2] else None
    return layer_norm(b, b.var(names[0]), int(b.attr("axis", -1)), float(b.attr("epsilon", 1e-5)), gamma, beta,
                      b.output)


@torch_lowering(aten.layer_norm.default, keep_whole=True)
def _torch_layer_norm(b) -> str:
    x = b.var(b.arg(0))
    shape = b.arg(1, "normalized_shape")
    weight, bias = b.arg(2, "weight", None), b.arg(3, "bias", None)
    gamma = None if weight is None else b.const(weight, "weight")
    beta = None if bias is None else b.const(bias, "bias")
    return layer_norm(b, x, -len(shape), float(b.arg(4, "eps", 1e-5)), gamma, beta, b.output)
