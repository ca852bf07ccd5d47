"""Interval (IBP) rules. An interval lives in one tensor s = stack(lower, upper): [2, B, ...],
so shape ops, ReLU and additions are one kernel call each.

Affine ops use centre/radius form, W @ c and |W| @ r, with |W| prepared once at plan time.
Centre and radius come from (lower, upper) by a 2x2 matmul with exact coefficients (1/2, 1),
which rounds exactly like (u + l) / 2 and (u - l) / 2.
Kernel signature, shared by every domain: fn(inputs, params, attrs) -> tuple of tensors.
"""
from __future__ import annotations

import torch

from boundflow.domains import fp
from boundflow.domains.concrete import conv2d
from boundflow.domains.rounding import gamma, magnitude, slack
from boundflow.ir.primal import Graph, Node

TO_CR = torch.tensor([[0.5, 0.5], [-0.5, 0.5]])    # (l, u) -> (c, r)
FROM_CR = torch.tensor([[1.0, -1.0], [1.0, 1.0]])  # (c, r) -> (l, u)


def to_cr(s: torch.Tensor) -> torch.Tensor:
    return torch.matmul(TO_CR.to(s.dtype), s.reshape(2, -1)).view(s.shape)


def from_cr(s: torch.Tensor) -> torch.Tensor:
    return torch.matmul(FROM_CR.to(s.dtype), s.reshape(2, -1)).view(s.shape)


def _linear(ins, ps, attrs):
    (s,) = ins
    w_cr, b_cr = ps                                   # [2, in, out], [2, 1, out]
    cr = to_cr(s)
    out = torch.baddbmm(b_cr, cr.reshape(2, -1, cr.shape[-1]), w_cr)
    return (from_cr(out).view(tuple(s.shape[:-1]) + (w_cr.shape[-1],)),)


def _conv2d(ins, ps, attrs):
    (s,) = ins
    w, w_abs, b = ps
    c, r = to_cr(s)
    return (from_cr(torch.stack((conv2d(c, w, b, attrs), conv2d(r, w_abs, None, attrs)))),)


def _affine(ins, ps, attrs):
    (s,) = ins
    scale, scale_abs, shift = ps
    c, r = to_cr(s)
    return (from_cr(torch.stack((c * scale + shift, r * scale_abs.expand_as(r)))),)


def _add(ins, ps, attrs):
    return (ins[0] + ins[1],)


def _relu(ins, ps, attrs):
    return (ins[0].clamp(min=0),)


def _reshape(ins, ps, attrs):
    (s,) = ins
    return (s.reshape(tuple(s.shape[:2]) + tuple(attrs["shape"])),)


def _transpose(ins, ps, attrs):
    return (ins[0].permute((0, 1) + tuple(p + 2 for p in attrs["perm"])),)


def _concat(ins, ps, attrs):
    return (torch.cat(ins, dim=attrs["axis"] + 2),)


def _spec_linear(ins, ps, attrs):
    """Output bounds of C @ linear(x), with C folded into the layer (C W, C b): tighter than
    bounding C @ box, and what auto_LiRPA does when the last op is linear. C: [B, S, O]."""
    s, C = ins
    w, b = ps
    c, r = to_cr(s.flatten(2))                                 # x: [B, in] (lead dims are 1)
    cw = torch.matmul(C, w)                                    # [B, S, in]
    mid = torch.bmm(cw, c.unsqueeze(-1)).squeeze(-1) + torch.matmul(C, b)
    rad = torch.bmm(cw.abs(), r.unsqueeze(-1)).squeeze(-1)
    return (torch.stack((mid - rad, mid + rad)),)


def _spec_box(ins, ps, attrs):
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


def _flatten(ins, ps, attrs):
    return (ins[0].flatten(2),)


RULES = {
    "linear": _linear,
    "conv2d": _conv2d,
    "affine": _affine,
    "add": _add,
    "relu": _relu,
    "reshape": _reshape,
    "transpose": _transpose,
    "concat": _concat,
    # not primal ops: how the output interval becomes bounds on C @ y
    "spec_linear": _spec_linear,
    "spec_box": _spec_box,
    "flatten": _flatten,
}


def prepare_params(graph: Graph, node: Node) -> list[torch.Tensor]:
    """Plan-time parameters of the interval rule of `node` (|W| computed here, once)."""
    ps = [graph.data(i) for i in node.inputs if not graph.is_variable(i)]
    if node.op == "linear":
        w = ps[0]
        b = ps[1] if len(ps) > 1 else torch.zeros(w.shape[0])
        return [torch.stack((w.t(), w.abs().t())), torch.stack((b, torch.zeros_like(b))).unsqueeze(1)]
    if node.op == "conv2d":
        return [ps[0], ps[0].abs(), ps[1] if len(ps) > 1 else None]
    if node.op == "affine":
        scale, shift = ps
        return [scale, scale.abs(), shift]
    return ps
