"""Floating-point error vectors, for plans that are sound in floating point
(PlannerConfig(sound_fp=True); see domains/rounding.py for the error model).

For an op y = f(x) a sound plan computes once, from the interval bounds of its inputs, an error
vector e over y's shape, [B, *y] (its kernel "fp.<op>", defined with the op in boundflow.ops),
with two uses:

  forward   the rounded interval of y is widened by e, then rounded outward (`finish`);
  backward  a backward pass through the op with coefficients A on y adds at most
            sum_j |A_rj| e_j of rounding error to the bound of row r (linear.fp_widen).

e covers the rounding of the op's own arithmetic (gamma(n) |W| max|x| + gamma(n) |b|, with n at
least every dot-product length the op's forward and backward rules compute: `dot_length`), the
error bounds of its constants (Value.err: `weights`), and for a relaxed op (ReLU) the gap by
which the rounded relaxation may miss the function. Ops that only move values (reshape,
transpose, concat) make no error and have no fp kernel.
"""
from __future__ import annotations

import torch

from boundflow.domains.rounding import down, enclosed, gamma, rounded_up, slack, up
from boundflow.errors import UnsupportedOpError
from boundflow.ir.primal import Graph, Node


def widen(s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The interval s = stack(lower, upper) grown by e on both sides, rounded outward."""
    return torch.stack((down(s[0] - e), up(s[1] + e)))


def finish(raw: torch.Tensor | None, e: torch.Tensor, n: int):
    """(widened interval, e): e doubled for its own rounding, plus underflow slack; (None, e)
    without the raw interval (Op.error_of_inputs: the plan wants the error vector alone)."""
    e = 2 * e + slack(n, e.dtype)
    return (None if raw is None else widen(raw, e)), e


def weights(graph: Graph, node: Node, dtype: torch.dtype, n: int | None = None) -> list[torch.Tensor]:
    """Plan-time error weights of an op with constant operands: gamma(n) |p| + err(p) per
    constant p, n = dot_length unless the op knows a shorter bound; in a float32 plan p is
    also rounded to float32 (that rounding is added), and the weights are rounded up."""
    g = gamma(dot_length(graph, node) if n is None else n, dtype)
    names = [i for i in node.inputs if not graph.is_variable(i)]
    out = []
    for name in names:
        c = enclosed(graph, name)
        if not bool(torch.isfinite(c.err).all()):
            raise UnsupportedOpError(f"sound_fp: constant {name!r} of node {node.name!r} ({node.op}) was computed "
                                     "at import by an op whose rounding error has no known bound")
        cast = (c.value - c.value.to(dtype).to(torch.float64)).abs()      # exact in float64
        out.append(rounded_up(g * c.value.abs() + c.err + cast, dtype))
    return out


def dot_length(graph: Graph, node: Node) -> int:
    """An upper bound on the number of terms of any sum the op's rules compute per element:
    its largest constant's size (a weight's fan-in and fan-out alike) plus the output size
    (bias sums), plus a few."""
    out = graph.values[node.outputs[0]].type.numel
    consts = [graph.values[i].type.numel for i in node.inputs if not graph.is_variable(i)]
    return max(consts, default=0) + out + 4
