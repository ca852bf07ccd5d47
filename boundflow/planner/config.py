"""Planner configuration. Every field appears in the plan's config_dump."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from boundflow.errors import DeviceError

CROWN_INTERM_MODES = ("sparse", "intersect", "pure")
FP_DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class PlannerConfig:
    # CROWN intermediate bounds of each ReLU input. All start from a one-step interval bound.
    #  "sparse"    auto_LiRPA's default: neurons the interval leaves unstable get their CROWN
    #              bound instead (every neuron when more than dense_fraction are unstable)
    #  "intersect" CROWN for the unstable neurons, intersected with the interval. Tighter
    #              intermediate bounds, but CROWN is not monotone in them (the adaptive lower
    #              slope can flip), so the output is usually, not always, tighter
    #  "pure"      textbook CROWN: every neuron's bound is its back-substitution bound (the
    #              inputs of other relaxed ops, whose lines need their domain, still intersect)
    crown_interm: str = "sparse"
    dense_fraction: float = 0.9
    # a relaxed op's input that is itself a relaxed op's output (a ReLU before a max pool) gets
    # a CROWN pass of its own only up to this many neurons (every neuron is refined there)
    refine_relaxed_outputs: int = 4096
    # start a CROWN pass on a conv output by gathering rows of the conv's dense matrix (made once
    # at plan time) when that matrix takes at most this many bytes; else one-hot + conv backward
    dense_conv_start_bytes: int = 64 << 20
    # a dense CROWN pass goes back through a conv as one product with the conv's dense matrix
    # when that matrix takes at most this many bytes (small images: the transposed conv's fixed
    # cost dominates there); float32 plans only (sound_fp plans keep the conv's error rules)
    dense_conv_backward_bytes: int = 512 << 10
    # refinement passes on a conv output through a plain conv/relu chain keep A as receptive-
    # field windows ("patches") instead of whole values
    patches: bool = True
    # partitioning: split tasks larger than this many ops; then split until at least min_tasks
    max_ops_per_task: int | None = None
    min_tasks: int = 1
    # layout: fold transposes into neighbouring linear ops / reshapes where exact (passes/layout.py)
    fold_layout: bool = True
    # storage: let buffers with disjoint lifetimes share arena bytes
    enable_storage_reuse: bool = True
    alignment: int = 64
    # order ops to lower the planned peak where the dependences leave a choice
    memory_aware_order: bool = True
    # also output the final interval of every ReLU input, as Role("interm", <value>) (ReLU branch
    # and bound starts from them)
    export_intermediate: bool = False
    # beta-crown (ReLU branch and bound) re-tightens the given intermediate bounds of this
    # many neurons per relaxed op's input (after the first) and domain, which it selects
    # (inputs Role("refine", <value>), [B, k] flat indices): a CROWN pass each, from the bounds
    # before it, intersected with the given ones (the domain's split constraints reach the
    # later layers); the re-tightened bounds are also outputs Role("interm", <value>). 0: none
    split_refine: int = 0
    # prove the storage plan safe (no live buffers sharing bytes) before returning it
    verify: bool = True
    # bounds sound in floating point, not only in real arithmetic: every op's rounding error
    # (and its constants' error bounds) added outward (domains/fp.py); no patches
    sound_fp: bool = False
    # the float type a sound_fp plan computes in: "float64" (any op; the error terms vanish
    # next to the bounds) or "float32" (about 1.7x as fast, the error terms larger; only ops
    # whose error rules are written for it: Op.fp32)
    fp_dtype: str = "float64"
    # the torch device the plan's parameters, arenas and kernels live on (any torch device;
    # users pick it through api.bound's device, which also resolves "auto")
    device: str = "cpu"

    def __post_init__(self):
        try:
            device = str(torch.device(self.device))
        except (RuntimeError, TypeError):
            raise DeviceError(f"unknown device {self.device!r}") from None
        object.__setattr__(self, "device", device)
        if self.crown_interm not in CROWN_INTERM_MODES:
            raise ValueError(f"crown_interm must be one of {CROWN_INTERM_MODES}, got {self.crown_interm!r}")
        if self.max_ops_per_task is not None and self.max_ops_per_task < 1:
            raise ValueError("max_ops_per_task must be >= 1")
        if self.split_refine < 0:
            raise ValueError("split_refine must be >= 0")
        if self.fp_dtype not in FP_DTYPES:
            raise ValueError(f"fp_dtype must be one of {FP_DTYPES}, got {self.fp_dtype!r}")
        if self.min_tasks < 1:
            raise ValueError("min_tasks must be >= 1")

    def dump(self) -> dict:
        return asdict(self)
