"""Linear (CROWN) backward rules.

A backward pass bounds S linear functions of a target value. Its state is one coefficient tensor
A of shape [B, 2S, *value_shape] (rows 0..S-1 build the lower bounds, rows S..2S-1 the upper
bounds; keeping both in one tensor halves the kernel calls) and a bias [B, 2S]. A pass with
attrs["lower_only"] (branch and bound needs lower bounds only) keeps just the S lower rows, at
half the cost; its upper bounds come out as +inf. Each rule maps
(A on an op's output, bias) to A on its variable inputs and the new bias. Rules return fresh
tensors, never views of their inputs, unless listed in ALIASING_KERNELS (the storage plan lets
outputs take the bytes of inputs that die at the op).
Kernel signature, shared by every domain: fn(inputs, params, attrs) -> tuple of tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from boundflow.domains.rounding import down, gamma, magnitude, slack, unit_roundoff, up


def _sum_lead(a: torch.Tensor, keep: int) -> torch.Tensor:
    """Sum A [B, 2S, ...] over every per-region axis except the last `keep` ones."""
    kept = tuple(a.shape[a.dim() - keep:])
    lead = 1
    for d in a.shape[2:a.dim() - keep]:
        lead *= d
    return a.reshape(tuple(a.shape[:2]) + (lead,) + kept).sum(2)


# -- starting a pass -------------------------------------------------------------------------

def start_spec(ins, ps, attrs):
    """A = C on the output value (identity when there is no C)."""
    batch, shape = attrs["batch"], tuple(attrs["shape"])
    if ins:
        (c,) = ins                                               # [B, S, O]
        a = c.reshape((batch, c.shape[1]) + shape)
    else:
        n = attrs["numel"]
        a = torch.eye(n, dtype=_dtype(attrs)).reshape((1, n) + shape).expand((batch, n) + shape)
    if not attrs.get("lower_only"):
        a = torch.cat([a, a], dim=1)
    return a, torch.zeros(batch, a.shape[1], dtype=a.dtype)


def start_onehot(ins, ps, attrs):
    """A = the selected rows of the identity on the target value (all rows without an index)."""
    batch, shape, n = attrs["batch"], tuple(attrs["shape"]), attrs["numel"]
    idx = ins[0] if ins else torch.arange(n)
    k = idx.numel()
    a = torch.zeros(batch, 2 * k, n, dtype=_dtype(attrs))
    rows = torch.arange(2 * k)
    a[:, rows, idx.repeat(2)] = 1.0
    return a.reshape((batch, 2 * k) + shape), torch.zeros(batch, 2 * k, dtype=a.dtype)


def start_rows(ins, ps, attrs):
    """Fused start + backward through the target's producer, when that op is a matrix on its
    flattened input (a linear over unit leading axes, or a conv given as its dense matrix):
    A on the input is just the selected rows of the matrix. In a sound_fp plan the last input
    is the producer's error vector (domains/fp.py): with one-hot rows, each row's bound takes
    the error of its own neuron."""
    w, b = ps
    batch, in_shape = attrs["batch"], tuple(attrs["in_shape"])
    sel = ins[:-1] if attrs.get("fp") else ins
    if sel:
        (idx,) = sel
        w, b = w.index_select(0, idx), b.index_select(0, idx)
    a = torch.cat([w, w], 0)
    bias = torch.cat([b, b], 0)
    s2 = a.shape[0]
    a = a.reshape((1, s2) + in_shape).expand((batch, s2) + in_shape)
    bias = bias.unsqueeze(0).expand(batch, s2)
    if attrs.get("fp"):
        e = ins[-1].flatten(1)
        if sel:
            e = e.index_select(1, sel[0])
        k = e.shape[1]
        bias = torch.cat([down(bias[:, :k] - e), up(bias[:, k:] + e)], 1)
    return a, bias


# -- backward rules, keyed by primal op ------------------------------------------------------

def _linear(ins, ps, attrs):
    a, bias = ins
    w, b = ps
    return torch.matmul(a, w), bias + torch.matmul(_sum_lead(a, 1), b)


def _conv2d(ins, ps, attrs):
    a, bias = ins
    w, b = ps
    c_in, h, wd = attrs["in_shape"][-3:]
    top, left, bottom, right = attrs["padding"]
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    c_out, h_out, w_out = a.shape[-3:]
    kh, kw = w.shape[-2:]
    # output_padding recovers the padded input extent that the strided conv did not reach
    op_h = h + top + bottom - ((h_out - 1) * sh + dh * (kh - 1) + 1)
    op_w = wd + left + right - ((w_out - 1) * sw + dw * (kw - 1) + 1)
    lead = tuple(a.shape[:-3])
    x = F.conv_transpose2d(a.reshape(-1, c_out, h_out, w_out), w, None, stride=(sh, sw),
                           output_padding=(op_h, op_w), groups=attrs["groups"], dilation=(dh, dw))
    x = x[:, :, top:top + h, left:left + wd]
    new_bias = bias.clone() if b is None else bias + _sum_lead(a, 3).sum((-1, -2)) @ b
    return x.reshape(lead + (c_in, h, wd)), new_bias


def _affine(ins, ps, attrs):
    a, bias = ins
    scale, shift = ps
    return a * scale, bias + (a * shift).flatten(2).sum(-1)


def _halves(a: torch.Tensor, attrs) -> int:
    """The number of lower rows of A: all of them in a lower-only pass, else half."""
    return a.shape[1] if attrs.get("lower_only") else a.shape[1] // 2


def _dtype(attrs) -> torch.dtype:
    return torch.float64 if attrs.get("dtype") == "float64" else torch.float32


def fp_widen(a_mag: torch.Tensor, bias: torch.Tensor, e: torch.Tensor, attrs) -> torch.Tensor:
    """The bias after an op of a sound_fp plan, widened by the rounding error the op made: row r
    takes sum_j a_mag_rj e_j (a_mag = |A| on the op's output, e its error vector) and the
    rounding of the bias update itself, lower rows down and upper rows up (domains/fp.py)."""
    err = torch.bmm(a_mag.flatten(2), e.flatten(1).unsqueeze(-1)).squeeze(-1)
    u = unit_roundoff(bias.dtype)
    err = 2 * (err + u * bias.abs()) + slack(e[0].numel() + 2, bias.dtype)
    s = _halves(a_mag, attrs)
    return torch.cat([down(bias[:, :s] - err[:, :s]), up(bias[:, s:] + err[:, s:])], 1)


def _sound(rule, magnitude_of=lambda ins: ins[0].abs()):
    """The backward rule `rule`; in a sound_fp plan (attrs "fp") its last input is the op's error
    vector and the new bias is widened by it (fp_widen). `magnitude_of(ins)` bounds |A| as the
    op's arithmetic sees it."""
    def kernel(ins, ps, attrs):
        if not attrs.get("fp"):
            return rule(ins, ps, attrs)
        ins, e = ins[:-1], ins[-1]
        *a_new, bias = rule(ins, ps, attrs)
        return (*a_new, fp_widen(magnitude_of(ins), bias, e, attrs))
    kernel.__doc__ = rule.__doc__
    return kernel


def _relu_alpha_magnitude(ins):
    """|A| plus the split multipliers that relu_alpha adds to it (beta-CROWN)."""
    beta = ins[4] if len(ins) > 4 else None
    return ins[0].abs() if beta is None else ins[0].abs() + beta.abs()


def _relu_back(a, bias, up_slope, up_bias, lo_slope_l, lo_slope_u, lower_only=False):
    """Lower rows: positive coefficients take the lower line, negative ones the upper line;
    upper rows the other way round. Slopes broadcast against A's halves."""
    ub = up_bias.flatten(2).transpose(1, 2)                                   # [B, N, 1]
    if lower_only:
        out = a * torch.where(a >= 0, lo_slope_l, up_slope)
        return out, bias + torch.bmm(a.clamp(max=0).flatten(2), ub).squeeze(-1)
    s = a.shape[1] // 2
    a_lo, a_up = a[:, :s], a[:, s:]
    out = torch.cat([a_lo * torch.where(a_lo >= 0, lo_slope_l, up_slope),
                     a_up * torch.where(a_up >= 0, up_slope, lo_slope_u)], 1)
    # intercepts: only the upper line has one; it enters where the upper line was taken
    bias_lo = torch.bmm(a_lo.clamp(max=0).flatten(2), ub).squeeze(-1)
    bias_up = torch.bmm(a_up.clamp(min=0).flatten(2), ub).squeeze(-1)
    return out, bias + torch.cat([bias_lo, bias_up], 1)


def _relu(ins, ps, attrs):
    a, bias, relax = ins
    up_slope, up_bias, lo_slope = relax.unsqueeze(2)       # each [B, 1, ...]
    return _relu_back(a, bias, up_slope, up_bias, lo_slope, lo_slope, attrs.get("lower_only", False))


def _relu_alpha(ins, ps, attrs):
    """As _relu, but the lower line of each unstable neuron has slope alpha (in [0, 1]), one per
    row of A: alpha-CROWN. Stable neurons keep their exact line. Without alpha (None), CROWN's
    adaptive slopes: that first run tells the optimiser the shapes and starting slopes.

    An optional fifth input m (beta-CROWN, [B, 2S, *shape] like alpha, or None) holds the
    split constraints' multipliers times their signs: m = beta * s with beta >= 0 and s = +1
    for a neuron split active (z >= 0), -1 inactive (z <= 0), 0 unsplit. On the domain
    s z >= 0, so the lower rows may subtract beta s z and the upper rows add it (a Lagrangian
    relaxation of the split constraints; sound for any beta >= 0)."""
    a, bias, relax, alpha = ins[:4]
    beta = ins[4] if len(ins) > 4 else None
    if alpha is None:
        out, bias = _relu(ins[:3], ps, attrs)
    else:
        up_slope, up_bias, lo_slope = relax.unsqueeze(2)
        lo_slope = torch.where(up_bias > 0, alpha, lo_slope)   # up_bias > 0 exactly when l < 0 < u
        s = _halves(a, attrs)
        out, bias = _relu_back(a, bias, up_slope, up_bias, lo_slope[:, :s], lo_slope[:, s:],
                               attrs.get("lower_only", False))
    if beta is not None:
        s = _halves(a, attrs)
        out = torch.cat([out[:, :s] - beta[:, :s], out[:, s:] + beta[:, s:]], 1)
    return out, bias


def _reshape(ins, ps, attrs):
    a, bias = ins
    return a.reshape(tuple(a.shape[:2]) + tuple(attrs["in_shape"])), bias


def _transpose(ins, ps, attrs):
    a, bias = ins
    inverse = [0] * len(attrs["perm"])
    for i, p in enumerate(attrs["perm"]):
        inverse[p] = i
    return a.permute((0, 1) + tuple(i + 2 for i in inverse)), bias


def _concat(ins, ps, attrs):
    a, bias = ins
    parts = torch.split(a, attrs["sizes"], dim=attrs["axis"] + 2)
    return (*parts, bias)


def accumulate(ins, ps, attrs):
    """A value read by several ops gets the sum of their coefficients. In a sound_fp plan the
    inputs are (A1, A2, bias, interval of the value) and the bias also takes the sum's rounding,
    u |A| max|x| per row."""
    if not attrs.get("fp"):
        return (ins[0] + ins[1],)
    a1, a2, bias, s = ins
    a = a1 + a2
    return a, fp_widen(a.abs(), bias, unit_roundoff(a.dtype) * magnitude(s), attrs)


def concretize(ins, ps, attrs):
    """stack(lower, upper) of A x + bias over the input box: A c -/+ |A| r. In a sound_fp plan
    the sums' rounding (and that of c and r) is subtracted, gamma(n) (|A| max|x| + |bias|), and
    the result rounded outward."""
    a, bias, box = ins
    s = _halves(a, attrs)
    a = a.flatten(2)
    lo, hi = box.flatten(2)
    c = ((hi + lo) / 2).unsqueeze(-1)
    r = ((hi - lo) / 2).unsqueeze(-1)
    mid = torch.bmm(a, c).squeeze(-1) + bias
    rad = torch.bmm(a.abs(), r).squeeze(-1)
    lower, upper = mid[:, :s] - rad[:, :s], mid[:, s:] + rad[:, s:]
    if attrs.get("fp"):
        n = a.shape[-1] + 4
        err = torch.bmm(a.abs(), magnitude(box).flatten(1).unsqueeze(-1)).squeeze(-1) + bias.abs()
        err = 2 * gamma(n, a.dtype) * err + slack(n, a.dtype)
        lower, upper = down(lower - err[:, :s]), up(upper + err[:, s:])
    return (_sides(lower, upper),)


def _sides(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """stack(lower, upper); upper = +inf after a lower-only pass (upper is then empty)."""
    return torch.stack((lower, upper if upper.shape[1] else torch.full_like(lower, torch.inf)))


def concretize_const(ins, ps, attrs):
    """A pass that never reached the input: the bound is the bias alone."""
    (bias,) = ins
    s = bias.shape[1] if attrs.get("lower_only") else bias.shape[1] // 2
    return (_sides(bias[:, :s], bias[:, s:]),)


# -- patches: refinement passes on conv outputs ------------------------------------------------
#
# A CROWN pass that bounds neurons of a conv output through a chain conv -> relu -> ... -> conv
# -> input only ever touches a window of each intermediate value: the neuron's receptive
# field. Patches keep A as that window, [B, 2k, C, ph, pw] (one window per row; rows 0..k-1
# lower, k..2k-1 upper, for the neurons idx), instead of the whole value. The window of row r
# starts at (i_r * S - P, j_r * T - Q), with (i_r, j_r) the neuron's position in the target and
# (S, T, P, Q) the chain's cumulative strides and paddings (attrs "grid"): it only depends on
# idx. Positions outside a value are its conv's zero padding: the windows of the relaxation and
# of the box are read with zeros there, which zeroes A (and its contribution) exactly.

def selected_neurons(ins: list, at: int, attrs) -> torch.Tensor:
    """The target neurons of a patch pass: the index input, or every neuron without one."""
    return ins[at] if len(ins) > at else torch.arange(math.prod(attrs["target"]))


def patch_margins(attrs, h: int, w: int, ph: int, pw: int) -> tuple[int, int, int, int]:
    """Zero padding (top, bottom, left, right) of an h x w value so that every window of size
    ph x pw the target's neurons can have lies inside: origins run over i S - P, i < H_t."""
    _, ht, wt = attrs["target"]
    s, t, p, q = attrs["grid"]
    return max(0, p), max(0, (ht - 1) * s - p + ph - h), max(0, q), max(0, (wt - 1) * t - q + pw - w)


def _windows(x: torch.Tensor, idx: torch.Tensor, attrs, ph: int, pw: int) -> torch.Tensor:
    """x [..., C, H, W] read at the windows of the neurons idx [k] (size ph x pw, zeros outside):
    [..., k, C, ph, pw]."""
    h, w = x.shape[-2:]
    mt, mb, ml, mr = patch_margins(attrs, h, w, ph, pw)
    _, ht, wt = attrs["target"]
    s, t, p, q = attrs["grid"]
    pix = idx % (ht * wt)
    top, left = (pix // wt) * s - p + mt, (pix % wt) * t - q + ml
    xp = F.pad(x, (ml, mr, mt, mb))
    rows = top[:, None, None] + torch.arange(ph)[None, :, None]
    cols = left[:, None, None] + torch.arange(pw)[None, None, :]
    return xp[..., rows, cols].movedim(-4, -3)


def _unit_lead(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Drop the model's unit batch axis of a [..., 1, C, H, W] tensor with `dims` leading axes."""
    return x.flatten(dims, dims + 1) if x.dim() == dims + 4 else x


def patch_start(ins, ps, attrs):
    """The selected neurons' rows of the target conv: its kernel, as a window on its input. In
    a sound_fp plan the last input is the conv's error vector: each row's bound takes its own
    neuron's error (as start_rows)."""
    sel, e = (ins[:-1], ins[-1]) if attrs.get("fp") else (ins, None)
    idx = selected_neurons(sel, 0, attrs)
    w, b = ps
    c = (idx // (attrs["target"][1] * attrs["target"][2])).repeat(2)
    a = w[c].unsqueeze(0).expand((attrs["batch"],) + (c.numel(),) + tuple(w.shape[1:]))
    bias = (torch.zeros(c.numel(), dtype=w.dtype) if b is None else b[c]).unsqueeze(0).expand(attrs["batch"], -1)
    if e is not None:
        e = e.flatten(1)[:, idx]
        bias = torch.cat([down(bias[:, :len(idx)] - e), up(bias[:, len(idx):] + e)], 1)
    return a, bias


def _patch_fp_widen(a: torch.Tensor, bias: torch.Tensor, e: torch.Tensor, idx: torch.Tensor, attrs) -> torch.Tensor:
    """fp_widen on windows: row r takes sum |A_r| e over its neuron's window of the op's error
    vector e (zeros outside the value, where A is zero too)."""
    k = a.shape[1] // 2
    win = _windows(_unit_lead(e, 1), idx, attrs, a.shape[-2], a.shape[-1]).unsqueeze(1)   # [B, 1, k, C, ph, pw]
    err = (a.unflatten(1, (2, k)).abs() * win).flatten(3).sum(-1).flatten(1)
    u = unit_roundoff(bias.dtype)
    err = 2 * (err + u * bias.abs()) + slack(math.prod(a.shape[2:]) + 2, bias.dtype)
    return torch.cat([down(bias[:, :k] - err[:, :k]), up(bias[:, k:] + err[:, k:])], 1)


def _patch_relax(relax: torch.Tensor, idx: torch.Tensor, attrs, a: torch.Tensor) -> torch.Tensor:
    """The relaxation at each neuron's window: [3, B, 1, k, C, ph, pw] (broadcasts over halves)."""
    return _windows(_unit_lead(relax, 2), idx, attrs, a.shape[-2], a.shape[-1]).unsqueeze(2)


def _patch_relu_back(a, bias, win, alpha=None):
    """_relu_back on windows; alpha [B, 2k, C, ph, pw] replaces the lower slope of unstable
    neurons (patch_relu_alpha), one per row as in _relu_alpha."""
    k = a.shape[1] // 2
    up_slope, up_bias, lo_slope = win                    # each [B, 1, k, C, ph, pw]
    a = a.unflatten(1, (2, k))
    if alpha is not None:
        lo_slope = torch.where(up_bias > 0, alpha.unflatten(1, (2, k)), lo_slope)
    lower = torch.tensor([True, False]).reshape(1, 2, 1, 1, 1, 1)
    slope = torch.where(a >= 0, torch.where(lower, lo_slope, up_slope), torch.where(lower, up_slope, lo_slope))
    chosen = torch.where(lower, a.clamp(max=0), a.clamp(min=0))
    extra = (chosen * up_bias).flatten(3).sum(-1).flatten(1)
    return (a * slope).flatten(1, 2), bias + extra


def patch_relu(ins, ps, attrs):
    """_relu_back on windows: each row reads the relaxation at its neuron's window. In a
    sound_fp plan the last input is the ReLU's error vector (_patch_fp_widen)."""
    ins, e = (ins[:-1], ins[-1]) if attrs.get("fp") else (ins, None)
    a, bias, relax = ins[:3]
    idx = selected_neurons(ins, 3, attrs)
    out, new_bias = _patch_relu_back(a, bias, _patch_relax(relax, idx, attrs, a))
    return out, new_bias if e is None else _patch_fp_widen(a, new_bias, e, idx, attrs)


def patch_relu_alpha(ins, ps, attrs):
    """patch_relu with optimised lower slopes (alpha-CROWN); without them (None), CROWN's."""
    ins, e = (ins[:-1], ins[-1]) if attrs.get("fp") else (ins, None)
    a, bias, relax, alpha = ins[:4]
    idx = selected_neurons(ins, 4, attrs)
    out, new_bias = _patch_relu_back(a, bias, _patch_relax(relax, idx, attrs, a), alpha)
    return out, new_bias if e is None else _patch_fp_widen(a, new_bias, e, idx, attrs)


def patch_start_slopes(a: torch.Tensor, relax: torch.Tensor, idx: torch.Tensor, attrs) -> torch.Tensor:
    """CROWN's lower slopes at each row's window, shaped like alpha: alpha-CROWN's start."""
    lo_slope = _patch_relax(relax, idx, attrs, a)[2]    # [B, 1, k, C, ph, pw]
    return lo_slope.expand(a.unflatten(1, (2, a.shape[1] // 2)).shape).flatten(1, 2)


def patch_conv(ins, ps, attrs):
    """Back through a conv: the window grows to the kernel's reach (no cropping: what falls on
    the conv's padding is zeroed by the next window read). In a sound_fp plan the inputs end
    with the conv's error vector and the selected neurons (attrs "grid": the window geometry
    of A on the conv's output)."""
    a, bias = ins[:2]
    w, b = ps
    lead = a.shape[:2]
    x = F.conv_transpose2d(a.flatten(0, 1), w, None, stride=tuple(attrs["stride"]))
    new_bias = bias.clone() if b is None else bias + a.sum((-1, -2)) @ b
    if attrs.get("fp"):
        e, idx = ins[2], selected_neurons(ins, 3, attrs)
        new_bias = _patch_fp_widen(a, new_bias, e, idx, attrs)
    return x.reshape(lead + x.shape[1:]), new_bias


def patch_concretize(ins, ps, attrs):
    """stack(lower, upper) of the rows over the input box read at their windows."""
    a, bias, box = ins[:3]
    k = a.shape[1] // 2
    lo, hi = _windows(_unit_lead(box, 2), selected_neurons(ins, 3, attrs), attrs, a.shape[-2], a.shape[-1])
    c, r = ((hi + lo) / 2).unsqueeze(1), ((hi - lo) / 2).unsqueeze(1)      # [B, 1, k, C, ph, pw]
    a = a.unflatten(1, (2, k))
    mid = (a * c).flatten(3).sum(-1) + bias.unflatten(1, (2, k))          # [B, 2, k]
    rad = (a.abs() * r).flatten(3).sum(-1)
    lower, upper = mid[:, 0] - rad[:, 0], mid[:, 1] + rad[:, 1]
    if attrs.get("fp"):                  # as concretize: the sums' rounding, then outward
        n = math.prod(a.shape[3:]) + 4
        err = (a.abs() * torch.maximum(lo.abs(), hi.abs()).unsqueeze(1)).flatten(3).sum(-1) + bias.unflatten(1, (2, k)).abs()
        err = 2 * gamma(n, a.dtype) * err + slack(n, a.dtype)
        lower, upper = down(lower - err[:, 0]), up(upper + err[:, 1])
    return (torch.stack((lower, upper)),)


RULES = {
    "linear": _sound(_linear),
    "conv2d": _sound(_conv2d),
    "affine": _sound(_affine),
    "relu": _sound(_relu),
    "relu_alpha": _sound(_relu_alpha, _relu_alpha_magnitude),
    "reshape": _reshape,
    "transpose": _transpose,
    "concat": _concat,
    # "add" needs no kernel: both inputs receive the same A
    "start_spec": start_spec,
    "start_onehot": start_onehot,
    "start_rows": start_rows,
    "accumulate": accumulate,
    "concretize": concretize,
    "concretize_const": concretize_const,
    "patch_start": patch_start,
    "patch_relu": patch_relu,
    "patch_relu_alpha": patch_relu_alpha,
    "patch_conv": patch_conv,
    "patch_concretize": patch_concretize,
}
