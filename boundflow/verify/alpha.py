"""alpha-CROWN: optimise the lower ReLU slopes with projected Adam.

The plan (method "alpha-crown") gives every backward pass, intermediate ones included, its own
slopes, read from module inputs Role("alpha", <relaxed op output>, <target>) (one per row of
A), as auto_LiRPA does. A first run without slopes is plain CROWN: it fixes which neurons each
intermediate pass refines (pinned from then on, so the slope shapes stay put) and gives the
starting slopes. Each step then re-runs every op downstream of the slopes with autograd,
intermediate bounds included. Any slope in [0, 1] gives sound bounds, so the best bound seen per
output row over all steps is sound too; likewise every output the plan exports (intermediate
bounds) keeps its best value per element.

:func:`descend` is the loop itself, shared with the beta-CROWN optimisation of ReLU branch and
bound (boundflow.verify.relu_bab), which feeds the plan from other variables.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from boundflow.ops import OPS
from boundflow.ir.task import BFTaskModule, of_kind
from boundflow.runtime.python_executor import PythonTaskExecutor
from boundflow.verify.deadline import fits

_PINNED = ("bound.unstable",)     # data-dependent selections fixed after the first run


@dataclass(frozen=True)
class AlphaConfig:
    """Defaults follow auto_LiRPA's optimize_bound_args as used for the golden fixtures."""
    iterations: int = 20
    lr: float = 0.1
    lr_decay: float = 0.98
    early_stop_patience: int = 10
    keep_best: bool = True

    def dump(self) -> dict:
        return asdict(self)


def loop_ops(module: BFTaskModule, variable_ids: set[int]):
    """Ops downstream of the variables, in order, without the pinned selections."""
    tainted, loop = set(variable_ids), []
    for op in module.ops():
        if op.op not in _PINNED and any(b in tainted for b in op.inputs):
            tainted.update(op.outputs)
            loop.append(op)
    return loop


# optimised kernel -> how its parameters start (each relaxed op says, boundflow.ops)
_STARTS = {name: start for op in OPS.values() for name, start in op.alpha_starts().items()}


def starting_slopes(module: BFTaskModule, env: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Slope buffer -> the starting slopes of the kernel that reads it (CROWN's, one per row of
    A), from a run without slopes (``env``). Optimised kernels read (A, bias, lines, slopes, ...)."""
    return {op.inputs[3]: _STARTS[op.op](op, env) for op in module.ops() if op.op in _STARTS}


class Adam:
    """Adam whose step sizes decay by ``decay`` per step: torch's update for CPU tensors
    (torch.optim.Adam with its defaults, then ExponentialLR), written out because torch.optim
    imports torch._dynamo when its first optimiser is made: 0.7 s, over 2 s on a loaded
    machine, inside the first optimisation step, where no deadline check can see it."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, groups: list[dict], decay: float):
        self.slots = [(v, k) for k, g in enumerate(groups) for v in g["params"]]   # (variable, group)
        self.lrs = [g["lr"] for g in groups]
        self.decay = decay
        self.moments: dict[int, list] = {}        # slot -> [steps, first moment, second moment]

    @torch.no_grad()
    def step(self, grads) -> None:
        """One update from the gradients of the variables (None: the variable got none)."""
        b1, b2 = self.BETAS
        for i, ((v, k), grad) in enumerate(zip(self.slots, grads)):
            if grad is None:
                continue
            # a non-finite gradient (0/0 in a relaxation of a zero-width interval) gives no
            # direction; it must not make the variable NaN
            grad = grad.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            state = self.moments.setdefault(i, [0, torch.zeros_like(v), torch.zeros_like(v)])
            state[0] += 1
            steps, m, m2 = state
            m.lerp_(grad, 1 - b1)
            m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            # (the root of a second moment below the smallest normal number adds under half an
            # ulp of EPS to the denominator: raising it there first spares sqrt the zeros and
            # subnormals of neurons without gradient, 5-30x slower here, for the same bits)
            tiny = torch.finfo(m2.dtype).tiny
            denom = (m2.clamp(min=tiny).sqrt_() / (1 - b2 ** steps) ** 0.5).add_(self.EPS)
            v.addcdiv_(m, denom, value=-(self.lrs[k] / (1 - b1 ** steps)))
        self.lrs = [lr * self.decay for lr in self.lrs]


@dataclass
class Descent:
    """What :func:`descend` found: the best value of every module output (by role, each a
    stack(lower, upper)), the variables at each region's best lower bound (when asked), the
    iterations run and the buffers of the last step (for scores that need A)."""
    best: dict[str, torch.Tensor]
    best_variables: list[torch.Tensor] | None
    iterations: int
    last_env: dict[int, torch.Tensor]
    cut: bool = False           # stopped by the deadline, not by the step count or patience


def descend(module: BFTaskModule, executor: PythonTaskExecutor, env: dict[int, torch.Tensor],
            groups: list[dict], feed: Callable[[], dict[int, torch.Tensor]], project: Callable[[], None],
            config: AlphaConfig, start: dict[str, torch.Tensor] | None = None,
            track_variables: bool = False, deadline: float | None = None, forward_s: float = 0.0) -> Descent:
    """Projected Adam on the variables of ``groups`` (torch param groups, leaf tensors with
    requires_grad, the region axis first). ``feed()`` maps them to module input buffers;
    ``project()`` puts them back in their feasible set after each step. Every output keeps its
    best value per element, starting from ``start`` (e.g. the CROWN run's). Stops early after
    ``config.early_stop_patience`` steps without progress, or before a step that would end past
    ``deadline`` (see boundflow.verify.deadline): a step costs as much as the last one, the
    first three times ``forward_s`` (the measured cost of a forward pass, e.g. of the run that
    made ``env``; a backward pass costs about two). Without a step, ``last_env`` is ``env``."""
    variables = [v for g in groups for v in g["params"]]
    loop = loop_ops(module, set(feed()))
    opt = Adam(groups, config.lr_decay)
    best = {role: t.detach().clone() for role, t in (start or {}).items()}
    best_vars = [v.detach().clone() for v in variables] if track_variables else None
    score = None
    stale, done, step = 0, 0, env
    cost = 3 * forward_s
    cut = False
    while done < config.iterations:
        if not fits(cost, deadline):
            cut = True
            break
        t0 = time.perf_counter()
        step = executor.run_functional(module, {}, {**env, **feed()}, loop)
        done += 1
        bounds = step[module.outputs["bounds"]]
        improved = False
        for role, bid in module.outputs.items():
            now, old = step[bid].detach(), best.get(role)
            if old is None:
                best[role] = now.clone()
                continue
            improved |= bool((now[0] > old[0]).any() or (now[1] < old[1]).any())
            # (fmax / fmin: a NaN bound is no information and must not replace a sound one)
            best[role] = (torch.stack((torch.fmax(old[0], now[0]), torch.fmin(old[1], now[1])))
                          if config.keep_best else now.clone())
        if track_variables:
            region = bounds[0].detach().sum(1)
            better = torch.ones_like(region, dtype=torch.bool) if score is None else region > score
            score = region if score is None else torch.maximum(score, region)
            for keep, v in zip(best_vars, variables):
                keep[better] = v.detach()[better]
        stale = 0 if improved else stale + 1
        if done == config.iterations or stale >= config.early_stop_patience:
            break
        # lower rows only see the lower half of each slope tensor and vice versa: one loss
        # optimises the lower and the upper bounds independently (a lower-only plan's upper
        # bounds are +inf and take no part)
        upper = bounds[1]
        loss = torch.where(torch.isinf(upper), 0.0, upper).sum() - bounds[0].sum()
        opt.step(torch.autograd.grad(loss, variables, allow_unused=True))
        with torch.no_grad():
            project()
        cost = time.perf_counter() - t0
    return Descent(best, best_vars, done, step, cut)


def optimize(module: BFTaskModule, inputs: dict[str, torch.Tensor], executor: PythonTaskExecutor,
             config: AlphaConfig = AlphaConfig(), deadline: float | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The best bounds of every module output (role -> stack(lower, upper); "bounds" is
    [2, B, S]) and stats (iterations run, CROWN and final mean widths). No step starts that
    would end past ``deadline`` (see :func:`descend`); the CROWN run before them always runs.
    Autograd is on whatever the caller's mode (a no_grad or inference_mode block around
    compute_bounds; inference tensors cannot be saved for backward: those inputs are copied)."""
    with torch.inference_mode(False), torch.enable_grad():
        inputs = {role: t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t
                  for role, t in inputs.items()}
        return _optimize(module, inputs, executor, config, deadline)


def _optimize(module: BFTaskModule, inputs: dict[str, torch.Tensor], executor: PythonTaskExecutor,
              config: AlphaConfig, deadline: float | None) -> tuple[dict[str, torch.Tensor], dict]:
    roles = of_kind(module.inputs, "alpha")
    t0 = time.perf_counter()
    with torch.no_grad():
        env = executor.run_functional(module, {**inputs, **{r: None for r in roles}})
    forward_s = time.perf_counter() - t0
    crown = {role: env[bid] for role, bid in module.outputs.items()}
    if not roles:                                     # no ReLU anywhere: CROWN is exact already
        return crown, {"iterations": 0, "stopped_by_deadline": False}
    alphas = {bid: a.requires_grad_(True) for bid, a in starting_slopes(module, env).items()}

    def project():
        for a in alphas.values():
            a.clamp_(0.0, 1.0)

    found = descend(module, executor, env, [{"params": list(alphas.values()), "lr": config.lr}],
                    lambda: alphas, project, config, start=crown, deadline=deadline, forward_s=forward_s)
    bounds = found.best["bounds"]
    stats = {"iterations": found.iterations, "stopped_by_deadline": found.cut, "crown_mean_width": (crown["bounds"][1] - crown["bounds"][0]).mean().item(),
             "alpha_mean_width": (bounds[1] - bounds[0]).mean().item(), "alpha_config": config.dump()}
    return found.best, stats
