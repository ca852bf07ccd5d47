"""A VNNLIB property as a verification problem: input boxes, spec rows and the unsafe set.

Semantics (VNN-COMP). A property gives input boxes ``X_1 .. X_m`` and an unsafe set
``U = union_k {y : C_k y <= d_k}`` (a disjunct ``k`` is unsafe when *all* its rows hold). It
holds iff no input of any box reaches ``U``:

    holds  <=>  for every box b and every disjunct k:  {x in X_b : C_k f(x) <= d_k} is empty.

A disjunct is empty over a region as soon as *one* of its rows cannot be met anywhere in it:

    exists row i of k with  min_{x in region} (C_k f(x))_i > d_{k,i}.

With certified lower bounds ``lb_i <= min (C f(x))_i`` this is checked as ``lb_i > d_i``
(sufficient, not necessary: the bound may be loose, which is what branch and bound is for).
Conversely a point ``x`` in a box whose output meets every row of one disjunct, ``C_k f(x) <=
d_k``, is a counterexample: the property is violated.

Numerics, always erring on the safe side:

- boxes are rounded *outward* to float32 for bounding (the bounded region contains the real
  one) and *inward* for attacks (every point tried lies in the real box);
- a row is only proven when its lower bound clears the threshold by a float32 round-off
  tolerance, and a spec row that float32 cannot represent exactly is corrected by an interval
  bound on the outputs (see :meth:`Problem.row_lower_bounds`);
- a counterexample must meet its rows strictly (``C y < d``), which also covers VNNLIB's strict
  inequalities that the reader reads as non-strict.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from boundflow.frontends.vnnlib import VnnlibProperty, outward_float32

# A lower bound proves a row only if it clears the threshold by this much: float32 round-off
# in the bound computation must not turn an unproven row into a proven one.
ATOL = 1e-5
RTOL = 1e-5


def inward_float32(lower, upper) -> tuple[np.ndarray, np.ndarray]:
    """Round a float64 box to float32 without growing it: lower up, upper down.

    Where the box is thinner than a float32 step the result may be empty (lower > upper):
    no float32 input lies in the real box there.
    """
    lo64 = np.asarray(lower, dtype=np.float64)
    hi64 = np.asarray(upper, dtype=np.float64)
    lo = lo64.astype(np.float32)
    hi = hi64.astype(np.float32)
    lo = np.where(lo.astype(np.float64) < lo64, np.nextafter(lo, np.float32(np.inf)), lo)
    hi = np.where(hi.astype(np.float64) > hi64, np.nextafter(hi, np.float32(-np.inf)), hi)
    return lo.astype(np.float32), hi.astype(np.float32)


@dataclass
class Problem:
    """Everything the verifier needs from a property, as tensors.

    Boxes (``nb`` of them, flattened to ``n`` inputs):
      ``outer_lo/hi`` [nb, n] float32, rounded outward: the regions to bound;
      ``inner_lo/hi`` [nb, n] float32, rounded inward: where attacks search;
      ``box_lo/hi``   [nb, n] float64: the boxes as written, for checking counterexamples.
    Spec: ``C`` [S, O] float64, the unique rows of all disjuncts, and ``d`` [S] float64;
    ``members`` [K, S] bool: row i belongs to disjunct k.
    ``C_bound`` [S', O] float32 is what is handed to the bound computation: ``C`` rounded to
    float32, followed by the O identity rows when that rounding was inexact (see
    :meth:`row_lower_bounds`). ``spec`` and ``thresholds`` are ``C`` and ``d`` as float64
    tensors.

    The tensors live on one device (:meth:`to`), where the search runs; the numpy arrays stay
    on the CPU, for the onnxruntime check of counterexamples.
    """

    input_shape: tuple[int, ...]
    outer_lo: torch.Tensor
    outer_hi: torch.Tensor
    inner_lo: torch.Tensor
    inner_hi: torch.Tensor
    box_lo: np.ndarray
    box_hi: np.ndarray
    C: np.ndarray
    d: np.ndarray
    members: torch.Tensor
    C_bound: torch.Tensor
    spec: torch.Tensor
    thresholds: torch.Tensor

    def to(self, device) -> Problem:
        """The problem with its tensors on ``device``."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    @property
    def device(self) -> torch.device:
        return self.outer_lo.device

    @property
    def exact_lo(self) -> torch.Tensor:
        """[nb, n] float64: the boxes as written (sound bounds take them as they are)."""
        return torch.from_numpy(self.box_lo).to(self.device)

    @property
    def exact_hi(self) -> torch.Tensor:
        return torch.from_numpy(self.box_hi).to(self.device)

    @property
    def num_boxes(self) -> int:
        return self.outer_lo.shape[0]

    @property
    def num_inputs(self) -> int:
        return self.outer_lo.shape[1]

    @property
    def num_disjuncts(self) -> int:
        return self.members.shape[0]

    @property
    def num_rows(self) -> int:
        return self.C.shape[0]

    def restrict(self, box: int, disjunct: int) -> Problem:
        """The sub-problem of one box and one disjunct (its rows only): ReLU branch and bound
        proves the (box, disjunct) pairs one at a time, with a smaller spec."""
        mask = self.members[disjunct]
        rows = mask.cpu().numpy()
        C_bound = self.C_bound[: self.num_rows][mask]
        if self.C_bound.shape[0] > self.num_rows:           # keep the float32 correction rows
            C_bound = torch.cat([C_bound, self.C_bound[self.num_rows:]])
        pick = slice(box, box + 1)
        return Problem(self.input_shape, self.outer_lo[pick], self.outer_hi[pick], self.inner_lo[pick],
                       self.inner_hi[pick], self.box_lo[pick], self.box_hi[pick], self.C[rows], self.d[rows],
                       torch.ones(1, int(rows.sum()), dtype=torch.bool, device=self.device), C_bound,
                       self.spec[mask], self.thresholds[mask])

    # ---------------------------------------------------------------- proofs

    def row_lower_bounds(self, lb: torch.Tensor, ub: torch.Tensor,
                         outputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Sound lower bounds [B, S] (float64) of ``C f(x)`` from the bounds of ``C_bound f(x)``.

        When C is exact in float32 these are ``lb`` itself. Otherwise ``C = C32 + E`` and
        ``E f(x) >= -|E| max(|lb_y|, |ub_y|)``, with the output bounds ``lb_y, ub_y`` read
        from the identity rows appended to ``C_bound``, or taken from ``outputs`` ([B, O]
        each: any sound output bounds over the region, e.g. a parent box's).
        """
        lb = lb.detach().to(torch.float64)
        rows = lb[:, : self.num_rows]
        if self.C_bound.shape[0] == self.num_rows:
            return rows
        if outputs is None:
            outputs = lb[:, self.num_rows:], ub[:, self.num_rows:]
        y_lo, y_hi = (t.detach().to(torch.float64) for t in outputs)
        y_abs = torch.maximum(y_lo.abs(), y_hi.abs())
        err = (self.spec - self.C_bound[: self.num_rows].double()).abs()
        return rows - y_abs @ err.T

    def disjunct_margins(self, row_lb: torch.Tensor) -> torch.Tensor:
        """[B, K]: for each region and disjunct, ``max_{i in k} (lb_i - d_i - tol_i)``.

        A positive margin proves the disjunct unreachable over the region. ``tol_i`` is the
        float32 round-off allowance ``ATOL + RTOL * max(|lb_i|, |d_i|)``.
        """
        d = self.thresholds
        tol = ATOL + RTOL * torch.maximum(row_lb.abs(), d.abs())
        slack = row_lb - d - tol                                        # [B, S]
        masked = slack.unsqueeze(1).masked_fill(~self.members, -math.inf)  # [B, K, S]
        return masked.amax(dim=2)

    # ---------------------------------------------------------------- counterexamples

    def violations(self, y: torch.Tensor) -> torch.Tensor:
        """Attack objective [N, K] (differentiable): ``max_{i in k} (C y - d)_i`` for each
        output ``y`` [N, O] and disjunct k; negative means every row of k holds strictly."""
        C, d = self.spec.to(y.dtype), self.thresholds.to(y.dtype)
        slack = y @ C.T - d                                             # [N, S]
        return slack.unsqueeze(1).masked_fill(~self.members, -math.inf).amax(dim=2)

    def violation(self, y: torch.Tensor, disjunct: torch.Tensor) -> torch.Tensor:
        """[N]: the objective of :meth:`violations` for the disjunct ``disjunct[n]`` of each point."""
        return self.violations(y).gather(1, disjunct.unsqueeze(1)).squeeze(1)

    def violated_disjunct(self, y: np.ndarray) -> int | None:
        """The first disjunct whose rows all hold strictly at output ``y`` (float64), or None."""
        slack = self.C @ np.asarray(y, dtype=np.float64).reshape(-1) - self.d
        for k, rows in enumerate(self.members.cpu().numpy()):
            if np.all(slack[rows] < 0):
                return k
        return None

    def box_containing(self, x: np.ndarray) -> int | None:
        """The first box (as written, float64) that contains ``x``, or None."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        inside = np.all((self.box_lo <= x) & (x <= self.box_hi), axis=1)
        hits = np.flatnonzero(inside)
        return int(hits[0]) if hits.size else None


def make_problem(prop: VnnlibProperty, input_shape: tuple[int, ...]) -> Problem:
    """The :class:`Problem` of a parsed property for a model with ``input_shape``."""
    if math.prod(input_shape) != prop.num_inputs:
        raise ValueError(f"{prop.path}: {prop.num_inputs} inputs, model input {list(input_shape)}")
    box_lo = np.stack([lo for lo, _ in prop.boxes]).astype(np.float64)
    box_hi = np.stack([hi for _, hi in prop.boxes]).astype(np.float64)
    outer = [outward_float32(lo, hi) for lo, hi in zip(box_lo, box_hi)]
    inner = [inward_float32(lo, hi) for lo, hi in zip(box_lo, box_hi)]
    C, d, _ = prop.spec_matrix()
    members = np.zeros((len(prop.disjuncts), C.shape[0]), dtype=bool)
    for k, rows in enumerate(prop.disjunct_rows()):
        members[k, rows] = True
    C32 = torch.from_numpy(C.astype(np.float32))
    if not np.array_equal(C32.double().numpy(), C):
        C32 = torch.cat([C32, torch.eye(C.shape[1])])
    return Problem(
        input_shape=tuple(input_shape),
        outer_lo=torch.from_numpy(np.stack([lo for lo, _ in outer])),
        outer_hi=torch.from_numpy(np.stack([hi for _, hi in outer])),
        inner_lo=torch.from_numpy(np.stack([lo for lo, _ in inner])),
        inner_hi=torch.from_numpy(np.stack([hi for _, hi in inner])),
        box_lo=box_lo,
        box_hi=box_hi,
        C=C.astype(np.float64),
        d=d.astype(np.float64),
        members=torch.from_numpy(members),
        C_bound=C32,
        spec=torch.from_numpy(C.astype(np.float64)),
        thresholds=torch.from_numpy(d.astype(np.float64)),
    )
