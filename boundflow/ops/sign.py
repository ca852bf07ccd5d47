"""sign: y = -1, 0 or 1 by the sign of x (ONNX Sign, aten sign). A step: monotone, so interval
bounds are exact (but for ends a rounding error from 0: see widened); its lines over [l, u] pass
through the step's values at the interval's ends:

  upper: y = sign(u) + s x, s in [0, (sign(u) + 1) / -l] (l < 0; else s = 0): through (l, -1)
         at the steepest, never below the step (it is sign(u) >= 0 at 0, above 1 right of it)
  lower: y = sign(l) + s x, s in [0, (1 - sign(l)) / u] (u > 0; else s = 0): the mirror image

alpha-CROWN optimises each s as a fraction of its range; CROWN takes the line with the smaller
gap: the steepest upper line when u < -l (else the flat one), the steepest lower line when
u > -l. For the attack (boundflow/verify/attack.py, which follows gradients) the forward rule
passes gradients straight through a smoothed step, d/dx tanh(x / w) with w the input's
spread, since the step's own gradient is zero everywhere: values are sign's exactly.
"""
from __future__ import annotations

import torch

from boundflow.domains import fp
from boundflow.domains.linear import halves, sound
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering
from boundflow.ops.s_shaped import _back


class _Step(torch.autograd.Function):
    """sign(x), with the gradient of tanh(x / w) (w: the mean |x| of the batch, at least 1e-3)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        w = x.abs().mean().clamp(min=1e-3)
        return grad * (1 - torch.tanh(x / w) ** 2) / w


def forward(x, attrs=None):
    return _Step.apply(x) if x.requires_grad else torch.sign(x)


# The step jumps by 1 at 0, so an end of its input's bounds that rounding put on the wrong side
# of 0 is a wrong bound, not a rounding error (0.5 - relu(0.5 - x) of a ReLU's exact zero comes
# out +3e-8 from a CROWN pass in float32). Non-zero ends move out by ROUNDING_ULPS units in the
# last place of the larger end before the step reads their signs: bounds that close to 0 are
# treated as crossing it (looser there only). Exact zeros (a ReLU's, a clamp's) stay.
ROUNDING_ULPS = 64


def widened(l: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    margin = ROUNDING_ULPS * unit_roundoff(l.dtype) * torch.maximum(l.abs(), u.abs())   # (not rounding.slack)
    return torch.where(l == 0, l, l - margin), torch.where(u == 0, u, u + margin)


def interval(ins, ps, attrs):
    return (torch.sign(torch.stack(widened(*ins[0]))),)


def _ranges(l, u):
    """Steepest slopes of the upper and lower lines."""
    s_up = torch.where(l < 0, (torch.sign(u) + 1) / (-l).clamp(min=torch.finfo(l.dtype).tiny), torch.zeros_like(l))
    s_lo = torch.where(u > 0, (1 - torch.sign(l)) / u.clamp(min=torch.finfo(u.dtype).tiny), torch.zeros_like(u))
    return s_lo, s_up


def crown_alphas(l, u):
    return (u > -l).to(l.dtype), (u < -l).to(l.dtype)


def lines(l, u, alpha_lo, alpha_up):
    s_lo, s_up = _ranges(l, u)
    return alpha_lo * s_lo, torch.sign(l), alpha_up * s_up, torch.sign(u)


def relax(ins, ps, attrs):
    """stack(l, u) -> rows (lower slope, lower intercept, upper slope, upper intercept, l, u)."""
    l, u = widened(*ins[0])
    return (torch.stack((*lines(l, u, *crown_alphas(l, u)), l, u)),)


def backward(ins, ps, attrs):
    a, bias, rows = ins
    return _back(a, bias, *rows[:4].unsqueeze(2), halves(a, attrs))


def backward_alpha(ins, ps, attrs):
    """backward with each row's slopes at fractions alpha [B, 2, R, *shape] (lower, upper) of
    their ranges; without alpha (None), CROWN's lines."""
    a, bias, rows, alpha = ins[:4]
    if alpha is None:
        return backward(ins[:3], ps, attrs)
    l, u = rows[4:6].unsqueeze(2)
    return _back(a, bias, *lines(l, u, alpha[:, 0], alpha[:, 1]), halves(a, attrs))


def alpha_start(op, env) -> torch.Tensor:
    a, rows = env[op.inputs[0]], env[op.inputs[2]]
    pair = torch.stack(crown_alphas(rows[4], rows[5]), 1).unsqueeze(2)        # [B, 2, 1, *shape]
    return pair.expand((a.shape[0], 2) + tuple(a.shape[1:])).clone()


def fp_interval(ins, ps, attrs):
    """Exact: the values are -1, 0 and 1."""
    s, raw = ins
    return fp.finish(raw, torch.zeros_like(raw[0]), attrs["n"])


def fp_lines(ins, ps, attrs):
    """e of the backward rules: slopes up to K = max(steepest slopes), intercepts up to 1; the
    products A * slope, the intercept sums, and a slope's own rounding carried over |x| (the
    lines touch the step only at its ends, the steepest ones exactly at l or u)."""
    s, rows = ins
    k = torch.maximum(*_ranges(rows[4], rows[5]))
    m = magnitude(s)
    eps = unit_roundoff(s.dtype)
    n = s[0, 0].numel() + 4
    return (2 * (2 * eps * k * m + gamma(n, s.dtype) + 4 * eps * (k * m + 1)) + slack(n, s.dtype),)


SIGN = register(Op("sign", forward, interval, sound(backward), fp=fp_interval, fp_params=lambda graph, node, dtype: [],
                   relaxation=Relaxation(relax, 6, fp_lines, sound(backward_alpha), alpha_start, params=2)))


@onnx_lowering("Sign")
def _onnx_sign(b) -> str:
    return b.emit("sign", [b.var(b.input(0))], out=b.output)


@torch_lowering(torch.ops.aten.sign.default)
def _torch_sign(b) -> str:
    return b.emit("sign", [b.var(b.arg(0))], out=b.output)
