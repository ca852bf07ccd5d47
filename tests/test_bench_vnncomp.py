"""The VNN-COMP benchmark's bookkeeping: presets, the reference beside our numbers, one real
instance end to end (JSON written, verdict counted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from boundflow.bench import vnncomp
from boundflow.verify import suite

from conftest import REPO


def outcome(verdict: str, seconds: float, expected: str = "holds") -> suite.Outcome:
    inst = suite.Instance("mnistfc", "m.onnx", "p.vnnlib", 60.0, Path("m.onnx"), Path("p.vnnlib"), expected)
    return suite.Outcome(inst, verdict, seconds)


def test_presets_run_the_target_subsets():
    Run = vnncomp.Run
    args = vnncomp.parse_args(["--preset", "issue", "--limit", "3"])
    assert vnncomp.plan_runs(args) == {"mnistfc": Run("mnistfc", "256x2", 30, 60.0),
                                       "acasxu": Run("acasxu", "", 45, 60.0), "oval21": Run("oval21", "", 5, 120.0)}
    args = vnncomp.parse_args(["--benchmarks", "acasxu, oval21", "--limit", "3", "--filter", "oval21=wide"])
    assert vnncomp.plan_runs(args) == {"acasxu": Run("acasxu", "", 3, 60.0), "oval21": Run("oval21", "wide", 3, 60.0)}
    # the deeper-networks issue: every instance of each, at its own timeout
    deep = vnncomp.plan_runs(vnncomp.parse_args(["--preset", "deep"]))
    assert deep == {"mnistfc 256x4": Run("mnistfc", "256x4"), "mnistfc 256x6": Run("mnistfc", "256x6"),
                    "oval21": Run("oval21"), "acasxu": Run("acasxu")}


def test_threads_per_instance(monkeypatch):
    """One torch thread per instance, as the reference numbers were measured, but for the deep
    preset, whose targets are per instance on the whole machine: the cores shared by the jobs."""
    monkeypatch.setattr(vnncomp.os, "cpu_count", lambda: 8)
    threads = lambda *argv: vnncomp.threads_per_instance(vnncomp.parse_args(list(argv)))
    assert threads("--preset", "issue") == 1 and threads("--benchmarks", "mnistfc") == 1
    assert threads("--preset", "deep") == 8 and threads("--preset", "deep", "--jobs", "3") == 2
    assert threads("--preset", "deep", "--jobs", "16") == 1
    assert threads("--preset", "deep", "--threads", "3") == 3 and threads("--threads", "2") == 2


def test_deep_preset_selects_whole_benchmarks_at_their_own_timeouts(shared):
    deep = vnncomp.plan_runs(vnncomp.parse_args(["--preset", "deep"]))
    mnist = vnncomp.select(str(shared), deep["mnistfc 256x4"])
    assert len(mnist) == 30 and all("256x4" in i.onnx and i.timeout == 300.0 for i in mnist)
    acas = vnncomp.select(str(shared), deep["acasxu"])
    assert len(acas) == 186 and {i.timeout for i in acas} == {116.0}


def test_abcrown_2021_beside_ours(shared):
    run = vnncomp.Run("mnistfc", "256x4", 3)
    instances = vnncomp.select(str(shared), run)       # prop_0_0.03, prop_1_0.03, prop_2_0.03
    ours = [suite.Outcome(i, v, s) for i, v, s in zip(instances, ["timeout", "holds", "violated"], [300.0, 10.0, 2.0])]
    got = vnncomp.abcrown_2021(str(shared), "mnistfc", ours)
    assert got["instances"] == 3 and got["solved"] == 2 and got["ours_solved"] == 2
    assert got["only_abcrown"] == ["mnist-net_256x4.onnx prop_0_0.03.vnnlib"]
    assert got["only_ours"] == ["mnist-net_256x4.onnx prop_1_0.03.vnnlib"]
    assert got["median_s"] == 59.33 and got["ours_median_s"] == 10.0


def test_abcrown_2021_found_where_properties_sit_in_a_folder(shared):
    """expected.csv names oval21's properties "vnnlib/<name>": matched by file name all the same."""
    instances = vnncomp.select(str(shared), vnncomp.Run("oval21", "", 2))   # img4549, img2908
    got = vnncomp.abcrown_2021(str(shared), "oval21", [suite.Outcome(i, "holds", 5.0) for i in instances])
    assert got["instances"] == 2 and got["solved"] == 2 and got["median_s"] == (17.04 + 36.72) / 2


def test_reference_compared_on_the_instances_it_covers():
    runs = [outcome("holds", 2.0)] * 20 + [outcome("timeout", 60.0)] * 5 + [outcome("violated", 1.0)] * 5
    versus = vnncomp.against_reference("mnistfc", "256x2", runs)
    assert versus["ours_on_same"]["solved"] == 25 and versus["solved_minus_reference"] == 25 - 29
    assert versus["ours_on_same"]["wrong"] == 5                       # violated where holds is expected
    assert abs(versus["median_speedup"] - 11.0 / 2.0) < 1e-9
    assert vnncomp.against_reference("mnistfc", "256x2", runs[:10]) is None    # fewer than it ran
    assert vnncomp.against_reference("mnistfc", "256x4", runs) is None         # another subset
    # ACAS Xu's reference covers the first 10 instances only
    acas = [outcome("holds", 1.0)] * 10 + [outcome("timeout", 60.0)] * 35
    assert vnncomp.against_reference("acasxu", "", acas)["ours_on_same"]["solved"] == 10


def test_one_instance_end_to_end(shared, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "boundflow.bench.vnncomp", "--benchmarks", "mnistfc", "--limit", "1",
                           "--timeout-cap", "30", "--json", str(out), "--shared", str(shared)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())["results"]["mnistfc"]
    assert res["instances"] == 1 and res["wrong"] == 0 and res["solved"] == 1
    assert res["rows"][0]["verdict"] in suite.SOLVED
