"""add: y = x1 + x2, two variable tensors of the same shape. A backward pass hands the same A to
both inputs (no kernel)."""
from __future__ import annotations

from boundflow.domains import fp
from boundflow.domains.rounding import magnitude, unit_roundoff
from boundflow.ops.registry import Op, register


def forward(x, y, attrs=None):
    return x + y


def interval(ins, ps, attrs):
    return (ins[0] + ins[1],)


def fp_error(ins, ps, attrs):
    """The rounding of l1 + l2 and u1 + u2 (the backward pass adds nothing)."""
    s1, s2, raw = ins
    return fp.finish(raw, unit_roundoff(s1.dtype) * (magnitude(s1) + magnitude(s2)), attrs["n"])


ADD = register(Op("add", forward, interval, None, fp_error, fp_params=fp.weights, fp32=True,
                  error_of_inputs=True))
