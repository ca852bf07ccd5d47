"""Root stabilisation: tighten the intermediate bounds of ReLU inputs before ReLU branch and bound.

The search's root takes its intermediate bounds from alpha-CROWN over the whole box. On deep nets
they are loose: many neurons it leaves unstable (``l < 0 < u``) never change sign on the box,
and the truly unstable ones have intervals far wider than their real range. Each costs every
domain of the search a loose relaxation, which loosens the layers after it too. So, layer by
layer (ReLU inputs ``v`` in node order), on the network cut at ``v`` (:func:`prefix`):

1. the layer's bounds are intersected with a sound CROWN pass from the earlier layers' tightened
   bounds;
2. its unstable neurons are probed (random points of the box and gradient corners, :func:`_probe`)
   and each gets claims to prove (:func:`_rows`): a neuron never seen below 0 the claim
   ``z_j > 0`` (above 0: ``-z_j > 0``); one seen on both sides ``z_j > l + reach (m - l)`` and
   ``-z_j > -(u + reach (M - u))``, its bounds moved toward the least and greatest values seen,
   ``m`` and ``M``. A threshold that would narrow its neuron's interval by less than
   ``min_gain`` of its width is not tried: on most oval21 properties the CNN's bounds lie within a
   tenth of their width of the values probed (the relaxation is tight there already) and such
   claims cost the search seconds for nothing. Sign claims are always tried: however little of
   the width they cut, the neurons they stabilise count on deep MLPs (mnist-net_256x6
   prop_0_0.03 holds in 30 s with them, not in 300 s without);
3. one ReLU branch and bound proves the claims together, each a disjunct of its own, so their
   domains share the batched bound calls (GROUP claims per search); a claim past
   ``claim_seconds`` of the search's time is given up. Its alpha-optimised root bound tightens
   every claim's side, a proof moves the side to the claim.

The later layers start from the tightened earlier ones. Each (layer, box) gets an equal share
of the time left. Probes only choose the claims; nothing is concluded from them.

Soundness: the tightening is a sound plan's bound from sound bounds; with sound_fp the root's
margins are recomputed by the sound plan and a claim counts as proven only on sound proofs of
all its domains (see relu_bab's module docstring); bounds valid on the box stay valid on it.
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
    claim_seconds: float = 0.2     # a claim's proof is given up after its domains took this long
    reach: float = 0.75            # an unstable neuron's bounds are pushed this far to the extremes probed
    min_gain: float = 0.1          # thresholds narrowing their neuron by less than this share of its width are left
    samples: int = 256             # random points probed per box,
    corner_steps: int = 2          # and per neuron the corners its gradient points to, this many times


MIN_SEARCH_SECONDS = 0.1
GROUP = 256    # claims bounded and searched together: one root call of this many domains
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
    bounds of ``values`` tightened as the module docstring says; and stats."""
    graph, key = api.load_model(model)
    out = dict(intermediate)
    stats = {"tightened": 0, "seen_both_signs": 0, "tried": 0, "proven": 0, "stabilised": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    progress = Progress("stabilisation")
    search = dataclasses.replace(search_config, pair_seconds=config.claim_seconds)
    layers = [v for v in values if v in graph.values and v in out]   # (renamed by layout folding: left)
    for i, v in enumerate(layers):
        cut = (prefix(graph, v), (key, "prefix", v))
        if not relaxed_nodes(cut[0]):                 # affine in the input: its bounds are exact
            continue
        out[v] = out[v].double().clone()                # float64: the search root rounds it outward
        for b in range(problem.num_boxes):
            stats["tightened"] += _tighten(cut, problem, b, out, planner)
            bounds = out[v][:, b].view(2, -1)
            rows = _rows(bounds, *_probe(cut[0], problem, b, bounds, config, generator), config.reach,
                         config.min_gain).cpu()
            # each (layer, box) to come gets an equal share of the time left, and passes on what it leaves
            until = time.perf_counter() + (deadline - time.perf_counter()) / ((len(layers) - i) * problem.num_boxes - b)
            if not len(rows) or not fits(MIN_SEARCH_SECONDS, until):
                continue
            unstable = rows[:, 0].long().unique()
            stats["seen_both_signs"] += len(rows) - len(unstable)
            stats["tried"] += len(rows)
            groups = rows.split(GROUP)
            for k, group in enumerate(groups):
                share = time.perf_counter() + (until - time.perf_counter()) / (len(groups) - k)
                lower, proven = _search(cut, problem, b, group, out, search, planner, sound_fp, share)
                j, up, lower = group[:, 0].long(), group[:, 1] > 0, lower.to(bounds)   # sign * z_j >= lower
                bounds[0, j[up]] = torch.fmax(bounds[0, j[up]], lower[up])
                bounds[1, j[~up]] = torch.fmin(bounds[1, j[~up]], -lower[~up])
                stats["proven"] += len(proven)
            stats["stabilised"] += int(((bounds[0, unstable] >= 0) | (bounds[1, unstable] <= 0)).sum())
            progress.tick(layer=v, tried=stats["tried"], stabilised=stats["stabilised"])
    stats["seconds"] = time.perf_counter() - t0
    return out, stats


def _tighten(cut: tuple[Graph, object], problem: Problem, b: int, intermediate: dict[str, torch.Tensor],
             planner: PlannerConfig | None) -> int:
    """Intersect the cut's output bounds on box b with a sound CROWN pass (bab.output_pass,
    float64 sound_fp) from the earlier layers' bounds as tightened: the bounds the search
    started with were computed before any tightening. The neurons it makes stable."""
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


def _probe(graph: Graph, problem: Problem, b: int, bounds: torch.Tensor, config: StabiliseConfig,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The least and greatest values [numel] float64 of the cut's output seen at probed points
    of box b: random points, and per unstable neuron the box corners its gradient points to
    (from the centre, then again from the corners reached: a ReLU net is linear around each
    point), both ways."""
    lo, hi = bounds.double()
    box_lo, box_hi = problem.inner_lo[b], problem.inner_hi[b]
    u = torch.rand((config.samples,) + box_lo.shape, generator=generator, device=box_lo.device)
    z = _cut_values(graph, problem, box_lo + u * (box_hi - box_lo))
    least, greatest = z.min(0).values, z.max(0).values
    index = ((lo < 0) & (hi > 0)).nonzero().flatten()
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
                least[chunk] = torch.minimum(least[chunk], z)
                greatest[chunk] = torch.maximum(greatest[chunk], z)
    return least, greatest


def _rows(bounds: torch.Tensor, least: torch.Tensor, greatest: torch.Tensor, reach: float,
          min_gain: float = 0.0) -> torch.Tensor:
    """[R, 3] rows (neuron j, sign, d), each the claim ``sign * z_j > d`` to prove, for the
    unstable neurons: the sign for one never seen on the other side of 0, else each bound moved
    ``reach`` of the way to the extreme seen (the bounds' gap to it is the relaxation's slack)
    where that cuts at least ``min_gain`` of the neuron's width."""
    lo, hi = bounds.double()
    unstable = (lo < 0) & (hi > 0)
    up, down = unstable & (least >= 0), unstable & (greatest <= 0) & (least < 0)
    both = unstable & ~up & ~down
    raise_lo, lower_hi = reach * (least - lo), reach * (hi - greatest)
    parts = [(up, 1.0, torch.zeros_like(lo)), (down, -1.0, torch.zeros_like(lo)),
             (both & (raise_lo >= min_gain * (hi - lo)), 1.0, lo + raise_lo),
             (both & (lower_hi >= min_gain * (hi - lo)), -1.0, -(hi - lower_hi))]
    return torch.cat([torch.stack((mask.nonzero().flatten().double(), torch.full((int(mask.sum()),), sign,
                                   dtype=torch.float64), d[mask]), 1) for mask, sign, d in parts])


def _cut_values(graph: Graph, problem: Problem, x: torch.Tensor) -> torch.Tensor:
    """[N, numel] float64: the cut's output at the flat points x [N, n]."""
    v = graph.outputs[0]
    env = concrete.values(graph, x.reshape((x.shape[0],) + problem.input_shape), stop=lambda env: v in env)
    return env[v].reshape(x.shape[0], -1).double()


def _search(cut: tuple[Graph, object], problem: Problem, b: int, rows: torch.Tensor,
            intermediate: dict[str, torch.Tensor], search_config: ReluBabConfig, planner: PlannerConfig | None,
            sound_fp: bool, deadline: float) -> tuple[torch.Tensor, list[int]]:
    """One ReLU branch and bound on box b over the claims ``rows`` [R, 3] (CPU; (j, sign, d):
    ``sign * z_j > d``, z the cut's output), each a disjunct of its own: lower bounds [R]
    float64 (CPU) of ``sign * z_j`` on the box (the root's, sound with sound_fp; at least d
    where proven), and the rows proven."""
    device = problem.device
    numel = cut[0].values[cut[0].outputs[0]].type.numel
    k = len(rows)
    j, sign, d = rows[:, 0].long(), rows[:, 1], rows[:, 2]
    C = torch.zeros(k, numel, dtype=torch.float64)
    C[torch.arange(k), j] = sign
    pick = slice(b, b + 1)
    sub = Problem(problem.input_shape, problem.outer_lo[pick], problem.outer_hi[pick], problem.inner_lo[pick],
                  problem.inner_hi[pick], problem.box_lo[pick], problem.box_hi[pick], C.numpy(), d.numpy(),
                  torch.eye(k, dtype=torch.bool, device=device), C.float().to(device), C.to(device), d.to(device))
    search = ReluBranchAndBound(None, sub, [(0, i) for i in range(k)], None, search_config, planner,
                                sound_fp=sound_fp, loaded=cut)
    lo, hi = intermediate[cut[0].outputs[0]][:, b].reshape(2, -1).double().cpu()
    row_lb = torch.where(sign > 0, lo[j], -hi[j]).to(device)
    root = search.root({u: intermediate[u][:, pick] for u in search.relaxed},
                       sub.disjunct_margins(row_lb[None]))            # the interval bounds' margins
    bounded = search.confirm(search.bound(root, search_config.root_iterations, deadline), every=True)
    outcome = search.run(bounded, deadline, bounded=True)
    # a margin is its row's lower bound less d and a round-off allowance
    lower = bounded.t["margin"].cpu() + d
    lower[outcome.proven] = torch.fmax(lower[outcome.proven], d[outcome.proven])
    return lower, outcome.proven
