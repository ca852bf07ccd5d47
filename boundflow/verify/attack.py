"""Counterexample search: batched PGD with random restarts, and the onnxruntime check.

The network is run from BoundFlow's primal graph with the concrete op rules (differentiable
torch ops), so gradients are cheap. PGD starts, for every (region, disjunct) pair, from the
centre of the region, from uniform samples and from *neuron corners*.

Neuron corners: a ReLU that is off passes no gradient, so PGD cannot learn that switching it on
would help. On sparse networks that is where counterexamples hide: in the eps = 0.05 boxes of
the VNN-COMP mnistfc MLPs (trained to one-hot outputs) ~246 of the 256 first-layer ReLUs are
off, and every uniform restart ends in the same local optimum. So for every ReLU unit that is
off at the centre of a region and, to first order, can switch on in it, the corner of the
region that maximises its input (the sign of its input's gradient: exact for the first ReLU
layer, whose input is affine in x as every primal op but relu is; a local linearisation
beyond) is a start. The corners are evaluated, and each (region, disjunct) pair starts from
the few with the lowest objective.

Restarts: where the box has few inputs (ACAS Xu: 5) the default call batches hundreds of
uniform starts; small networks cost per step, not per point.

A point is only *reported* after the original ONNX file, run by onnxruntime, confirms it: the
input lies in a box of the property as written (float64) and the output meets every row of one
disjunct of the unsafe set strictly. A candidate that fails this check is discarded and counted
(``stats["rejected"]``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from boundflow.domains import concrete
from boundflow.errors import UnsupportedOpError
from boundflow.ir.primal import Graph
from boundflow.verify.deadline import fits
from boundflow.verify.property import Problem

# onnxruntime input types -> the numpy dtype fed
_ORT_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class AttackConfig:
    """PGD settings. Steps are sign-gradient steps of ``step * width`` per coordinate, the step
    decaying geometrically from ``step_start`` to ``step_end``."""
    steps: int = 50
    restarts: int = 8
    # wide first steps reach thin violations at the box's faces; the small last ones settle
    # there (ACAS Xu's 47 violated instances, one run each, 3 seeds: 0.25 -> 0.01 with 256 fill
    # points found 109 of 141, 0.5 -> 0.001 with 4,096 fill points 123, in 20 steps as in 50;
    # no change on mnistfc's 22 violated, where 20 steps instead of 50 lose 3 of 66)
    step_start: float = 0.5
    step_end: float = 0.001
    max_points: int = 4096          # points per PGD batch (restarts x disjuncts x boxes)
    max_checks_per_step: int = 4    # candidates sent to onnxruntime per step
    fill_points: int = 4096         # calls with the default restarts on at most
    fill_max_inputs: int = 32       # this many inputs add uniform samples up to this many points,
    fill_steps: int = 20            # and take this many steps
    corner_starts: int = 8          # neuron corners per (region, disjunct), at most ``restarts``
    jacobian_rows: int = 4096       # ReLU-unit gradients per call (regions x units), for corners
    jacobian_entries: int = 1 << 23  # ... and their entries (x inputs): memory


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
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_dtype = _ORT_INPUT_DTYPES.get(model_input.type)
        if self.input_dtype is None:
            raise UnsupportedOpError(f"{model_path}: network input {model_input.name!r} has type {model_input.type}; "
                                     f"counterexamples can be checked for {', '.join(_ORT_INPUT_DTYPES)}")
        self.problem = problem

    def check(self, x: np.ndarray) -> Counterexample | None:
        """The confirmed counterexample at float32 input ``x`` (flat), or None. The model is run
        on ``x`` in its declared input type."""
        # exact, but for float16, which rounds: the point fed is the one checked and reported
        fed = np.asarray(x, dtype=np.float32).reshape(-1).astype(self.input_dtype)
        box = self.problem.box_containing(fed)
        if box is None:
            return None
        feed = {self.input_name: fed.reshape(self.problem.input_shape)}
        y = np.asarray(self.session.run(None, feed)[0], dtype=np.float64).reshape(-1)
        disjunct = self.problem.violated_disjunct(y)
        if disjunct is None:
            return None
        return Counterexample(x=fed.astype(np.float32), y=y, box=box, disjunct=disjunct)


@dataclass
class AttackStats:
    runs: int = 0
    steps: int = 0
    points: int = 0          # network evaluations (points x steps)
    candidates: int = 0      # points our forward pass flagged, sent to onnxruntime
    rejected: int = 0        # of those, not confirmed by onnxruntime
    corners: int = 0         # neuron-corner starts
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


def _first_of_each(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of ``keys`` [P, c] and, for each, the index of its first occurrence
    (ascending)."""
    distinct, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((distinct.shape[0],), keys.shape[0], dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(keys.shape[0], device=keys.device), reduce="amin")
    return distinct, first.sort().values


@dataclass
class Attacker:
    """PGD over sub-boxes of a problem, with onnxruntime confirmation. The graph, the problem
    and the generator live on one device (the points go to the CPU for onnxruntime only)."""
    graph: Graph
    problem: Problem
    checker: OrtChecker
    config: AttackConfig = AttackConfig()
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    stats: AttackStats = field(default_factory=AttackStats)
    # the inputs of the ReLUs that depend on the network input; computed on first use
    _relus: list[str] | None = field(default=None, init=False, repr=False)
    # regions already attacked from their deterministic starts (centre, neuron corners)
    _seen: set = field(default_factory=set, init=False, repr=False)
    # seconds of the last PGD step: no step (and no run) starts that would end past a deadline
    _step_s: float = field(default=0.0, init=False, repr=False)

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
            cex = self.checker.check(x[i].detach().cpu().numpy())
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
        disjunct still alive there (``alive`` [M, K]). ``restarts`` starts per (region, disjunct)
        pair: the centre and uniform samples; plus up to ``min(corner_starts, restarts)`` neuron
        corners. Returns a confirmed counterexample or None (steps run out, or the next step
        would end past ``deadline``, a ``time.perf_counter`` value)."""
        if not fits(self._step_s, deadline):
            return None
        t0 = time.perf_counter()
        self.stats.runs += 1
        try:
            # many uniform starts pay off where the box has few dimensions (ACAS Xu: 5), and
            # there the per-step overhead dominates the cost of a point; on image-sized inputs
            # they all fall into the same optimum (the neuron corners do the work there)
            few = self.problem.num_inputs <= self.config.fill_max_inputs
            fill = self.config.fill_points if restarts is None and few else 0
            with torch.no_grad():
                starts = self._starts(lo, hi, box, alive, restarts or self.config.restarts, fill)
            if isinstance(starts, Counterexample) or starts is None:
                return starts
            return self._descend(*starts, steps or (self.config.fill_steps if fill else self.config.steps), deadline)
        finally:
            self.stats.seconds += time.perf_counter() - t0

    def _starts(self, lo, hi, box, alive, restarts, fill=0):
        """Per point: its sub-box (clipped to the inward-rounded property box), its disjunct and
        a start. Points are laid out by kind, most promising first, so that the ``max_points``
        cap drops uniform samples first: the centres, the neuron corners, the uniform samples.
        Regions seen before get uniform samples only (the other starts are deterministic).
        Returns a counterexample when a neuron corner already is one."""
        lo = torch.maximum(lo, self.problem.inner_lo[box])
        hi = torch.minimum(hi, self.problem.inner_hi[box])
        usable = alive & (lo <= hi).all(dim=1, keepdim=True)
        region, disjunct = torch.nonzero(usable, as_tuple=True)
        if region.numel() == 0:
            return None
        cap = self.config.max_points
        fresh = self._fresh(lo, hi, box)
        parts_region, parts_disjunct, parts_x = [], [], []
        # the centres
        keep = fresh[region]
        centre = (lo + hi) / 2
        parts_region.append(region[keep])
        parts_disjunct.append(disjunct[keep])
        parts_x.append(centre[region[keep]])
        # the neuron corners
        count = min(self.config.corner_starts, restarts)
        if count > 0 and bool(fresh.any()):
            corners = self._corners(lo, hi, usable & fresh[:, None], count,
                                    max(1, (cap - int(keep.sum())) // max(1, region.numel())))
            if isinstance(corners, Counterexample):
                return corners
            if corners is not None:
                parts_region.append(corners[0])
                parts_disjunct.append(corners[1])
                parts_x.append(corners[2])
                self.stats.corners += corners[0].numel()
        # the uniform samples: restarts - 1 per pair where the centre was used, restarts elsewhere,
        # and more, the same number for every pair, until the batch has ``fill`` points
        used = sum(r.numel() for r in parts_region)
        per_pair = torch.where(keep, restarts - 1, restarts)
        short = min(fill, cap) - used - int(per_pair.sum())
        if short > 0:
            per_pair = per_pair + math.ceil(short / region.numel())
        rounds = int(per_pair.max()) if per_pair.numel() else 0
        if rounds > 0 and used < cap:
            reps = torch.arange(rounds, device=region.device).repeat_interleave(region.numel())
            ur = region.repeat(rounds)[reps < per_pair.repeat(rounds)][: cap - used]
            ud = disjunct.repeat(rounds)[reps < per_pair.repeat(rounds)][: cap - used]
            u = torch.rand((ur.numel(), lo.shape[1]), generator=self.generator, device=lo.device)
            parts_region.append(ur)
            parts_disjunct.append(ud)
            parts_x.append(lo[ur] + u * (hi[ur] - lo[ur]))
        region = torch.cat(parts_region)[:cap]
        disjunct = torch.cat(parts_disjunct)[:cap]
        if region.numel() == 0:
            return None
        plo, phi = lo[region], hi[region]
        x = torch.minimum(torch.maximum(torch.cat(parts_x)[:cap], plo), phi)
        return x, plo, phi, disjunct

    def _fresh(self, lo: torch.Tensor, hi: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """[M] bool: the regions not attacked before (and remember them)."""
        fresh = torch.ones(lo.shape[0], dtype=torch.bool)
        box, lo, hi = box.cpu(), lo.cpu().numpy(), hi.cpu().numpy()
        for m in range(lo.shape[0]):
            key = (int(box[m]), hash(lo[m].tobytes()), hash(hi[m].tobytes()))
            fresh[m] = key not in self._seen
            self._seen.add(key)
        return fresh.to(self.problem.device)

    def _corners(self, lo, hi, usable, count, per_region):
        """Neuron-corner starts. For every usable region m, the ReLUs that are off at its centre
        and, to first order, can switch on in it (the ``per_region`` that come closest), each
        with the corner that maximises its input to first order; for every usable (region,
        disjunct) pair the ``count`` of these corners with the lowest objective. Returns
        (region, disjunct, x) of the starts, a confirmed counterexample found at a corner, or
        None."""
        rows = torch.nonzero(usable.any(dim=1)).flatten()
        units = self._units_per_region(rows.numel())
        if units == 0:
            return None
        rows = rows[: max(1, self.config.jacobian_rows // units)]
        centre, half = (lo[rows] + hi[rows]) / 2, (hi[rows] - lo[rows]) / 2
        z, grad = self._unit_gradients(centre, units)                 # [R, U], [R, U, n]
        reach = z + (grad.abs() * half[:, None, :]).sum(dim=2)        # first-order maximum
        reach = torch.where((z <= 0) & (reach > 0), reach, -math.inf)
        k = min(per_region, units)
        top, unit = torch.topk(reach, k, dim=1)                       # [R, k]
        r, slot = torch.nonzero(top > -math.inf, as_tuple=True)
        if r.numel() == 0:
            return None
        up = grad[r, unit[r, slot]] > 0                                # [P, n]
        # one start per distinct corner of a region (few inputs: many units share a corner)
        code = up.double() @ torch.randn(up.shape[1], generator=torch.Generator().manual_seed(0),
                                         dtype=torch.float64).to(up.device)
        _, first = _first_of_each(torch.stack([r.double(), code], dim=1))
        r, slot, up = r[first], slot[first], up[first]
        region = rows[r]
        x = torch.where(up, hi[region], lo[region])
        self.stats.points += x.shape[0]
        f = self.problem.violations(self.forward(x))                  # [P, K]
        f = f.masked_fill(~usable[region], math.inf)
        cex = self.confirm(x, f.amin(dim=1))
        if cex is not None:
            return cex
        # per pair: the `count` lowest corners of its region
        M, K = lo.shape[0], f.shape[1]
        table = torch.full((M, k, K), math.inf, device=f.device)
        table[region, slot] = f
        best, order = torch.topk(table, min(count, k), dim=1, largest=False)   # [M, c, K]
        m, c, d = torch.nonzero(best < math.inf, as_tuple=True)
        index = torch.full((M, k), -1, dtype=torch.long, device=f.device)
        index[region, slot] = torch.arange(region.numel(), device=f.device)
        # most promising first (the cap cuts from the end): by rank, then region, disjunct
        rank = torch.argsort(c * (M * K) + m * K + d, stable=True)
        m, c, d = m[rank], c[rank], d[rank]
        return m, d, x[index[m, order[m, c, d]]]

    def _relu_inputs(self) -> list[str]:
        """The distinct inputs of the ReLUs that depend on the network input, in topological order."""
        if self._relus is None:
            const = concrete.constant_valued(self.graph)
            names = [node.inputs[0] for node in self.graph.nodes
                     if node.op == "relu" and node.inputs[0] not in const]
            self._relus = list(dict.fromkeys(names))
        return self._relus

    def _units_per_region(self, regions: int) -> int:
        """How many ReLU units (the first ones in topological order) get a gradient per region:
        all of them unless ``jacobian_rows`` (per call) or ``jacobian_entries`` runs out."""
        names = self._relu_inputs()
        total = sum(math.prod(self.graph.shape(name)) for name in names)
        budget = min(self.config.jacobian_rows // max(1, regions),
                     self.config.jacobian_entries // max(1, regions * self.problem.num_inputs))
        return min(total, budget)

    def _unit_gradients(self, centre: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
        """At each point of ``centre`` [R, n]: the inputs of the first ``units`` ReLU units
        ([R, U]) and their gradients w.r.t. the network input ([R, U, n]; exact for the first
        ReLU layer, which is affine in x, a local linearisation beyond)."""
        R, n = centre.shape
        x = centre.repeat_interleave(units, dim=0).requires_grad_(True)   # row r*U + u
        with torch.enable_grad():
            z = self._pre_activations(x, units)                            # [R U, U]
            picked = z.gather(1, torch.arange(units, device=z.device).repeat(R)[:, None]).squeeze(1)
            (grad,) = torch.autograd.grad(picked.sum(), x)
        self.stats.points += x.shape[0]
        return picked.detach().reshape(R, units), grad.reshape(R, units, n)

    def _pre_activations(self, x: torch.Tensor, units: int) -> torch.Tensor:
        """[N, units]: the inputs of the first ``units`` ReLU units (topological order, each
        ReLU's input flattened) at the flat points x [N, n]. Runs the graph only as far as needed."""
        wanted, have = [], 0
        for name in self._relu_inputs():
            if have >= units:
                break
            wanted.append(name)
            have += math.prod(self.graph.shape(name))
        env = concrete.values(self.graph, x.reshape((x.shape[0],) + self.problem.input_shape),
                              stop=lambda env: all(name in env for name in wanted))
        return torch.cat([env[name].reshape(x.shape[0], -1) for name in wanted], dim=1)[:, :units]

    def _descend(self, x, lo, hi, disjunct, steps, deadline) -> Counterexample | None:
        """Sign-gradient descent of each point's objective, projected onto its box; every
        iterate with a negative objective goes to onnxruntime. No step starts that would end
        past ``deadline``: a step costs about as much as the last one."""
        width = hi - lo
        ratio = (self.config.step_end / self.config.step_start) ** (1.0 / max(1, steps - 1))
        step = self.config.step_start
        alive = torch.nn.functional.one_hot(disjunct, self.problem.num_disjuncts).bool()
        for _ in range(steps):
            if not fits(self._step_s, deadline):
                return None
            t0 = time.perf_counter()
            cex, _, grad = self.probe(x, alive)
            self.stats.steps += 1
            if cex is not None:
                return cex
            x = x.detach() - step * width * grad.sign()
            x = torch.minimum(torch.maximum(x, lo), hi)
            step *= ratio
            self._step_s = time.perf_counter() - t0
        with torch.no_grad():
            f = self.problem.violation(self.forward(x), disjunct)
        self.stats.points += x.shape[0]
        return self.confirm(x, f)
