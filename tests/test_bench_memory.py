"""Smoke test of the memory benchmark: a --quick run writes the documented JSON fields and the
packing plot (run in a subprocess, as a user would)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

CASE = "permute_net__eps0.05"
SPREAD = {"median", "min", "p25", "p75", "max", "n"}
PER_CONFIG = {"logical_bytes", "physical_bytes", "peak_planned_bytes", "num_buffers", "reuse_stats",
              "rss_peak_delta_bytes", "rss_hwm_reset", "rss_baseline_bytes", "profiler_peak_bytes", "arena_bytes",
              "profiler_peak_minus_arena_bytes", "time_ms", "cpu_ms"}


def test_quick_run_writes_json_and_plot(shared, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "memory.json", tmp_path / "packing.png"
    proc = subprocess.run([sys.executable, "-m", "boundflow.bench.memory", "--quick", "--shared", str(shared),
                           "--json", str(out), "--plot", str(png)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "checks:" in proc.stdout and CASE in proc.stdout

    data = json.loads(out.read_text())
    assert set(data) == {"machine", "versions", "config", "results", "checks", "plot"}
    assert {"cpu", "cores", "torch_threads", "os", "python"} <= set(data["machine"])
    assert {"boundflow", "torch", "numpy", "onnx", "onnxruntime"} <= set(data["versions"])
    assert data["config"]["quick"] and data["config"]["cases"] == [CASE] and data["config"]["methods"] == ["crown"]

    rows = data["results"]
    assert [(r["case"], r["method"]) for r in rows] == [(CASE, "crown")]
    for r in rows:
        on, off = r["reuse_on"], r["reuse_off"]
        for cfg in (on, off):
            assert PER_CONFIG <= set(cfg)
            assert set(cfg["time_ms"]) == SPREAD and set(cfg["cpu_ms"]) == SPREAD
            assert cfg["time_ms"]["n"] >= data["config"]["repeats"]
            assert cfg["profiler_peak_bytes"] >= cfg["arena_bytes"] > 0
            assert cfg["rss_hwm_reset"] is False or cfg["rss_peak_delta_bytes"] >= 0
        assert on["logical_bytes"] == off["logical_bytes"]
        assert on["peak_planned_bytes"] <= on["physical_bytes"] <= off["physical_bytes"]
        assert r["physical_over_logical"] == on["physical_bytes"] / on["logical_bytes"]
        assert r["cpu_time_ratio"] == on["cpu_ms"]["median"] / off["cpu_ms"]["median"]
        assert r["same_bounds"] is True

    chk = data["checks"]
    assert chk["mnist-net_256x6__prop_0_0.03"]["physical_le_half_logical"] is None   # not run in --quick
    assert isinstance(chk["reuse_slowdown"]["pass"], bool) and chk["same_bounds"] is True
    assert data["plot"] == {"case": CASE, "method": "crown", "path": str(png)}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
