"""Bound domains: the machinery each domain shares across ops. The ops' own rules live with
the ops (boundflow.ops, one module per op family); the kernels of both are gathered in
boundflow.ops.KERNELS.

concrete  evaluating a primal graph (the ops' forward rules), shape inference, validation
interval  IBP: centre/radius form, output intervals as bounds on C @ y
linear    CROWN backward passes: starting, summing fan-in, concretizing over the input box
patches   backward passes with A as receptive-field windows
bound     bookkeeping between domains (unstable neurons, merging bounds)
fp        floating-point error vectors of sound_fp plans (rounding.py: the error model)
"""
