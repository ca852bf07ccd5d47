"""Counterexample search: batched PGD with random restarts, and the onnxruntime check.

The network is run from BoundFlow's primal graph with the concrete op rules (differentiable
torch ops), so gradients are cheap. A point is only *reported* after the original ONNX file,
run by onnxruntime, confirms it: the input lies in a box of the property as written (float64)
and the output meets every row of one disjunct of the unsafe set strictly. A candidate that
fails this check is discarded and counted (``stats["rejected"]``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from boundflow.domains import concrete
from boundflow.ir.primal import Graph
from boundflow.verify.property import Problem



@dataclass(frozen=True)
class AttackConfig:
    """PGD settings. Steps are sign-gradient steps of ``step * width`` per coordinate, the step
    decaying geometrically from ``step_start`` to ``step_end``."""
    steps: int = 50
    restarts: int = 8
    step_start: float = 0.25
    step_end: float = 0.01
    max_points: int = 4096          # points per PGD batch (restarts x disjuncts x boxes)
    max_checks_per_step: int = 4    # candidates sent to onnxruntime per step


@dataclass
class Counterexample:
    """A confirmed counterexample: flat float32 input ``x`` and the onnxruntime output ``y``."""
    x: np.ndarray
    y: np.ndarray
    box: int
    disjunct: int


class OrtChecker:
    """Runs the original ONNX file with onnxruntime to confirm counterexamples."""

    def __init__(self, model_path: str, problem: Problem):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1   # single points: threads only add overhead
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.problem = problem

    def check(self, x: np.ndarray) -> Counterexample | None:
        """The confirmed counterexample at float32 input ``x`` (flat), or None."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        box = self.problem.box_containing(x)
        if box is None:
            return None
        feed = {self.input_name: x.reshape(self.problem.input_shape)}
        y = np.asarray(self.session.run(None, feed)[0], dtype=np.float64).reshape(-1)
        disjunct = self.problem.violated_disjunct(y)
        if disjunct is None:
            return None
        return Counterexample(x=x.copy(), y=y, box=box, disjunct=disjunct)


@dataclass
class AttackStats:
    runs: int = 0
    steps: int = 0
    points: int = 0          # network evaluations (points x steps)
    candidates: int = 0      # points our forward pass flagged, sent to onnxruntime
    rejected: int = 0        # of those, not confirmed by onnxruntime
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class Attacker:
    """PGD over sub-boxes of a problem, with onnxruntime confirmation."""
    graph: Graph
    problem: Problem
    checker: OrtChecker
    config: AttackConfig = AttackConfig()
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    stats: AttackStats = field(default_factory=AttackStats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs [N, O] of flat inputs [N, n]; differentiable when x requires grad."""
        y = concrete.evaluate(self.graph, x.reshape((x.shape[0],) + self.problem.input_shape))[0]
        return y.reshape(x.shape[0], -1)

    def confirm(self, x: torch.Tensor, f: torch.Tensor) -> Counterexample | None:
        """Send the points with ``f < 0`` (most violating first, a few) to onnxruntime."""
        flagged = torch.nonzero(f < 0).flatten()
        if flagged.numel() == 0:
            return None
        order = flagged[torch.argsort(f[flagged])][: self.config.max_checks_per_step]
        for i in order.tolist():
            self.stats.candidates += 1
            cex = self.checker.check(x[i].detach().numpy())
            if cex is not None:
                return cex
            self.stats.rejected += 1
        return None

    def probe(self, x: torch.Tensor, alive: torch.Tensor) -> tuple[Counterexample | None, torch.Tensor, torch.Tensor]:
        """Evaluate points x [N, n] against the disjuncts ``alive`` [N, K] at each. Returns a
        confirmed counterexample among them (or None), the objective ``f`` [N] (the smallest
        over the alive disjuncts; +inf where none is alive) and its gradient [N, n]."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self.problem.violations(self.forward(x)).masked_fill(~alive, math.inf).amin(dim=1)
            (grad,) = torch.autograd.grad(f.sum(), x)
        self.stats.points += x.shape[0]
        f = f.detach()
        return self.confirm(x, f), f, grad

    def run(self, lo: torch.Tensor, hi: torch.Tensor, box: torch.Tensor, alive: torch.Tensor,
            deadline: float, steps: int | None = None, restarts: int | None = None) -> Counterexample | None:
        """PGD inside the sub-boxes [lo, hi] ([M, n], from property box ``box[m]``) against each
        disjunct still alive there (``alive`` [M, K]). Returns a confirmed counterexample or None
        (steps run out, or ``deadline``, a ``time.perf_counter`` value, passed)."""
        t0 = time.perf_counter()
        self.stats.runs += 1
        try:
            starts = self._starts(lo, hi, box, alive, restarts or self.config.restarts)
            if starts is None:
                return None
            return self._descend(*starts, steps or self.config.steps, deadline)
        finally:
            self.stats.seconds += time.perf_counter() - t0

    def _starts(self, lo, hi, box, alive, restarts):
        """Per point: its sub-box (clipped to the inward-rounded property box), its disjunct and
        a start (the centre for the first restart, uniform samples for the others)."""
        lo = torch.maximum(lo, self.problem.inner_lo[box])
        hi = torch.minimum(hi, self.problem.inner_hi[box])
        usable = alive & (lo <= hi).all(dim=1, keepdim=True)
        region, disjunct = torch.nonzero(usable, as_tuple=True)
        if region.numel() == 0:
            return None
        per_point = max(1, min(restarts, self.config.max_points // region.numel()))
        region = region.repeat(per_point)[: self.config.max_points]
        disjunct = disjunct.repeat(per_point)[: self.config.max_points]
        plo, phi = lo[region], hi[region]
        u = torch.rand(plo.shape, generator=self.generator)
        u[: usable.sum()] = 0.5                       # first restart: the centres
        x = torch.minimum(torch.maximum(plo + u * (phi - plo), plo), phi)
        return x, plo, phi, disjunct

    def _descend(self, x, lo, hi, disjunct, steps, deadline) -> Counterexample | None:
        """Sign-gradient descent of each point's objective, projected onto its box; every
        iterate with a negative objective goes to onnxruntime."""
        width = hi - lo
        ratio = (self.config.step_end / self.config.step_start) ** (1.0 / max(1, steps - 1))
        step = self.config.step_start
        alive = torch.nn.functional.one_hot(disjunct, self.problem.num_disjuncts).bool()
        for _ in range(steps):
            cex, _, grad = self.probe(x, alive)
            self.stats.steps += 1
            if cex is not None or time.perf_counter() >= deadline:
                return cex
            x = x.detach() - step * width * grad.sign()
            x = torch.minimum(torch.maximum(x, lo), hi)
            step *= ratio
        with torch.no_grad():
            f = self.problem.violation(self.forward(x), disjunct)
        self.stats.points += x.shape[0]
        return self.confirm(x, f)

