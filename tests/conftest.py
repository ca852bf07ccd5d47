"""Shared fixtures. Data from ../shared is read in place, never copied into the project.

Tests that need ../shared skip when it is absent, unless BOUNDFLOW_SHARED is set (as CI does):
then a missing folder is a failure, not a skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_path() -> Path | None:
    env = os.environ.get("BOUNDFLOW_SHARED")
    path = Path(env) if env else REPO.parent / "shared"
    if path.is_dir():
        return path.resolve()
    if env:
        raise RuntimeError(f"BOUNDFLOW_SHARED={env!r} is not a directory")
    return None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_path()
    if path is None:
        pytest.skip("../shared not present (set BOUNDFLOW_SHARED to make this a failure)")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
