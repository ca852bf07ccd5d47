"""Branch and bound on ReLU splits, bounded with beta-CROWN.

For networks with many inputs (MNIST, CIFAR) splitting the input box gets nowhere; splitting
unstable ReLU neurons does. A domain is the property box together with a set of split
constraints, each neuron ``z_j`` (a ReLU input) either active, ``z_j >= 0``, or inactive,
``z_j <= 0``. The two children of a split cover their parent, so a disjunct proven on every leaf
is proven on the box.

Bounding a domain (the plan method "beta-crown", boundflow.planner.lower):

- intermediate bounds are the parent's (the root's come from alpha-CROWN over the box), with
  each split neuron's interval clamped to its side (``[0, u]`` or ``[l, 0]``): bounds valid on
  a set stay valid on its subsets, and the clamp is the split constraint itself. A clamped
  neuron is stable, so its ReLU is exact;
- the output pass adds ``-beta_j s_j z_j`` for every split neuron (``s_j = +1`` active, ``-1``
  inactive, ``beta_j >= 0``): ``s_j z_j >= 0`` on the domain, so this only lowers the function
  being minimised there; for any ``beta >= 0`` the bound stays sound and projected Adam on
  ``beta`` (with the slopes alpha) tightens it (beta-CROWN, Wang et al. 2021). This carries the
  split constraints back to the input, which clamping alone cannot;
- a child's margin is at least its parent's (the parent's bound holds on the child);
- optionally (``ReluBabConfig.refine_neurons``) a few neurons per layer get their intermediate
  bounds re-tightened by CROWN from the domain's clamped bounds (PlannerConfig.split_refine);
  the domain keeps the sound given bounds, each bound call re-tightens from them.

Other relaxed ops' inputs (sigmoid, tanh, sin, exp, a product's operands, a max pool's
inputs: "curved" neurons) are split too, as GenBaB does (Shi et al. 2024), once no ReLU of the
domain is left unstable: the interval ``[l, u]`` of the neuron is cut at its midpoint ``m``
(at the op's kink where it has one, Relaxation.kink: a clamp's constant, where it is linear on
both sides), one child takes ``[l, m]``, the other ``[m, u]``. Each child's bounds hold on the
inputs whose neuron lies in its part, and the parts cover the parent; the relaxations, built
from the intervals, get tighter. No multiplier carries these cuts back to the input. They are
ranked by the first-order gain of each child, the gradient of the domain's lower bounds with
respect to the neuron's interval times the width it removes; intervals narrower than
``ReluBabConfig.min_split_width`` are not halved (nor cut where the kink is not inside).

Soundness in floating point (``sound_fp``): the root's intermediate bounds come from a sound
bound (the verifier's float64 alpha-CROWN), rounded outward to float32; the search bounds in
float32, and every domain it proves is bounded once more by the sound beta-crown plan (float64,
rounding bounded, exact spec rows) at its own slopes and multipliers. Only that proof counts; a
domain it does not confirm goes back to the queue with the sound margin.

Which neuron to split: candidates are ranked by how much their upper-line intercept costs the
lower bound, ``|a_j^-| (-l_j u_j / (u_j - l_j))`` with ``a_j`` the coefficient of the neuron's
ReLU output in the lower bound (BaBSR's intercept score); the best few are tried with one cheap
bound of both children each, and the one whose worse child is best wins (filtered smart
branching). A domain with no unstable neuron left and still unproven makes the answer
"unknown". The search is orchestration in Python over batched plan runs: many
domains in one call, the worst domains first.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

import dataclasses

from boundflow import api, ops
from boundflow.domains.rounding import round_outward
from boundflow.ir.task import Role
from boundflow.planner.config import PlannerConfig
from boundflow.planner.lower import SPLIT_METHOD, relaxed_inputs, relaxed_nodes
from boundflow.planner.pipeline import planned_graph
from boundflow.verify.alpha import AlphaConfig, descend, starting_slopes
from boundflow.verify.attack import Counterexample
from boundflow.verify.deadline import fits
from boundflow.verify.progress import Progress
from boundflow.verify.property import Problem


class Attack(Protocol):
    seconds: float

    def __call__(self, deadline: float) -> Counterexample | None: ...


@dataclass(frozen=True)
class ReluBabConfig:
    """Search settings. ``optimiser`` drives alpha (lr) and beta (``lr_beta``) per batch."""
    # children start from their parent's alpha and beta, so a few steps do: on mnist-net_256x2
    # prop_1_0.03, 5 steps need 3441 domains in 1.4 s of bounding, 20 steps 3239 in 5.1 s
    optimiser: AlphaConfig = AlphaConfig(iterations=5, lr=0.1, lr_decay=0.98, early_stop_patience=5)
    root_iterations: int = 20       # the root's slopes start from CROWN's
    exhausted_iterations: int = 200  # for a domain with nothing left to split, before "unknown"
    lr_beta: float = 0.05
    max_batch: int = 1024           # children bounded per call (a power of two)
    call_seconds: float = 1.0       # target wall time of one call (keeps deadlines)
    memory_budget: int = 2 << 30    # bytes one call may hold (its buffers, autograd's copies)
    # bytes of queued domains: beyond the budget the search takes the domains nearest a proof
    # first (their children are the likeliest proven, so the queue shrinks; a proof visits
    # every domain in any order), beyond the limit it gives up ("unknown")
    queue_budget: int = 1 << 30
    queue_limit: int = 4 << 30
    attack_share: float = 0.1       # at most this share of the search time goes to PGD
    branch_candidates: int = 1      # neurons per domain tried by a look-ahead (1: score only)
    min_split_width: float = 1e-3   # a curved neuron's interval narrower than this is not split
    # per relaxed op's input and domain, this many neurons (the best by branching score) get
    # their intermediate bounds re-tightened by CROWN from the domain's split constraints each
    # time it is bounded (PlannerConfig.split_refine; 0: the parent's bounds as they are)
    refine_neurons: int = 0
    # a pair whose domains' share of the search's rounds passes this many seconds is given up:
    # its domains leave the queue, the search goes on with the others (0: no limit; for
    # stabilise.py's many small proofs)
    pair_seconds: float = 0.0


class DomainSet:
    """Domains as named tensors with the domain axis first, keyed by (what, value): per relaxed
    op's input ``v``, ``("lo", v)``/``("hi", v)`` [N, *shape] (clamped intermediate bounds) and
    ``("score", v)`` [N, *shape] (branching); per ReLU input ``v`` ``("sign", v)`` [N, *shape]
    (+1, -1, 0) and ``("beta", v)`` [N, 2S, *shape] (warm starts); per relaxed op's output ``o``
    its slopes ``("alpha", o)`` (warm starts); and ``"pair"`` [N] (which (box, disjunct) pair
    the domain belongs to) and ``"margin"`` [N] (float64, the certified margin of its
    disjunct)."""

    def __init__(self, tensors: dict[str | tuple[str, str], torch.Tensor]):
        self.t = tensors

    def __len__(self) -> int:
        return self.t["margin"].shape[0]

    def select(self, index) -> DomainSet:
        return DomainSet({k: v[index] for k, v in self.t.items()})

    @staticmethod
    def cat(parts: list[DomainSet]) -> DomainSet:
        return DomainSet({k: torch.cat([p.t[k] for p in parts]) for k in parts[0].t})

    def nbytes(self) -> int:
        return sum(v.element_size() * v.numel() for v in self.t.values())


class DomainQueue:
    """Unproven domains in chunks (as pushed), each with a mask of the domains still queued:
    popping the worst few copies just those; a chunk is compacted once half of it is gone, so
    the copies stay proportional to what is popped, not to the queue. ``pack`` and ``unpack``
    (default: as they are) hold queued domains in less memory and give them back whole."""

    def __init__(self, pack=None, unpack=None):
        self.chunks: list[tuple[DomainSet, torch.Tensor]] = []     # (domains, which are queued)
        self.pack, self.unpack = pack or (lambda d: d), unpack or (lambda d: d)

    def __len__(self) -> int:
        return sum(int(queued.sum()) for _, queued in self.chunks)

    def nbytes(self) -> int:
        """Bytes held, popped domains of uncompacted chunks included."""
        return sum(c.nbytes() for c, _ in self.chunks)

    def push(self, domains: DomainSet) -> None:
        if len(domains):
            domains = self.pack(domains)
            self.chunks.append((domains, torch.ones(len(domains), dtype=torch.bool, device=domains.t["margin"].device)))

    def drop(self, pairs: torch.Tensor) -> None:
        """Unqueue every domain of the pairs marked in ``pairs`` [pairs] bool."""
        kept = [(c, queued & ~pairs[c.t["pair"]]) for c, queued in self.chunks]
        self.chunks = [(c, queued) for c, queued in kept if queued.any()]

    def pairs(self, count: int, device) -> torch.Tensor:
        """[count] bool: the pairs with a domain queued."""
        out = torch.zeros(count, dtype=torch.bool, device=device)
        for c, queued in self.chunks:
            out[c.t["pair"][queued]] = True
        return out

    def worst(self) -> float:
        """The lowest margin queued (+inf when empty)."""
        return min((float(c.t["margin"][queued].min()) for c, queued in self.chunks), default=math.inf)

    def pop(self, count: int, nearest: bool = False) -> DomainSet:
        """The ``count`` domains of lowest margin (``nearest``: of highest, nearest a proof)."""
        where = torch.cat([q for _, q in self.chunks]).nonzero().flatten()   # of the queued ones
        margins = torch.cat([c.t["margin"] for c, _ in self.chunks])[where]
        picked = torch.zeros(sum(len(c) for c, _ in self.chunks), dtype=torch.bool, device=margins.device)
        picked[where[torch.topk(margins, min(count, len(margins)), largest=nearest).indices]] = True
        out, keep, start = [], [], 0
        for c, queued in self.chunks:
            mine = picked[start:start + len(c)]
            start += len(c)
            if mine.any():
                out.append(c.select(mine))
                queued = queued & ~mine
                left = int(queued.sum())
                if not left:
                    continue
                if 2 * left <= len(c):
                    c, queued = c.select(queued), queued.new_ones(left)
            keep.append((c, queued))
        self.chunks = keep
        return self.unpack(DomainSet.cat(out))


@dataclass
class ReluBabOutcome:
    verdict: str                         # "holds", "violated", "unknown" or "timeout"
    counterexample: Counterexample | None
    stats: dict = field(default_factory=dict)
    proven: list[int] = field(default_factory=list)   # the pairs (indices) proven, all on "holds"


class ReluBranchAndBound:
    """One search over the unproven (box, disjunct) pairs of a problem. Domains of every pair
    share the batched calls: each domain's region is its pair's box and its spec its pair's
    rows (see :meth:`Problem.restrict`), padded to a common count by repeating a row (a
    disjunct's margin is a max over its rows, so a repeated row changes nothing)."""

    def __init__(self, model: str | None, problem: Problem, pairs: list[tuple[int, int]], attack: Attack | None,
                 config: ReluBabConfig, planner: PlannerConfig | None = None, sound_fp: bool = False,
                 loaded: tuple | None = None):
        """``attack(deadline)`` searches the pairs for a counterexample (PGD); ``attack.seconds``
        is the time it spent so far. With ``sound_fp`` every proof is confirmed by a sound plan
        (see the module docstring). ``loaded``: the (simplified graph, plan cache key) to search
        instead of loading ``model`` (stabilise.py's cut networks; their spec rows must be exact
        in float32)."""
        self.model, self.problem, self.attack, self.config = model, problem, attack, config
        self.device = problem.device                  # of the plans, the domains and the queue
        self.planner = dataclasses.replace(planner or PlannerConfig(), device=str(self.device),
                                           split_refine=config.refine_neurons)
        self.sound = dataclasses.replace(self.planner, sound_fp=True, export_intermediate=False) if sound_fp else None
        self.graph, self.key = loaded or api.load_model(model)
        self.output = self.graph.outputs[0]
        # the plan's names (layout folding may rename a ReLU's input): every relaxed op's input
        # has intermediate bounds, every relaxed op its slopes (named by its output), the
        # ReLUs' inputs are split (with multipliers)
        planned = planned_graph(self.graph, self.planner)[0]
        self.relaxed = relaxed_inputs(planned)
        self.slopes = [n.outputs[0] for n in relaxed_nodes(planned)]
        self.relus = relaxed_inputs(planned, splitting=True)
        self.relu_slope = {}                          # split input -> the slopes of a ReLU of it
        for n in relaxed_nodes(planned, splitting=True):
            self.relu_slope.setdefault(n.inputs[0], n.outputs[0])
        self.curved = [v for v in self.relaxed if v not in self.relu_slope]   # split at midpoints
        self.kinks = {}                               # or at a kink of an op they feed (flat)
        for n in relaxed_nodes(planned):
            kink = ops.get(n.op).relaxation.kink
            if kink is not None and n.inputs[0] in self.curved:
                self.kinks.setdefault(n.inputs[0], kink(planned, n).flatten().to(self.device, torch.float64))
        self.pairs = pairs
        self.subs = [problem.restrict(b, k) for b, k in pairs]
        self.rows = max(sub.num_rows for sub in self.subs)
        # the plan bounds the spec rows rounded to float32 (lower bounds only); rows float32
        # cannot hold exactly are corrected with CROWN output bounds over the pair's box
        self.C = torch.stack([torch.cat([sub.C_bound[: sub.num_rows],
                                         sub.C_bound[:1].expand(self.rows - sub.num_rows, -1)])
                              for sub in self.subs])                            # [pairs, S, O]
        self.C_exact = torch.stack([torch.cat([sub.spec, sub.spec[:1].expand(self.rows - sub.num_rows, -1)])
                                    for sub in self.subs])                      # float64, for sound_fp
        self.outputs = None
        if problem.C_bound.shape[0] > problem.num_rows:
            shape = (problem.num_boxes,) + problem.input_shape
            y = api.bound(model, problem.outer_lo.reshape(shape), problem.outer_hi.reshape(shape), "crown",
                          config=self.planner, device=str(self.device))
            self.outputs = y.lb, y.ub                                           # [boxes, O]
        self.box = torch.stack([torch.cat([sub.outer_lo, sub.outer_hi]) for sub in self.subs])  # [pairs, 2, n]
        self.one_box = bool((self.box == self.box[:1]).all())
        self.stats = {"pairs": len(pairs), "rounds": 0, "domains_bounded": 0, "trial_domains": 0, "leaves_proven": 0,
                      "max_queue": 0, "unsplittable": 0, "max_batch": 0, "bound_s": 0.0,
                      "rounds_over_budget": 0}
        self.batch = 2
        self.steps_s = 0.0      # seconds spent in optimisation steps (they stop at a deadline)
        self.fixed_s = 0.0      # seconds per child of the rest of the last round (it cannot stop)
        self.cut = False        # whether the deadline stopped the last bound's steps
        self.spent = torch.zeros(len(pairs), dtype=torch.float64, device=self.device)  # seconds per pair
        self.given_up = torch.zeros(len(pairs), dtype=torch.bool, device=self.device)  # past pair_seconds

    def boxes(self, pair: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[2, N, *input shape]: the boxes of the domains' pairs; where every pair has the same
        box (the usual property: one box, many disjuncts), one box broadcast (a view: the
        concretization then reads it once, not N copies)."""
        shape = self.problem.input_shape
        if self.one_box:
            return self.box[:1].transpose(0, 1).reshape((2, 1) + shape).to(dtype).expand((2, len(pair)) + shape)
        return self.box[pair].transpose(0, 1).reshape((2, len(pair)) + shape).to(dtype)

    def margins(self, pair: torch.Tensor, lb: torch.Tensor, ub: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """[N] certified margin of each domain's disjunct from the bounds of its rows (of the
        spec rows as float32 holds them, corrected; ``exact``: of the exact rows)."""
        out = torch.empty(len(pair), dtype=torch.float64, device=pair.device)
        for p in pair.unique().tolist():
            mine = pair == p
            sub = self.subs[p]
            outputs = None
            if self.outputs is not None:
                box = self.pairs[p][0]
                outputs = tuple(t[box:box + 1].expand(int(mine.sum()), -1) for t in self.outputs)
            rows = lb[mine, : sub.num_rows].double() if exact else \
                sub.row_lower_bounds(lb[mine, : sub.num_rows], ub[mine, : sub.num_rows], outputs)
            out[mine] = sub.disjunct_margins(rows)[:, 0]
        return out.nan_to_num(nan=-math.inf)

    # -- bounding ---------------------------------------------------------------------------
    def bound(self, domains: DomainSet, iterations: int, deadline: float | None = None,
              trial: bool = False, exhausted: bool = False, sound: bool = False) -> DomainSet:
        """Bound the domains (padded to a power of two): from their warm-start alpha and beta (or
        CROWN's slopes and no multipliers at the root), then ``iterations`` steps of projected
        Adam on both, until ``deadline``. Returns the domains with new margins (never below the
        old), warm starts and branching scores; a ``trial`` (look-ahead) only gets margins.
        ``sound``: on the sound_fp plan (float64; its margins need no confirmation)."""
        t0 = time.perf_counter()
        n = len(domains)
        size = 1 << max(0, math.ceil(math.log2(n)))
        padded = domains if size == n else DomainSet.cat(
            [domains, domains.select(torch.zeros(size - n, dtype=torch.long, device=self.device))])
        planner, dtype = (self.sound, torch.float64) if sound else (self.planner, torch.float32)
        module, _ = api.get_plan(self.graph, self.key, SPLIT_METHOD, size, self.rows, planner)
        t = dict(padded.t)
        pair = t["pair"]
        inputs = {"box": self.boxes(pair, dtype), "C": (self.C_exact if sound else self.C)[pair]}
        for v in self.relaxed:
            inputs[Role("interm", v)] = torch.stack((t[("lo", v)], t[("hi", v)])).to(dtype)
            if Role("refine", v) in module.inputs:
                t[("refine", v)] = inputs[Role("refine", v)] = self._refine_selection(t, v)
        executor = api._executor
        alpha_roles = {o: Role("alpha", o, self.output) for o in self.slopes}
        beta_roles = {v: Role("beta", v, self.output) for v in self.relus}
        signs = {v: t[("sign", v)].to(dtype).unsqueeze(1) for v in self.relus}
        warm = ("alpha", self.slopes[0]) in t
        if warm:
            for o in self.slopes:
                t[("alpha", o)] = t[("alpha", o)].to(dtype)
            for v in self.relus:
                t[("beta", v)] = t[("beta", v)].to(dtype)
        t_run = time.perf_counter()
        with torch.no_grad():
            if warm:
                given = {alpha_roles[o]: t[("alpha", o)] for o in self.slopes}
                given.update({beta_roles[v]: t[("beta", v)] * signs[v] for v in self.relus})
            else:                                     # the root: CROWN's slopes, no multipliers
                given = {role: None for role in list(alpha_roles.values()) + list(beta_roles.values())}
            env = executor.run_functional(module, {**inputs, **given})
        run_s = time.perf_counter() - t_run
        if not warm:
            slopes = starting_slopes(module, env)
            for o in self.slopes:
                t[("alpha", o)] = slopes[module.inputs[alpha_roles[o]]]
            for v in self.relus:
                t[("beta", v)] = torch.zeros_like(t[("alpha", self.relu_slope[v])])
        start = env[module.outputs["bounds"]]
        last_env = env
        self.cut = False
        if iterations > 0:
            t_steps = time.perf_counter()
            found = self._optimise(module, env, t, signs, iterations, start, deadline, exhausted, run_s)
            self.steps_s += time.perf_counter() - t_steps
            start, last_env = found.best["bounds"], found.last_env
            self.cut = found.cut
            for k, o in enumerate(self.slopes):
                t[("alpha", o)] = found.best_variables[k]
            for k, v in enumerate(self.relus):
                t[("beta", v)] = found.best_variables[len(self.slopes) + k]
        t["margin"] = torch.maximum(t["margin"], self.margins(pair, start[0], start[1], exact=sound))
        if not trial:
            self._scores(module, env, last_env, t)
            self._curved_scores(module, inputs, t, signs)
        for key in t:                         # the queue keeps float32 warm starts and scores
            if t[key].dtype == torch.float64 and key != "margin":
                t[key] = t[key].float()
        result = DomainSet(t).select(slice(0, n))
        seconds = time.perf_counter() - t0
        self.stats["bound_s"] += seconds
        self.stats["trial_domains" if trial else "domains_bounded"] += n
        if not trial:
            self.stats["max_batch"] = max(self.stats["max_batch"], n)
            self._resize(size, seconds, module.stats["logical_bytes"])
        return result

    def confirm(self, domains: DomainSet, every: bool = False) -> DomainSet:
        """The domains with every positive margin (``every``: every margin) recomputed by the
        sound beta-crown plan at their own slopes and multipliers (one run, no optimisation);
        without sound_fp, as they are."""
        proven = (domains.t["margin"] > (-math.inf if every else 0)).nonzero().flatten()
        if self.sound is None or not len(proven):
            return domains
        t0 = time.perf_counter()
        n = len(proven)
        size = 1 << max(0, math.ceil(math.log2(n)))
        t = domains.select(torch.cat([proven, proven[:1].expand(size - n)])).t
        module, _ = api.get_plan(self.graph, self.key, SPLIT_METHOD, size, self.rows, self.sound)
        pair = t["pair"]
        f64 = torch.float64
        inputs = {"box": self.boxes(pair, f64), "C": self.C_exact[pair]}
        for v in self.relaxed:
            inputs[Role("interm", v)] = torch.stack((t[("lo", v)], t[("hi", v)])).to(f64)
            if Role("refine", v) in module.inputs:          # the neurons the search re-tightened
                inputs[Role("refine", v)] = t[("refine", v)]
        for o in self.slopes:
            inputs[Role("alpha", o, self.output)] = t[("alpha", o)].to(f64)
        for v in self.relus:
            inputs[Role("beta", v, self.output)] = (t[("beta", v)] * t[("sign", v)].unsqueeze(1)).to(f64)
        lb, ub = api._executor.run(module, inputs)["bounds"]
        sound = self.margins(pair, lb, ub, exact=True)[:n]
        margin = domains.t["margin"].clone()
        margin[proven] = sound
        self.stats["confirm_s"] = self.stats.get("confirm_s", 0.0) + time.perf_counter() - t0
        if not every:
            self.stats["unconfirmed"] = self.stats.get("unconfirmed", 0) + int((~(sound > 0)).sum())
        return DomainSet({**domains.t, "margin": margin})

    def _optimise(self, module, env, t, signs, iterations, start, deadline, exhausted, forward_s):
        """Projected Adam on alpha (in [0, 1]) and beta (>= 0) from the domains' warm starts.
        On ``exhausted`` domains (the network linear there) the bound is a Lagrangian dual of
        a linear program, which may need large multipliers (an empty domain's dual is
        unbounded): beta's steps are ten times larger and do not decay."""
        alpha_ids = {o: module.inputs[Role("alpha", o, self.output)] for o in self.slopes}
        beta_ids = {v: module.inputs[Role("beta", v, self.output)] for v in self.relus}
        alphas = {o: t[("alpha", o)].clone().requires_grad_(True) for o in self.slopes}
        betas = {v: t[("beta", v)].clone().requires_grad_(True) for v in self.relus}

        def feed():
            out = {alpha_ids[o]: alphas[o] for o in self.slopes}
            out.update({beta_ids[v]: betas[v] * signs[v] for v in self.relus})
            return out

        def project():
            for o in self.slopes:
                alphas[o].clamp_(0.0, 1.0)
            for v in self.relus:
                betas[v].clamp_(min=0.0)

        groups = [{"params": list(alphas.values()), "lr": self.config.optimiser.lr},
                  {"params": list(betas.values()), "lr": self.config.lr_beta * (10 if exhausted else 1)}]
        opt = AlphaConfig(iterations=iterations, lr=self.config.optimiser.lr,
                          lr_decay=1.0 if exhausted else self.config.optimiser.lr_decay,
                          early_stop_patience=self.config.optimiser.early_stop_patience)
        return descend(module, api._executor, env, groups, feed, project, opt,
                       start={"bounds": start}, track_variables=True, deadline=deadline, forward_s=forward_s)

    def _refine_selection(self, t: dict, v: str) -> torch.Tensor:
        """[N, k] the neurons of v whose bounds each domain re-tightens: those of best branching
        score (the widest before the first scores; of a ReLU's input only the unsplit unstable
        ones), padded by repeating the best (a neuron bounded twice changes nothing)."""
        lo, hi = t[("lo", v)].flatten(1), t[("hi", v)].flatten(1)
        score = t[("score", v)].flatten(1) if ("score", v) in t else hi - lo
        if v in self.relu_slope:
            score = score.masked_fill(~((lo < 0) & (hi > 0) & (t[("sign", v)].flatten(1) == 0)), -math.inf)
        k = min(self.config.refine_neurons, score.shape[1])
        best, idx = score.topk(k, dim=1)
        return torch.where(best > -math.inf, idx, idx[:, :1])

    def _scores(self, module, first_env, env, out: dict) -> None:
        """BaBSR's intercept score per neuron (-inf where no split is possible), from the
        re-tightened intermediate bounds of the first run (``first_env``) where the plan has them."""
        relu_of = {module.inputs[Role("alpha", o, self.output)]: v for v, o in self.relu_slope.items()}
        coeff = {relu_of[op.inputs[3]]: env[op.inputs[0]].detach()
                 for op in module.ops() if len(op.inputs) > 3 and op.inputs[3] in relu_of}
        for v in self.relus:
            lo, hi, sign = out[("lo", v)], out[("hi", v)], out[("sign", v)]
            if Role("interm", v) in module.outputs:
                lo, hi = first_env[module.outputs[Role("interm", v)]].to(lo.dtype)
            free = (lo < 0) & (hi > 0) & (sign == 0)
            intercept = (-lo * hi / (hi - lo).clamp(min=1e-12)).clamp(min=0)
            a_neg = coeff[v].clamp(max=0).abs().sum(1)
            a_pos = coeff[v].clamp(min=0).sum(1)
            # the tie-break term keeps neurons with only positive coefficients splittable
            score = a_neg * intercept + 1e-3 * a_pos * torch.minimum(hi, -lo).clamp(min=0)
            out[("score", v)] = score.masked_fill(~free, -math.inf)

    def _curved_scores(self, module, inputs: dict, out: dict, signs: dict) -> None:
        """A curved neuron's score: the first-order gain of the domains' lower bounds when its
        interval is halved, averaged over both halves (-inf where narrower than
        min_split_width), or cut at its kink (-inf where the kink is not inside). One more run
        of the plan, differentiated with respect to the intervals, at the domains' current
        slopes and multipliers."""
        if not self.curved:
            return
        relu_left = [(out[("score", v)] > -math.inf).flatten(1).any(1) for v in self.relus]
        if relu_left and torch.stack(relu_left).any(0).all():    # no curved split chosen yet
            for v in self.curved:
                out[("score", v)] = torch.full_like(out[("lo", v)], -math.inf)
            return
        interm = {v: inputs[Role("interm", v)].detach().clone().requires_grad_(True) for v in self.curved}
        dtype = interm[self.curved[0]].dtype
        given = {Role("alpha", o, self.output): out[("alpha", o)].to(dtype) for o in self.slopes}
        given.update({Role("beta", v, self.output): out[("beta", v)].to(dtype) * signs[v] for v in self.relus})
        feed = {**inputs, **given, **{Role("interm", v): interm[v] for v in self.curved}}
        with torch.enable_grad():
            env = api._executor.run_functional(module, feed)
            lower = env[module.outputs["bounds"]][0]
            grads = torch.autograd.grad(lower.sum(), [interm[v] for v in self.curved], allow_unused=True)
        for v, g in zip(self.curved, grads):
            lo, hi = out[("lo", v)], out[("hi", v)]
            if v in self.kinks:                 # the children [c, u] and [l, c]
                c = self.kinks[v].to(lo.dtype).view(lo.shape[1:])
                raised, lowered, splits = c - lo, hi - c, (lo < c) & (c < hi)
            else:
                raised = lowered = (hi - lo) / 2
                splits = hi - lo > self.config.min_split_width
            if g is None:                       # the bound does not depend on this interval
                gain = torch.zeros_like(lo)
            else:
                g = g.detach().to(lo.dtype)
                gain = (raised * g[0].clamp(min=0) + lowered * (-g[1]).clamp(min=0)) / 2
            out[("score", v)] = gain.masked_fill(~splits, -math.inf)

    def _resize(self, size: int, seconds: float, plan_bytes: int) -> None:
        """The next batch: double while within the time target of a call and the memory
        budget (every buffer of the plan is kept for autograd, plus the optimiser's state:
        about three times the plan's logical bytes)."""
        cap = min(self.config.max_batch, self.config.memory_budget * size / max(1, 3 * plan_bytes))
        if seconds > 0:
            cap = min(cap, self.config.call_seconds * size / seconds)
        cap = 1 << max(1, int(math.floor(math.log2(max(2.0, cap)))))
        self.batch = min(2 * size, cap)

    # -- splitting --------------------------------------------------------------------------
    def split(self, parents: DomainSet, index: torch.Tensor) -> DomainSet:
        """Both children of each parent on its neuron ``index`` [P] (flat over the ReLU inputs,
        then the curved neurons): the active (upper half) ones first, then the inactive (lower
        half) ones."""
        P = len(parents)
        children = DomainSet.cat([parents, parents])
        t = children.t
        offset = 0
        rows = torch.arange(P, device=self.device)
        for v in self.relus + self.curved:
            size = math.prod(t[("lo", v)].shape[1:])
            mine = (index >= offset) & (index < offset + size)
            if mine.any():
                r, j = rows[mine], index[mine] - offset
                shape = t[("lo", v)].shape
                lo, hi = t[("lo", v)].flatten(1).clone(), t[("hi", v)].flatten(1).clone()
                if v in self.relu_slope:
                    cut = 0.0
                else:
                    cut = self.kinks[v][j].to(lo.dtype) if v in self.kinks else (lo[r, j] + hi[r, j]) / 2
                lo[r, j], hi[P + r, j] = cut, cut              # [cut, u] (a ReLU active), [l, cut]
                t[("lo", v)], t[("hi", v)] = lo.view(shape), hi.view(shape)
                if v in self.relu_slope:
                    sign = t[("sign", v)].flatten(1).clone()
                    sign[r, j], sign[P + r, j] = 1, -1         # active: z >= 0; inactive: z <= 0
                    t[("sign", v)] = sign.view(shape)
            offset += size
        return children

    def choose(self, parents: DomainSet, deadline: float) -> torch.Tensor:
        """The neuron to split per parent (flat index; -1: nothing left to split). The best
        few by score are tried (filtered smart branching): both children of each candidate
        are bounded once with the parent's alpha and beta, and the candidate whose worse child
        has the best margin wins; ties go to the score."""
        relu = [parents.t[("score", v)].flatten(1) for v in self.relus]
        curved = [parents.t[("score", v)].flatten(1) for v in self.curved]
        if relu and curved:                 # curved neurons only once no ReLU is left to split
            relu_left = (torch.cat(relu, 1) > -math.inf).any(1, keepdim=True)
            curved = [c.masked_fill(relu_left, -math.inf) for c in curved]
        flat = torch.cat(relu + curved, 1)
        k = min(self.config.branch_candidates, flat.shape[1])
        score, cand = flat.topk(k, dim=1)                           # [P, k], best first
        first = torch.where(score[:, 0] > -math.inf, cand[:, 0], torch.full_like(cand[:, 0], -1))
        if k == 1:
            return first
        P = len(parents)
        trials = self.split(parents.select(torch.arange(P, device=self.device).repeat(k)), cand.T.reshape(-1))
        trials.t["margin"] = torch.full((2 * P * k,), -math.inf, dtype=torch.float64, device=self.device)
        margins = self.bound(trials, 0, deadline, trial=True).t["margin"]
        value = torch.minimum(margins[: P * k], margins[P * k:]).reshape(k, P).T
        value = value.masked_fill(score == -math.inf, -math.inf)
        best = cand[torch.arange(P, device=self.device), value.argmax(dim=1)]           # the first maximum: best score
        return torch.where(first >= 0, best, first)

    # -- the search -------------------------------------------------------------------------
    def root(self, intermediate: dict[str, torch.Tensor], margins: torch.Tensor) -> DomainSet:
        """One unsplit domain per pair, from intermediate bounds over the boxes (ReLU input ->
        stack(lower, upper) [2, boxes, *shape], e.g. alpha-CROWN's) and the margins [boxes,
        disjuncts] already certified."""
        boxes = torch.tensor([b for b, _ in self.pairs], device=self.device)
        t = {"pair": torch.arange(len(self.pairs), device=self.device),
             "margin": torch.stack([margins[b, k] for b, k in self.pairs]).double().nan_to_num(nan=-math.inf)}
        for v in self.relaxed:
            lo, hi = round_outward(intermediate[v][:, boxes], torch.float32)   # still contains the sound bounds
            t[("lo", v)], t[("hi", v)] = lo.clone(), hi.clone()
        for v in self.relus:
            t[("sign", v)] = torch.zeros(t[("lo", v)].shape, dtype=torch.int8, device=self.device)
        return DomainSet(t)

    def run(self, root: DomainSet, deadline: float, bounded: bool = False) -> ReluBabOutcome:
        """The search from ``root`` (``bounded``: already bounded and confirmed)."""
        t0 = time.perf_counter()
        attack_before = self.attack.seconds if self.attack else 0.0
        progress = Progress("ReLU branch and bound")
        bounded = root if bounded else self.confirm(self.bound(root, self.config.root_iterations, deadline))
        queue = DomainQueue(*self._lean(bounded))
        queue.push(bounded.select(~(bounded.t["margin"] > 0)))
        while len(queue):
            if not fits(self.fixed_s * self.batch, deadline):   # a round but for its steps
                return self._outcome("timeout", None, t0, queue)
            held = queue.nbytes()
            if held > self.config.queue_limit:
                self.stats["stopped"] = f"queue over {self.config.queue_limit} bytes"
                return self._outcome("unknown", None, t0, queue)
            start, steps_s = time.perf_counter(), self.steps_s
            # the worst domains first, while the queue is within its budget
            over = held > self.config.queue_budget
            self.stats["rounds_over_budget"] += over
            parents = queue.pop(max(1, self.batch // 2), nearest=over)
            index = self.choose(parents, deadline)
            self.stats["rounds"] += 1
            if (index < 0).any():
                # every neuron split or stable: the network is linear there and only the
                # multipliers can still move the bound, given many more steps
                # (on the sound plan directly when sound_fp: its large multipliers are where
                # float32 and float64 disagree most)
                exhausted = self.bound(parents.select(index < 0), self.config.exhausted_iterations, deadline,
                                       exhausted=True, sound=self.sound is not None)
                self.stats["exhausted"] = self.stats.get("exhausted", 0) + len(exhausted)
                failed = ~(exhausted.t["margin"] > 0)
                if failed.any():
                    self.stats["unsplittable"] += int(failed.sum())
                    if not self.config.pair_seconds:
                        # (steps the deadline cut short decide nothing)
                        return self._outcome("timeout" if self.cut else "unknown", None, t0, queue, parents)
                    self._give_up(exhausted.t["pair"][failed], queue)
                # the others, but for those of the pairs just given up
                keep = (index >= 0) & ~self.given_up[parents.t["pair"]]
                parents, index = parents.select(keep), index[keep]
                if not len(parents):
                    continue
            children = self.confirm(self.bound(self.split(parents, index), self.config.optimiser.iterations,
                                               deadline))
            proven = children.t["margin"] > 0
            self.stats["leaves_proven"] += int(proven.sum())
            queue.push(children.select(~proven))
            if self.config.pair_seconds:     # the round's time, shared by its children
                share = (time.perf_counter() - start) / len(children)
                self.spent += share * torch.bincount(children.t["pair"], minlength=len(self.pairs))
                self._give_up((self.spent > self.config.pair_seconds).nonzero().flatten(), queue)
            self.fixed_s = (time.perf_counter() - start - (self.steps_s - steps_s)) / len(children)
            progress.tick(len(queue), deadline, domains=self.stats["domains_bounded"],
                          worst_margin=f"{queue.worst():.4g}")
            self.stats["max_queue"] = max(self.stats["max_queue"], len(queue))
            if self.attack and len(queue) and \
                    self.attack.seconds - attack_before <= self.config.attack_share * (time.perf_counter() - t0):
                cex = self.attack(deadline)
                if cex is not None:
                    return self._outcome("violated", cex, t0, queue)
        return self._outcome("unknown" if self.given_up.any() else "holds", None, t0, queue)

    def _lean(self, root: DomainSet) -> tuple:
        """(pack, unpack) for the queue of a search from ``root`` (one unsplit domain per pair).
        Where domains keep their parent's bounds (no re-tightening, no curved neuron cut at a
        midpoint), a domain's intermediate bounds are its pair's root bounds with each split
        neuron clamped to its side: the queue keeps the signs only (lo and hi are 8 of the 21
        bytes a ReLU neuron takes per domain). Else (None, None): domains as they are."""
        if self.config.refine_neurons or self.curved or len(root) != len(self.pairs) or \
                any(bool(root.t[("sign", v)].any()) for v in self.relus):
            return None, None
        order = torch.argsort(root.t["pair"])
        base = {v: (root.t[("lo", v)][order], root.t[("hi", v)][order]) for v in self.relus}
        bounds = [k for v in self.relus for k in (("lo", v), ("hi", v))]

        def pack(domains: DomainSet) -> DomainSet:
            return DomainSet({k: t for k, t in domains.t.items() if k not in bounds})

        def unpack(domains: DomainSet) -> DomainSet:
            t, pair = dict(domains.t), domains.t["pair"]
            for v, (lo, hi) in base.items():
                sign = t[("sign", v)]
                t[("lo", v)] = torch.where(sign > 0, 0.0, lo[pair])
                t[("hi", v)] = torch.where(sign < 0, 0.0, hi[pair])
            return DomainSet(t)

        return pack, unpack

    def _give_up(self, pairs: torch.Tensor, queue: DomainQueue) -> None:
        """Stop searching the pairs listed (past their time budget, or unprovable)."""
        self.given_up[pairs] = True
        queue.drop(self.given_up)
        self.stats["pairs_given_up"] = int(self.given_up.sum())

    def _outcome(self, verdict: str, cex, t0: float, queue: DomainQueue,
                 in_flight: DomainSet | None = None) -> ReluBabOutcome:
        self.stats["seconds"] = time.perf_counter() - t0
        unproven = self.given_up | queue.pairs(len(self.pairs), self.device)
        if in_flight is not None:
            unproven[in_flight.t["pair"]] = True
        return ReluBabOutcome(verdict, cex, dict(self.stats), (~unproven).nonzero().flatten().tolist())
