"""The machinery of CROWN backward passes, shared by every op (the ops' own backward rules live
in boundflow.ops).

A backward pass bounds S linear functions of a target value. Its state is one coefficient tensor
A of shape [B, 2S, *value_shape] (rows 0..S-1 build the lower bounds, rows S..2S-1 the upper
bounds; keeping both in one tensor halves the kernel calls) and a bias [B, 2S]. A pass with
attrs["lower_only"] (branch and bound needs lower bounds only) keeps just the S lower rows, at
half the cost; its upper bounds come out as +inf. An op's backward rule maps (A on the op's
output, bias) to A on its variable inputs and the new bias. Rules return fresh tensors, never
views of their inputs, unless listed in an op's `aliasing` (the storage plan lets outputs take
the bytes of inputs that die at the op).

Here: starting a pass (from C, from one-hot rows, from a matrix's rows), summing the A of a value
read by several ops, concretizing over the input box, and the sound_fp widening of the bias
(`fp_widen`, `sound`), which every op's backward rule gets through `sound`.
Kernel signature, shared by every domain: fn(inputs, params, attrs) -> tuple of tensors.
"""
from __future__ import annotations

import torch

from boundflow.domains import shaped, writes_into
from boundflow.domains.interval import to_cr
from boundflow.domains.rounding import down, gamma, magnitude, slack, unit_roundoff, up


def sum_lead(a: torch.Tensor, keep: int) -> torch.Tensor:
    """Sum A [B, 2S, ...] over every per-region axis except the last `keep` ones."""
    kept = tuple(a.shape[a.dim() - keep:])
    lead = 1
    for d in a.shape[2:a.dim() - keep]:
        lead *= d
    if lead == 1:                                   # nothing to sum (a dense pass: A [B, 2S, 1, ...])
        return a.reshape(tuple(a.shape[:2]) + kept)
    return a.reshape(tuple(a.shape[:2]) + (lead,) + kept).sum(2)


def halves(a: torch.Tensor, attrs) -> int:
    """The number of lower rows of A: all of them in a lower-only pass, else half."""
    return a.shape[1] if attrs.get("lower_only") else a.shape[1] // 2


def with_splits(a: torch.Tensor, m: torch.Tensor, s: int) -> torch.Tensor:
    """A with split multipliers m (beta-CROWN, see relu.backward_alpha): the lower rows (the
    first s) minus m, the upper rows plus m."""
    if s == a.shape[1]:                      # a lower-only pass: no copy into a new A
        return a - m
    return torch.cat([a[:, :s] - m[:, :s], a[:, s:] + m[:, s:]], 1)


def _dtype(attrs) -> torch.dtype:
    return torch.float64 if attrs.get("dtype") == "float64" else torch.float32


def _device(attrs) -> torch.device:
    """The plan's device, for a pass that starts from no tensor (no C, every neuron)."""
    return torch.device(attrs["device"])


# -- starting a pass -------------------------------------------------------------------------

@writes_into
def start_spec(ins, ps, attrs, out=(None, None)):
    """A = C on the output value (identity when there is no C)."""
    batch, shape = attrs["batch"], tuple(attrs["shape"])
    if ins:
        (c,) = ins                                               # [B, S, O]
        a = c.reshape((batch, c.shape[1]) + shape)
    else:
        n = attrs["numel"]
        a = torch.eye(n, dtype=_dtype(attrs), device=_device(attrs)).reshape((1, n) + shape).expand((batch, n) + shape)
    if not attrs.get("lower_only"):
        a = torch.cat([a, a], dim=1, out=out[0])
    bias = a.new_zeros(batch, a.shape[1]) if out[1] is None else shaped(out[1], (batch, a.shape[1])).zero_()
    return a, bias


def start_onehot(ins, ps, attrs):
    """A = the selected rows of the identity on the target value (all rows without an index;
    an index [B, k] selects per region)."""
    batch, shape, n = attrs["batch"], tuple(attrs["shape"]), attrs["numel"]
    idx = ins[0] if ins else torch.arange(n, device=_device(attrs))
    k = idx.shape[-1]
    a = torch.zeros(batch, 2 * k, n, dtype=_dtype(attrs), device=idx.device)
    if idx.dim() == 2:
        a.scatter_(2, idx.repeat(1, 2).unsqueeze(2), 1.0)
    else:
        a[:, torch.arange(2 * k, device=idx.device), idx.repeat(2)] = 1.0
    return a.reshape((batch, 2 * k) + shape), a.new_zeros(batch, 2 * k)


@writes_into
def start_rows(ins, ps, attrs, out=(None, None)):
    """Fused start + backward through the target's producer, when that op is a matrix on its
    flattened input (a linear over unit leading axes, or a conv given as its dense matrix):
    A on the input is just the selected rows of the matrix. In a sound_fp plan the last input
    is the producer's error vector (domains/fp.py): with one-hot rows, each row's bound takes
    the error of its own neuron."""
    w, b = ps
    batch, in_shape = attrs["batch"], tuple(attrs["in_shape"])
    sel = ins[:-1] if attrs.get("fp") else ins
    if sel and sel[0].dim() == 2:               # rows per region: [B, k]
        (idx,) = sel
        a = torch.cat([w[idx], w[idx]], 1).reshape((batch, 2 * idx.shape[1]) + in_shape)
        bias = torch.cat([b[idx], b[idx]], 1)
    else:
        if sel:
            w, b = w.index_select(0, sel[0]), b.index_select(0, sel[0])
        s2 = 2 * w.shape[0]
        if batch == 1 and not attrs.get("fp"):
            w, b = w.view((1, s2 // 2) + in_shape), b.view(1, s2 // 2)
            return torch.cat([w, w], 1, out=out[0]), torch.cat([b, b], 1, out=out[1])
        a = torch.cat([w, w], 0).reshape((1, s2) + in_shape).expand((batch, s2) + in_shape)
        bias = torch.cat([b, b], 0).unsqueeze(0).expand(batch, s2)
    if attrs.get("fp"):
        e = ins[-1].flatten(1)
        if sel:
            e = e.gather(1, sel[0]) if sel[0].dim() == 2 else e.index_select(1, sel[0])
        k = e.shape[1]
        bias = torch.cat([down(bias[:, :k] - e), up(bias[:, k:] + e)], 1)
    return a, bias


# -- floating-point soundness ------------------------------------------------------------------

def fp_widen(a_mag: torch.Tensor, bias: torch.Tensor, e: torch.Tensor, attrs) -> torch.Tensor:
    """The bias after an op of a sound_fp plan, widened by the rounding error the op made: row r
    takes sum_j a_mag_rj e_j (a_mag = |A| on the op's output, e its error vector) and the
    rounding of the bias update itself, lower rows down and upper rows up (domains/fp.py)."""
    err = torch.bmm(a_mag.flatten(2), e.flatten(1).unsqueeze(-1)).squeeze(-1)
    u = unit_roundoff(bias.dtype)
    err = 2 * (err + u * bias.abs()) + slack(e[0].numel() + 2, bias.dtype)
    s = halves(a_mag, attrs)
    return torch.cat([down(bias[:, :s] - err[:, :s]), up(bias[:, s:] + err[:, s:])], 1)


def sound(rule, magnitude_of=lambda ins: ins[0].abs()):
    """An op's backward rule `rule`; in a sound_fp plan (attrs "fp") its last input is the op's
    error vector and the new bias is widened by it (fp_widen). `magnitude_of(ins)` bounds |A|
    as the op's arithmetic sees it."""
    def kernel(ins, ps, attrs, out=None):
        if not attrs.get("fp"):
            return rule(ins, ps, attrs) if out is None else rule(ins, ps, attrs, out=out)
        ins, e = ins[:-1], ins[-1]
        *a_new, bias = rule(ins, ps, attrs)
        return (*a_new, fp_widen(magnitude_of(ins), bias, e, attrs))
    kernel.__doc__ = rule.__doc__
    return writes_into(kernel) if getattr(rule, "writes_into", False) else kernel


# -- fan-in and the end of a pass --------------------------------------------------------------

@writes_into
def accumulate(ins, ps, attrs, out=(None, None)):
    """A value read by several ops gets the sum of their coefficients. In a sound_fp plan the
    inputs are (A1, A2, bias, interval of the value) and the bias also takes the sum's rounding,
    u |A| max|x| per row."""
    if not attrs.get("fp"):
        return (torch.add(ins[0], ins[1], out=out[0]),)
    a1, a2, bias, s = ins
    a = a1 + a2
    return a, fp_widen(a.abs(), bias, unit_roundoff(a.dtype) * magnitude(s), attrs)


@writes_into
def concretize(ins, ps, attrs, out=(None,)):
    """stack(lower, upper) of A x + bias over the input box: A c -/+ |A| r. In a sound_fp plan
    the sums' rounding (and that of c and r) is subtracted, gamma(n) (|A| max|x| + |bias|), and
    the result rounded outward."""
    a, bias, box = ins
    s = halves(a, attrs)
    a = a.flatten(2)
    if box.shape[1] > 1 and box.stride(1) == 0:   # one box broadcast to every region: read once
        box = box[:, :1]
    c, r = to_cr(box.flatten(2)).unsqueeze(-1).unbind(0)
    mid = _dots(a, c) + bias
    rad = _dots(a.abs(), r)
    if not attrs.get("fp") and s * 2 == a.shape[1] and not rad.requires_grad:   # both halves in one addition
        rad[:, :s].neg_()                                # (exact: mid + (-rad) is mid - rad)
        two, dest = (a.shape[0], 2, s), shaped(out[0], (2, a.shape[0], s))
        if dest is None:
            return (torch.add(mid.view(two), rad.view(two)).transpose(0, 1).contiguous(),)
        torch.add(mid.view(two), rad.view(two), out=dest.transpose(0, 1))
        return (dest,)
    lower, upper = mid[:, :s] - rad[:, :s], mid[:, s:] + rad[:, s:]
    if attrs.get("fp"):
        n = a.shape[-1] + 4
        err = _dots(a.abs(), magnitude(box).flatten(1).unsqueeze(-1)) + bias.abs()
        err = 2 * gamma(n, a.dtype) * err + slack(n, a.dtype)
        lower, upper = down(lower - err[:, :s]), up(upper + err[:, s:])
    return (sides(lower, upper, out[0]),)


def _dots(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, S]: each row of a [B, S, n] times its region's v [B, n, 1], or times one v [1, n, 1]
    shared by every region (one product over all rows)."""
    return (torch.bmm(a, v) if v.shape[0] > 1 else torch.matmul(a, v[0])).squeeze(-1)


def sides(lower: torch.Tensor, upper: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """stack(lower, upper) (into out); upper = +inf after a lower-only pass (upper is then empty)."""
    return torch.stack((lower, upper if upper.shape[1] else torch.full_like(lower, torch.inf)), out=out)


def concretize_const(ins, ps, attrs):
    """A pass that never reached the input: the bound is the bias alone."""
    (bias,) = ins
    s = bias.shape[1] if attrs.get("lower_only") else bias.shape[1] // 2
    return (sides(bias[:, :s], bias[:, s:]),)


RULES = {
    "start_spec": start_spec,
    "start_onehot": start_onehot,
    "start_rows": start_rows,
    "accumulate": accumulate,
    "concretize": concretize,
    "concretize_const": concretize_const,
}
