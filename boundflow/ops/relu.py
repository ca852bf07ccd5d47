"""relu: y = max(x, 0). Its linear relaxation (as auto_LiRPA's CROWN defines it), the backward
rules that read it (with optimisable lower slopes for alpha-CROWN and split multipliers for
beta-CROWN), its floating-point error vector and its patch rules.

For pre-activation bounds [l, u]: upper line through (l, 0) and (u, u), i.e. slope
d = u / (u - l) and intercept -l d (identity when l >= 0, zero when u <= 0); lower line y = x
when u > -l, else y = 0 (the "adaptive" choice, y = 0 on a tie).

Frontends lower ReLU to it (and clamps at 0: boundflow/ops/clamp.py).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from boundflow.domains import shaped, writes_into
from boundflow.domains.linear import halves, sound, with_splits
from boundflow.domains.patches import fp_widen as patch_fp_widen
from boundflow.domains.patches import row_dots, selected_neurons, shared_windows, unit_lead, windows
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder

aten = torch.ops.aten


def forward(x, attrs=None):
    return torch.relu(x)


@writes_into
def interval(ins, ps, attrs, out=(None,)):
    return (torch.clamp(ins[0], min=0, out=out[0]),)


@writes_into
def relax(ins, ps, attrs, out=(None,)):
    """stack(lower, upper) -> stack(upper slope, upper intercept, lower slope). The lower slope
    is 1 where the upper one is > 0.5: round() of a slope in [0, 1] is that (0.5 rounds to 0,
    to even), cheaper than a comparison."""
    lo, hi = ins[0].unbind(0)
    lo_r = lo.clamp(max=0)
    hi_r = torch.maximum(hi.clamp(min=0), lo_r + 1e-8)   # keeps d finite when l = u = 0
    up_slope = hi_r / (hi_r - lo_r)
    lines = torch.stack((up_slope, lo_r * up_slope, up_slope.round()), out=out[0])
    lines[1].neg_()                                       # the intercept -l d (negation is exact)
    return (lines,)


def _lines(a, pos_slope, neg_slope, out=None):
    """(a * slope with slope pos_slope where a >= 0 and neg_slope below, a+, a-). Written as
    a+ pos_slope + a- neg_slope: one term is an exact zero, so this is the masked product
    bit for bit, without a boolean mask (a comparison and torch.where over A cost 10-30x an
    arithmetic pass on the CPU). a- = a - a+ (exact), not a clamp: its gradient at a = 0 is then
    0, so autograd's derivative there is pos_slope, as the masked product's (alpha-CROWN)."""
    pos = a.clamp(min=0)
    neg = a - pos
    return torch.addcmul(pos * pos_slope, neg, neg_slope, out=out), pos, neg


def _unstable_slopes(lo_slope, up_bias, alpha):
    """The lower slopes with alpha on the unstable neurons (up_bias > 0 exactly when l < 0 < u),
    lo_slope elsewhere: alpha u + lo_slope (1 - u) for the 0/1 indicator u, exact (see _lines)."""
    u = (up_bias > 0).to(alpha.dtype)
    return torch.addcmul(lo_slope * (1 - u), alpha, u)


def _back(a, bias, up_slope, up_bias, lo_slope_l, lo_slope_u, lower_only=False, out=(None, None)):
    """Lower rows: positive coefficients take the lower line, negative ones the upper line;
    upper rows the other way round. Slopes broadcast against A's halves. out: where A and the
    bias go (writes_into)."""
    ub = up_bias.flatten(1).unsqueeze(-1)                                      # [B, N, 1]
    if lower_only:
        new_a, _, neg = _lines(a, lo_slope_l, up_slope, out[0])
        return new_a, torch.add(bias, torch.bmm(neg.flatten(2), ub).squeeze(-1), out=out[1])
    # both halves at once, as [B, 2, S, ...]: slopes stacked per half
    halves_a = a.unflatten(1, (2, a.shape[1] // 2))
    if lo_slope_l is lo_slope_u:                  # one lower slope per neuron: no broadcast needed
        pos_slope, neg_slope = torch.stack((lo_slope_l, up_slope), 1), torch.stack((up_slope, lo_slope_l), 1)
    else:
        pos_slope = torch.stack(torch.broadcast_tensors(lo_slope_l, up_slope), 1)
        neg_slope = torch.stack(torch.broadcast_tensors(up_slope, lo_slope_u), 1)
    dest = shaped(out[0], a.shape)
    new_a, pos, neg = _lines(halves_a, pos_slope, neg_slope, None if dest is None else dest.view(halves_a.shape))
    # intercepts: only the upper line has one; it enters where the upper line was taken
    bias_lo = torch.bmm(neg[:, 0].flatten(2), ub)
    bias_up = torch.bmm(pos[:, 1].flatten(2), ub)
    new_bias = torch.add(bias, torch.cat([bias_lo, bias_up], 1).squeeze(-1), out=out[1])
    return new_a.flatten(1, 2) if dest is None else dest, new_bias


@writes_into
def backward(ins, ps, attrs, out=(None, None)):
    a, bias, lines = ins
    up_slope, up_bias, lo_slope = lines.unsqueeze(2)       # each [B, 1, ...]
    return _back(a, bias, up_slope, up_bias, lo_slope, lo_slope, attrs.get("lower_only", False), out)


def backward_alpha(ins, ps, attrs):
    """As backward, but the lower line of each unstable neuron has slope alpha (in [0, 1]), one
    per row of A: alpha-CROWN. Stable neurons keep their exact line. Without alpha (None),
    CROWN's adaptive slopes: that first run tells the optimiser the shapes and starting slopes.

    An optional fifth input m (beta-CROWN, [B, 2S, *shape] like alpha, or None) holds the
    split constraints' multipliers times their signs: m = beta * s with beta >= 0 and s = +1
    for a neuron split active (z >= 0), -1 inactive (z <= 0), 0 unsplit. On the domain
    s z >= 0, so the lower rows may subtract beta s z and the upper rows add it (a Lagrangian
    relaxation of the split constraints; sound for any beta >= 0)."""
    a, bias, lines, alpha = ins[:4]
    beta = ins[4] if len(ins) > 4 else None
    if alpha is None:
        out, bias = backward(ins[:3], ps, attrs)
    else:
        up_slope, up_bias, lo_slope = lines.unsqueeze(2)
        lo_slope = _unstable_slopes(lo_slope, up_bias, alpha)
        s = halves(a, attrs)
        out, bias = _back(a, bias, up_slope, up_bias, lo_slope[:, :s], lo_slope[:, s:],
                          attrs.get("lower_only", False))
    if beta is not None:
        out = with_splits(out, beta, halves(a, attrs))
    return out, bias


def _alpha_magnitude(ins):
    """|A| plus the split multipliers that backward_alpha adds to it (beta-CROWN)."""
    beta = ins[4] if len(ins) > 4 else None
    return ins[0].abs() if beta is None else ins[0].abs() + beta.abs()


def alpha_start(op, env) -> torch.Tensor:
    """CROWN's adaptive lower slopes of backward_alpha's task op, one per row of A (from a run
    without slopes, env: buffer -> tensor): alpha-CROWN's start."""
    a, lines = env[op.inputs[0]], env[op.inputs[2]]
    return lines[2].unsqueeze(1).expand(a.shape).clone()


def fp_error(ins, ps, attrs):
    """e of the backward rules, from the interval of the input and the relaxation: the products
    A * slope (|slope| <= 1), the intercept sums over the layer, and how far the rounded upper
    line s z + t may fall below relu(z) on [l, u] (relu minus a line is convex, so the worst is
    at an end)."""
    s, lines = ins
    lo, hi = s
    slope, intercept = lines[0], lines[1]
    m = magnitude(s)
    u = unit_roundoff(s.dtype)
    gap = torch.maximum(hi.clamp(min=0) - (slope * hi + intercept), lo.clamp(min=0) - (slope * lo + intercept))
    gap = gap.clamp(min=0) + 4 * u * (m + slope.abs() * m + intercept.abs())
    n = math.prod(s.shape[2:]) + 4
    return (2 * (2 * u * m + gamma(n, s.dtype) * intercept.abs() + gap) + slack(n, s.dtype),)


# -- patches ------------------------------------------------------------------------------------

def _window_lines(lines: torch.Tensor, idx: torch.Tensor | None, attrs, a: torch.Tensor) -> torch.Tensor:
    """The relaxation at each neuron's window: [3, B, 1, k, C, ph, pw] (broadcasts over halves);
    idx None: at each position's window, shared by the target's channels (shared_windows)."""
    return windows(unit_lead(lines, 2), idx, attrs, a.shape[-2], a.shape[-1]).unsqueeze(2)


def _patch_back(a, bias, win, alpha=None, out=(None, None), groups=1):
    """_back on windows; alpha [B, 2k, C, ph, pw] replaces the lower slope of unstable neurons,
    one per row as in backward_alpha. win: the relaxation at k / groups windows, each shared by
    `groups` blocks of rows (patches.shared_windows). out: where A and the bias go (writes_into)."""
    k = a.shape[1] // 2
    rows = (2, groups, k // groups)
    up_slope, up_bias, lo_slope = (w.unsqueeze(2) for w in win)     # each [B, 1, 1, k / groups, C, ph, pw]
    dest = shaped(out[0], a.shape)
    if dest is None and not torch.is_grad_enabled():     # (out= writes have no autograd)
        dest = torch.empty_like(a)
    a = a.unflatten(1, rows)
    lo_l = lo_u = lo_slope[:, 0]
    if alpha is not None:
        lo_slope = _unstable_slopes(lo_slope, up_bias, alpha.unflatten(1, rows))
        lo_l, lo_u = lo_slope[:, 0], lo_slope[:, 1]
    halves = (None, None) if dest is None else dest.unflatten(1, rows).unbind(1)
    out_lo, _, neg_lo = _lines(a[:, 0], lo_l, up_slope[:, 0], halves[0])
    out_up, pos_up, _ = _lines(a[:, 1], up_slope[:, 0], lo_u, halves[1])
    ub = up_bias[:, 0, 0].flatten(2)
    extra = torch.stack((row_dots(neg_lo.flatten(3), ub), row_dots(pos_up.flatten(3), ub)), 1)
    new_a = torch.stack((out_lo, out_up), 1).flatten(1, 3) if dest is None else dest
    return new_a, torch.add(bias, extra.flatten(1), out=out[1])


@writes_into
def patch_backward(ins, ps, attrs, out=(None, None)):
    """backward on windows: each row reads the relaxation at its neuron's window. In a sound_fp
    plan the last input is the ReLU's error vector (patches.fp_widen)."""
    ins, e = (ins[:-1], ins[-1]) if attrs.get("fp") else (ins, None)
    a, bias, lines = ins[:3]
    idx = selected_neurons(ins, 3, attrs, a)
    groups = shared_windows(idx, attrs)
    into = out if e is None else (out[0], None)          # (a sound_fp bias is widened after)
    win = _window_lines(lines, None if groups > 1 else idx, attrs, a)
    new_a, new_bias = _patch_back(a, bias, win, out=into, groups=groups)
    return new_a, new_bias if e is None else patch_fp_widen(a, new_bias, e, idx, attrs)


def patch_backward_alpha(ins, ps, attrs):
    """patch_backward with optimised lower slopes (alpha-CROWN); without them (None), CROWN's."""
    ins, e = (ins[:-1], ins[-1]) if attrs.get("fp") else (ins, None)
    a, bias, lines, alpha = ins[:4]
    idx = selected_neurons(ins, 4, attrs, a)
    groups = shared_windows(idx, attrs)
    win = _window_lines(lines, None if groups > 1 else idx, attrs, a)
    out, new_bias = _patch_back(a, bias, win, alpha, groups=groups)
    return out, new_bias if e is None else patch_fp_widen(a, new_bias, e, idx, attrs)


def patch_alpha_start(op, env) -> torch.Tensor:
    """CROWN's lower slopes at each row's window, shaped like alpha: alpha-CROWN's start."""
    ins = [env[b] for b in op.inputs]
    ins = ins[:-1] if op.attrs.get("fp") else ins          # a sound_fp plan's error vector
    a, lines = ins[0], ins[2]
    idx = selected_neurons(ins, 4, op.attrs, a)
    lo_slope = _window_lines(lines, idx, op.attrs, a)[2]    # [B, 1, k, C, ph, pw]
    return lo_slope.expand(a.unflatten(1, (2, a.shape[1] // 2)).shape).flatten(1, 2).clone()


RELU = register(Op(
    "relu", forward, interval, sound(backward), coordinatewise=True,     # monotone: [relu(l), relu(u)] is exact
    relaxation=Relaxation(relax, 3, fp_error, sound(backward_alpha, _alpha_magnitude), alpha_start,
                          patch_backward, patch_backward_alpha, patch_alpha_start, sparse_refine=True,
                          splits_at_zero=True),
    fp32=True))


# -- frontends ----------------------------------------------------------------------------------------

def relu(b: Builder, x: str) -> str:
    return b.emit("relu", [x], out=b.output)


@onnx_lowering("Relu")
def _onnx_relu(b) -> str:
    return relu(b, b.var(b.input(0)))


@torch_lowering(aten.relu.default)
def _torch_relu(b) -> str:
    return relu(b, b.var(b.arg(0)))
