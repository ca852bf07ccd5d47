"""Smoke test of the methods benchmark: a --quick run on one small golden model writes the
documented JSON fields (run in a subprocess so its thread setting stays out of this process)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

CASE = "mlp_small__eps0.05"
METHODS = ["ibp", "crown-ibp", "crown", "crown-pure", "crown-sound", "ibp-batch64"]
SPREAD = {"median", "min", "p25", "p75", "max", "n"}


def test_quick_run_writes_json(shared, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "boundflow.bench.methods", "--quick", "--models", CASE,
                           "--shared", str(shared), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "targets:" in proc.stdout and CASE in proc.stdout

    data = json.loads(out.read_text())
    assert set(data) == {"machine", "versions", "config", "results", "targets"}
    assert {"cpu", "cores", "torch_threads", "os", "python"} <= set(data["machine"])
    assert data["machine"]["torch_threads"] == 1
    assert {"boundflow", "torch", "numpy", "onnx", "onnxruntime"} <= set(data["versions"])
    assert data["config"]["quick"] and data["config"]["cases"] == [CASE] and not data["config"]["isolated"]

    rows = data["results"]
    assert [r["method"] for r in rows] == METHODS
    for r in rows:
        assert r["case"] == CASE and r["batch"] == (64 if r["method"] == "ibp-batch64" else 1)
        for t in (r["time_ms"], r["cpu_ms"]):
            assert set(t) == SPREAD and t["n"] == data["config"]["repeats"]
            assert 0 < t["min"] <= t["p25"] <= t["median"] <= t["p75"] <= t["max"]
        t = r["time_ms"]
        assert r["first_call_ms"] > 0 and r["forward_ms"] > 0
        assert r["ratio_vs_forward"] == t["median"] / r["forward_ms"]
        assert r["first_call_same_bounds"] and r["mean_width"] > 0
        if r["batch"] > 1:          # the same box 64 times: IBP's widths; no reference, no onnxruntime
            assert set(r["forward"]) == {"torch", "torch_cpu"} and r["lirpa"] is None
            assert abs(r["mean_width"] - rows[0]["mean_width"]) < 1e-6 * rows[0]["mean_width"]
            continue
        assert all(set(r["forward"][k]) == SPREAD for k in ("torch", "torch_cpu", "onnxruntime", "onnxruntime_cpu"))
        assert r["forward"]["torch_vs_onnxruntime_max_abs_diff"] < 1e-4
        ref = r["lirpa"]
        assert ref["fixture"] == CASE and ref["ms"] > 0
        assert ref["speedup"] == ref["ms"] / t["median"]
        assert ref["speedup_vs_cpu"] == ref["ms"] / r["cpu_ms"]["median"]
        assert abs(ref["tightness"] - 1) < 1e-4  # mlp_small: every method matches auto_LiRPA

    tg = data["targets"]
    assert set(tg["ibp_vs_forward"]["per_case"]) == {CASE} and set(tg["ibp_vs_forward_batch64"]) == {CASE}
    assert set(tg["sound_fp_cost"]["per_case"]) == {CASE} and tg["sound_fp_cost"]["per_case"][CASE]["ratio"] > 0
    assert isinstance(tg["ibp_vs_forward"]["pass"], bool)
    assert tg["crown_vs_lirpa"]["pass"] is None  # its case was not selected
    assert tg["crown_vs_quoted"] == {"speedup_needed": 3.0, "per_case": {}, "pass": None}   # nor these


def test_cases_run_in_fresh_processes(shared, tmp_path):
    """With several cases each runs in a process of its own (run_isolated) and their rows come
    back in order; the two boxes of mlp_small, whose IBP widths differ."""
    out = tmp_path / "bench.json"
    cases = ["mlp_small__eps0.05", "mlp_small__eps0.2"]
    proc = subprocess.run([sys.executable, "-m", "boundflow.bench.methods", "--quick", "--repeats", "1", "--models",
                           *cases, "--shared", str(shared), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["config"]["isolated"] and data["config"]["cases"] == cases
    rows = data["results"]
    assert [r["case"] for r in rows] == [c for c in cases for _ in METHODS]
    ibp = [r["mean_width"] for r in rows if r["method"] == "ibp"]
    assert ibp[0] < ibp[1]
    assert set(data["targets"]["ibp_vs_forward"]["per_case"]) == set(cases)
