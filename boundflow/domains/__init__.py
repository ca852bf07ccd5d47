"""Bound domains: one rule table per domain, keyed by op.

concrete  forward semantics of the primal ops (and, on meta tensors, their shape rule)
interval  IBP rules on (lower, upper)
linear    CROWN backward rules on linear coefficients
relu      the ReLU relaxation the linear rules use
bound     bookkeeping between domains (unstable neurons, merging bounds)
fp        floating-point error vectors of sound_fp plans (rounding.py: the error model)

KERNELS maps a TaskOp's op name "<domain>.<rule>" to its kernel fn(inputs, params, attrs).
Adding an op means adding its concrete rule, its interval rule and its linear rule.
"""
from boundflow.domains import bound, fp, interval, linear, relu

KERNELS = {f"{name}.{op}": fn
           for name, table in (("interval", interval.RULES), ("linear", linear.RULES),
                               ("relu", relu.RULES), ("bound", bound.RULES), ("fp", fp.RULES))
           for op, fn in table.items()}

# Kernels whose results may be views of their inputs (reshapes, splits). Every other kernel
# returns fresh tensors, so its outputs may take the bytes of inputs that die at that op.
ALIASING_KERNELS = frozenset({
    "interval.reshape", "interval.transpose", "interval.flatten",
    "linear.reshape", "linear.transpose", "linear.concat", "bound.replace",
})
