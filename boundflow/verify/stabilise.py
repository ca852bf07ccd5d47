"""Root stabilisation: prove the signs of "unstable" ReLU inputs before ReLU branch and bound.

The search's root takes its intermediate bounds from alpha-CROWN over the whole box. On deep nets
many neurons it leaves unstable (``l < 0 < u``) never change sign on the box, and each one costs
every domain of the search a relaxation, which loosens the layers after it too. So, layer by
layer (ReLU inputs ``v`` in node order), on the network cut at ``v`` (:func:`prefix`): the
layer's bounds are intersected with a sound CROWN pass from the earlier layers' clamped bounds,
then each neuron ``z_j`` still unstable gets a short ReLU branch and bound of its own, the
unsafe set ``{z_j <= 0}`` (or ``{z_j >= 0}``) as its property. A "holds" clamps the neuron's
interval to ``[0, u]`` (or ``[l, 0]``), and the later layers start from the clamped earlier
ones. Neurons that probed points of the box show on both sides are not tried; the others are
tried from the nearest to stable (the bound near 0, relative to the width) on, each within
``neuron_seconds``, all within the deadline.

Soundness: the tightening is a sound plan's bound from sound bounds; a neuron is clamped only on
a "holds" of its search, which with sound_fp counts sound proofs only (see relu_bab's module
docstring); bounds valid on the box stay valid on it.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from boundflow import api
from boundflow.domains import concrete
from boundflow.ir.primal import Graph
from boundflow.passes.simplify import remove_dead_nodes
from boundflow.planner.config import PlannerConfig
from boundflow.planner.lower import relaxed_nodes
from boundflow.verify.bab import output_pass
from boundflow.verify.deadline import fits
from boundflow.verify.progress import Progress
from boundflow.verify.property import Problem
from boundflow.verify.relu_bab import ReluBabConfig, ReluBranchAndBound


@dataclass(frozen=True)
class StabiliseConfig:
    """When and how long. The verifier runs the search as it is for ``after`` seconds first, and
    stabilises only when that did not decide."""
    after: float = 5.0             # seconds of the plain search first
    share: float = 0.4             # then at most this share of the time left (0: no stabilisation)
    neuron_seconds: float = 1.0    # per neuron's search
    samples: int = 256             # random points per box that rule out neurons seen on both sides,
    corner_steps: int = 2          # and per neuron the corners its gradient points to, this many times


CHUNK = 512    # neurons whose gradients are taken in one pass (a copy of the input each)


def prefix(graph: Graph, value: str) -> Graph:
    """The part of ``graph`` that computes ``value``, with ``value`` as its one output."""
    g = graph.copy()
    g.outputs = [value]
    return remove_dead_nodes(g)


def stabilise(model: str, problem: Problem, intermediate: dict[str, torch.Tensor], values: list[str],
              config: StabiliseConfig, search_config: ReluBabConfig, planner: PlannerConfig | None,
              sound_fp: bool, deadline: float, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """``intermediate`` (ReLU input -> [2, boxes, *shape] bounds over the problem's boxes) with the
    neurons of ``values`` whose sign a search proves clamped at 0; and stats."""
    graph, key = api.load_model(model)
    out = dict(intermediate)
    stats = {"tightened": 0, "tried": 0, "stabilised": 0, "seen_both_signs": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    progress = Progress("stabilisation")
    for v in values:
        if v not in graph.values or v not in out:     # (renamed by layout folding: left as it is)
            continue
        cut = (prefix(graph, v), (key, "prefix", v))
        if not relaxed_nodes(cut[0]):                 # affine in the input: its bounds are exact
            continue
        out[v] = out[v].double().clone()                # float64: the search root rounds it outward
        for b in range(problem.num_boxes):
            stats["tightened"] += _tighten(cut, problem, b, out, planner)
            for j, sign in _candidates(cut[0], problem, b, out[v][:, b].flatten(1), config, generator, stats):
                if not fits(config.neuron_seconds / 4, deadline):
                    stats["seconds"] = time.perf_counter() - t0
                    return out, stats
                stats["tried"] += 1
                if _proves(cut, problem, b, j, sign, out, search_config, planner, sound_fp,
                           min(deadline, time.perf_counter() + config.neuron_seconds)):
                    stats["stabilised"] += 1
                    bounds = out[v][:, b].view(2, -1)
                    bounds[0 if sign > 0 else 1, j] = 0.0
                progress.tick(layer=v, tried=stats["tried"], stabilised=stats["stabilised"])
    stats["seconds"] = time.perf_counter() - t0
    return out, stats


def _tighten(cut: tuple[Graph, object], problem: Problem, b: int, intermediate: dict[str, torch.Tensor],
             planner: PlannerConfig | None) -> int:
    """Intersect the cut's output bounds on box b with a sound CROWN pass (bab.output_pass,
    float64 sound_fp) from the earlier layers' bounds, clamped ones included: the
    bounds the search started with were computed before any clamp. The neurons it makes stable."""
    v = cut[0].outputs[0]
    bounds = intermediate[v][:, b].view(2, -1)
    rows = ((bounds[0] < 0) & (bounds[1] > 0)).nonzero().flatten()
    if not len(rows):
        return 0
    sound = dataclasses.replace(planner or PlannerConfig(), sound_fp=True, fp_dtype="float64",
                                export_intermediate=False, device=str(problem.device))
    eye = torch.eye(bounds.shape[1], dtype=torch.float64, device=problem.device)[rows]
    shape = (1,) + problem.input_shape
    box = torch.stack((problem.outer_lo[b].reshape(shape), problem.outer_hi[b].reshape(shape)))
    module, env = output_pass(cut, box, torch.cat([eye, -eye])[None],
                              {u: t[:, b:b + 1] for u, t in intermediate.items()}, sound)
    lb = env[module.outputs["bounds"]][0, 0]
    lo, hi = lb[: len(rows)], -lb[len(rows):]
    bounds[0, rows] = torch.fmax(bounds[0, rows], lo.to(bounds.dtype))
    bounds[1, rows] = torch.fmin(bounds[1, rows], hi.to(bounds.dtype))
    return int(((bounds[0, rows] >= 0) | (bounds[1, rows] <= 0)).sum())


def _candidates(graph: Graph, problem: Problem, b: int, bounds: torch.Tensor, config: StabiliseConfig,
                generator: torch.Generator, stats: dict) -> list[tuple[int, float]]:
    """(neuron, sign to prove) of the unstable neurons of the cut's output on box b that no
    probed point shows on the other side, nearest to stable first. Probes: random points of the
    box, and per neuron the box corners its gradient points to (from the centre, then again
    from the corners reached: a ReLU net is linear around each point), both ways."""
    lo, hi = bounds.double()
    unstable = (lo < 0) & (hi > 0)
    box_lo, box_hi = problem.inner_lo[b], problem.inner_hi[b]
    u = torch.rand((config.samples,) + box_lo.shape, generator=generator, device=box_lo.device)
    z = _cut_values(graph, problem, box_lo + u * (box_hi - box_lo))
    pos, neg = (z > 0).any(0), (z < 0).any(0)
    index = unstable.nonzero().flatten()
    for chunk in index.split(CHUNK) if len(index) else ():
        centre = ((box_lo + box_hi) / 2).expand(len(chunk), -1)
        for way in (1.0, -1.0):
            x = centre
            for _ in range(config.corner_steps):
                x = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    picked = _cut_values(graph, problem, x).gather(1, chunk[:, None]).squeeze(1)
                    (grad,) = torch.autograd.grad(picked.sum(), x)
                x = torch.where(way * grad >= 0, box_hi, box_lo)
                z = _cut_values(graph, problem, x).gather(1, chunk[:, None]).squeeze(1)
                pos[chunk] |= z > 0
                neg[chunk] |= z < 0
    stats["seen_both_signs"] += int((unstable & pos & neg).sum())
    width = hi - lo
    picks = [(j, 1.0, float(-lo[j] / width[j])) for j in (unstable & pos & ~neg).nonzero().flatten().tolist()]
    picks += [(j, -1.0, float(hi[j] / width[j])) for j in (unstable & neg & ~pos).nonzero().flatten().tolist()]
    return [(j, sign) for j, sign, _ in sorted(picks, key=lambda p: p[2])]


def _cut_values(graph: Graph, problem: Problem, x: torch.Tensor) -> torch.Tensor:
    """[N, numel] float64: the cut's output at the flat points x [N, n]."""
    v = graph.outputs[0]
    env = concrete.values(graph, x.reshape((x.shape[0],) + problem.input_shape), stop=lambda env: v in env)
    return env[v].reshape(x.shape[0], -1).double()


def _proves(cut: tuple[Graph, object], problem: Problem, b: int, j: int, sign: float,
            intermediate: dict[str, torch.Tensor], search_config: ReluBabConfig, planner: PlannerConfig | None,
            sound_fp: bool, deadline: float) -> bool:
    """Whether a ReLU branch and bound proves ``sign * z_j > 0`` on box b (z: the cut's output)."""
    device = problem.device
    numel = cut[0].values[cut[0].outputs[0]].type.numel
    row = torch.zeros(1, numel, dtype=torch.float64)
    row[0, j] = sign
    pick = slice(b, b + 1)
    sub = Problem(problem.input_shape, problem.outer_lo[pick], problem.outer_hi[pick], problem.inner_lo[pick],
                  problem.inner_hi[pick], problem.box_lo[pick], problem.box_hi[pick], row.numpy(), np.zeros(1),
                  torch.ones(1, 1, dtype=torch.bool, device=device), row.float().to(device), row.to(device),
                  torch.zeros(1, dtype=torch.float64, device=device))
    search = ReluBranchAndBound(None, sub, [(0, 0)], None, search_config, planner, sound_fp=sound_fp, loaded=cut)
    lo, hi = intermediate[cut[0].outputs[0]][:, b].reshape(2, -1)[:, j].double()
    margins = sub.disjunct_margins((lo if sign > 0 else -hi).reshape(1, 1))
    root = search.root({u: intermediate[u][:, pick] for u in search.relaxed}, margins)
    return search.run(root, deadline).verdict == "holds"
