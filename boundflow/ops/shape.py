"""Ops that only move values: reshape (attrs shape: the full per-region target shape), transpose
(attrs perm over per-region axes), concat (attrs axis, per-region, non-negative). Their rules are
exact (no rounding, no fp kernel); reshapes may return views."""
from __future__ import annotations

import torch

from boundflow.ops.registry import Op, register


def _reshape_forward(x, attrs):
    return x.reshape((x.shape[0],) + tuple(attrs["shape"]))


def _reshape_interval(ins, ps, attrs):
    (s,) = ins
    return (s.reshape(tuple(s.shape[:2]) + tuple(attrs["shape"])),)


def _reshape_backward(ins, ps, attrs):
    a, bias = ins
    return a.reshape(tuple(a.shape[:2]) + tuple(attrs["in_shape"])), bias


def _transpose_forward(x, attrs):
    return x.permute((0,) + tuple(p + 1 for p in attrs["perm"]))


def _transpose_interval(ins, ps, attrs):
    return (ins[0].permute((0, 1) + tuple(p + 2 for p in attrs["perm"])),)


def _transpose_backward(ins, ps, attrs):
    a, bias = ins
    inverse = [0] * len(attrs["perm"])
    for i, p in enumerate(attrs["perm"]):
        inverse[p] = i
    return a.permute((0, 1) + tuple(i + 2 for i in inverse)), bias


def _concat_forward(*xs, attrs):
    return torch.cat(xs, dim=attrs["axis"] + 1)


def _concat_interval(ins, ps, attrs):
    return (torch.cat(ins, dim=attrs["axis"] + 2),)


def _concat_backward(ins, ps, attrs):
    """A split back into the inputs' parts (attrs sizes: each input's extent along the axis)."""
    a, bias = ins
    parts = torch.split(a, attrs["sizes"], dim=attrs["axis"] + 2)
    return (*parts, bias)


def _concat_attrs(graph, node) -> dict:
    return {"sizes": [graph.shape(i)[node.attrs["axis"]] for i in node.inputs]}


RESHAPE = register(Op("reshape", _reshape_forward, _reshape_interval, _reshape_backward, coordinatewise=True,
                      aliasing=frozenset({"interval.reshape", "linear.reshape"})))
TRANSPOSE = register(Op("transpose", _transpose_forward, _transpose_interval, _transpose_backward,
                        coordinatewise=True,
                        aliasing=frozenset({"interval.transpose", "linear.transpose"})))
CONCAT = register(Op("concat", _concat_forward, _concat_interval, _concat_backward, backward_attrs=_concat_attrs,
                     aliasing=frozenset({"linear.concat"})))
