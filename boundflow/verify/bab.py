"""Branch and bound by input splitting.

A domain is a sub-box of one property box together with the disjuncts of the unsafe set not yet
shown unreachable on it. Each round pops the most promising domains (lowest attack objective at
the centre: the likeliest to hide a counterexample; a proof has to visit every domain anyway),
splits each in two along one input, bounds all children in one batched ``compute_bounds`` call
(B regions, the spec rows shared), drops the disjuncts a child proves, and queues the children
that still have some. With a bounder whose linear bounds are sound (MixedBounder), each child is
first clipped to the bounding box of the points where those bounds still allow a violation
(clip.py): the part cut off holds none, and a disjunct with no such point left is proven. PGD
runs inside the most promising children now and then, so violations are found early.

Soundness: the two halves of a split are closed boxes whose union is the parent; a disjunct
proven on a box stays proven on its sub-boxes; the roots are the property boxes rounded
outward; clipping cuts off only points its sound linear bounds prove safe. So "holds" (the
queue runs empty with every leaf proven) covers every input. A domain
that cannot be split further in float32 and is still unproven makes the answer "unknown".
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from boundflow import api
from boundflow.ir.task import of_kind
from boundflow.planner.config import PlannerConfig
from boundflow.planner.lower import SPLIT_METHOD
from boundflow.verify.attack import Attacker, Counterexample
from boundflow.verify.clip import clip
from boundflow.verify.deadline import fits
from boundflow.verify.progress import Progress
from boundflow.verify.property import ATOL, RTOL, Problem


@dataclass(frozen=True)
class BabConfig:
    """Search settings. ``bound_options`` go to :func:`boundflow.api.bound` unchanged."""
    bound_options: dict = field(default_factory=dict)
    memory_budget: int = 512 << 20   # bytes of bound-computation arena per batched call
    call_seconds: float = 0.5        # target wall time of one batched call (keeps deadlines)
    max_batch: int = 4096
    queue_budget: int = 1 << 30      # bytes of queued domains before giving up ("unknown")
    order: str = "attack"            # queue order: "attack" (objective at the centre) or "margin"
    split_method: str | None = "ibp"  # bound method that ranks split candidates (None: gradient only)
    split_candidates: int = 8        # inputs per domain tried with split_method
    attack_share: float = 0.2        # at most this share of the search time goes to PGD
    attack_domains: int = 16         # worst children attacked per round
    attack_steps: int = 10
    attack_restarts: int = 2
    clip: bool = True                # shrink domains to where their linear bounds allow a violation (clip.py)


@dataclass
class Domains:
    """A batch of domains: sub-boxes ``lo, hi`` [N, n] (float32), the property box each comes
    from ``box`` [N], ``margins`` [N, K] (float64): the certified margin of each disjunct,
    ``+inf`` once proven (a positive margin proves it), and ``priority`` [N] (float64): lower
    is searched first."""
    lo: torch.Tensor
    hi: torch.Tensor
    box: torch.Tensor
    margins: torch.Tensor
    priority: torch.Tensor

    FIELDS = ("lo", "hi", "box", "margins", "priority")

    def __len__(self) -> int:
        return self.lo.shape[0]

    def select(self, index) -> Domains:
        return Domains(*(getattr(self, f)[index] for f in self.FIELDS))

    @staticmethod
    def cat(parts: list[Domains]) -> Domains:
        return Domains(*(torch.cat([getattr(p, f) for p in parts]) for f in Domains.FIELDS))

    def worst(self) -> torch.Tensor:
        """[N] the smallest disjunct margin of each domain (NaN counts as -inf)."""
        return self.margins.amin(dim=1).nan_to_num(nan=-math.inf)

    def alive(self) -> torch.Tensor:
        """[N, K] disjuncts not proven yet. NaN margins count as not proven."""
        return ~(self.margins > 0)

    def nbytes(self) -> int:
        return sum(getattr(self, f).element_size() * getattr(self, f).numel() for f in self.FIELDS)


def combine(parent_margins: torch.Tensor, child_margins: torch.Tensor) -> torch.Tensor:
    """A child's margins: +inf where the parent or the child proves the disjunct."""
    proven = (parent_margins > 0) | (child_margins > 0)
    return torch.where(proven, torch.full_like(child_margins, math.inf), child_margins)


class Bounder:
    """Certified disjunct margins of many sub-boxes with one batched bound computation.

    A ``sound`` bounder computes bounds that are sound in floating point (api.bound's
    sound_fp: float64, every rounding bounded, the spec rows exact). A bounder with a sound
    ``confirm`` bounder computes fast float32 bounds and has every margin they prove (> 0)
    recomputed by ``confirm``: only confirmed margins stay positive, so whatever proves a
    disjunct anywhere in the search is sound in floating point. Bounds are computed on the
    problem's device (api.bound's device)."""

    def __init__(self, model: str, problem: Problem, method: str, options: dict, sound: bool = False,
                 confirm: Bounder | None = None):
        self.model, self.problem, self.method, self.options = model, problem, method, options
        self.sound, self.confirm = sound, confirm
        self.calls = 0
        self.regions = 0
        self.seconds = 0.0
        self.last_stats: dict = {}
        self.last_intermediate: dict[str, torch.Tensor] = {}    # with export_intermediate
        self.last_rows: torch.Tensor | None = None
        self.last_linear: tuple[torch.Tensor, torch.Tensor] | None = None   # sound A, b of the rows (MixedBounder)

    def margins(self, lo: torch.Tensor, hi: torch.Tensor, deadline: float | None = None) -> torch.Tensor:
        """[B, K] margins of the boxes [lo, hi] ([B, n]) for every disjunct (``deadline``: see
        :func:`boundflow.api.bound`)."""
        margins = self.problem.disjunct_margins(self.row_bounds(lo, hi, deadline))
        return margins if self.confirm is None else self._confirmed(lo, hi, margins)

    def row_bounds(self, lo: torch.Tensor, hi: torch.Tensor, deadline: float | None = None) -> torch.Tensor:
        """[B, S] float64 lower bounds of the spec rows over the boxes [lo, hi] ([B, n])."""
        t0 = time.perf_counter()
        shape = (lo.shape[0],) + self.problem.input_shape
        C = self.problem.spec if self.sound else self.problem.C_bound
        res = api.bound(self.model, lo.reshape(shape), hi.reshape(shape), self.method, C=C,
                        sound_fp=self.sound, deadline=deadline, device=str(self.problem.device), **self.options)
        rows = res.lb.double() if self.sound else self.problem.row_lower_bounds(res.lb, res.ub)
        rows = self._output_pass(lo, hi, res, rows)
        self.last_rows = rows
        self.calls += 1
        self.regions += lo.shape[0]
        self.seconds += time.perf_counter() - t0
        self.last_stats = res.stats
        self.last_intermediate = res.intermediate
        return rows

    def _output_pass(self, lo: torch.Tensor, hi: torch.Tensor, res: api.BoundsResult, rows: torch.Tensor):
        """The row bounds, tightened where a subclass has a second bound (MixedBounder)."""
        return rows

    def _confirmed(self, lo: torch.Tensor, hi: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
        """The margins with every proof (> 0) replaced by the sound bounder's margin."""
        claims = (margins > 0).any(dim=1).nonzero().flatten()
        if len(claims):
            padded = torch.cat([claims, claims[:1].expand(_ceil_pow2(len(claims)) - len(claims))])  # few plans
            sound = self.confirm.margins(lo[padded], hi[padded])[: len(claims)]
            proven = margins[claims] > 0
            margins[claims] = torch.where(proven, sound, margins[claims])
        return margins


class MixedBounder(Bounder):
    """Sound margins at about 1.5x the cost of plain float32 bounds, where the plain ones plus a
    float64 confirmation of their proofs cost about 2x (ACAS Xu, batch 1024): a float32
    sound_fp bound, whose intermediate bounds are sound too (its error terms cost it some
    1e-4 of its width), then the output's backward pass once more, in a float64 sound_fp plan,
    from those intermediate bounds (the beta-crown plan without splits: CROWN's slopes). That
    pass is cheap (the spec's few rows against each layer's unstable neurons) and almost as
    tight as a float64 bound; each row keeps the better of the two. Needs a model whose every
    op has float32 error rules (planner.lower.fp32_refusal)."""

    def __init__(self, model: str, problem: Problem, method: str, options: dict):
        planner = options.get("config") or PlannerConfig(crown_interm=options.get("crown_interm", "sparse"))
        options = {k: v for k, v in options.items() if k != "crown_interm"}
        options["config"] = dataclasses.replace(planner, sound_fp=True, fp_dtype="float32", export_intermediate=True)
        super().__init__(model, problem, method, options, sound=True)
        self.output_plan = dataclasses.replace(planner, sound_fp=True, fp_dtype="float64", export_intermediate=False,
                                               device=str(problem.device))

    def _output_pass(self, lo, hi, res, rows):
        """The float64 pass; its linear lower bounds of the spec rows over each box (A x + b
        <= row, sound) are kept in last_linear for clipping."""
        B, spec = lo.shape[0], self.problem.spec
        shape = (B,) + self.problem.input_shape
        module, env = output_pass(api.load_model(self.model), torch.stack((lo.reshape(shape), hi.reshape(shape))),
                                  spec.unsqueeze(0).expand(B, -1, -1), res.intermediate, self.output_plan)
        bounds = module.outputs["bounds"]
        end = next(op for op in module.ops() if op.outputs == [bounds])
        self.last_linear = None
        if end.op == "linear.concretize":           # (not when the pass never reaches the input)
            a, b = (env[i] for i in end.inputs[:2])
            rows_n = spec.shape[0]
            self.last_linear = a.flatten(2)[:, :rows_n], b[:, :rows_n]
        return torch.fmax(rows, env[bounds][0])


def output_pass(loaded: tuple, box: torch.Tensor, C: torch.Tensor, intermediate: dict[str, torch.Tensor],
                planner: PlannerConfig) -> tuple:
    """The output's backward pass alone over the boxes ([2, B, *input shape]) for the rows C
    ([B, S, O]), from given intermediate bounds (relaxed op input -> [2, B, ...]): the
    beta-crown plan without splits (CROWN's slopes), in float64 (``planner``: a float64
    sound_fp one, then sound as its inputs are). ``loaded``: (graph, plan cache key). The
    module and its environment (``env[module.outputs["bounds"]][0]``: the rows' lower bounds)."""
    graph, key = loaded
    module, _ = api.get_plan(graph, key, SPLIT_METHOD, box.shape[1], C.shape[1], planner)
    inputs = {"box": box.double(), "C": C.double()}
    for role in of_kind(module.inputs, "interm"):
        inputs[role] = intermediate[role.value].double()
    for role in of_kind(module.inputs, "alpha", "beta"):    # CROWN's slopes, no split multipliers
        inputs[role] = None
    with torch.no_grad():
        return module, api._executor.run_functional(module, inputs)


def _ceil_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def _floor_pow2(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


class BatchSizer:
    """How many regions one bound call takes: a power of two (few distinct plans get built),
    within the memory budget (the plan's physical arena bytes per region) and the time target
    of one call, and otherwise the size with the best measured time per region. Bigger is not
    always faster: past the cache sizes, time per region grows again. Sizes are explored by
    doubling from 2."""

    def __init__(self, memory_budget: int, call_seconds: float, max_batch: int):
        self.memory_budget, self.call_seconds, self.max_batch = memory_budget, call_seconds, max_batch
        self.size = 2
        self.per_region: dict[int, float] = {}   # batch size -> seconds per region (smoothed)
        self.cap = max_batch

    def update(self, batch: int, seconds: float, arena_bytes) -> None:
        cap = float(self.max_batch)
        if isinstance(arena_bytes, (int, float)) and arena_bytes > 0:
            cap = min(cap, self.memory_budget * batch / arena_bytes)
        if seconds > 0:
            cap = min(cap, self.call_seconds * batch / seconds)
        self.cap = max(2, _floor_pow2(cap))
        if batch == _floor_pow2(batch):
            old = self.per_region.get(batch)
            now = seconds / batch
            self.per_region[batch] = now if old is None else 0.5 * (old + now)
        allowed = {b: s for b, s in self.per_region.items() if b <= self.cap}
        if not allowed:
            self.size = min(2 * batch, self.cap)
            return
        # the largest size within 25% of the best time per region (fewer, bigger rounds
        # amortise the per-round work), and one size up while that is the largest tried
        fast = max(b for b, s in allowed.items() if s <= 1.25 * min(allowed.values()))
        self.size = 2 * fast if fast == max(allowed) and 2 * fast <= self.cap else fast

    def parents(self, queued: int) -> int:
        """Domains to pop: half a batch (each has two children), a power of two."""
        return min(self.size // 2, _floor_pow2(queued))


class DomainQueue:
    """Unproven domains as stacked tensors; pops the lowest priority first."""

    def __init__(self, empty: Domains):
        self.all = empty
        self.pending: list[Domains] = []

    def push(self, domains: Domains) -> None:
        if len(domains):
            self.pending.append(domains)

    def __len__(self) -> int:
        return len(self.all) + sum(len(p) for p in self.pending)

    def nbytes(self) -> int:
        return self.all.nbytes() + sum(p.nbytes() for p in self.pending)

    def pop(self, count: int) -> Domains:
        """The ``count`` domains of lowest priority (NaN last)."""
        if self.pending:
            self.all = Domains.cat([self.all] + self.pending)
            self.pending = []
        priority = self.all.priority.nan_to_num(nan=math.inf)
        index = torch.topk(priority, min(count, len(self.all)), largest=False).indices
        keep = torch.ones(len(self.all), dtype=torch.bool, device=priority.device)
        keep[index] = False
        out = self.all.select(index)
        self.all = self.all.select(keep)
        return out


def split_scores(grad: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 root_width: torch.Tensor) -> torch.Tensor:
    """Which input to split, per region: ``|gradient| x width`` (how far the objective can move
    along that input), falling back to the width relative to the root box where the gradient is
    zero everywhere (e.g. a dead ReLU pattern at the centre). Inputs that cannot be split in
    float32 (the midpoint equals an end) score -inf."""
    width = hi - lo
    mid = (lo + hi) / 2
    blocked = ~((lo < mid) & (mid < hi))
    score = (grad.abs() * width).masked_fill(blocked, 0.0)
    flat = ~(score.amax(dim=1, keepdim=True) > 0)            # also catches NaN
    relative = width / torch.where(root_width > 0, root_width, torch.ones_like(root_width))
    return torch.where(flat, relative, score).masked_fill(blocked, -math.inf)


def split(domains: Domains, dims: torch.Tensor) -> Domains:
    """Both halves of each domain along ``dims`` [N]: lower halves first, then upper halves."""
    rows = torch.arange(len(domains), device=dims.device)
    mid = (domains.lo[rows, dims] + domains.hi[rows, dims]) / 2
    lower_hi = domains.hi.clone()
    lower_hi[rows, dims] = mid
    upper_lo = domains.lo.clone()
    upper_lo[rows, dims] = mid
    return Domains(torch.cat([domains.lo, upper_lo]), torch.cat([lower_hi, domains.hi]),
                   domains.box.repeat(2), domains.margins.repeat(2, 1), domains.priority.repeat(2))


@dataclass
class BabOutcome:
    verdict: str                         # "holds", "violated", "unknown" or "timeout"
    counterexample: Counterexample | None
    stats: dict


class BranchAndBound:
    """One search over the unproven roots of a problem; see the module docstring."""

    def __init__(self, problem: Problem, bounder: Bounder, attacker: Attacker, config: BabConfig):
        self.problem, self.bounder, self.attacker, self.config = problem, bounder, attacker, config
        self.sizer = BatchSizer(config.memory_budget, config.call_seconds, config.max_batch)
        self.root_width = problem.outer_hi - problem.outer_lo
        self.split_bounder = (None if config.split_method is None else
                              Bounder(bounder.model, problem, config.split_method, {}))
        self.attack_seconds_before = 0.0
        self.parent_s = 0.0     # seconds per parent of the last round (its bound calls cannot stop)
        self.stats = {"rounds": 0, "domains_bounded": 0, "leaves_proven": 0, "max_queue": 0,
                      "unsplittable": 0, "max_batch": 0, "clipped_proofs": 0}

    def run(self, roots: Domains, deadline: float) -> BabOutcome:
        """Search from ``roots`` (their margins computed) until every domain is proven, a
        counterexample is confirmed, the queue outgrows its budget, or ``deadline`` (a
        ``time.perf_counter`` value) passes."""
        t0 = time.perf_counter()
        self.attack_seconds_before = self.attacker.stats.seconds
        queue = DomainQueue(roots.select(slice(0, 0)))
        cex = self._prioritise(roots)
        queue.push(roots)
        progress = Progress("input branch and bound")
        while cex is None and len(queue):
            progress.tick(len(queue), deadline, domains=self.stats["domains_bounded"])
            count = self.sizer.parents(len(queue))
            if not fits(self.parent_s * count, deadline):
                return self._outcome("timeout", None, t0)
            if queue.nbytes() > self.config.queue_budget:
                self.stats["stopped"] = f"queue over {self.config.queue_budget} bytes"
                return self._outcome("unknown", None, t0)
            cex = self._round(queue, count, t0, deadline)
        if cex is not None:
            return self._outcome("violated", cex, t0)
        return self._outcome("unknown" if self.stats["unsplittable"] else "holds", None, t0)

    def _round(self, queue: DomainQueue, count: int, t0: float, deadline: float) -> Counterexample | None:
        """Pop ``count``, split, bound, queue the unproven children; attack the most promising ones."""
        start = time.perf_counter()
        parents = queue.pop(count)
        cex, children = self._branch(parents)
        self.stats["rounds"] += 1
        if cex is not None or not len(children):
            return cex
        unproven = self._bound(children)
        cex = self._prioritise(unproven)
        self.parent_s = (time.perf_counter() - start) / len(parents)
        queue.push(unproven)
        self.stats["max_queue"] = max(self.stats["max_queue"], len(queue))
        if cex is None and len(unproven) and self._attack_due(t0):
            cex = self._attack(unproven, deadline)
        return cex

    def _outcome(self, verdict: str, cex: Counterexample | None, t0: float) -> BabOutcome:
        self.stats["seconds"] = time.perf_counter() - t0
        return BabOutcome(verdict, cex, dict(self.stats))

    def _centres(self, domains: Domains) -> torch.Tensor:
        """Centres of the domains, moved inside the inward-rounded property box."""
        box = domains.box
        centre = (domains.lo + domains.hi) / 2
        return torch.minimum(torch.maximum(centre, self.problem.inner_lo[box]), self.problem.inner_hi[box])

    def _prioritise(self, domains: Domains) -> Counterexample | None:
        """Evaluate the network at the domain centres (a cheap attack) and set each domain's
        priority: the attack objective there ("attack" order: the closest to a violation goes
        first) or the worst certified margin ("margin" order)."""
        if not len(domains):
            return None
        cex, f, _ = self.attacker.probe(self._centres(domains), domains.alive())
        domains.priority = (f.double() if self.config.order == "attack" else domains.worst())
        return cex

    def _branch(self, parents: Domains) -> tuple[Counterexample | None, Domains]:
        """Split each parent along its best input; unsplittable parents are counted and dropped.
        The gradient at the centre ranks the inputs when there are more than the look-ahead
        tries (its probe is also a cheap attack)."""
        cex, grad = None, torch.zeros_like(parents.lo)
        if self.split_bounder is None or parents.lo.shape[1] > self.config.split_candidates:
            cex, _, grad = self.attacker.probe(self._centres(parents), parents.alive())
        scores = split_scores(grad, parents.lo, parents.hi, self.root_width[parents.box])
        ok = scores.amax(dim=1) > -math.inf
        self.stats["unsplittable"] += int((~ok).sum())
        parents, scores = parents.select(ok), scores[ok]
        return cex, split(parents, self._choose_dims(parents, scores))

    def _choose_dims(self, parents: Domains, scores: torch.Tensor) -> torch.Tensor:
        """The input to split per domain: among the best few by score, the one whose worse half
        gets the best margin under the cheap ``split_method`` bound (a one-step look-ahead; ties
        go to the score). On ACAS Xu property 1 this needs tens of domains where the gradient
        score alone needs tens of thousands."""
        if self.split_bounder is None or not len(parents):
            return scores.argmax(dim=1)
        count = min(self.config.split_candidates, scores.shape[1])
        cand_scores, cand = scores.topk(count, dim=1)                # [P, c], best first
        P = len(parents)
        trial = split(parents.select(torch.arange(P, device=cand.device).repeat(count)), cand.T.reshape(-1))
        margins = combine(trial.margins, self.split_bounder.margins(trial.lo, trial.hi))
        worst = margins.amin(dim=1).nan_to_num(nan=-math.inf)       # [2 P c]
        value = torch.minimum(worst[: P * count], worst[P * count:]).reshape(count, P).T
        value = value.masked_fill(cand_scores == -math.inf, -math.inf)
        return cand[torch.arange(P, device=cand.device), value.argmax(dim=1)]   # first max: best score

    def _bound(self, children: Domains) -> Domains:
        """Bound the children in one call; the ones with a disjunct still unproven."""
        margins = self.bounder.margins(children.lo, children.hi)
        run_ms = self.bounder.last_stats.get("run_ms")    # without planning: a new batch size
        self.sizer.update(len(children), run_ms / 1e3, self.bounder.last_stats.get("physical_bytes"))
        children.margins = combine(children.margins, margins)
        if self.config.clip and self.bounder.last_linear is not None:
            self._clip(children)
        done = ~children.alive().any(dim=1)
        self.stats["domains_bounded"] += len(children)
        self.stats["leaves_proven"] += int(done.sum())
        self.stats["max_batch"] = max(self.stats["max_batch"], len(children))
        return children.select(~done)

    def _clip(self, children: Domains) -> None:
        """Shrink the children to where their linear bounds allow a violation (clip.py); a
        disjunct with no such point left is proven."""
        a, b = self.bounder.last_linear
        rows = self.bounder.last_rows
        t = self.problem.thresholds + ATOL + RTOL * torch.maximum(rows.abs(), self.problem.thresholds.abs())
        alive = children.alive()
        children.lo, children.hi, gone = clip(children.lo, children.hi, a, b, t, self.problem.members, alive)
        children.margins = children.margins.masked_fill(gone, math.inf)
        self.stats["clipped_proofs"] += int(gone.any(dim=1).sum())

    def _attack_due(self, t0: float) -> bool:
        spent = self.attacker.stats.seconds - self.attack_seconds_before
        return spent <= self.config.attack_share * (time.perf_counter() - t0)

    def _attack(self, unproven: Domains, deadline: float) -> Counterexample | None:
        """PGD inside the most promising few unproven children."""
        count = min(self.config.attack_domains, len(unproven))
        best = torch.topk(unproven.priority.nan_to_num(nan=math.inf), count, largest=False).indices
        target = unproven.select(best)
        return self.attacker.run(target.lo, target.hi, target.box, target.alive(), deadline,
                                 steps=self.config.attack_steps, restarts=self.config.attack_restarts)
