"""Deadlines: "timeout" only at the deadline, and never past it.

VNN-COMP kills a tool at its timeout, so an answer written after it is lost; a "timeout" with
time left gives up instances that the time could still decide.
"""
from __future__ import annotations

import time

import pytest
import torch

from boundflow import api


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
    torch.testing.assert_close(past.lb, crown.lb)
    t0 = time.perf_counter()
    full = api.bound(net, lo, hi, "alpha-crown")
    full_s = time.perf_counter() - t0
    assert full.stats["iterations"] > 2
    budget = full_s / 2
    t0 = time.perf_counter()
    part = api.bound(net, lo, hi, "alpha-crown", deadline=t0 + budget)
    assert time.perf_counter() - t0 < budget + 1.0         # a step may run over its estimate
    assert 0 < part.stats["iterations"] < full.stats["iterations"]
    assert (part.lb >= crown.lb - 1e-5).all() and (part.ub <= crown.ub + 1e-5).all()
