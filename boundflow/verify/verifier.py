"""``verify(model, property, timeout)``: a verdict on a VNNLIB property.

Cheap things first, as most instances are decided by them: one bound over the whole input
box(es) (often proves the property), then a short PGD attack (often finds a counterexample),
then branch and bound with attacks inside it until the deadline.

Verdicts: "holds" (every disjunct of the unsafe set proven unreachable from every box),
"violated" (a counterexample confirmed by onnxruntime on the original ONNX file), "unknown"
(the search gave up before the deadline: queue budget, or a domain float32 cannot split) and
"timeout".
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from boundflow import api
from boundflow.frontends.onnx import load_onnx
from boundflow.frontends.vnnlib import read_vnnlib
from boundflow.planner.config import PlannerConfig
from boundflow.planner.lower import fp32_refusal
from boundflow.runtime.device import resolve_device
from boundflow.verify.attack import AttackConfig, Attacker, Counterexample, OrtChecker
from boundflow.verify.bab import BabConfig, Bounder, BranchAndBound, Domains, MixedBounder, combine
from boundflow.verify.deadline import fits
from boundflow.verify.property import Problem, make_problem
from boundflow.verify.relu_bab import ReluBabConfig, ReluBranchAndBound
from boundflow.verify.stabilise import StabiliseConfig, stabilise

VERDICTS = ("holds", "violated", "unknown", "timeout")
# alpha-CROWN's first pass (plain CROWN, uninterruptible) costs about one first bound; it is
# worth starting with time for a few steps after it
REFINE_COST_FACTOR = 4
# alpha-CROWN stops after this share of the time left, so that branch and bound gets the rest
REFINE_SHARE = 0.5


@dataclass(frozen=True)
class VerifyConfig:
    """Knobs of :func:`verify`. The search bounds with ``verify``'s ``method``; before it, the
    whole boxes are bounded with ``first_method`` (cheap) and, for inputs of at least
    ``refine_min_inputs`` values, ``refine_method`` (tighter, slower). Input splitting pays off
    on few inputs, tighter bounds on many (MNIST, CIFAR), hence the threshold."""
    bab: BabConfig = BabConfig()
    relu_bab: ReluBabConfig = ReluBabConfig()
    stabilise: StabiliseConfig = StabiliseConfig()   # before ReLU branch and bound (stabilise.py)
    attack: AttackConfig = AttackConfig()
    first_method: str = "crown"
    refine_method: str | None = "alpha-crown"
    refine_min_inputs: int = 32
    # branch and bound: "input" splits input boxes (few inputs, e.g. ACAS Xu), "relu" splits
    # neurons (ReLUs with beta-CROWN, then other relaxed ops' inputs at midpoints; needs
    # refine_method "alpha-crown" for its intermediate bounds), "auto" picks "relu" from
    # refine_min_inputs inputs on
    split: str = "auto"
    seed: int = 0
    # every proof sound in floating point (api.bound's sound_fp): the first and branch-and-bound
    # bounds are float32 and each margin they prove is confirmed by a sound bound; the refining
    # bound (the root of ReLU branch and bound) is sound itself. Off only to measure its cost.
    sound_fp: bool = True
    # where the bounds, the attack and the branch-and-bound queues run: "auto" (CUDA when torch
    # sees it), "cpu", "cuda" or "cuda:N"; onnxruntime checks counterexamples on the CPU
    device: str = "auto"

    def __post_init__(self):
        if self.split not in ("auto", "input", "relu"):
            raise ValueError(f"split must be 'auto', 'input' or 'relu', not {self.split!r}")
        if "device" in self.bab.bound_options:
            raise ValueError("the device of the search is VerifyConfig.device, not a bound option")


@dataclass
class Result:
    """A verdict. ``counterexample`` is ``(x, y)`` (flat float32 input and the onnxruntime
    output) when violated, else None. ``stats`` says which phase decided and what it cost."""
    verdict: str
    counterexample: tuple[np.ndarray, np.ndarray] | None
    seconds: float
    stats: dict = field(default_factory=dict)


def verify(model_path, vnnlib_path, timeout: float, method: str = "crown", *,
           config: VerifyConfig | None = None) -> Result:
    """Decide whether the VNNLIB property holds for the ONNX model within ``timeout`` seconds.

    ``method`` is the bound method of the branch and bound ("crown", "crown-ibp", "ibp",
    "alpha-crown"). ``timeout`` counts from this call. Raises :class:`~boundflow.errors.BoundflowError` for a
    model or property that cannot be read. Autograd (the attack, alpha-CROWN's slopes, branch
    and bound's scores) is on whatever the caller's mode: a no_grad or inference_mode block
    around the call changes nothing.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _verify(model_path, vnnlib_path, timeout, method, config)


def _verify(model_path, vnnlib_path, timeout: float, method: str, config: VerifyConfig | None) -> Result:
    t0 = time.perf_counter()
    deadline = t0 + timeout
    config = config or VerifyConfig()
    device = resolve_device(config.device)
    model = str(model_path)
    problem = _load(model, vnnlib_path).to(device)
    # the attack runs the network as imported, not simplified: folded constants (a normalisation
    # merged into the first layer) round differently from the file onnxruntime checks
    attacker = Attacker(load_onnx(model).to(device), problem, OrtChecker(model, problem), config.attack,
                        generator=torch.Generator(device).manual_seed(config.seed))
    bounders = _bounders(model, problem, method, config)
    stats: dict = {"method": method, "device": device, "boxes": problem.num_boxes,
                   "disjuncts": problem.num_disjuncts, "load_s": time.perf_counter() - t0}
    verdict, cex = _decide(model, problem, bounders, attacker, config, deadline, stats)
    stats["attack"] = attacker.stats.as_dict()
    stats["bound_calls"] = sum(b.calls for b in bounders.values())
    stats["bound_s"] = sum(b.seconds for b in bounders.values())
    pair = None if cex is None else (cex.x, cex.y)
    return Result(verdict, pair, time.perf_counter() - t0, stats)


def _bounders(model: str, problem: Problem, method: str, config: VerifyConfig) -> dict[str, Bounder]:
    """The bound computations of the phases: "first", "refine" (when it applies), "bab"."""
    options = config.bab.bound_options
    sound = config.sound_fp

    def confirmed(method: str) -> Bounder:
        confirm = Bounder(model, problem, method, options, sound=True) if sound else None
        return Bounder(model, problem, method, options, confirm=confirm)

    out = {"first": confirmed(config.first_method), "bab": confirmed(method)}
    if sound and fp32_refusal(api.load_model(model)[0]) is None:
        out["bab"] = MixedBounder(model, problem, method, options)     # sound at once, cheaper
    if config.refine_method and problem.num_inputs >= config.refine_min_inputs:
        # their intermediate bounds are where ReLU branch and bound starts: the refining
        # bound's, or the first bound's when the refining one did not fit
        planner = options.get("config") or PlannerConfig(crown_interm=options.get("crown_interm", "sparse"))
        refine = dict(options, config=dataclasses.replace(planner, export_intermediate=True))
        refine.pop("crown_interm", None)
        # (sound bounds when sound_fp: the search's root must be, see relu_bab)
        out["first"] = Bounder(model, problem, config.first_method, refine, sound=sound)
        out["refine"] = Bounder(model, problem, config.refine_method, refine, sound=sound)
    return out


def _relu_split(model: str, problem: Problem, config: VerifyConfig) -> bool:
    """Whether to split neurons (ReLUs at 0 with beta-CROWN, other relaxed ops' inputs at their
    interval's midpoint; a network with no relaxed op is decided at the root), else input
    boxes: for many inputs."""
    return problem.num_inputs >= config.refine_min_inputs if config.split == "auto" else config.split == "relu"


def _load(model: str, vnnlib_path) -> Problem:
    shape = tuple(int(d) for d in api.input_shape(model))
    prop = read_vnnlib(Path(vnnlib_path), num_inputs=math.prod(shape),
                       num_outputs=int(api.num_outputs(model)))
    return make_problem(prop, shape)


def _decide(model: str, problem: Problem, bounders: dict, attacker: Attacker, config: VerifyConfig,
            deadline: float, stats: dict) -> tuple[str, Counterexample | None]:
    """The phases, cheapest first; ``stats["decided_by"]`` names the one that answered."""
    def over() -> bool:
        return time.perf_counter() >= deadline

    if over():
        stats["decided_by"] = "deadline"
        return "timeout", None
    margins = bounders["first"].margins(problem.exact_lo, problem.exact_hi)
    stats["first_margin"] = float(margins.amin())
    if bool((margins > 0).all()) or over():
        return _verdict_by_bound(margins, stats)
    cex = attacker.run(problem.inner_lo, problem.inner_hi, torch.arange(problem.num_boxes, device=problem.device),
                       ~(margins > 0), deadline)
    if cex is not None:
        stats["decided_by"] = "attack"
        return "violated", cex
    now = time.perf_counter()
    refine_deadline = now + REFINE_SHARE * (deadline - now)
    if "refine" in bounders and _affordable(bounders["first"], refine_deadline):
        # both are sound lower bounds: keep the better one (fmax: a NaN is no information)
        refined = bounders["refine"].margins(problem.exact_lo, problem.exact_hi, refine_deadline)
        margins = torch.fmax(margins, refined)
        stats["refined_margin"] = float(margins.amin())
        if bool((margins > 0).all()) or over():
            return _verdict_by_bound(margins, stats)
    if _relu_split(model, problem, config):
        return _relu_search(model, problem, bounders, attacker, config, margins, deadline, stats)
    roots = Domains(problem.outer_lo, problem.outer_hi, torch.arange(problem.num_boxes, device=problem.device),
                    combine(margins, margins), torch.zeros(problem.num_boxes, dtype=torch.float64, device=problem.device))
    open_roots = roots.select(roots.alive().any(dim=1))
    outcome = BranchAndBound(problem, bounders["bab"], attacker, config.bab).run(open_roots, deadline)
    stats["decided_by"] = "bab"
    stats["bab"] = outcome.stats
    return outcome.verdict, outcome.counterexample


class _PairAttack:
    """PGD on the unproven (box, disjunct) pairs of the whole problem, for ReLU branch and bound."""

    def __init__(self, attacker: Attacker, problem: Problem, pairs: list[tuple[int, int]]):
        self.attacker, self.problem = attacker, problem
        self.boxes = sorted({b for b, _ in pairs})
        alive = torch.zeros(len(self.boxes), problem.num_disjuncts, dtype=torch.bool)
        for b, k in pairs:
            alive[self.boxes.index(b), k] = True
        self.alive = alive.to(problem.device)
        self.index = torch.tensor(self.boxes, device=problem.device)

    @property
    def seconds(self) -> float:
        return self.attacker.stats.seconds

    def __call__(self, deadline: float) -> Counterexample | None:
        b, p = self.index, self.problem
        return self.attacker.run(p.inner_lo[b], p.inner_hi[b], b, self.alive, deadline)


def _relu_search(model: str, problem: Problem, bounders: dict, attacker: Attacker, config: VerifyConfig,
                 margins: torch.Tensor, deadline: float, stats: dict) -> tuple[str, Counterexample | None]:
    """ReLU branch and bound on every unproven (box, disjunct) pair at once, from the refining
    bound's intermediate bounds (the first bound's when the refining one did not run)."""
    refine = bounders.get("refine")
    if refine is None:
        raise ValueError("ReLU branch and bound needs refine_method='alpha-crown' (its intermediate bounds)")
    start = refine.last_intermediate or bounders["first"].last_intermediate
    pairs = [tuple(bk) for bk in (~(margins > 0)).nonzero().tolist()]
    search = ReluBranchAndBound(model, problem, pairs, _PairAttack(attacker, problem, pairs), config.relu_bab,
                                refine.options["config"], sound_fp=config.sound_fp)
    if not search.relaxed:                    # a linear network: nothing to split, the bound is final
        stats["decided_by"] = "relu_bab"
        stats["relu_bab"] = {"stopped": "no neuron to split"}
        return "unknown", None
    # the root's first pass is one backward pass; the first bound made one per relaxed op's
    # input and one for the output
    if not fits(bounders["first"].seconds / (len(search.relaxed) + 1), deadline):
        stats["decided_by"] = "deadline"
        return "timeout", None
    outcome = None
    if config.stabilise.share > 0:
        # the search as it is first, for a short while: what it decides quickly stays quick
        outcome = search.run(search.root(start, margins), min(deadline, time.perf_counter() + config.stabilise.after))
        if outcome.verdict not in ("holds", "violated"):
            until = time.perf_counter() + config.stabilise.share * (deadline - time.perf_counter())
            start, stats["stabilise"] = stabilise(model, problem, start, search.relus, config.stabilise,
                                                  config.relu_bab, refine.options["config"], config.sound_fp, until,
                                                  torch.Generator(problem.device).manual_seed(config.seed))
            outcome = None
    if outcome is None:
        outcome = search.run(search.root(start, margins), deadline)
    stats["decided_by"] = "relu_bab"
    stats["relu_bab"] = outcome.stats
    return outcome.verdict, outcome.counterexample


def _affordable(first: Bounder, deadline: float) -> bool:
    """Whether the refining bound's first pass and a few steps fit before ``deadline`` (its
    steps stop there)."""
    return fits(REFINE_COST_FACTOR * first.seconds, deadline)


def _verdict_by_bound(margins: torch.Tensor, stats: dict) -> tuple[str, None]:
    """"holds" when every box has every disjunct proven, else the deadline passed."""
    if (margins > 0).all():
        stats["decided_by"] = "bound"
        return "holds", None
    stats["decided_by"] = "deadline"
    return "timeout", None


def result_file_text(result: Result | None) -> str:
    """The VNN-COMP result file: ``unsat``, ``sat`` and the counterexample as
    ``((X_0 v)\\n (X_1 v)\\n ... (Y_0 v) ...)``, ``unknown``, ``timeout``, or ``error`` (for
    ``result=None``). Values are printed exactly (``repr`` of the float32 values as float64)."""
    if result is None:
        return "error\n"
    if result.verdict == "holds":
        return "unsat\n"
    if result.verdict != "violated":
        return f"{result.verdict}\n"
    x, y = result.counterexample
    pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x)]
    pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y)]
    return "sat\n(" + "\n ".join(pairs) + ")\n"
