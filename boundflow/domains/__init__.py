"""Bound domains: the machinery each domain shares across ops. The ops' own rules live with
the ops (boundflow.ops, one module per op family); the kernels of both are gathered in
boundflow.ops.KERNELS.

concrete  evaluating a primal graph (the ops' forward rules), shape inference, validation
interval  IBP: centre/radius form, output intervals as bounds on C @ y
linear    CROWN backward passes: starting, summing fan-in, concretizing over the input box
patches   backward passes with A as receptive-field windows
bound     bookkeeping between domains (unstable neurons, merging bounds)
fp        floating-point error vectors of sound_fp plans (rounding.py: the error model)

Kernels that write their results into the planned views themselves are marked `writes_into`;
those made with `binds` are bound to their buffers once per plan, then run with nothing to find.
"""
import functools


def writes_into(kernel):
    """Marks a kernel that takes `out`, the planned views of its results (None for a result
    without one: a dynamic size, or a run outside the arena), and writes its results there
    instead of into fresh tensors, so the executor has nothing to copy: the memory plan is the
    allocation. Its results are live while it reads its inputs, so they never share bytes with
    them (planner/liveness.py)."""
    kernel.writes_into = True
    return kernel


def binds(bind=None, *, writes: bool = True):
    """A kernel made of `bind(ins, ps, attrs[, out]) -> run`: run() computes the results and
    returns them, into out when `writes` (a writing kernel, given out), else fresh (the executor
    copies them into the views). The executor binds an op whose buffers are all static once per
    plan and then calls only run(): what bind does (the branch a kernel takes, the views it cuts)
    is not paid per call, where a small net's IBP is mostly such Python. So bind may cut views
    of ins and out and read the params (constants), nothing that reads the values of ins: those
    change between runs."""
    if bind is None:
        return functools.partial(binds, writes=writes)

    def kernel(ins, ps, attrs, out=None):
        return (bind(ins, ps, attrs) if out is None else bind(ins, ps, attrs, out))()
    kernel.bind = bind
    kernel.__name__, kernel.__qualname__, kernel.__doc__ = bind.__name__, bind.__qualname__, bind.__doc__
    return writes_into(kernel) if writes else kernel


def nonnegative(constant) -> bool:
    """Whether every entry of a constant (a param a binder reads) is >= 0; False on the meta
    device, whose tensors have no values (the general rule then)."""
    return constant.device.type != "meta" and bool((constant >= 0).all())


def shaped(out, shape):
    """A writing kernel's destination for a result of `shape` that it fills piece by piece:
    its planned view, or, for a buffer of dynamic size (an empty view at its slot), that view
    grown to the shape; None outside the arena."""
    return out.resize_(shape) if out is not None and out.numel() == 0 else out
