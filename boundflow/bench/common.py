"""Shared helpers for BoundFlow's benchmarks: where the data lives, what machine and library
versions a run used, timing with median and spread, a plain-text table and JSON output.

Timing protocol (``time_calls``): ``warmup`` untimed calls, then ``repeats`` timed calls, each
timed on its own with Python's garbage collector paused (as ``timeit`` does): wall-clock time
(``time.perf_counter_ns``) and the calling thread's CPU time (``time.thread_time_ns``). Results
are in milliseconds: median, min, p25, p75, max and the count. With one torch thread all the
work runs on the calling thread, so CPU time is what a call costs even on a loaded machine,
where wall-clock samples pick up time slices lost to other processes.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def shared_dir(path: str | os.PathLike | None = None) -> Path:
    """The read-only data folder: `path`, else $BOUNDFLOW_SHARED, else ../shared next to the repo."""
    path = Path(path or os.environ.get("BOUNDFLOW_SHARED") or REPO.parent / "shared")
    if not path.is_dir():
        raise FileNotFoundError(f"shared data folder not found: {path} (set BOUNDFLOW_SHARED or --shared)")
    return path.resolve()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions(packages=("boundflow", "torch", "numpy", "numba", "onnx", "onnxruntime")) -> dict[str, str | None]:
    """Installed versions (None for a package that is not installed)."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def spread(samples_ms) -> dict[str, float]:
    """median, min, p25, p75, max (ms) and n of a list of samples."""
    a = np.asarray(samples_ms, dtype=np.float64)
    p = np.percentile(a, [0, 25, 50, 75, 100])
    return {"median": float(p[2]), "min": float(p[0]), "p25": float(p[1]), "p75": float(p[3]),
            "max": float(p[4]), "n": int(a.size)}


def time_once(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds, result) of one call."""
    t0 = time.perf_counter_ns()
    out = fn()
    return (time.perf_counter_ns() - t0) / 1e6, out


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[dict, dict, Any]:
    """Wall-clock and thread-CPU spreads of `repeats` timed calls of fn after `warmup` untimed
    ones, and the last result."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    out = None
    for _ in range(warmup):
        out = fn()
    wall, cpu = [], []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            out = fn()
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            wall.append((t1 - t0) / 1e6)
            cpu.append((c1 - c0) / 1e6)
    finally:
        if enabled:
            gc.enable()
    return spread(wall), spread(cpu), out


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, tuple[dict, dict]]:
    """As time_calls for several functions compared side by side: each round calls every one
    once, in an order that alternates between rounds, so drift in the machine's load hits them
    alike. Returns {name: (wall spread, thread-CPU spread)}."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
                fns[name]()
                t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
                wall[name].append((t1 - t0) / 1e6)
                cpu[name].append((c1 - c0) / 1e6)
    finally:
        if enabled:
            gc.enable()
    return {n: (spread(wall[n]), spread(cpu[n])) for n in names}


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain-text table; numbers are formatted by the caller, None prints as '-'."""
    cells = [[str(h) for h in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 3) -> str | None:
    """A number with `digits` significant digits, or None."""
    return None if x is None else f"{x:.{digits}g}"


def write_json(obj: Any, dest: str | os.PathLike) -> None:
    """Write obj as indented JSON to the file `dest`, or to stdout when dest is '-'."""
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    if str(dest) == "-":
        sys.stdout.write(text)
    else:
        Path(dest).write_text(text)
