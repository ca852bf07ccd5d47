"""affine: y = x * scale + shift, elementwise, the constants broadcast to x. Inputs (x, scale,
shift). Frontends lower additions, subtractions, multiplications and divisions by constants,
negations and BatchNorm at inference to it (the sum of two variables to add, the product of two
to mul)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from boundflow.domains import binds, fp, nonnegative
from boundflow.domains.linear import sound
from boundflow.domains.patches import fp_widen as patch_fp_widen
from boundflow.domains.patches import row_windows, rows_view, selected_neurons
from boundflow.domains.rounding import magnitude
from boundflow.ops import convex, mul, normalise, select
from boundflow.ops.registry import Op, onnx_lowering, register, torch_lowering

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder, Constant

aten = torch.ops.aten


def forward(x, scale, shift, attrs=None):
    return x * scale + shift


@binds(writes=False)
def interval(ins, ps, attrs):
    """Coordinate by coordinate: the lesser and greater of scale l and scale u, plus shift (two
    roundings each; the centre/radius form's c scale + shift -/+ r |scale| cancels badly when
    |c| >> |the result|: a LayerNorm's variance [0, 1944] / 6 + 0.1 came out at 0.1000061).
    Where every scale is >= 0 (known at bind: a constant) scale l <= scale u already, in floating
    point too (rounding is monotone): one product and one sum."""
    (s,) = ins
    scale, shift = ps
    if nonnegative(scale):
        return lambda: (s * scale + shift,)

    def run():
        p = s * scale                                 # (not aminmax: no derivative before torch 2.13)
        return (torch.stack((torch.minimum(p[0], p[1]), torch.maximum(p[0], p[1]))) + shift,)
    return run


def backward(ins, ps, attrs):
    a, bias = ins
    scale, shift = ps
    return a * scale, bias + (a * shift).flatten(2).sum(-1)


def fp_error(ins, ps, attrs):
    s, raw = ins
    scale_err, shift_err = ps
    return fp.finish(raw, magnitude(s) * scale_err + shift_err, attrs["n"])


def patch_backward(ins, ps, attrs):
    """backward on windows (a pass through an affine map that keeps the shape): each row reads
    scale and shift at its neuron's window (zeros outside the value, where A is zero too). In a
    sound_fp plan the last input is the error vector (patches.fp_widen)."""
    ins, e = (ins[:-1], ins[-1]) if attrs.get("fp") else (ins, None)
    a, bias = ins[:2]
    idx = selected_neurons(ins, 2, attrs, a)
    (scale, groups), (shift, _) = (row_windows(torch.broadcast_to(p, attrs["shape"]), 0, idx, attrs, a) for p in ps)
    a6 = rows_view(a, groups)
    new_bias = bias + (a6 * shift).flatten(4).sum(-1).flatten(1)
    return (a6 * scale).flatten(1, 3), new_bias if e is None else patch_fp_widen(a, new_bias, e, idx, attrs)


AFFINE = register(Op("affine", forward, interval, sound(backward), fp_error, coordinatewise=True,
                     fp_params=fp.weights, fp32=True, error_of_inputs=True,
                     kernels={"linear.patch_affine": patch_backward}))


# -- frontends: elementwise arithmetic with constants, BatchNorm ----------------------------------

def add_scaled(b: Builder, p, q, k: float = 1.0) -> str:
    """p + k * q for source arguments p, q of which at least one depends on the network input."""
    if not b.is_const(p) and not b.is_const(q):
        x, y = b.var(p), b.var(q)
        if b.shape(x) != b.shape(y):            # numpy broadcasting: each is a selection of itself
            x, y = select.broadcast(b, x, b.shape(y)), select.broadcast(b, y, b.shape(x))
        if k != 1.0:
            y = b.affine(y, b.literal(k))
        return b.emit("add", [x, y], out=b.output)
    if b.is_const(q):                           # x + k c
        return b.affine(b.var(p), shift=b.const(q, "operand").scaled(k), out=b.output)
    c = b.const(p, "operand")                   # c + k x
    return b.affine(b.var(q), b.literal(np.full(c.shape, k)), c, out=b.output)


def multiply(b: Builder, p, q) -> str:
    if not b.is_const(p) and not b.is_const(q):
        x, y = b.var(p), b.var(q)
        if x == y:                              # x * x: the square, a relaxed op of its own
            return convex.square(b, x)
        return mul.product(b, x, y, b.output)
    x, c = (p, q) if b.is_const(q) else (q, p)
    return b.affine(b.var(x), b.const(c, "factor"), out=b.output)


def divide(b: Builder, p, q) -> str:
    if not b.is_const(q):                       # x / y = x * (1 / y) (ops/normalise.py)
        if b.is_const(p):
            return b.affine(b.emit("reciprocal", [b.var(q)]), b.const(p, "dividend"), out=b.output)
        return normalise.quotient(b, b.var(p), b.var(q), b.output)
    c = b.const(q, "divisor")
    try:
        scale = c.derive(c.value.reciprocal())
    except ValueError:
        b.unsupported("division by a constant that is (or may be) zero")
    return b.affine(b.var(p), scale, out=b.output)


def batch_norm(b: Builder, x: str, gamma: Constant, beta: Constant, mean: Constant, var: Constant,
               eps: float) -> str:
    """BatchNorm at inference: x * scale + shift with scale = gamma / sqrt(var + eps) and
    shift = beta - mean * scale (with their error bounds), per channel (axis 1)."""
    try:
        scale = gamma.value * (var.value + eps).sqrt().reciprocal()
    except ValueError as e:
        b.unsupported(f"its variance plus epsilon is (or may be) zero or negative ({e})")
    shift = beta.value - mean.value * scale
    xs = b.shape(x)
    if len(xs) < 2:
        b.unsupported(f"input of rank {len(xs)} has no channel axis")
    channels = xs[1]
    if math.prod(scale.shape) == channels:      # per channel, broadcast over the axes after it
        target = (channels,) + (1,) * (len(xs) - 2)
    elif scale.shape == xs[1:]:                 # ONNX opset <= 8 with spatial=0: one per activation
        target = xs[1:]
    else:
        b.unsupported(f"statistics of shape {list(scale.shape)} for an input of shape {list(xs)}")
    stats = (beta, mean, var)
    return b.affine(x, gamma.derive(scale, *stats).map(lambda t: t.reshape(target)),
                    gamma.derive(shift, *stats).map(lambda t: t.reshape(target)), out=b.output)


@onnx_lowering("Add")
def _onnx_add(b) -> str:
    return add_scaled(b, b.input(0), b.input(1))


@onnx_lowering("Sub")
def _onnx_sub(b) -> str:
    return add_scaled(b, b.input(0), b.input(1), -1.0)


@onnx_lowering("Mul")
def _onnx_mul(b) -> str:
    return multiply(b, b.input(0), b.input(1))


@onnx_lowering("Div")
def _onnx_div(b) -> str:
    return divide(b, b.input(0), b.input(1))


@onnx_lowering("BatchNormalization")
def _onnx_batch_norm(b) -> str:
    if b.attr("training_mode", 0):
        b.unsupported("BatchNormalization in training mode")
    if any(b.outputs[1:]):
        b.unsupported("BatchNormalization with running-statistics outputs (training mode)")
    x = b.var(b.input(0))
    gamma, beta, mean, var = (b.const(b.input(i), what) for i, what in
                              enumerate(("scale", "B", "input_mean", "input_var"), start=1))
    return batch_norm(b, x, gamma, beta, mean, var, float(b.attr("epsilon", 1e-5)))


@torch_lowering(aten.add.Tensor, aten.add.Scalar)
def _torch_add(b) -> str:
    return add_scaled(b, b.arg(0), b.arg(1), float(b.kwarg("alpha", 1)))


@torch_lowering(aten.sub.Tensor, aten.sub.Scalar)
def _torch_sub(b) -> str:
    return add_scaled(b, b.arg(0), b.arg(1), -float(b.kwarg("alpha", 1)))


@torch_lowering(aten.rsub.Scalar)
def _torch_rsub(b) -> str:
    # rsub(x, other, alpha) = other - alpha * x
    return add_scaled(b, b.arg(1), b.arg(0), -float(b.kwarg("alpha", 1)))


@torch_lowering(aten.mul.Tensor, aten.mul.Scalar)
def _torch_mul(b) -> str:
    return multiply(b, b.arg(0), b.arg(1))


@torch_lowering(aten.div.Tensor, aten.div.Scalar)
def _torch_div(b) -> str:
    if b.kwarg("rounding_mode") is not None:
        b.unsupported("division with rounding")
    return divide(b, b.arg(0), b.arg(1))


@torch_lowering(aten.neg.default)
def _torch_neg(b) -> str:
    return b.affine(b.var(b.arg(0)), b.literal(-1.0), out=b.output)


@torch_lowering(aten._native_batch_norm_legit_no_training.default)
def _torch_batch_norm(b) -> tuple:
    # (x, weight, bias, running_mean, running_var, momentum, eps) -> (y, save_mean, save_invstd)
    x = b.var(b.arg(0))
    mean, var = b.const(b.arg(3), "running mean"), b.const(b.arg(4), "running var")
    gamma = b.literal(np.ones(mean.shape)) if b.arg(1) is None else b.const(b.arg(1), "weight")
    beta = b.literal(np.zeros(mean.shape)) if b.arg(2) is None else b.const(b.arg(2), "bias")
    return (batch_norm(b, x, gamma, beta, mean, var, float(b.arg(6))), None, None)
