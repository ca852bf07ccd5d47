"""Floating-point error bounds: what bounds that are sound in floating point (sound_fp) rest on.

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 2-3): with unit roundoff
u (2^-53 in float64), one rounded operation is off by at most u times its result, and a sum of
n products, computed in any order (BLAS blocks and FMA included), is off by at most
gamma(n) = n u / (1 - n u) times the sum of the products' absolute values. Underflow adds at
most the smallest subnormal per operation, covered by `slack`. Error bounds are computed in
floating point too; they are sums of non-negative terms, exact to a factor 1 + gamma(n), so
every bound here is doubled, which covers that for any n < 2^51.

`Enclosed` carries a constant that a frontend or a simplification derived (1 / std, a folded
BatchNorm, W * s) together with a bound on how far it may be from the exact value its formula
defines, so that the sound bounds cover the model's real-arithmetic semantics, not a rounded copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from boundflow.runtime.device import constant


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float64) -> float:
    """Bound on the relative error of a sum of n products (see the module docstring)."""
    nu = n * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"a dot product of {n} terms is too long for a rigorous error bound in {dtype}")
    return nu / (1 - nu)


def slack(n: int, dtype: torch.dtype) -> float:
    """Absolute error that underflow can add to a computation of n operations."""
    return n * torch.finfo(dtype).smallest_normal


def down(x: torch.Tensor) -> torch.Tensor:
    """The next float below x: undoes the rounding to nearest of the operation that made x."""
    return _next(x, constant(-math.inf, x.dtype, x.device))


def up(x: torch.Tensor) -> torch.Tensor:
    return _next(x, constant(math.inf, x.dtype, x.device))


class _NextFloat(torch.autograd.Function):
    """nextafter with the identity's gradient (a one-ulp step): alpha-CROWN optimises through
    sound plans, and torch before 2.13 has no derivative for nextafter."""

    @staticmethod
    def forward(x, to):
        return torch.nextafter(x, to)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _next(x: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    return _NextFloat.apply(x, to) if x.requires_grad else torch.nextafter(x, to)


def rounded_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, rounded up (not to nearest): for error bounds cast to a narrower type."""
    y = x.to(dtype)
    return torch.where(y.to(x.dtype) < x, up(y), y) if y.dtype != x.dtype else y


def round_outward(box: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An interval stack(lower, upper) in `dtype`, rounded outward so that it still contains
    the original (lower down, upper up)."""
    if box.dtype == dtype:                         # nothing rounds
        return box
    lo, hi = box.to(dtype)
    lo = torch.where(lo.double() > box[0].double(), down(lo), lo)
    hi = torch.where(hi.double() < box[1].double(), up(hi), hi)
    return torch.stack((lo, hi))


def magnitude(s: torch.Tensor) -> torch.Tensor:
    """max(|lower|, |upper|) of an interval s = stack(lower, upper): a bound on |x| inside it."""
    return torch.maximum(s[0].abs(), s[1].abs())


def enclosed(graph, name: str) -> Enclosed:
    """The graph's constant `name` as float64 with its error bound (Value.err; zero if none)."""
    data = graph.data(name).to(torch.float64)
    err = graph.values[name].err
    return Enclosed(data, torch.zeros_like(data) if err is None else err.to(torch.float64))


@dataclass(frozen=True)
class Enclosed:
    """A float64 tensor and a bound on its distance to an exact real value: the exact value lies
    in [value - err, value + err] elementwise (err broadcasts against value)."""
    value: torch.Tensor
    err: torch.Tensor

    @staticmethod
    def exact(t) -> Enclosed:
        v = torch.as_tensor(t).detach().to(torch.float64)
        return Enclosed(v, torch.zeros_like(v))

    @staticmethod
    def lift(t) -> Enclosed:
        return t if isinstance(t, Enclosed) else Enclosed.exact(t)

    @staticmethod
    def rounded(value: torch.Tensor, err: torch.Tensor, n: int = 1) -> Enclosed:
        """`value` computed by rounded operations whose propagated input errors are `err`; the
        result's own rounding (n operations deep) is added, and the whole bound doubled."""
        u = unit_roundoff(torch.float64)
        return Enclosed(value, 2 * (err + n * u * value.abs()) + slack(n, torch.float64))

    def map(self, fn) -> Enclosed:
        """An exact rearrangement (reshape, permute, index) applied to value and error alike."""
        return Enclosed(fn(self.value), fn(self.err.expand_as(self.value)))

    def __add__(self, other) -> Enclosed:
        o = Enclosed.lift(other)
        return Enclosed.rounded(self.value + o.value, self.err + o.err)

    __radd__ = __add__

    def __neg__(self) -> Enclosed:
        return Enclosed(-self.value, self.err)

    def __sub__(self, other) -> Enclosed:
        return self + (-Enclosed.lift(other))

    def __rsub__(self, other) -> Enclosed:
        return Enclosed.lift(other) - self

    def __mul__(self, other) -> Enclosed:
        o = Enclosed.lift(other)
        err = self.value.abs() * o.err + self.err * o.value.abs() + self.err * o.err
        return Enclosed.rounded(self.value * o.value, err)

    __rmul__ = __mul__

    def reciprocal(self) -> Enclosed:
        """1 / x; the enclosure must not contain zero."""
        a = self.value.abs()
        if not bool((self.err < a).all()):
            raise ValueError("division by a value that may be zero")
        return Enclosed.rounded(1.0 / self.value, self.err / (a * (a - self.err)))

    def sqrt(self) -> Enclosed:
        """sqrt(x) for x >= 0 (the enclosure must not reach below zero)."""
        if not bool((self.value - self.err >= 0).all()):
            raise ValueError("square root of a value that may be negative")
        root = self.value.sqrt()
        # |sqrt(x) - sqrt(a)| <= |x - a| / sqrt(a), and <= sqrt(|x - a|) also when a = 0
        err = torch.minimum(self.err.sqrt(), self.err / root.clamp(min=torch.finfo(torch.float64).tiny))
        return Enclosed.rounded(root, err)

    def matmul(self, other) -> Enclosed:
        """self @ other, contracting self's last axis."""
        o = Enclosed.lift(other)
        n = self.value.shape[-1]
        av, ov = self.value.abs(), o.value.abs()
        ae, oe = self.err.expand_as(self.value), o.err.expand_as(o.value)
        err = av @ oe + ae @ ov + ae @ oe + gamma(n + 1) * (av @ ov)
        return Enclosed.rounded(self.value @ o.value, err)

    def sum(self, dim) -> Enclosed:
        """Sum over the axes `dim`."""
        n = math.prod(self.value.shape[d] for d in ([dim] if isinstance(dim, int) else dim))
        err = self.err.expand_as(self.value).sum(dim) + gamma(n + 1) * self.value.abs().sum(dim)
        return Enclosed.rounded(self.value.sum(dim), err)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(data, err) for a graph Value: float32 data when that holds the value exactly and
        there is no error (most weights), else the float64 value and its error bound."""
        err = self.err.expand_as(self.value)
        if not err.any():
            single = self.value.to(torch.float32)
            if torch.equal(single.to(torch.float64), self.value):
                return single.contiguous(), None
            return self.value.contiguous(), None
        return self.value.contiguous(), err.contiguous()
