"""Patches: backward passes whose A is kept as receptive-field windows.

A CROWN pass that bounds neurons of a conv output through a chain conv -> relu -> ... -> conv
-> input only ever touches a window of each intermediate value: the neuron's receptive
field. Patches keep A as that window, [B, 2k, C, ph, pw] (one window per row; rows 0..k-1
lower, k..2k-1 upper, for the neurons idx), instead of the whole value. The window of row r
starts at (i_r * S - P, j_r * T - Q), with (i_r, j_r) the neuron's position in the target and
(S, T, P, Q) the chain's cumulative strides and paddings (attrs "grid"): it only depends on
idx. Positions outside a value are its conv's zero padding: the windows of the relaxation and
of the box are read with zeros there, which zeroes A (and its contribution) exactly.

A pass may also go through sums of two values (residual connections): both inputs get the
sum's A. A value read by several ops gets windows of different extents (and origins) from
them; the planner places each inside their union (patch_pad) before adding them up
(planner/lower.py: Geometry).

Here the window geometry, the start of a pass at a target that is not a conv output, the end
of a patch pass, elementwise lines on windows and the sound_fp widening on windows; the conv's,
the ReLU's, the clamp's and the affine map's patch rules live with those ops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from boundflow.domains import shaped, writes_into
from boundflow.domains.rounding import down, gamma, magnitude, slack, unit_roundoff, up


def selected_neurons(ins: list, at: int, attrs, like: torch.Tensor) -> torch.Tensor:
    """The target neurons of a patch pass: the index input, or every neuron without one (on
    like's device)."""
    return ins[at] if len(ins) > at else torch.arange(math.prod(attrs["target"]), device=like.device)


def patch_margins(attrs, h: int, w: int, ph: int, pw: int) -> tuple[int, int, int, int]:
    """Zero padding (top, bottom, left, right) of an h x w value so that every window of size
    ph x pw the target's neurons can have lies inside: origins run over i S - P, i < H_t."""
    _, ht, wt = attrs["target"]
    s, t, p, q = attrs["grid"]
    return max(0, p), max(0, (ht - 1) * s - p + ph - h), max(0, q), max(0, (wt - 1) * t - q + pw - w)


def shared_windows(idx: torch.Tensor, attrs) -> int:
    """How many blocks of rows share their windows: the target's channels when the rows are
    every neuron of the target in order (neuron c P + p's window depends on its position p
    only; bound.unstable's indices are sorted and unique, so all of them is the identity), else
    1. Windows are then read once per position, not once per row."""
    c, h, w = attrs["target"]
    return c if idx.dim() == 1 and idx.numel() == c * h * w else 1


def windows(x: torch.Tensor, idx: torch.Tensor | None, attrs, ph: int, pw: int) -> torch.Tensor:
    """x [..., C, H, W] read at the windows of the neurons idx [k] (size ph x pw, zeros outside):
    [..., k, C, ph, pw]; idx None: at each position of the target once, [..., H_t W_t, C, ph, pw].
    Every target position's window at once (an unfold of x, cropped or zero padded so that
    window (i, j) starts at (i S - P, j T - Q)), then each row's."""
    lead, (c, h, w) = tuple(x.shape[:-3]), x.shape[-3:]
    _, ht, wt = attrs["target"]
    s, t, p, q = attrs["grid"]
    xp = _pad_or_crop(x.reshape((-1, c, h, w)), q, (wt - 1) * t - q + pw - w, p, (ht - 1) * s - p + ph - h)
    every = F.unfold(xp, (ph, pw), stride=(s, t)).transpose(1, 2)          # [N, ht wt, C ph pw]
    if idx is None:                       # (contiguous: the rules read it once per channel block)
        return every.contiguous().reshape(lead + (ht * wt, c, ph, pw))
    return every.index_select(1, idx % (ht * wt)).reshape(lead + (idx.numel(), c, ph, pw))


def _pad_or_crop(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """x [..., H, W] with zeros added on each side (a negative amount crops): pads first, so a
    crop may reach into the other side's padding (F.pad crops the input first and refuses a
    crop wider than it: a window grid that starts past the input's far edge)."""
    x = F.pad(x, (max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)))
    h, w = x.shape[-2:]
    return x[..., max(-top, 0): h - max(-bottom, 0), max(-left, 0): w - max(-right, 0)]


def unit_lead(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Drop the model's unit batch axis of a [..., 1, C, H, W] tensor with `dims` leading axes."""
    return x.flatten(dims, dims + 1) if x.dim() == dims + 4 else x


def row_dots(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, h, k] dots of each row's window a [B, h, k, n] with its neuron's x [B, k, n]: one
    batched product, ~2.5x faster than multiplying out and summing (no [B, h, k, n]
    temporary), except for h = 1, where torch's einsum runs k products of one row each (4x
    slower than multiplying out: 0.9 against 0.2 ms for 221 windows of 1,800)."""
    if a.shape[1] == 1:
        return (a * x.unsqueeze(1)).sum(-1)
    return torch.einsum("bhjx,bjx->bhj", a, x)


def row_windows(x: torch.Tensor, dims: int, idx: torch.Tensor, attrs, a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [*lead, (1,) C, H, W] with `dims` leading axes (per neuron of the value: lines,
    constants) at the windows of A's rows, [*lead, 1, 1, k / groups, C, ph, pw]: broadcasting
    against A as rows_view [B, 2, groups, k / groups, C, ph, pw] (groups: shared_windows)."""
    groups = shared_windows(idx, attrs)
    win = windows(unit_lead(x, dims), None if groups > 1 else idx, attrs, a.shape[-2], a.shape[-1])
    return win.unsqueeze(-5).unsqueeze(-5), groups


def rows_view(a: torch.Tensor, groups: int) -> torch.Tensor:
    """A [B, 2k, C, ph, pw] as [B, 2, groups, k / groups, C, ph, pw]."""
    return a.unflatten(1, (2, groups, a.shape[1] // (2 * groups)))


def lines_back(a6: torch.Tensor, bias: torch.Tensor, k_lo, b_lo, k_up, b_up) -> tuple[torch.Tensor, torch.Tensor]:
    """Back through elementwise lines on windows (ops.s_shaped._back's rule): A a6 as rows_view,
    each line coefficient broadcasting against it (axis 1: one for both halves, or two: lower,
    upper rows). Lower rows: positive coefficients take the lower line, negative ones the upper
    line; upper rows the other way round. -> (A [B, 2k, C, ph, pw], bias)."""
    def half(t, h):
        return t[:, h] if t.shape[1] == 2 else t[:, 0]

    outs, icpts = [], []
    for h, (kp, bp, kn, bn) in enumerate(((k_lo, b_lo, k_up, b_up), (k_up, b_up, k_lo, b_lo))):
        pos = a6[:, h].clamp(min=0)
        neg = a6[:, h] - pos
        outs.append(torch.addcmul(pos * half(kp, h), neg, half(kn, h)))
        icpts.append((pos * half(bp, h) + neg * half(bn, h)).flatten(3).sum(-1))
    return torch.stack(outs, 1).flatten(1, 3), bias + torch.stack(icpts, 1).flatten(1)


def fp_widen(a: torch.Tensor, bias: torch.Tensor, e: torch.Tensor, idx: torch.Tensor, attrs) -> torch.Tensor:
    """linear.fp_widen on windows: row r takes sum |A_r| e over its neuron's window of the op's
    error vector e (zeros outside the value, where A is zero too)."""
    k = a.shape[1] // 2
    win = windows(unit_lead(e, 1), idx, attrs, a.shape[-2], a.shape[-1]).flatten(2)      # [B, k, C ph pw]
    err = row_dots(a.unflatten(1, (2, k)).flatten(3).abs(), win).flatten(1)
    u = unit_roundoff(bias.dtype)
    err = 2 * (err + u * bias.abs()) + slack(math.prod(a.shape[2:]) + 2, bias.dtype)
    return torch.cat([down(bias[:, :k] - err[:, :k]), up(bias[:, k:] + err[:, k:])], 1)


def patch_start_onehot(ins, ps, attrs):
    """A = the selected neurons' rows of the identity as 1 x 1 windows on the target:
    [B, 2k, C, 1, 1], one-hot along C (a pass whose target is not a conv output)."""
    device = torch.device(attrs["device"])
    idx = ins[0] if ins else torch.arange(math.prod(attrs["target"]), device=device)
    c, h, w = attrs["target"]
    channel = (idx // (h * w)).repeat(2)
    dtype = torch.float64 if attrs["dtype"] == "float64" else torch.float32
    a = torch.zeros(attrs["batch"], channel.numel(), c, 1, 1, dtype=dtype, device=device)
    a[:, torch.arange(channel.numel(), device=device), channel] = 1.0
    return a, a.new_zeros(attrs["batch"], channel.numel())


def patch_pad(ins, ps, attrs):
    """A's windows placed inside larger ones (attrs pad: top, bottom, left, right), zeros
    around: where a value's consumers reach it with windows of different extents."""
    top, bottom, left, right = attrs["pad"]
    return (F.pad(ins[0], (left, right, top, bottom)),)


@writes_into
def patch_add(ins, ps, attrs, out=(None, None)):
    """A + B with B's windows placed inside A's (attrs pad, as patch_pad's): where a value's
    consumers reach it with windows of different extents. Adds B into its place only (a
    copy of A and a sum over B's windows: 1.5x faster than padding B and adding).

    In a sound_fp plan (attrs fp; every sum of two contributions, with or without padding)
    the inputs are (A, B, bias, the value's interval[, neurons]) and the bias also takes the
    sum's rounding, u |A + B| max|x| over each row's window (fp_widen, as linear.accumulate
    on a dense A): a second result."""
    a, b = ins[:2]
    top, _, left, _ = attrs["pad"]
    dest = shaped(out[0], a.shape)
    dest = a.clone() if dest is None else dest.copy_(a)
    dest[..., top:top + b.shape[-2], left:left + b.shape[-1]] += b
    if not attrs.get("fp"):
        return (dest,)
    bias, s = ins[2:4]
    e = unit_roundoff(dest.dtype) * magnitude(s)
    return dest, fp_widen(dest, bias, e, selected_neurons(ins, 4, attrs, a), attrs)


def patch_concretize(ins, ps, attrs):
    """stack(lower, upper) of the rows over the input box read at their windows (sound_fp: as
    linear.concretize, the sums' rounding subtracted and the result rounded outward)."""
    a, bias, box = ins[:3]
    k = a.shape[1] // 2
    lo, hi = unit_lead(box, 2)
    idx = selected_neurons(ins, 3, attrs, a)
    groups = shared_windows(idx, attrs)
    # centre and radius (and the magnitude) on the box, then read at the windows: the same
    # values as computed on the windows (zeros outside give zeros), at a fraction of the work
    per_box = [(hi + lo) / 2, (hi - lo) / 2] + ([torch.maximum(lo.abs(), hi.abs())] if attrs.get("fp") else [])
    c, r, *m = windows(torch.stack(per_box), None if groups > 1 else idx, attrs,
                       a.shape[-2], a.shape[-1]).flatten(3)                  # [B, k / groups, C ph pw] each
    a = a.unflatten(1, (2 * groups, k // groups)).flatten(3)                # [B, 2 groups, k / groups, C ph pw]
    a_abs = a.abs()
    shape = (a.shape[0], 2, k)
    mid = row_dots(a, c).reshape(shape) + bias.unflatten(1, (2, k))           # [B, 2, k]
    rad = row_dots(a_abs, r).reshape(shape)
    lower, upper = mid[:, 0] - rad[:, 0], mid[:, 1] + rad[:, 1]
    if attrs.get("fp"):
        n = a.shape[-1] + 4
        err = row_dots(a_abs, m[0]).reshape(shape) + bias.unflatten(1, (2, k)).abs()
        err = 2 * gamma(n, a.dtype) * err + slack(n, a.dtype)
        lower, upper = down(lower - err[:, 0]), up(upper + err[:, 1])
    return (torch.stack((lower, upper)),)


RULES = {"patch_start_onehot": patch_start_onehot, "patch_pad": patch_pad, "patch_add": patch_add,
         "patch_concretize": patch_concretize}
