"""runtime/heap.py: glibc's malloc thresholds fixed once per process, when the executor first
prepares a plan, unless the user opted out or tuned malloc already."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from boundflow.runtime.heap import _glibc

PROBE = """
from boundflow.runtime import heap
import boundflow, torch
print(heap.keep_freed_memory.cache_info().currsize, end=" ")
boundflow.compute_bounds(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), torch.zeros(1, 2), torch.ones(1, 2),
                         device="cpu")
print(heap.keep_freed_memory.cache_info().currsize, heap.keep_freed_memory(), heap.keep_freed_memory())
"""


def _probe(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("BOUNDFLOW_KEEP_HEAP", "MALLOC_MMAP_THRESHOLD_",
                                                               "MALLOC_TRIM_THRESHOLD_")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not _glibc(), reason="the thresholds are glibc's")
def test_the_first_plan_run_fixes_the_thresholds_once():
    assert _probe() == ["0", "1", "True", "True"]      # not on import; on the first run; mallopt took both


@pytest.mark.skipif(not _glibc(), reason="the thresholds are glibc's")
@pytest.mark.parametrize("env", [{"BOUNDFLOW_KEEP_HEAP": "0"}, {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                                 {"MALLOC_TRIM_THRESHOLD_": "1048576"}])
def test_malloc_is_left_alone_when_asked_or_tuned_already(env):
    assert _probe(**env)[2:] == ["False", "False"]
