"""mul: y = x1 * x2, the product of two variable tensors of the same rank (axes of size 1
broadcast). Frontends lower a product of two operands that both depend on the network input to
it (a product with a constant is an affine map, affine.py).

McCormick relaxation of x y over the box [lx, ux] x [ly, uy] (per output neuron, the input
bounds broadcast to it):

  lower  L1 = ly x + lx y - lx ly      from (x - lx)(y - ly) >= 0
         L2 = uy x + ux y - ux uy      from (ux - x)(uy - y) >= 0
  upper  U1 = uy x + lx y - lx uy      from (x - lx)(uy - y) >= 0
         U2 = ly x + ux y - ux ly      from (ux - x)(y - ly) >= 0

and so does every convex combination r L1 + (1 - r) L2 (r U1 + (1 - r) U2), r in [0, 1]. CROWN
takes L1 and U1 (r = 1, auto_LiRPA's BoundMul); alpha-CROWN optimises r per row of A and output
neuron, for the lower and for the upper plane (auto_LiRPA's optimisable BoundMul, starting at 1).
The lines tensor ("mul.relax") is [8, B, *out]: lx, ux, ly, uy broadcast to the output, then
CROWN's planes laid out for the backward rule's slices (module `backward`): ly again, and the
intercepts -lx ly, -lx uy, -lx ly.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from boundflow.domains import binds, fp, native
from boundflow.domains.interval import extremes
from boundflow.domains.linear import halves, sound
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.ops.registry import Op, Relaxation, register

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder

RELAX_ROWS = 8


def forward(x, y, attrs=None):
    return x * y


@binds
def interval(ins, ps, attrs, out=(None,)):
    """The least and the largest of the four products of the bounds: stack(lx, ux) times
    stack(ly, uy) crosswise, in one broadcast product, and its two ends reduced into the
    planned view (this rule's time is mostly per call)."""
    sx, sy = ins
    if sx.dim() == sy.dim():
        xs, ys, ends = sx.unsqueeze(1), sy.unsqueeze(0), extremes(out[0], (0, 1))

        def run():
            return (ends(torch.mul(xs, ys)),)
        # (one compiled call where both have the output's shape: native.py)
        return native.elementwise_run(native._product_range, (sx, sy), out[0], run) or run
    (lx, ux), (ly, uy), ends = sx, sy, extremes(out[0])    # (new axes would not line up)
    return lambda: (ends(torch.stack(torch.broadcast_tensors(lx * ly, lx * uy, ux * ly, ux * uy))),)


def fp_error(ins, ps, attrs):
    """Each product of the interval rule rounds once: u |x| |y|."""
    sx, sy, raw = ins
    return fp.finish(raw, unit_roundoff(raw.dtype) * magnitude(sx) * magnitude(sy), attrs["n"])


# -- relaxation -----------------------------------------------------------------------------------

def relax(ins, ps, attrs):
    """stack(lower, upper) of x and of y -> stack(lx, ux, ly, uy, ly, -lx ly, -lx uy, -lx ly) on
    the output's shape."""
    (lx, ux), (ly, uy) = ins
    lxly, lxuy = -(lx * ly), -(lx * uy)
    return (torch.stack(torch.broadcast_tensors(lx, ux, ly, uy, ly, lxly, lxuy, lxly)),)


def planes(lx, ux, ly, uy, r_lo, r_up):
    """((x slope, y slope, intercept) of the lower plane, the same of the upper plane) at the
    fractions r: r_lo L1 + (1 - r_lo) L2 and r_up U1 + (1 - r_up) U2 (module docstring). lerp
    is exact at r = 0 and r = 1."""
    y_slope = lambda r: torch.lerp(ux, lx, r)                          # noqa: E731 (both planes)
    lower = (torch.lerp(uy, ly, r_lo), y_slope(r_lo), -torch.lerp(ux * uy, lx * ly, r_lo))
    upper = (torch.lerp(ly, uy, r_up), y_slope(r_up), -torch.lerp(ux * ly, lx * uy, r_up))
    return lower, upper


def _back(a, bias, lower, upper, shapes, s: int):
    """Lower rows (the first s): positive coefficients take the lower plane, negative ones the
    upper plane; upper rows the other way round. The planes' tensors are [B, 1, *out] (shared by
    every row) or [B, rows, *out]. A on each input sums over the axes it broadcasts along."""
    def rows(t, low):
        return t if t.shape[1] == 1 else (t[:, :s] if low else t[:, s:])

    def side(a, low):
        pos_plane, neg_plane = (lower, upper) if low else (upper, lower)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        ax, ay, c = (pos * rows(p, low) + neg * rows(q, low) for p, q in zip(pos_plane, neg_plane))
        return ax, ay, c.flatten(2).sum(-1)

    lo, up = side(a[:, :s], True), side(a[:, s:], False)
    lead = tuple(a.shape[:2])
    ax, ay = (torch.cat([lo[i], up[i]], 1).sum_to_size(lead + tuple(shape)) for i, shape in enumerate(shapes))
    return ax, ay, bias + torch.cat([lo[2], up[2]], 1)


def backward(ins, ps, attrs):
    """CROWN's planes L1 = (ly, lx, -lx ly) and U1 = (uy, lx, -lx uy) (r = 1), both halves of A at
    once as [B, h, S, *out]: lower rows take L1 where A >= 0 and U1 below, upper rows the other
    way round, so the x slopes for (a+, a-) are rows (ly, uy) and (uy, ly) of the lines tensor
    (slices 2:4 and 3:5 per half), the intercepts rows 5:7 and 6:8, the y slope lx throughout.
    a- = a - a+ (exact), one of the two terms an exact zero (relu.py's _lines)."""
    a, bias, lines = ins
    h = 1 if attrs.get("lower_only") else 2
    split = a.unflatten(1, (h, a.shape[1] // h))
    pos = split.clamp(min=0)
    neg = split - pos
    rows = lines.movedim(0, 1).unsqueeze(2)                       # [B, 8, 1, *out]
    ax = torch.addcmul(pos * rows[:, 2:2 + h], neg, rows[:, 3:3 + h]).flatten(1, 2)
    icpt = torch.addcmul(pos * rows[:, 5:5 + h], neg, rows[:, 6:6 + h]).flatten(3).sum(-1).flatten(1)
    lead = tuple(a.shape[:2])
    (sx, sy) = attrs["shapes"]
    return ax.sum_to_size(lead + tuple(sx)), (a * rows[:, 0]).sum_to_size(lead + tuple(sy)), bias + icpt


def backward_alpha(ins, ps, attrs):
    """backward with each row's planes at fractions alpha [B, 2, R, *out] (lower plane, upper
    plane) in [0, 1]; without alpha (None), CROWN's."""
    a, bias, lines, alpha = ins[:4]
    if alpha is None:
        return backward(ins[:3], ps, attrs)
    lower, upper = planes(*lines[:4].unsqueeze(2), alpha[:, 0], alpha[:, 1])
    return _back(a, bias, lower, upper, attrs["shapes"], halves(a, attrs))


def alpha_start(op, env) -> torch.Tensor:
    """CROWN's planes, r = 1 for both, per row of A: [B, 2, R, *out]."""
    a = env[op.inputs[0]]
    return a.new_ones((a.shape[0], 2) + tuple(a.shape[1:]))


def fp_lines(ins, ps, attrs):
    """e of the backward rules (over the output), with m = max|x| max|y|: how far the rounded
    planes may cross x y (their slopes, lerps of bounds, within 4u max|y| and 4u max|x|, their
    intercept within 6u m: 14u m on the box), the products A * slope (u m each), the sums of A
    over broadcast axes (gamma(n) m each) and the intercept sums over the layer (gamma(n) m)."""
    sx, sy, lines = ins
    m = magnitude(sx) * magnitude(sy)
    n = math.prod(lines.shape[2:]) + 4
    return (2 * ((16 * unit_roundoff(m.dtype) + 3 * gamma(n, m.dtype)) * m) + slack(n, m.dtype),)


def lines_shape(graph, node) -> tuple[int, ...]:
    """[8, *output shape]."""
    return (RELAX_ROWS,) + tuple(graph.shape(node.outputs[0]))


def backward_attrs(graph, node) -> dict:
    return {"shapes": [list(graph.shape(i)) for i in node.inputs]}


MUL = register(Op(
    "mul", forward, interval, sound(backward), fp_error, fp_params=lambda graph, node, dtype: [],
    backward_attrs=backward_attrs,
    relaxation=Relaxation(relax, RELAX_ROWS, fp_lines, sound(backward_alpha), alpha_start, params=2,
                          lines_shape=lines_shape, inputs=2)))


# -- frontends ------------------------------------------------------------------------------------

def product(b: Builder, x: str, y: str, out: str | None) -> str:
    """x * y for two different variables, broadcasting as numpy does: a variable of lower rank
    gets leading axes of size 1 (a reshape), then axes of size 1 broadcast."""
    xs, ys = b.shape(x), b.shape(y)
    try:
        full = tuple(torch.broadcast_shapes(xs, ys))
    except RuntimeError:
        b.unsupported(f"operands of shapes {list(xs)} and {list(ys)} do not broadcast")
    if len(xs) < len(full):
        x = b.reshape(x, (1,) * (len(full) - len(xs)) + tuple(xs))
    if len(ys) < len(full):
        y = b.reshape(y, (1,) * (len(full) - len(ys)) + tuple(ys))
    return b.emit("mul", [x, y], out=out)


def matmul(b: Builder, x: str, y: str, out: str | None) -> str:
    """x @ y for two variables (numpy matmul: vectors promoted, batch axes broadcast) as the sum
    over k of the products x[..., m, k, 1] * y[..., 1, k, n] (each relaxed by its McCormick
    planes, as auto_LiRPA's MatMul of two perturbed operands): mul, then a transpose bringing k
    last and a linear with a row of ones. The product holds m k n values per batch entry."""
    xs, ys = b.shape(x), b.shape(y)
    if not xs or not ys:
        b.unsupported("matrix product of a rank-0 operand")
    vec_x, vec_y = len(xs) == 1, len(ys) == 1
    if vec_x:
        x, xs = b.reshape(x, (1,) + tuple(xs)), (1,) + tuple(xs)
    if vec_y:
        y, ys = b.reshape(y, tuple(ys) + (1,)), tuple(ys) + (1,)
    (m, k), (k2, n) = xs[-2:], ys[-2:]
    if k != k2:
        b.unsupported(f"matrix product of shapes {list(xs)} and {list(ys)}: inner sizes {k} and {k2} differ")
    terms = product(b, b.reshape(x, tuple(xs) + (1,)), b.reshape(y, tuple(ys[:-2]) + (1, k, n)), None)
    r = len(b.shape(terms))
    terms = b.transpose(terms, list(range(r - 2)) + [r - 1, r - 2])                  # [..., m, n, k]
    summed = b.linear(terms, b.literal(np.ones((1, k))))                              # [..., m, n, 1]
    shape = tuple(b.shape(summed)[:-3]) + ((m,) if not vec_x else ()) + ((n,) if not vec_y else ())
    return b.reshape(summed, shape, out)
