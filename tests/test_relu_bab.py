"""ReLU branch and bound with beta-CROWN: soundness by sampling, the splitting itself, and
verdicts against sampled ground truth on random networks.

A domain's bound only has to hold on the points of the box that meet its split constraints
(``z_j >= 0`` for active, ``z_j <= 0`` for inactive neurons), so the samples are filtered by
their own pre-activations, and the splits are drawn from a sample's pattern so that the domain
is never empty.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from collections import OrderedDict
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import boundflow
from boundflow import api
from boundflow.domains import bound, concrete, linear
from boundflow.frontends.vnnlib import parse_vnnlib
from boundflow.ir.task import Role, of_kind
from boundflow.passes.layout import fold_layout
from boundflow.planner.config import PlannerConfig
from boundflow.planner.lower import SPLIT_METHOD, _Lowering
from boundflow.verify.alpha import AlphaConfig
from boundflow.verify.property import make_problem
from boundflow.verify.relu_bab import DomainQueue, DomainSet, ReluBabConfig, ReluBranchAndBound
from boundflow.verify.verifier import VerifyConfig, verify

from nets import export_onnx, networks, onnx_file, sample_box

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXPORT = PlannerConfig(export_intermediate=True)


def pre_activations(graph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every ReLU input's value at the points x [N, *input shape]."""
    with torch.no_grad():
        env = concrete.values(graph, x)
    return {n.inputs[0]: env[n.inputs[0]] for n in graph.nodes if n.op == "relu"}


def property_text(n_in: int, n_out: int, lo, hi, threshold: float, weight: float = 1.0) -> str:
    """Unsafe set: Y_0 - weight Y_last <= threshold (one disjunct, one row)."""
    decl = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in))
    decl += "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))
    box = "".join(f"(assert (>= X_{i} {float(a)!r}))\n(assert (<= X_{i} {float(b)!r}))\n"
                  for i, (a, b) in enumerate(zip(lo, hi)))
    last = n_out - 1
    row = f"(assert (<= (- Y_0 (* {weight!r} Y_{last})) {threshold!r}))\n" if last else \
        f"(assert (<= Y_0 {threshold!r}))\n"
    return decl + box + row


def spec_values(y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    return (y[:, 0] - weight * y[:, -1]) if y.shape[1] > 1 else y[:, 0]


def branching_gap(module: torch.nn.Module, folder, weight: float = 1.0) -> tuple[str, object, float]:
    """The module (4 inputs, 3 outputs) as folder/net.onnx and a property folder/p.vnnlib,
    Y_0 - weight Y_2 <= d over [-1, 1]^4, d 90% of the way from alpha-CROWN's bound to the
    sampled minimum (returned): only branching proves it."""
    path = export_onnx(module, torch.zeros(1, 4), folder / "net.onnx")
    lo, hi = -torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with torch.no_grad():
        low = float(spec_values(module(sample_box(lo.float(), hi.float(), 20000, 16)).double(), weight).min())
    lb = float(api.bound(path, lo.float().reshape(1, 4), hi.float().reshape(1, 4), "alpha-crown",
                         C=torch.tensor([[1.0, 0.0, -weight]])).lb)
    assert lb < low - 0.05, (lb, low)          # a real gap to close
    prop = folder / "p.vnnlib"
    prop.write_text(property_text(4, 3, lo, hi, lb + 0.9 * (low - lb), weight))
    return path, prop, low


def two_layer_net(act: torch.nn.Module | None = None) -> torch.nn.Module:
    """4 -> 16 -> 16 -> 3 with ``act`` (ReLU) between, seeded."""
    torch.manual_seed(3)
    act = act or torch.nn.ReLU()
    return torch.nn.Sequential(torch.nn.Linear(4, 16), act, torch.nn.Linear(16, 16), act, torch.nn.Linear(16, 3))


@st.composite
def setups(draw):
    net = draw(networks(["mlp", "cnn", "permute"]), label="net")
    n_in = math.prod(net.input_shape)
    seed = draw(st.integers(0, 10_000), label="seed")
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(n_in, generator=gen, dtype=torch.float64) * 2 - 1
    radius = draw(st.sampled_from([0.05, 0.2, 0.5]), label="radius")
    return net, centre - radius, centre + radius, gen


def split_at_random(search, root, z: dict, splits: int, gen) -> torch.Tensor:
    """Split the one domain of ``root`` on up to ``splits`` unstable neurons, signs from one
    sample's pattern (so the domain is never empty); which samples (pre-activations ``z``) are
    in the domain."""
    anchor = int(torch.randint(len(next(iter(z.values()))), (1,), generator=gen))
    t = root.t
    inside = torch.ones(len(next(iter(z.values()))), dtype=torch.bool)
    for _ in range(splits):
        v = search.relus[int(torch.randint(len(search.relus), (1,), generator=gen))]
        l, u = t[("lo", v)][0].flatten(), t[("hi", v)][0].flatten()
        free = ((l < 0) & (u > 0) & (t[("sign", v)][0].flatten() == 0)).nonzero().flatten()
        if not len(free):
            continue
        j = int(free[torch.randint(len(free), (1,), generator=gen)])
        zj = z[v].flatten(1)[:, j]
        side = 1 if zj[anchor] >= 0 else -1
        t[("sign", v)].view(1, -1)[0, j] = side
        (t[("lo", v)] if side > 0 else t[("hi", v)]).view(1, -1)[0, j] = 0.0
        inside &= side * zj >= 0
    assert inside[anchor]
    return inside


@settings(SETTINGS)
@given(setup=setups(), splits=st.integers(1, 6), iterations=st.sampled_from([1, 8]))
def test_beta_crown_bounds_hold_on_their_domain(setup, splits, iterations):
    net, lo, hi, gen = setup
    n_in = lo.numel()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net.module, torch.zeros(net.input_shape), os.path.join(tmp, "net.onnx"))
        graph, _ = api.load_model(path)
        shape = net.input_shape
        lo32, hi32 = lo.float().reshape((1,) + shape), hi.float().reshape((1,) + shape)
        crown = api.bound(path, lo32, hi32, "crown", config=EXPORT)
        problem = make_problem(parse_vnnlib(property_text(n_in, net.num_outputs, lo, hi, 0.0)), shape)
        search = ReluBranchAndBound(path, problem, [(0, 0)], None, ReluBabConfig(
            optimiser=AlphaConfig(iterations=iterations, lr=0.2, early_stop_patience=100), lr_beta=0.5),
            EXPORT)
        root = search.root(crown.intermediate, torch.full((1, 1), -math.inf))

        pts = sample_box(lo.float(), hi.float(), 1500, 300, gen).reshape((-1,) + shape)
        z = pre_activations(graph, pts)
        inside = split_at_random(search, root, z, splits, gen)
        # random warm starts: any alpha in [0, 1] and beta >= 0 must give a sound bound
        bounded = search.bound(root, 1)
        for o in search.slopes:
            bounded.t[("alpha", o)] = torch.rand(bounded.t[("alpha", o)].shape, generator=gen)
        for v in search.relus:
            bounded.t[("beta", v)] = torch.rand(bounded.t[("beta", v)].shape, generator=gen) * 2
        bounded.t["margin"] = torch.full((1,), -math.inf, dtype=torch.float64)
        margin = float(search.bound(bounded, iterations).t["margin"][0])

        y = net(pts[inside].reshape((-1,) + tuple(shape[1:]))).double()
        worst = float(spec_values(y).min())
        # margin = lb - d - tol with d = 0: every point of the domain has value >= lb > margin
        assert worst >= margin - 1e-5 * max(1.0, abs(worst)), (repr(net), worst, margin)


@settings(SETTINGS)
@given(setup=setups(), splits=st.integers(0, 6), k=st.sampled_from([1, 3, 1000]),
       sound_fp=st.booleans())
def test_refined_intermediate_bounds_hold_on_their_domain(setup, splits, k, sound_fp):
    """The split plan's re-tightened bounds (PlannerConfig.split_refine) contain every sampled
    pre-activation of the domain, lie inside the given bounds, and are tighter somewhere when
    the domain has splits to carry."""
    net, lo, hi, gen = setup
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net.module, torch.zeros(net.input_shape), os.path.join(tmp, "net.onnx"))
        graph, key = api.load_model(path)
        shape = net.input_shape
        crown = api.bound(path, lo.float().reshape((1,) + shape), hi.float().reshape((1,) + shape), "crown",
                          config=EXPORT)
        problem = make_problem(parse_vnnlib(property_text(lo.numel(), net.num_outputs, lo, hi, 0.0)), shape)
        search = ReluBranchAndBound(path, problem, [(0, 0)], None, ReluBabConfig(), EXPORT)
        root = search.root(crown.intermediate, torch.full((1, 1), -math.inf))
        pts = sample_box(lo.float(), hi.float(), 1500, 300, gen).reshape((-1,) + shape)
        z = pre_activations(graph, pts)
        inside = split_at_random(search, root, z, splits, gen)
        config = PlannerConfig(split_refine=k, sound_fp=sound_fp)
        module, _ = api.get_plan(graph, key, SPLIT_METHOD, 1, search.rows, config)
        dtype = torch.float64 if sound_fp else torch.float32
        inputs = {"box": torch.stack((lo, hi)).reshape((2, 1) + shape).to(dtype), "C": search.C.to(dtype)}
        for v in search.relaxed:
            inputs[Role("interm", v)] = torch.stack((root.t[("lo", v)], root.t[("hi", v)])).to(dtype)
            if Role("refine", v) in module.inputs:        # the k widest neurons (any selection is sound)
                width = (root.t[("hi", v)] - root.t[("lo", v)]).flatten(1)
                inputs[Role("refine", v)] = width.topk(min(k, width.shape[1]), dim=1).indices
        for role in of_kind(module.inputs, "alpha", "beta"):
            inputs[role] = None
        env = api._executor.run_functional(module, inputs)
        refined = {role.value: env[module.outputs[role]] for role in of_kind(module.outputs, "interm")}
        assert refined or not of_kind(module.inputs, "refine")
        for v, bounds in refined.items():
            given = inputs[Role("interm", v)]
            assert (bounds[0] >= given[0]).all() and (bounds[1] <= given[1]).all()
            zin = z[v][inside].double()
            tol = 1e-5 * max(1.0, float(zin.abs().max()))      # (the samples are float32)
            assert (zin >= bounds[0].double() - tol).all() and (zin <= bounds[1].double() + tol).all(), v


def test_per_region_selections_match_shared_ones():
    """Start kernels and the merge given each region's own neurons ([B, k]) give each region
    what the shared selection ([k]) gives it."""
    gen = torch.Generator().manual_seed(0)
    B, n = 3, 7
    idx = torch.stack([torch.randperm(n, generator=gen)[:4] for _ in range(B)])
    attrs = {"batch": 1, "shape": [n], "numel": n, "dtype": "float32", "device": "cpu"}
    w, b = torch.randn(n, 5, generator=gen), torch.randn(n, generator=gen)
    err = torch.rand(B, n, generator=gen)
    per = {"onehot": linear.start_onehot([idx], [], dict(attrs, batch=B)),
           "rows": linear.start_rows([idx], [w, b], {"batch": B, "in_shape": [5]}),
           "rows_fp": linear.start_rows([idx, err], [w, b], {"batch": B, "in_shape": [5], "fp": True})}
    s = torch.sort(torch.rand(2, B, n, generator=gen), dim=0).values       # stack(lower, upper)
    crown = torch.sort(torch.rand(2, B, 4, generator=gen), dim=0).values
    merged = bound.merge_sparse([s, idx, crown], [], {"intersect": True})[0]
    for r in range(B):
        one = {"onehot": linear.start_onehot([idx[r]], [], attrs),
               "rows": linear.start_rows([idx[r]], [w, b], {"batch": 1, "in_shape": [5]}),
               "rows_fp": linear.start_rows([idx[r], err[r:r + 1]], [w, b], {"batch": 1, "in_shape": [5], "fp": True})}
        for name, (a, bias) in one.items():
            assert torch.equal(per[name][0][r], a[0]) and torch.equal(per[name][1][r], bias[0]), name
        want = bound.merge_sparse([s[:, r:r + 1], idx[r], crown[:, r:r + 1]], [], {"intersect": True})[0]
        assert torch.equal(merged[:, r:r + 1], want)


@settings(SETTINGS, max_examples=8)
@given(net=networks(["mlp"]), seed=st.integers(0, 1000))
def test_relu_split_verdicts_agree_with_sampling(net, seed):
    """Thresholds just above the sampled minimum are violated (never "holds"); well below it
    the search proves the property."""
    gen = torch.Generator().manual_seed(seed)
    n_in = math.prod(net.input_shape)
    lo = torch.rand(n_in, generator=gen, dtype=torch.float64) - 1
    hi = lo + 0.5 + torch.rand(n_in, generator=gen, dtype=torch.float64)
    pts = sample_box(lo.float(), hi.float(), 4000, 500, gen)
    values = spec_values(net(pts.reshape((-1,) + tuple(net.input_shape[1:]))).double())
    low, spread = float(values.min()), float(values.max() - values.min())
    config = VerifyConfig(split="relu", refine_min_inputs=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net.module, torch.zeros(net.input_shape), os.path.join(tmp, "net.onnx"))
        for threshold, must_not in ((low + 0.02 * spread + 1e-4, "holds"), (low - 0.2 * spread - 1e-3, "violated")):
            prop = os.path.join(tmp, "p.vnnlib")
            with open(prop, "w") as f:
                f.write(property_text(n_in, net.num_outputs, lo, hi, threshold))
            res = verify(path, prop, timeout=20, config=config)
            assert res.verdict != must_not, (repr(net), threshold, low, res.stats)
            if must_not == "violated":
                assert res.verdict == "holds", (repr(net), res.stats)
            if res.verdict == "violated":
                x, _ = res.counterexample
                assert float(spec_values(net(torch.from_numpy(x).reshape(net.input_shape)).double())) <= threshold


@pytest.mark.parametrize("weight", [1.0, 0.3])     # 0.3 is inexact in float32: corrected rows
def test_relu_split_proves_what_alpha_crown_cannot(tmp_path, weight):
    """A threshold 90% of the way from alpha-CROWN's bound to the sampled minimum: only
    branching can prove it, and it must (a small network, a generous deadline); just above the
    sampled minimum it must not."""
    path, prop, low = branching_gap(two_layer_net(), tmp_path, weight)
    config = VerifyConfig(split="relu", refine_min_inputs=0)
    res = verify(path, prop, timeout=30, config=config)
    assert res.verdict == "holds", res.stats
    assert res.stats["decided_by"] == "relu_bab" and res.stats["relu_bab"]["rounds"] > 5, res.stats
    lo, hi = -torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    prop.write_text(property_text(4, 3, lo, hi, low + 1e-3, weight))    # a sampled point violates it
    assert verify(path, prop, timeout=10, config=config).verdict != "holds"


def test_a_queue_over_its_budget_takes_the_domains_nearest_a_proof_and_over_its_limit_gives_up(tmp_path):
    """Over the budget the order changes, not the answer; over the limit the answer is unknown."""
    path, prop, _ = branching_gap(two_layer_net(), tmp_path)

    def run(**queue):
        return verify(path, prop, timeout=30, config=VerifyConfig(split="relu", refine_min_inputs=0,
                                                                  relu_bab=ReluBabConfig(**queue)))

    res = run(queue_budget=0)
    stats = res.stats["relu_bab"]
    assert res.verdict == "holds" and stats["rounds"] > 5 and stats["rounds_over_budget"] == stats["rounds"], stats
    res = run(queue_limit=0)
    assert res.verdict == "unknown" and res.stats["relu_bab"]["stopped"] == "queue over 0 bytes", res.stats


def test_queue_pops_the_domains_nearest_a_proof():
    queue = DomainQueue()
    queue.push(DomainSet({"margin": torch.tensor([-1.0, -5.0, -2.0], dtype=torch.float64), "id": torch.tensor([0, 1, 2])}))
    queue.push(DomainSet({"margin": torch.tensor([-4.0, -0.5], dtype=torch.float64), "id": torch.tensor([3, 4])}))
    assert sorted(queue.pop(2, nearest=True).t["id"].tolist()) == [0, 4] and len(queue) == 3


def test_queue_pops_each_domain_once_from_a_chunk_it_keeps():
    queue = DomainQueue()
    margin = torch.tensor([-3.0, -1.0, -math.inf, -2.0, -5.0, -4.0], dtype=torch.float64)
    queue.push(DomainSet({"margin": margin, "id": torch.arange(6)}))
    assert queue.pop(1).t["id"].tolist() == [2] and len(queue) == 5 and queue.worst() == -5.0
    assert queue.pop(1, nearest=True).t["id"].tolist() == [1] and len(queue) == 4
    assert sorted(queue.pop(3, nearest=True).t["id"].tolist()) == [0, 3, 5] and len(queue) == 1
    assert queue.pop(2).t["id"].tolist() == [4] and len(queue) == 0


@settings(SETTINGS, max_examples=6)
@given(setup=setups())
def test_unsplit_beta_crown_is_crown(setup):
    """With CROWN's intermediate bounds, no splits and no multipliers, the lower-only beta-crown
    pass reproduces CROWN's lower bound (the same relaxations, half the rows)."""
    net, lo, hi, _ = setup
    n_in = lo.numel()
    shape = net.input_shape
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net.module, torch.zeros(shape), os.path.join(tmp, "net.onnx"))
        problem = make_problem(parse_vnnlib(property_text(n_in, net.num_outputs, lo, hi, 0.0)), shape)
        C = problem.C_bound[: problem.num_rows]
        crown = api.bound(path, problem.outer_lo.reshape(shape), problem.outer_hi.reshape(shape), "crown",
                          C=C, config=EXPORT)
        search = ReluBranchAndBound(path, problem, [(0, 0)], None, ReluBabConfig(), EXPORT)
        root = search.root(crown.intermediate, torch.full((1, 1), -math.inf))
        margin = float(search.bound(root, 0).t["margin"][0])
        want = float(problem.disjunct_margins(problem.row_lower_bounds(crown.lb, crown.ub))[0, 0])
        assert abs(margin - want) <= 1e-5 * max(1.0, abs(want)), (repr(net), margin, want)


@settings(SETTINGS)
@given(setup=setups(), splits=st.integers(0, 4))
def test_sound_split_plans_give_the_same_margins_with_the_error_vectors_alone(setup, splits):
    """A sound beta-crown plan computes an op's error vector alone (fp.<op>_error) where nothing
    reads the op's interval (the ReLU after it gets the domain's bounds): the confirmed margins
    are the same, bit for bit, as with every interval computed."""
    net, lo, hi, gen = setup
    shape = net.input_shape
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net.module, torch.zeros(shape), os.path.join(tmp, "net.onnx"))
        problem = make_problem(parse_vnnlib(property_text(lo.numel(), net.num_outputs, lo, hi, 0.0)), shape)
        crown = api.bound(path, problem.outer_lo.reshape(shape), problem.outer_hi.reshape(shape), "crown", config=EXPORT)
        search = ReluBranchAndBound(path, problem, [(0, 0)], None, ReluBabConfig(), EXPORT, sound_fp=True)
        root = search.root(crown.intermediate, torch.full((1, 1), -math.inf))
        graph, _ = api.load_model(path)
        split_at_random(search, root, pre_activations(graph, sample_box(lo.float(), hi.float(), 200, 50, gen)
                                                      .reshape((-1,) + shape)), splits, gen)
        domains = search.bound(root, 2)
        for v in search.relus:
            domains.t[("beta", v)] = torch.rand(domains.t[("beta", v)].shape, generator=gen)
        alone = search.confirm(domains, every=True).t["margin"]
        with mock.patch.object(_Lowering, "interval_unread", lambda self, y: False), \
                mock.patch.object(api, "_plans", OrderedDict()):
            every = search.confirm(domains, every=True).t["margin"]
        assert torch.equal(alone, every), (repr(net), alone, every)


def test_a_sound_split_plan_skips_the_intervals_nobody_reads():
    """mnist-net-like: each linear layer's output is a ReLU's input (given) or the output."""
    graph, _ = api.load_model(export_onnx(two_layer_net(), torch.zeros(1, 4), os.path.join(tempfile.mkdtemp(), "n.onnx")))
    module = boundflow.plan(graph, SPLIT_METHOD, PlannerConfig(sound_fp=True), batch=2, spec_rows=1)
    kernels = [op.op for op in module.ops()]
    assert kernels.count("fp.linear_error") == 3 and "interval.linear" not in kernels and "fp.linear" not in kernels


@pytest.mark.parametrize("fp", [False, True])
def test_concretize_reads_a_broadcast_box_once_and_gets_the_same_bounds(fp):
    """linear.concretize over one box broadcast to every region (a stride-0 view, as the ReLU
    search passes it) gives the bounds of the same box copied per region."""
    gen = torch.Generator().manual_seed(4)
    dtype = torch.float64 if fp else torch.float32
    a = torch.randn(6, 4, 3, 5, 5, generator=gen, dtype=dtype)
    bias = torch.randn(6, 4, generator=gen, dtype=dtype)
    lo = torch.randn(1, 1, 3, 5, 5, generator=gen, dtype=dtype)
    box = torch.cat([lo, lo + torch.rand(lo.shape, generator=gen, dtype=dtype)])       # [2, 1, 3, 5, 5]
    attrs = {"fp": fp}
    shared = linear.concretize([a, bias, box.expand(2, 6, 3, 5, 5)], [], attrs)[0]
    copied = linear.concretize([a, bias, box.expand(2, 6, 3, 5, 5).contiguous()], [], attrs)[0]
    assert shared.shape == copied.shape == (2, 6, 2)
    assert torch.allclose(shared, copied, rtol=1e-5, atol=1e-5)


def test_a_search_of_one_box_passes_it_once(tmp_path):
    """Pairs that share their box (disjuncts of one region) get it as one broadcast view; the
    margins are those of the box copied per domain."""
    path = export_onnx(two_layer_net(), torch.zeros(1, 4), tmp_path / "net.onnx")
    lo, hi = -torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    text = property_text(4, 3, lo, hi, 0.0).replace("(assert (<= (- Y_0 (* 1.0 Y_2)) 0.0))\n", "")
    text += "(assert (or (and (<= Y_0 Y_1)) (and (<= Y_0 Y_2))))\n"
    problem = make_problem(parse_vnnlib(text), (1, 4))
    crown = api.bound(path, problem.outer_lo.reshape(1, 4), problem.outer_hi.reshape(1, 4), "crown", config=EXPORT)
    search = ReluBranchAndBound(path, problem, [(0, 0), (0, 1)], None, ReluBabConfig(), EXPORT)
    assert search.one_box and search.boxes(torch.tensor([0, 1, 1]), torch.float32).stride(1) == 0
    root = search.root(crown.intermediate, torch.full((1, 2), -math.inf))
    shared = search.bound(root, 3).t["margin"]
    search.one_box = False
    copied = search.bound(root, 3).t["margin"]
    assert torch.allclose(shared, copied, rtol=1e-5, atol=1e-6), (shared, copied)


def renamed_relu_net(kind: str, path) -> str:
    """x [1, 2, 4, 4] -> conv -> (a layout op that folding removes) -> relu -> flatten -> dense [2]:
    after folding the ReLU reads the conv output directly, a value of another name."""
    from onnx import helper

    rng = np.random.default_rng(5)
    inits = {"W": rng.standard_normal((3, 2, 3, 3)).astype(np.float32) * 0.5,
             "G": rng.standard_normal((2, 48)).astype(np.float32) * 0.3}
    conv = helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])
    if kind == "transposes_cancel":     # NHWC relu: transpose, relu, inverse transpose
        layout = [helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
                  helper.make_node("Relu", ["t"], ["r0"]),
                  helper.make_node("Transpose", ["r0"], ["r"], perm=[0, 3, 1, 2])]
    elif kind == "reshapes_collapse":   # flatten and back: an identity reshape chain
        inits.update(s1=np.array([1, 48]), s2=np.array([1, 3, 4, 4]))
        layout = [helper.make_node("Reshape", ["c", "s1"], ["f0"]), helper.make_node("Reshape", ["f0", "s2"], ["t"]),
                  helper.make_node("Relu", ["t"], ["r"])]
    else:                               # a transpose of unit axes only: a reshape, sunk below the relu
        inits.update(s1=np.array([1, 1, 48]))
        layout = [helper.make_node("Reshape", ["c", "s1"], ["f0"]),
                  helper.make_node("Transpose", ["f0"], ["t"], perm=[1, 0, 2]),
                  helper.make_node("Relu", ["t"], ["r"])]
    head = [helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "G"], ["y"], transB=1)]
    return onnx_file([conv, *layout, *head], inits, [1, 2, 4, 4], [1, 2], path)


@pytest.mark.parametrize("kind", ["transposes_cancel", "reshapes_collapse", "unit_transpose"])
def test_search_names_relus_as_the_folded_plan_does(tmp_path, kind):
    """Layout folding renames the ReLU's input; the search must use the plan's names (it crashed
    with a KeyError), and its unsplit bound is CROWN's."""
    path = renamed_relu_net(kind, tmp_path / "net.onnx")
    graph, _ = api.load_model(path)
    folded, _ = fold_layout(graph)
    relus = [{n.inputs[0] for n in g.nodes if n.op == "relu"} for g in (graph, folded)]
    assert relus[0] != relus[1]                                 # the case at hand: folding renames
    lo, hi = -torch.ones(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)
    shape = (1, 2, 4, 4)
    problem = make_problem(parse_vnnlib(property_text(32, 2, lo, hi, 0.0)), shape)
    crown = api.bound(path, problem.outer_lo.reshape(shape), problem.outer_hi.reshape(shape), "crown",
                      C=problem.C_bound[: problem.num_rows], config=EXPORT)
    search = ReluBranchAndBound(path, problem, [(0, 0)], None, ReluBabConfig(), EXPORT)
    margin = float(search.bound(search.root(crown.intermediate, torch.full((1, 1), -math.inf)), 0).t["margin"][0])
    want = float(problem.disjunct_margins(problem.row_lower_bounds(crown.lb, crown.ub))[0, 0])
    assert abs(margin - want) <= 1e-5 * max(1.0, abs(want))


def gap_property(path: str, shape: tuple[int, ...], prop) -> None:
    """Write a property Y_0 - Y_1 <= d over [-1, 1]^n with d halfway between alpha-CROWN's lower
    bound and the sampled minimum: the root bounds cannot prove it, ReLU splitting can."""
    n = math.prod(shape)
    lo, hi = -torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    pts = sample_box(lo.float(), hi.float(), 20000, 64).reshape((-1,) + shape)
    low = float(spec_values(torch.cat([api.bound(path, p, p, "ibp").lb for p in pts.split(1000)]).double()).min())
    box = lo.float().reshape(shape), hi.float().reshape(shape)
    lb = float(api.bound(path, *box, "alpha-crown", C=torch.tensor([[1.0, -1.0]])).lb)
    assert lb < low - 0.05, (lb, low)
    prop.write_text(property_text(n, 2, lo, hi, lb + 0.5 * (low - lb)))


def test_relu_split_verifies_a_net_whose_relu_folding_renames(tmp_path):
    path = renamed_relu_net("transposes_cancel", tmp_path / "net.onnx")
    gap_property(path, (1, 2, 4, 4), tmp_path / "p.vnnlib")
    res = verify(path, tmp_path / "p.vnnlib", timeout=30)
    assert res.verdict == "holds" and res.stats["decided_by"] == "relu_bab", res.stats


def input_relu_net(path) -> str:
    """x [1, 32] -> relu -> dense 16 -> relu -> dense 2: a ReLU on the network input itself."""
    from onnx import helper

    rng = np.random.default_rng(2)
    inits = {"A": rng.standard_normal((16, 32)).astype(np.float32) * 0.3,
             "a": rng.standard_normal(16).astype(np.float32) * 0.3,
             "B": rng.standard_normal((2, 16)).astype(np.float32) * 0.5}
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Gemm", ["r", "A", "a"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["s"]), helper.make_node("Gemm", ["s", "B"], ["y"], transB=1)]
    return onnx_file(nodes, inits, [1, 32], [1, 2], path)


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "alpha-crown"])
def test_relu_on_the_input_exports_the_box(tmp_path, method):
    """The exported interval of a ReLU on the network input is the input box (the plan crashed
    making the box buffer a module output)."""
    path = input_relu_net(tmp_path / "net.onnx")
    lo, hi = -torch.rand(2, 1, 32), torch.rand(2, 1, 32)
    res = api.bound(path, lo, hi, method, config=EXPORT)
    assert torch.equal(res.intermediate["x"], torch.stack((lo, hi)))
    assert torch.equal(res.lb, api.bound(path, lo, hi, method).lb)


def test_relu_split_verifies_a_net_with_a_relu_on_its_input(tmp_path):
    """32 inputs: the alpha-CROWN refine phase exports the input ReLU's bounds, and the search
    splits that ReLU too."""
    path = input_relu_net(tmp_path / "net.onnx")
    gap_property(path, (1, 32), tmp_path / "p.vnnlib")
    res = verify(path, tmp_path / "p.vnnlib", timeout=30)
    assert res.verdict == "holds" and res.stats["decided_by"] == "relu_bab", res.stats


def test_relu_split_verifies_a_net_with_a_one_element_max_pool(tmp_path):
    """A ReduceMax over the model's batch axis (size 1) is a max pool of a 1 x 1 window: its
    lower weights have an axis of one element, and the sound plan that confirms proofs must
    expect that shape (nightly fuzz seed 4277419160: a ShapeError there)."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = {"A": rng.standard_normal((4, 3)).astype(np.float32), "B": rng.standard_normal((2, 4)).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "A"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceMax", ["r"], ["m"], axes=[0], keepdims=0),
             helper.make_node("Flatten", ["m"], ["f"], axis=0), helper.make_node("Gemm", ["f", "B"], ["y"], transB=1)]
    path = onnx_file(nodes, inits, [1, 3], [1, 2], tmp_path / "net.onnx")
    assert any(n.op == "maxpool2d" for n in api.load_model(path)[0].nodes)
    gap_property(path, (1, 3), tmp_path / "p.vnnlib")
    res = verify(path, tmp_path / "p.vnnlib", timeout=30, config=VerifyConfig(split="relu", refine_min_inputs=1))
    assert res.verdict == "holds" and res.stats["relu_bab"]["confirm_s"] > 0, res.stats


def test_queue_pops_the_worst_domains_and_keeps_the_rest():
    queue = DomainQueue()
    queue.push(DomainSet({"margin": torch.tensor([-1.0, -5.0, -2.0], dtype=torch.float64),
                          "id": torch.tensor([0, 1, 2])}))
    queue.push(DomainSet({"margin": torch.tensor([-4.0, -0.5], dtype=torch.float64), "id": torch.tensor([3, 4])}))
    worst = queue.pop(3)
    assert sorted(worst.t["id"].tolist()) == [1, 2, 3] and len(queue) == 2
    assert sorted(queue.pop(5).t["id"].tolist()) == [0, 4] and len(queue) == 0


def test_the_queue_keeps_the_signs_and_gives_back_the_clamped_bounds(tmp_path):
    """Queued without their intermediate bounds, split domains of two pairs come back with them
    exactly (their pair's root bounds, clamped at each split neuron)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                 torch.nn.Linear(16, 2))
    path = export_onnx(module, torch.zeros(1, 3), tmp_path / "net.onnx")
    lo, hi = -torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    problem = make_problem(parse_vnnlib(disjuncts_text(3, lo, hi, [(0, 0.0), (1, 0.0)])), (1, 3))
    search = ReluBranchAndBound(str(path), problem, [(0, 1), (0, 0)], None, ReluBabConfig(), EXPORT)
    crown = api.bound(path, lo.float().reshape(1, 1, 3), hi.float().reshape(1, 1, 3), "crown", config=EXPORT)
    root = search.root(crown.intermediate, torch.full((1, 2), -math.inf))
    for v in search.relus:                   # the pairs' roots differ (as on two boxes)
        root.t[("lo", v)][1] *= 0.5
        root.t[("hi", v)][1] *= 0.5
    pack, unpack = search._lean(root)
    domains = search.bound(root, 1)
    for _ in range(4):
        domains = search.bound(search.split(domains, search.choose(domains, time.perf_counter() + 60)), 1)
    assert len(domains) == 32 and all(domains.t[("sign", v)].abs().sum() > 0 for v in search.relus)
    packed = pack(domains)
    assert packed.nbytes() < domains.nbytes() and ("lo", search.relus[0]) not in packed.t
    back = unpack(packed)
    assert set(back.t) == set(domains.t) and all(torch.equal(back.t[k], domains.t[k]) for k in domains.t)
    # a split root, re-tightened bounds or curved neurons: domains are queued as they are
    assert search._lean(domains.select(torch.tensor([0, 1]))) == (None, None)


def test_queue_drops_every_domain_of_the_pairs_given_up():
    queue = DomainQueue()
    queue.push(DomainSet({"margin": torch.tensor([-1.0, -5.0, -2.0], dtype=torch.float64), "pair": torch.tensor([0, 1, 2])}))
    queue.push(DomainSet({"margin": torch.tensor([-4.0, -0.5], dtype=torch.float64), "pair": torch.tensor([1, 1])}))
    queue.drop(torch.tensor([False, True, False]))
    assert len(queue) == 2 and queue.pairs(3, "cpu").tolist() == [True, False, True] and len(queue.chunks) == 1
    assert sorted(queue.pop(5).t["pair"].tolist()) == [0, 2]


def disjuncts_text(n_in: int, lo, hi, thresholds: list[tuple[int, float]]) -> str:
    """Unsafe set: the union of {Y_i <= t} over (i, t) in ``thresholds``, one row each."""
    decl = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in))
    decl += "".join(f"(declare-const Y_{j} Real)\n" for j in range(1 + max(i for i, _ in thresholds)))
    box = "".join(f"(assert (>= X_{i} {float(a)!r}))\n(assert (<= X_{i} {float(b)!r}))\n"
                  for i, (a, b) in enumerate(zip(lo, hi)))
    return decl + box + "(assert (or " + " ".join(f"(and (<= Y_{i} {t!r}))" for i, t in thresholds) + "))\n"


@settings(SETTINGS, max_examples=8)
@given(net=networks(["mlp"]), seed=st.integers(0, 1000), budget=st.sampled_from([0.0, 1e-6, 2.0]))
def test_a_search_over_many_pairs_proves_only_pairs_that_hold(net, seed, budget):
    """Per output y_i two disjuncts: {y_i <= t} with t just above y_i's sampled minimum (a
    sampled point meets it) and well below it. The pairs a search reports proven are never the
    first kind, whatever its per-pair time budget (``pair_seconds``, 0: none) and however
    it ends; given a budget, the hopeless pairs are given up and the others all proven."""
    gen = torch.Generator().manual_seed(seed)
    n_in = math.prod(net.input_shape)
    lo = torch.rand(n_in, generator=gen, dtype=torch.float64) - 1
    hi = lo + 0.5 + torch.rand(n_in, generator=gen, dtype=torch.float64)
    pts = sample_box(lo.float(), hi.float(), 4000, 500, gen)
    y = net(pts.reshape((-1,) + tuple(net.input_shape[1:]))).double()
    low, spread = y.min(0).values, y.max(0).values - y.min(0).values
    thresholds = [(i, float(low[i] + 0.02 * spread[i] + 1e-4)) for i in range(net.num_outputs)]
    thresholds += [(i, float(low[i] - 0.2 * spread[i] - 1e-3)) for i in range(net.num_outputs)]
    met = [bool((y[:, i] <= t).any()) for i, t in thresholds]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(net.module, torch.zeros(net.input_shape), os.path.join(tmp, "net.onnx"))
        shape = tuple(net.input_shape)
        problem = make_problem(parse_vnnlib(disjuncts_text(n_in, lo, hi, thresholds)), shape)
        root = api.bound(path, problem.outer_lo.reshape((1,) + shape), problem.outer_hi.reshape((1,) + shape),
                         "alpha-crown", config=EXPORT, sound_fp=True)
        pairs = [(0, k) for k in range(len(thresholds))]
        search = ReluBranchAndBound(path, problem, pairs, None, ReluBabConfig(pair_seconds=budget), EXPORT,
                                    sound_fp=True)
        outcome = search.run(search.root(root.intermediate, torch.full((1, len(pairs)), -math.inf)),
                             time.perf_counter() + (60 if budget else 10))
    assert all(not met[k] for k in outcome.proven), (repr(net), outcome.proven, met)
    assert outcome.verdict != "holds" and sorted(set(outcome.proven)) == outcome.proven
    if budget:
        assert outcome.verdict == "unknown" and outcome.stats["pairs_given_up"] >= sum(met), outcome.stats
    if budget == 2.0:
        assert outcome.proven == [k for k in range(len(pairs)) if not met[k]], (repr(net), outcome.stats)


def test_a_search_that_holds_proves_every_pair(tmp_path):
    path, prop, _ = branching_gap(two_layer_net(), tmp_path)
    problem = make_problem(parse_vnnlib(prop.read_text()), (1, 4))
    root = api.bound(path, problem.outer_lo, problem.outer_hi, "alpha-crown", config=EXPORT, sound_fp=True)
    search = ReluBranchAndBound(path, problem, [(0, 0)], None, ReluBabConfig(pair_seconds=1000.0), EXPORT,
                                sound_fp=True)
    outcome = search.run(search.root(root.intermediate, torch.full((1, 1), -math.inf)), time.perf_counter() + 30)
    assert outcome.verdict == "holds" and outcome.proven == [0] and outcome.stats["rounds"] > 5, outcome.stats


def test_split_children_clamp_and_sign_one_neuron(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    path = export_onnx(module, torch.zeros(1, 3), tmp_path / "net.onnx")
    lo, hi = -torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    problem = make_problem(parse_vnnlib(property_text(3, 2, lo, hi, 0.0)), (1, 3))
    search = ReluBranchAndBound(str(path), problem, [(0, 0)], None, ReluBabConfig(), EXPORT)
    (v,) = search.relus
    parent = DomainSet({"pair": torch.tensor([0]), "margin": torch.tensor([-1.0], dtype=torch.float64),
                        ("lo", v): -torch.ones(1, 1, 4), ("hi", v): torch.ones(1, 1, 4),
                        ("sign", v): torch.zeros(1, 1, 4, dtype=torch.int8)})
    children = search.split(parent, torch.tensor([2]))
    t = children.t
    assert t[("lo", v)][0, 0].tolist() == [-1, -1, 0, -1] and t[("hi", v)][0, 0].tolist() == [1, 1, 1, 1]
    assert t[("lo", v)][1, 0].tolist() == [-1, -1, -1, -1] and t[("hi", v)][1, 0].tolist() == [1, 1, 0, 1]
    assert t[("sign", v)][:, 0, 2].tolist() == [1, -1] and int(t[("sign", v)].abs().sum()) == 2
    assert parent.t[("lo", v)].min() == -1 and parent.t[("sign", v)].abs().sum() == 0   # parent untouched


@pytest.mark.parametrize("refine", [0, 4], ids=["parent's bounds", "re-tightened"])
@pytest.mark.parametrize("other", ["maxpool", "sigmoid"])
def test_relu_split_with_other_relaxed_ops(tmp_path, other, refine):
    """Relaxed ops branch and bound does not split (a max pool, a sigmoid) keep their
    relaxation and their own slopes while the ReLUs are split: a gap only branching closes is
    closed, and a threshold a sampled point violates is never proven."""
    torch.manual_seed(4)
    nn = torch.nn
    layer = nn.MaxPool2d(2) if other == "maxpool" else nn.Sigmoid()
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), layer, nn.Flatten(),
                           nn.Linear(4 * (4 if other == "maxpool" else 16), 8), nn.ReLU(), nn.Linear(8, 3))
    path = export_onnx(module, torch.zeros(1, 1, 4, 4), tmp_path / "net.onnx")
    lo, hi = -0.5 * torch.ones(16, dtype=torch.float64), 0.5 * torch.ones(16, dtype=torch.float64)
    pts = sample_box(lo.float(), hi.float(), 20000, 16)
    with torch.no_grad():
        low = float(spec_values(module(pts.reshape(-1, 1, 4, 4)).double(), 1.0).min())
    C = torch.tensor([[1.0, 0.0, -1.0]])
    lb = float(api.bound(path, lo.float().reshape(1, 1, 4, 4), hi.float().reshape(1, 1, 4, 4), "alpha-crown", C=C).lb)
    assert lb < low - 0.02, (lb, low)
    config = VerifyConfig(split="relu", refine_min_inputs=0, relu_bab=ReluBabConfig(refine_neurons=refine))
    prop = tmp_path / "p.vnnlib"
    # (a split ReLU does not tighten a max pool's input bounds, so the max pool's share of
    # the gap stays: a part of the gap only)
    prop.write_text(property_text(16, 3, lo, hi, lb + 0.2 * (low - lb), 1.0))
    res = verify(path, prop, timeout=120, config=config)
    assert res.verdict == "holds", res.stats
    assert res.stats["decided_by"] == "relu_bab", res.stats
    prop.write_text(property_text(16, 3, lo, hi, low + 1e-3, 1.0))
    assert verify(path, prop, timeout=10, config=config).verdict != "holds"


def curved_net(seed: int, n_in: int = 4) -> torch.nn.Module:
    """x [1, n_in] -> dense 8 -> tanh -> dense 8 -> sigmoid -> dense 8 -> (x * x) -> dense 2: only
    relaxed ops split at a midpoint (curved neurons), no ReLU."""
    torch.manual_seed(seed)
    nn = torch.nn

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    return nn.Sequential(nn.Linear(n_in, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 8), Square(),
                         nn.Linear(8, 2)).eval()


def clamp_net(seed: int, n_in: int = 4) -> torch.nn.Module:
    """x [1, n_in] -> dense 8 -> hardtanh(-0.4, 0.3) -> dense 8 -> max(., c) -> dense 2: clamps
    only (curved neurons cut at their kinks), no ReLU."""
    torch.manual_seed(seed)
    nn = torch.nn

    class Floor(nn.Module):
        def forward(self, x):
            return torch.maximum(x, torch.linspace(-0.5, 0.5, 8))

    return nn.Sequential(nn.Linear(n_in, 8), nn.Hardtanh(-0.4, 0.3), nn.Linear(8, 8), Floor(), nn.Linear(8, 2)).eval()


@settings(SETTINGS)
@given(seed=st.integers(0, 1000), splits=st.integers(1, 8), radius=st.sampled_from([0.3, 1.0]),
       kind=st.sampled_from(["curved", "clamp"]))
def test_curved_splits_hold_on_their_halves(seed, splits, radius, kind):
    """A curved neuron's split keeps one part of its interval per child, cut at the midpoint (at
    the kink of a clamp): a domain's bound holds on the sampled points whose neurons lie in the
    domain's parts (the splits follow one sample's values, so the domain is never empty)."""
    module = curved_net(seed) if kind == "curved" else clamp_net(seed)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -radius * torch.ones(4, dtype=torch.float64), radius * torch.ones(4, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(module, torch.zeros(1, 4), os.path.join(tmp, "net.onnx"))
        graph, _ = api.load_model(path)
        crown = api.bound(path, lo.float().reshape(1, 1, 4), hi.float().reshape(1, 1, 4), "crown", config=EXPORT)
        problem = make_problem(parse_vnnlib(property_text(4, 2, lo, hi, 0.0)), (1, 4))
        search = ReluBranchAndBound(path, problem, [(0, 0)], None, ReluBabConfig(), EXPORT)
        assert not search.relus and len(search.curved) == 3
        assert set(search.kinks) == (set() if kind == "curved" else set(search.curved))
        domain = search.root(crown.intermediate, torch.full((1, 1), -math.inf))
        pts = sample_box(lo.float(), hi.float(), 3000, 16, gen).reshape(-1, 1, 4)
        with torch.no_grad():
            env = concrete.values(graph, pts)
        anchor = int(torch.randint(len(pts), (1,), generator=gen))
        inside = torch.ones(len(pts), dtype=torch.bool)
        sizes = [domain.t[("lo", v)][0].numel() for v in search.curved]
        for _ in range(splits):
            k = int(torch.randint(len(search.curved), (1,), generator=gen))
            v, j = search.curved[k], int(torch.randint(sizes[k], (1,), generator=gen))
            l, u = float(domain.t[("lo", v)].flatten()[j]), float(domain.t[("hi", v)].flatten()[j])
            mid = float(search.kinks[v][j]) if v in search.kinks else (l + u) / 2
            if not l < mid < u:                 # a clamp linear on its interval: nothing to cut
                continue
            z = env[v].flatten(1)[:, j]
            upper = bool(z[anchor] >= mid)
            children = search.split(domain, torch.tensor([sum(sizes[:k]) + j]))
            assert children.t[("lo", v)].flatten(1)[0, j] == mid and children.t[("hi", v)].flatten(1)[1, j] == mid
            domain = children.select(torch.tensor([0 if upper else 1]))
            inside &= (z >= mid) if upper else (z <= mid)
        domain.t["margin"] = torch.full((1,), -math.inf, dtype=torch.float64)
        margin = float(search.bound(domain, 4).t["margin"][0])
        assert inside[anchor]
        with torch.no_grad():
            worst = float(spec_values(module(pts[inside].reshape(-1, 4)).double()).min())
        assert worst >= margin - 1e-5 * max(1.0, abs(worst)), (seed, worst, margin)


@pytest.mark.parametrize("act", [torch.nn.Hardtanh(-0.5, 0.5), torch.nn.ReLU6()], ids=["hardtanh", "relu6"])
def test_clamps_are_cut_at_their_kinks_and_proven(tmp_path, act):
    """A threshold 90% of the way from alpha-CROWN's bound to the sampled minimum of a clamp
    network: cut at their constants, where they turn linear, the clamps are proven in seconds
    (cut at their midpoints, the hardtanh network was not in 60 s)."""
    path, prop, _ = branching_gap(two_layer_net(act), tmp_path)
    res = verify(path, prop, timeout=30, config=VerifyConfig(split="relu", refine_min_inputs=0))
    assert res.verdict == "holds", res.stats
    assert res.stats["decided_by"] == "relu_bab", res.stats


def test_curved_neuron_splitting_proves_what_alpha_crown_cannot(tmp_path):
    """A tanh / sigmoid / square network of 32 inputs (neuron splitting, not input splitting): a
    threshold 30% of the way from alpha-CROWN's bound to the lowest value found is proven by
    splitting curved neurons; one just above that value is never proven."""
    module = curved_net(0, n_in=32)
    path = export_onnx(module, torch.zeros(1, 32), tmp_path / "net.onnx")
    lo, hi = -torch.ones(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)
    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(200):                    # PGD-like: a low value in the box
        loss = spec_values(module(torch.tanh(z))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        low = float(spec_values(module(torch.tanh(z)).double()).min())
    C = torch.tensor([[1.0, -1.0]])
    lb = float(api.bound(path, lo.float().reshape(1, 32), hi.float().reshape(1, 32), "alpha-crown", C=C).lb)
    assert lb < low - 0.02, (lb, low)
    prop = tmp_path / "p.vnnlib"
    prop.write_text(property_text(32, 2, lo, hi, lb + 0.3 * (low - lb)))
    res = verify(path, prop, timeout=120)
    assert res.verdict == "holds", res.stats
    assert res.stats["decided_by"] == "relu_bab" and res.stats["relu_bab"]["rounds"] >= 1, res.stats
    prop.write_text(property_text(32, 2, lo, hi, low + 1e-3))
    assert verify(path, prop, timeout=15).verdict != "holds"
