"""The `boundflow` command line: every input form, --json, and clean errors (exit 2)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from boundflow.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("make_example", REPO / "examples" / "make_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_example(tmp_path_factory.mktemp("example"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert list(data) == ["lb", "ub", "method", "stats"]
    for key in ("plan_ms", "run_ms", "num_tasks", "num_edges", "logical_bytes", "physical_bytes",
                "peak_planned_bytes", "reuse_stats", "transposes_folded", "transposes_executed", "timings", "config"):
        assert key in data["stats"], key
    return data


def onnx_outputs(model: Path, xs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x.reshape(1, -1)})[0] for x in xs])


def samples(lower, upper, n=300, seed=0) -> np.ndarray:
    lower = np.asarray(lower, np.float32).reshape(-1)
    upper = np.asarray(upper, np.float32).reshape(-1)
    rng = np.random.default_rng(seed)
    corners = np.where(rng.integers(0, 2, (n // 3, lower.size)).astype(bool), upper, lower)
    inner = rng.uniform(lower, upper, (n - n // 3, lower.size)).astype(np.float32)
    return np.concatenate([corners, inner]).astype(np.float32)


def assert_sound(lb, ub, values):
    lb, ub = np.asarray(lb), np.asarray(ub)
    tol = 1e-5 * np.maximum(1.0, np.abs(values))
    assert np.all(values >= lb - tol), (values.min(0), lb)
    assert np.all(values <= ub + tol), (values.max(0), ub)


# --------------------------------------------------------------------------- help


def test_module_help_subprocess():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "boundflow", "--help"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bounds" in proc.stdout


def test_bounds_help_names_every_option(capsys):
    code, out, _ = run_cli(capsys, "bounds", "--help")
    assert code == 0
    for opt in ("--vnnlib", "--center", "--eps", "--clip-min", "--clip-max", "--box", "--spec",
                "--method", "--json", "ibp", "crown-ibp"):
        assert opt in out, opt


def test_no_command(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and "bounds" in err


# --------------------------------------------------------------------------- input forms


def test_vnnlib_table(capsys, example):
    code, out, err = run_cli(capsys, "bounds", example["model"], "--vnnlib", example["vnnlib"],
                             "--method", "crown")
    assert code == 0, err
    assert str(example["model"]) in out and "toy_prop.vnnlib" in out and "crown" in out
    assert "Y_0 - Y_1" in out and "Y_0 - Y_2" in out
    assert "hint" in out and "not a verdict" in out
    assert out.strip().splitlines()[-1].startswith("stats: plan ")
    assert "tasks" in out and "physical" in out


def test_vnnlib_json_is_sound(capsys, example):
    from boundflow.frontends.vnnlib import read_vnnlib

    data = run_json(capsys, "bounds", example["model"], "--vnnlib", example["vnnlib"])
    assert data["method"] == "crown"
    assert len(data["lb"]) == len(data["ub"]) == 2
    prop = read_vnnlib(example["vnnlib"])
    C, _, _ = prop.spec_matrix()
    y = onnx_outputs(example["model"], samples(*prop.boxes[0]))
    assert_sound(data["lb"], data["ub"], y @ C.T)


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp"])
def test_center_eps(capsys, example, method):
    data = run_json(capsys, "bounds", example["model"], "--center", example["center"],
                    "--eps", "0.05", "--method", method)
    assert data["method"] == method
    assert len(data["lb"]) == 3
    x0 = np.load(example["center"]).reshape(-1).astype(np.float64)
    assert_sound(data["lb"], data["ub"], onnx_outputs(example["model"], samples(x0 - 0.05, x0 + 0.05)))


def test_center_forms_and_clip(capsys, example, tmp_path):
    x0 = np.load(example["center"])
    flat = tmp_path / "flat.npy"
    np.save(flat, x0.reshape(-1))
    batched = tmp_path / "batched.npy"
    np.save(batched, x0.reshape(1, *x0.shape))
    ref = run_json(capsys, "bounds", example["model"], "--center", example["center"], "--eps", "0.1")
    for path in (flat, batched):
        got = run_json(capsys, "bounds", example["model"], "--center", path, "--eps", "0.1")
        assert (got["lb"], got["ub"]) == (ref["lb"], ref["ub"])
    # clipping shrinks the box, so the bounds can only tighten
    clipped = run_json(capsys, "bounds", example["model"], "--center", example["center"],
                       "--eps", "0.1", "--clip-min", float(x0.min()), "--clip-max", float(x0.max()))
    assert np.all(np.array(clipped["lb"]) >= np.array(ref["lb"]) - 1e-5)
    assert np.all(np.array(clipped["ub"]) <= np.array(ref["ub"]) + 1e-5)
    code, out, err = run_cli(capsys, "bounds", example["model"], "--center", example["center"],
                             "--eps", "0.1", "--clip-min", "-5", "--clip-max", "5", "--method", "ibp")
    assert code == 0, err
    assert "eps 0.1" in out and "clipped" in out


def test_box_json_flat_and_nested(capsys, example, tmp_path):
    box = json.loads(example["box"].read_text())
    flat = run_json(capsys, "bounds", example["model"], "--box", example["box"], "--method", "crown-ibp")
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"lower": [box["lower"]], "upper": [box["upper"]]}))
    again = run_json(capsys, "bounds", example["model"], "--box", nested, "--method", "crown-ibp")
    assert again["lb"] == flat["lb"] and again["ub"] == flat["ub"]
    assert flat["method"] == "crown-ibp" and len(flat["lb"]) == 3
    assert_sound(flat["lb"], flat["ub"],
                 onnx_outputs(example["model"], samples(box["lower"], box["upper"])))
    code, out, err = run_cli(capsys, "bounds", example["model"], "--box", example["box"])
    assert code == 0, err
    assert "Y_2" in out and "width" in out


def test_spec_json_matches_vnnlib_rows(capsys, example, tmp_path):
    by_prop = run_json(capsys, "bounds", example["model"], "--vnnlib", example["vnnlib"])
    by_spec = run_json(capsys, "bounds", example["model"], "--box", example["box"],
                       "--spec", example["spec"])
    np.testing.assert_allclose(by_spec["lb"], by_prop["lb"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(by_spec["ub"], by_prop["ub"], rtol=1e-5, atol=1e-5)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(json.loads(example["spec"].read_text())["C"]))
    assert run_json(capsys, "bounds", example["model"], "--box", example["box"],
                    "--spec", bare)["lb"] == by_spec["lb"]
    code, out, _ = run_cli(capsys, "bounds", example["model"], "--box", example["box"],
                           "--spec", bare)
    assert code == 0 and "Y_0 - Y_1" in out


def test_vnnlib_several_boxes(capsys, example, tmp_path):
    box = json.loads(example["box"].read_text())
    lo, hi = np.array(box["lower"]), np.array(box["upper"])
    shifted = (lo + 0.5, hi + 0.5)
    decls = "".join(f"(declare-const X_{i} Real)\n" for i in range(8))
    decls += "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))

    def conj(l, h):
        return "(and " + " ".join(f"(>= X_{i} {float(l[i])!r}) (<= X_{i} {float(h[i])!r})" for i in range(8)) + ")"

    prop = tmp_path / "two.vnnlib"
    prop.write_text(decls + f"(assert (or {conj(lo, hi)}\n {conj(*shifted)}))\n"
                    "(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0))))\n")
    data = run_json(capsys, "bounds", example["model"], "--vnnlib", prop)
    assert np.array(data["lb"]).shape == (2, 2)
    single = run_json(capsys, "bounds", example["model"], "--vnnlib", example["vnnlib"])
    np.testing.assert_allclose(data["lb"][0], single["lb"], rtol=1e-5, atol=1e-5)
    code, out, err = run_cli(capsys, "bounds", example["model"], "--vnnlib", prop)
    assert code == 0, err
    assert "box 1 of 2" in out and "box 2 of 2" in out


# --------------------------------------------------------------------------- errors


def expect_error(capsys, *argv, fragment: str):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert "boundflow: error:" in err, err
    assert fragment in err, err
    assert "Traceback" not in err


def test_error_missing_model(capsys, example, tmp_path):
    expect_error(capsys, "bounds", tmp_path / "nope.onnx", "--box", example["box"],
                 fragment="nope.onnx: no such file")


def test_error_missing_region_files(capsys, example, tmp_path):
    for opt in ("--vnnlib", "--box", "--center"):
        args = ["bounds", example["model"], opt, tmp_path / "missing.x"]
        if opt == "--center":
            args += ["--eps", "0.1"]
        expect_error(capsys, *args, fragment="missing.x: no such file")


def test_error_malformed_json(capsys, example, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lower": [0, 1,\n')
    expect_error(capsys, "bounds", example["model"], "--box", bad, fragment="malformed JSON")
    expect_error(capsys, "bounds", example["model"], "--box", example["box"], "--spec", bad,
                 fragment="malformed JSON")
    bad.write_text('{"lower": [0, 1]}')
    expect_error(capsys, "bounds", example["model"], "--box", bad, fragment='"upper"')
    bad.write_text('{"lower": ["a"], "upper": [1]}')
    expect_error(capsys, "bounds", example["model"], "--box", bad, fragment="list of numbers")


def test_error_wrong_box_length(capsys, example, tmp_path):
    bad = tmp_path / "short.json"
    bad.write_text(json.dumps({"lower": [0.0] * 7, "upper": [1.0] * 7}))
    expect_error(capsys, "bounds", example["model"], "--box", bad, fragment="input shape [1, 8]")
    npy = tmp_path / "wrong.npy"
    np.save(npy, np.zeros((2, 8), np.float32))
    expect_error(capsys, "bounds", example["model"], "--center", npy, "--eps", "0.1",
                 fragment="has shape [2, 8]")


def test_error_lower_above_upper(capsys, example, tmp_path):
    bad = tmp_path / "empty.json"
    lower = [0.0] * 8
    upper = [1.0] * 8
    upper[3] = -1.0
    bad.write_text(json.dumps({"lower": lower, "upper": upper}))
    expect_error(capsys, "bounds", example["model"], "--box", bad, fragment="flat index 3")
    expect_error(capsys, "bounds", example["model"], "--center", example["center"], "--eps", "0.1",
                 "--clip-min", "1", "--clip-max", "0", fragment="--clip-min")


def test_error_bad_arguments(capsys, example):
    expect_error(capsys, "bounds", example["model"], "--center", example["center"],
                 fragment="needs --eps")
    expect_error(capsys, "bounds", example["model"], "--center", example["center"], "--eps", "-1",
                 fragment="--eps")
    expect_error(capsys, "bounds", example["model"], "--box", example["box"], "--eps", "0.1",
                 fragment="only go with --center")
    expect_error(capsys, "bounds", example["model"], "--vnnlib", example["vnnlib"], "--spec",
                 example["spec"], fragment="--spec cannot be combined")
    expect_error(capsys, "bounds", example["model"], "--box", example["box"], "--method", "magic",
                 fragment="invalid choice")
    expect_error(capsys, "bounds", example["model"], fragment="one of the arguments")


def test_error_spec_and_vnnlib_content(capsys, example, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([[1.0, -1.0]]))
    expect_error(capsys, "bounds", example["model"], "--box", example["box"], "--spec", spec,
                 fragment="2 columns but the model has 3 outputs")
    prop = tmp_path / "bad.vnnlib"
    prop.write_text(example["vnnlib"].read_text().replace("(assert (>= X_3", "(assert (>= X_9", 1))
    line = next(i for i, ln in enumerate(prop.read_text().splitlines(), 1) if "X_9" in ln)
    expect_error(capsys, "bounds", example["model"], "--vnnlib", prop,
                 fragment=f"bad.vnnlib:{line}: undeclared variable X_9")
    five = tmp_path / "five.vnnlib"
    five.write_text(example["vnnlib"].read_text().replace(
        "(declare-const Y_2 Real)", "(declare-const Y_2 Real)\n(declare-const Y_3 Real)"))
    expect_error(capsys, "bounds", example["model"], "--vnnlib", five,
                 fragment="declares 4 outputs")


def test_error_not_an_onnx_model(capsys, example, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    code, _, err = run_cli(capsys, "bounds", junk, "--box", example["box"])
    assert code == 2 and err.startswith("boundflow: error:") and "Traceback" not in err
