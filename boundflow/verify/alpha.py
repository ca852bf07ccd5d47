"""alpha-CROWN: optimise the lower ReLU slopes with projected Adam.

The plan (method "alpha-crown") gives every backward pass, intermediate ones included, its own
slopes, read from module inputs "alpha:<target>:<relu input>" (one per row of A), as auto_LiRPA
does. A first run without slopes is plain CROWN: it fixes which neurons each intermediate pass
refines (pinned from then on, so the slope shapes stay put) and gives the starting slopes. Each
step then re-runs every op downstream of the slopes with autograd, intermediate bounds
included. Any slope in [0, 1] gives sound bounds, so the best bound seen per output row over
all steps is sound too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from boundflow.ir.task import BFTaskModule
from boundflow.runtime.python_executor import PythonTaskExecutor

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


def _loop_ops(module: BFTaskModule, alpha_ids: set[int]):
    """Ops downstream of the slopes, in order, without the pinned selections."""
    tainted, loop = set(alpha_ids), []
    for op in module.ops():
        if op.op not in _PINNED and any(b in tainted for b in op.inputs):
            tainted.update(op.outputs)
            loop.append(op)
    return loop


def optimize(module: BFTaskModule, inputs: dict[str, torch.Tensor], executor: PythonTaskExecutor,
             config: AlphaConfig = AlphaConfig()) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Returns lb, ub ([B, S]) and stats (iterations run, CROWN and final mean widths)."""
    roles = {role: bid for role, bid in module.inputs.items() if role.startswith("alpha:")}
    out = module.outputs["bounds"]
    with torch.no_grad():
        env = executor.run_functional(module, {**inputs, **{r: None for r in roles}})
    crown = env[out]
    if not roles:                                     # no ReLU anywhere: CROWN is exact already
        return crown[0], crown[1], {"iterations": 0}

    alphas = {}
    for op in module.ops():
        if op.op == "linear.relu_alpha":
            a, relax, bid = env[op.inputs[0]], env[op.inputs[2]], op.inputs[3]
            alphas[bid] = relax[2].unsqueeze(1).expand(a.shape).clone().requires_grad_(True)
    loop = _loop_ops(module, set(alphas))
    opt = torch.optim.Adam(list(alphas.values()), lr=config.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, config.lr_decay)
    best_lb, best_ub = crown[0].clone(), crown[1].clone()
    stale, it = 0, 0
    for it in range(1, config.iterations + 1):
        bounds = executor.run_functional(module, {}, {**env, **alphas}, loop)[out]
        lb, ub = bounds[0], bounds[1]
        improved = bool((lb.detach() > best_lb).any() or (ub.detach() < best_ub).any())
        if config.keep_best:
            best_lb, best_ub = torch.maximum(best_lb, lb.detach()), torch.minimum(best_ub, ub.detach())
        else:
            best_lb, best_ub = lb.detach(), ub.detach()
        stale = 0 if improved else stale + 1
        if it == config.iterations or stale >= config.early_stop_patience:
            break
        # lower rows only see the lower half of each slope tensor and vice versa: one loss
        # optimises the lower and the upper bounds independently
        loss = ub.sum() - lb.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for a in alphas.values():
                a.clamp_(0.0, 1.0)
    stats = {"iterations": it, "crown_mean_width": (crown[1] - crown[0]).mean().item(),
             "alpha_mean_width": (best_ub - best_lb).mean().item(), "alpha_config": config.dump()}
    return best_lb, best_ub, stats
