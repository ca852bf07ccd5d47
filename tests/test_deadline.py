"""Deadlines: "timeout" only at the deadline, and never past it.

VNN-COMP kills a tool at its timeout, so an answer written after it is lost; a "timeout" with
time left gives up instances that the time could still decide. The process-level tests run
``boundflow verify`` as VNN-COMP does, a fresh process timed from outside.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from boundflow import api
from boundflow.verify.verifier import VerifyConfig, verify

from test_relu_bab import branching_gap, two_layer_net

REPO = Path(__file__).resolve().parents[1]
VNNCOMP = "benchmarks/vnncomp2021"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def deep_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Five hidden layers of 256 over a box wide enough for many unstable neurons: an
    alpha-CROWN step takes a noticeable time."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(100, 256)]
    for _ in range(4):
        layers += [torch.nn.ReLU(), torch.nn.Linear(256, 256)]
    net = torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(256, 10))
    x = torch.rand(1, 100)
    return net, x - 0.05, x + 0.05


def test_alpha_crown_stops_at_its_deadline():
    net, lo, hi = deep_mlp()
    crown = api.bound(net, lo, hi, "crown")
    past = api.bound(net, lo, hi, "alpha-crown", deadline=time.perf_counter())
    assert past.stats["iterations"] == 0                  # the CROWN pass only
    assert past.stats["stopped_by_deadline"]              # (branch and bound: "timeout", not "unknown")
    torch.testing.assert_close(past.lb, crown.lb)
    t0 = time.perf_counter()
    full = api.bound(net, lo, hi, "alpha-crown")
    full_s = time.perf_counter() - t0
    assert full.stats["iterations"] > 2 and not full.stats["stopped_by_deadline"]
    budget = full_s / 2
    t0 = time.perf_counter()
    part = api.bound(net, lo, hi, "alpha-crown", deadline=t0 + budget)
    assert time.perf_counter() - t0 < budget + 1.0         # a step may run over its estimate
    assert 0 < part.stats["iterations"] < full.stats["iterations"] and part.stats["stopped_by_deadline"]
    assert (part.lb >= crown.lb - 1e-5).all() and (part.ub <= crown.ub + 1e-5).all()


@pytest.mark.parametrize("first_s", [0.5, 3.0], ids=["alpha-crown fits", "alpha-crown does not fit"])
def test_slow_first_bound_is_no_reason_to_give_up(tmp_path, monkeypatch, first_s):
    """A first bound too slow for alpha-CROWN (as on deep networks: 25 times the first bound
    was more than the time left) made ReLU branch and bound answer "timeout" at once. Now
    alpha-CROWN runs within its share of the time, or, when it does not fit, the search starts
    from CROWN's intermediate bounds: a property that only branching proves is proven, or
    "timeout" comes at the deadline. The first bound is slowed down here, the network kept small."""
    path, prop, _ = branching_gap(two_layer_net(), tmp_path)
    fast_bound = api.bound

    def bound(model, x_lower, x_upper, method="crown", *args, **kwargs):
        if method == "crown":
            time.sleep(first_s)
        return fast_bound(model, x_lower, x_upper, method, *args, **kwargs)

    monkeypatch.setattr(api, "bound", bound)
    timeout = 12.0
    res = verify(path, prop, timeout=timeout, config=VerifyConfig(split="relu", refine_min_inputs=0))
    assert res.stats["decided_by"] == "relu_bab", res.stats
    assert ("refined_margin" in res.stats) == (first_s < 1), res.stats
    assert res.verdict == "holds" or (res.verdict == "timeout" and res.seconds > timeout - 1.0), \
        (res.verdict, res.seconds, res.stats)


def run_verify(model, prop, timeout: float, results: Path,
               code: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """``boundflow verify`` in a fresh process (or ``code`` run with its arguments as
    ``sys.argv``); the wall seconds from before its start to its exit."""
    argv = ["verify", str(model), str(prop), "--timeout", str(timeout), "--results", str(results)]
    cmd = [sys.executable, "-m", "boundflow", *argv] if code is None else [sys.executable, "-c", code, *argv]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout + 60)
    return time.perf_counter() - t0, proc


BIG = [  # nobody decides these in seconds: "timeout" is the answer, in time
    ("oval21", "nets/cifar_deep_kw.onnx", "vnnlib/cifar_deep_kw-img2399-eps0.038562091503267976.vnnlib", 12),
    ("oval21", "nets/cifar_wide_kw.onnx", "vnnlib/cifar_wide_kw-img4356-eps0.04993464052287582.vnnlib", 12),
]


@pytest.mark.parametrize("benchmark,onnx_name,vnnlib_name,timeout", BIG)
def test_verify_process_ends_by_its_timeout(shared, tmp_path, benchmark, onnx_name, vnnlib_name, timeout):
    """The audit's case: cifar_deep_kw at --timeout 20 printed "timeout" after 26.8 s. (Exit
    status 1: a loaded machine kept the watchdog thread from the GIL, faulthandler ended it.)"""
    folder = shared / VNNCOMP / benchmark
    results = tmp_path / "result.txt"
    wall, proc = run_verify(folder / onnx_name, folder / vnnlib_name, timeout, results)
    assert proc.returncode == 0 or (proc.returncode == 1 and "Timeout (" in proc.stderr), proc.stderr
    assert wall <= timeout + 1.0, (wall, proc.stdout, proc.stderr)
    assert results.read_text() == "timeout\n", proc.stdout


HANG = """\
import sys, time
import boundflow.verify.verifier as verifier
verifier.verify = lambda *args, **kwargs: {phase}     # a phase that never ends
from boundflow.cli import run
run()
"""


@pytest.mark.parametrize("phase", ["time.sleep(3600)", "sum(range(10 ** 13))"], ids=["sleeps", "holds the GIL"])
def test_watchdog_answers_timeout_when_a_phase_overruns(tmp_path, phase):
    """A phase that cannot stop must not take the answer with it: at the timeout the process
    has written "timeout", says loudly where it was, and has exited. A phase that holds the
    GIL (C code) keeps the answering thread from running: the process is ended without it."""
    model, prop, results = tmp_path / "net.onnx", tmp_path / "p.vnnlib", tmp_path / "result.txt"
    model.write_bytes(b"never read")
    prop.write_text("never read")
    timeout = 8.0
    wall, proc = run_verify(model, prop, timeout, results, code=HANG.format(phase=phase))
    assert wall <= timeout + 1.0, (wall, proc.stderr)
    assert results.read_text() == "timeout\n"
    if phase.startswith("time"):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("timeout ") and "watchdog" in proc.stdout
        assert "ran past its deadline (in commands.py" in proc.stderr and "cmd_verify" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 1 and proc.stdout == ""
        assert "Timeout" in proc.stderr and "cmd_verify" in proc.stderr, proc.stderr
