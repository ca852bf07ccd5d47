"""Root stabilisation (boundflow.verify.stabilise): the cut network computes the value it is cut
at; the bounds it hands the search hold at every sampled point of the box, corners included,
are never looser, and clamp at 0 exactly the neurons it proved; the verifier's ReLU search
starts from them."""
from __future__ import annotations

import math
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boundflow import api
from boundflow.domains import concrete
from boundflow.frontends.vnnlib import parse_vnnlib
from boundflow.planner.config import PlannerConfig
from boundflow.planner.lower import relaxed_inputs
from boundflow.planner.pipeline import planned_graph
from boundflow.verify.property import make_problem
from boundflow.verify.relu_bab import ReluBabConfig
from boundflow.verify.stabilise import StabiliseConfig, _rows, prefix, stabilise
from boundflow.verify.verifier import VerifyConfig, verify

from nets import build, export_onnx, networks, sample_box
from test_relu_bab import pre_activations, property_text

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXPORT = PlannerConfig(export_intermediate=True)


@SETTINGS
@given(net=networks(["mlp", "cnn", "residual", "permute"]), seed=st.integers(0, 1000))
def test_a_cut_network_computes_the_value_it_is_cut_at(tmp_path_factory, net, seed):
    path = export_onnx(net.module, torch.zeros(net.input_shape), tmp_path_factory.mktemp("cut") / "net.onnx")
    graph, _ = api.load_model(path)
    x = torch.rand((5,) + tuple(net.input_shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        full = concrete.values(graph, x)
        for node in graph.nodes:
            v = node.outputs[0]
            cut = prefix(graph, v)
            assert cut.outputs == [v] and cut.inputs == graph.inputs
            assert len(cut.nodes) <= graph.nodes.index(node) + 1          # only what v needs
            assert torch.equal(concrete.values(cut, x)[v], full[v]), v


def test_claims_prove_a_sign_or_move_both_bounds_toward_the_extremes_seen():
    bounds = torch.tensor([[-1.0, -2.0, -4.0, 1.0, -1.0], [3.0, 1.0, 2.0, 2.0, 1.0]], dtype=torch.float64)
    least = torch.tensor([0.5, -1.5, -2.0, 1.2, 0.0], dtype=torch.float64)      # the values probed
    greatest = torch.tensor([2.0, -0.5, 1.0, 1.8, 0.0], dtype=torch.float64)
    rows = _rows(bounds, least, greatest, 0.5)
    assert rows.tolist() == [[0, 1, 0], [4, 1, 0], [1, -1, 0], [2, 1, -3.0], [2, -1, -1.5]]   # 3 is stable
    # neuron 2's thresholds cut 1/6 and 1/12 of its width [-4, 2]: under min_gain 0.1 only the
    # second is dropped, under 0.3 both; sign claims stay whatever they cut (neuron 0: 1/4)
    assert _rows(bounds, least, greatest, 0.5, 0.1).tolist() == [[0, 1, 0], [4, 1, 0], [1, -1, 0], [2, 1, -3.0]]
    assert _rows(bounds, least, greatest, 0.5, 0.3).tolist() == [[0, 1, 0], [4, 1, 0], [1, -1, 0]]


def check_stabilised(module, input_shape, num_outputs, lo, hi, folder, gen) -> dict:
    """Stabilise every layer of the module's search root over [lo, hi] and check the result
    against sampled points (corners included); the stats."""
    n_in = math.prod(input_shape)
    path = export_onnx(module, torch.zeros(input_shape), folder / "net.onnx")
    problem = make_problem(parse_vnnlib(property_text(n_in, num_outputs, lo, hi, 0.0)), tuple(input_shape))
    graph, _ = api.load_model(path)
    shape = tuple(input_shape)
    root = api.bound(path, lo.reshape((1,) + shape), hi.reshape((1,) + shape), "alpha-crown", config=EXPORT,
                     sound_fp=True)                                     # as the verifier's search root
    relus = relaxed_inputs(planned_graph(graph, EXPORT)[0], splitting=True)
    start = dict(root.intermediate)
    out, stats = stabilise(path, problem, start, relus, StabiliseConfig(), ReluBabConfig(),
                           EXPORT, True, time.perf_counter() + 30, torch.Generator().manual_seed(0))
    assert stats["stabilised"] <= stats["tried"]
    z = pre_activations(graph, sample_box(lo.float(), hi.float(), 3000, 500, gen).reshape((-1,) + shape))
    clamped = narrowed = 0
    for v in relus:
        new, old = out[v][:, 0].flatten(1), start[v][:, 0].flatten(1)
        assert (new[0] >= old[0]).all() and (new[1] <= old[1]).all(), v               # never looser
        clamped += int((((new[0] >= 0) | (new[1] <= 0)) & (old[0] < 0) & (old[1] > 0)).sum())
        narrowed += int(((new[0] < 0) & (new[1] > 0) & ((new[0] > old[0]) | (new[1] < old[1]))).sum())
        values = z[v].flatten(1).double()          # (float32 evaluations: a rounding's leeway)
        tol = 1e-5 * (1 + values.abs().max())
        assert (values.min(0).values >= new[0] - tol).all() and (values.max(0).values <= new[1] + tol).all(), v
    assert clamped >= stats["stabilised"]         # each one stabilised is stable (a tightening may make more)
    return {**stats, "narrowed": narrowed}


@settings(SETTINGS, max_examples=6)
@given(net=networks(["mlp", "cnn"]), seed=st.integers(0, 1000), radius=st.sampled_from([0.2, 0.6, 1.5]))
def test_stabilised_bounds_hold_at_sampled_points(tmp_path_factory, net, seed, radius):
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(math.prod(net.input_shape), generator=gen, dtype=torch.float64) * 2 - 1
    check_stabilised(net.module, net.input_shape, net.num_outputs, centre - radius, centre + radius,
                     tmp_path_factory.mktemp("st"), gen)


def test_a_deep_net_gets_neurons_stabilised_and_narrowed_that_hold_at_sampled_points(tmp_path):
    lo, hi = -torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    stats = check_stabilised(deep_net(), (1, 6), 2, lo, hi, tmp_path, torch.Generator().manual_seed(0))
    assert stats["stabilised"] > 0 and stats["narrowed"] > 0, stats


def deep_net():
    """A seeded 6-input MLP with four hidden layers, some of whose neurons alpha-CROWN leaves
    unstable on [-1, 1]^6 though they never change sign there."""
    torch.manual_seed(11)
    layers = [torch.nn.Linear(6, 24), torch.nn.ReLU()]
    for _ in range(3):
        layers += [torch.nn.Linear(24, 24), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(24, 2))


def test_the_relu_search_starts_from_stabilised_bounds(tmp_path):
    net = deep_net()
    path = export_onnx(net, torch.zeros(1, 6), tmp_path / "net.onnx")
    lo, hi = -torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    with torch.no_grad():
        low = float((lambda y: y[:, 0] - y[:, 1])(net(sample_box(lo.float(), hi.float(), 20000, 64))).min())
    prop = tmp_path / "p.vnnlib"
    prop.write_text(property_text(6, 2, lo, hi, low - 0.05))
    config = VerifyConfig(split="relu", refine_min_inputs=0)
    res = verify(path, prop, timeout=60, config=config)
    assert res.verdict == "holds", res.stats
    assert res.stats["stabilise"]["stabilised"] > 0, res.stats
    # (without it the plain search has not proven this within 60 s)
    off = verify(path, prop, timeout=3, config=VerifyConfig(split="relu", refine_min_inputs=0,
                                                           stabilise=StabiliseConfig(share=0.0)))
    assert off.verdict != "violated" and "stabilise" not in off.stats
