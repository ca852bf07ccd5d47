"""The machinery of interval (IBP) bounds, shared by every op (the ops' own interval rules live
in boundflow.ops).

An interval lives in one tensor s = stack(lower, upper): [2, B, ...], so shape ops, ReLU and
additions are one kernel call each. Linear layers and convs use centre/radius form, W @ c and
|W| @ r, with |W| prepared once at plan time (at batch 1, small linear layers and large conv
kernels take a cheaper form: ops/linear.py, ops/conv.py). Centre and radius come from (lower, upper) by a 2x2
matmul with exact coefficients (1/2, 1), which rounds exactly like (u + l) / 2 and (u - l) / 2.

Here: the centre/radius conversions, and how the output interval becomes bounds on C @ y.
Kernel signature, shared by every domain: fn(inputs, params, attrs) -> tuple of tensors.
"""
from __future__ import annotations

import torch

from boundflow.domains import binds, fp, native, shaped
from boundflow.domains.rounding import gamma, magnitude, slack
from boundflow.runtime.device import constant

TO_CR = ((0.5, 0.5), (-0.5, 0.5))    # (l, u) -> (c, r)
FROM_CR = ((1.0, -1.0), (1.0, 1.0))  # (c, r) -> (l, u)


def to_cr(s: torch.Tensor) -> torch.Tensor:
    return torch.matmul(constant(TO_CR, s.dtype, s.device), s.reshape(2, -1)).view(s.shape)


def from_cr(s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(c, r) -> (l, u), into `out` (of s's shape) when given."""
    lu = torch.matmul(constant(FROM_CR, s.dtype, s.device), s.reshape(2, -1),
                      out=None if out is None else out.view(2, -1))
    return lu.view(s.shape) if out is None else out


def extremes(out: torch.Tensor | None, dims=0):
    """values -> stack(min, max) over `dims` (an axis or a tuple of them), written into the two
    halves of out, a kernel's planned view (cut here: a binder calls this once). Two reductions
    into place cost less than aminmax and a stack (this CPU: 2.2 against 3.5 us on [4, 8]), and
    autograd differentiates them on torch 2.11 too (not aminmax)."""
    if out is None or out.numel() == 0:              # (outside the arena, or a dynamic size)
        return lambda values: torch.stack((values.amin(dims), values.amax(dims)), out=out)
    lo, hi = out.unbind(0)

    def into(values: torch.Tensor) -> torch.Tensor:
        torch.amin(values, dims, out=lo)
        torch.amax(values, dims, out=hi)
        return out
    return into


@binds
def spec_linear(ins, ps, attrs, out=(None,)):
    """Output bounds of C @ linear(x), with C folded into the layer (C W, C b): tighter than
    bounding C @ box, and what auto_LiRPA does when the last op is linear. C: [B, S, O]. One
    region of a float32 CPU plan: one compiled loop (native.py), one call against ten."""
    s, C = ins
    w, b = ps
    if C.shape[0] == 1:
        loop = native.spec_interval_run(C[0], w, b, s.flatten(2), shaped(out[0], (2, 1, C.shape[1])))
        if loop is not None:
            return loop

    def run():
        c, r = to_cr(s.flatten(2))                                 # x: [B, in] (lead dims are 1)
        cw = torch.matmul(C, w)                                    # [B, S, in]
        mid = torch.bmm(cw, c.unsqueeze(-1)).squeeze(-1) + torch.matmul(C, b)
        rad = torch.bmm(cw.abs(), r.unsqueeze(-1)).squeeze(-1)
        return (torch.stack((mid - rad, mid + rad)),)
    return run


def spec_box(ins, ps, attrs):
    """Bounds of C @ y for y in a box: C+ lo + C- hi. In a sound_fp plan (attrs "fp") widened
    by the sums' rounding, gamma(n) |C| max|y|, and rounded outward."""
    s, C = ins
    lo, hi = s.flatten(2).unsqueeze(-1)
    pos, neg = C.clamp(min=0), C.clamp(max=0)
    out = torch.stack(((torch.bmm(pos, lo) + torch.bmm(neg, hi)).squeeze(-1),
                       (torch.bmm(pos, hi) + torch.bmm(neg, lo)).squeeze(-1)))
    if attrs.get("fp"):
        n = C.shape[-1] + 2
        err = torch.bmm(C.abs(), magnitude(s).flatten(1).unsqueeze(-1)).squeeze(-1)
        out = fp.widen(out, 2 * gamma(n, C.dtype) * err + slack(n, C.dtype))
    return (out,)


def flatten(ins, ps, attrs):
    return (ins[0].flatten(2),)


RULES = {"spec_linear": spec_linear, "spec_box": spec_box, "flatten": flatten}
ALIASING = frozenset({"interval.flatten"})
VIEWS = frozenset({"interval.flatten"})
