"""Verification: property semantics, branch-and-bound pieces, verdicts on hand-made networks and
on VNN-COMP 2021 instances (checked against expected.csv), the CLI and the result-file format.

Every "violated" is re-checked here, independently, with onnxruntime on the original ONNX file.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from boundflow.cli import main
from boundflow.errors import SpecError
from boundflow.frontends.vnnlib import parse_vnnlib, read_vnnlib
from boundflow.verify import suite
from boundflow.verify.bab import BatchSizer, Bounder, DomainQueue, Domains, combine, split, split_scores
from boundflow.verify.property import ATOL, inward_float32, make_problem
from boundflow.verify.verifier import Result, result_file_text, verify

from nets import export_onnx, onnx_file, onnx_runner
from test_vnnlib import MALFORMED

VNNCOMP = "benchmarks/vnncomp2021"



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread, as the benchmarks run: on a shared 2-core machine more threads only
    contend, and the timeouts below assume a fair share of a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


def header(n_in: int, n_out: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))


def unit_box(n_in: int, lo: float = 0.0, hi: float = 1.0) -> str:
    return "".join(f"(assert (>= X_{i} {lo}))\n(assert (<= X_{i} {hi}))\n" for i in range(n_in))


def problem_of(text: str, shape=(1, 2)):
    prop = parse_vnnlib(text)
    return make_problem(prop, shape)


def assert_counterexample(model, vnnlib, result: Result) -> None:
    """Independent check: the input lies in a box of the property as written and onnxruntime's
    output meets every row of some disjunct."""
    assert result.counterexample is not None
    x, y = result.counterexample
    prop = read_vnnlib(vnnlib)
    x64 = np.asarray(x, dtype=np.float64)
    assert any(np.all((lo <= x64) & (x64 <= hi)) for lo, hi in prop.boxes)
    y_ort = onnx_runner(model)(torch.from_numpy(np.asarray(x, np.float32)).reshape(1, -1)).numpy()[0]
    assert np.array_equal(y_ort, np.asarray(y, np.float64))
    assert any(np.all(C @ y_ort <= d) for C, d in prop.disjuncts)


class TwoRelu(nn.Module):
    """y0 = relu(x0 + x1), y1 = relu(x0 - x1): known exactly on any box."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return torch.relu(self.fc(x))


@pytest.fixture(scope="module")
def two_relu(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nets") / "two_relu.onnx"
    export_onnx(TwoRelu(), torch.zeros(1, 2), path)
    return path


@pytest.fixture(scope="module")
def two_relu_double(tmp_path_factory) -> Path:
    """TwoRelu as a DOUBLE-typed ONNX model (weights, input and output float64)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])]
    path = tmp_path_factory.mktemp("nets") / "two_relu_double.onnx"
    onnx_file(nodes, {"W": np.array([[1.0, 1.0], [1.0, -1.0]])}, [1, 2], [1, 2], path, TensorProto.DOUBLE)
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- property semantics


def test_disjunct_needs_one_row_above_threshold():
    # unsafe: (Y_0 <= 1 and Y_1 <= 2) or (Y_0 >= 3)
    text = header(2, 2) + unit_box(2) + "(assert (or (and (<= Y_0 1) (<= Y_1 2)) (and (>= Y_0 3))))\n"
    pb = problem_of(text)
    assert pb.num_disjuncts == 2 and pb.num_rows == 3
    rows = {tuple(c) + (d,): i for i, (c, d) in enumerate(zip(pb.C.tolist(), pb.d.tolist()))}
    r_y0, r_y1, r_neg = rows[(1.0, 0.0, 1.0)], rows[(0.0, 1.0, 2.0)], rows[(-1.0, 0.0, -3.0)]

    def margins(lb_by_row):
        lb = torch.zeros(1, 3, dtype=torch.float64)
        for i, v in lb_by_row.items():
            lb[0, i] = v
        return pb.disjunct_margins(lb)[0]

    # first disjunct: one row above its threshold is enough
    m = margins({r_y0: 1.5, r_y1: -10.0, r_neg: -10.0})
    assert m[0] > 0 and m[1] <= 0
    # neither row above: not proven; exactly at the threshold: not proven (strictly above needed)
    assert margins({r_y0: 0.5, r_y1: 1.0, r_neg: -10.0})[0] <= 0
    assert margins({r_y0: 1.0, r_y1: 2.0, r_neg: -3.0}).max() <= 0
    # within the float tolerance above the threshold: still not proven
    assert margins({r_y0: 1.0 + ATOL / 2, r_y1: 0.0, r_neg: -10.0})[0] <= 0
    # NaN bounds prove nothing
    assert not (margins({r_y0: math.nan, r_y1: math.nan, r_neg: math.nan}) > 0).any()


def test_counterexample_needs_every_row_strictly():
    text = header(2, 2) + unit_box(2) + "(assert (<= Y_0 1))\n(assert (<= Y_1 2))\n"
    pb = problem_of(text)
    assert pb.violated_disjunct(np.array([0.5, 1.5])) == 0
    assert pb.violated_disjunct(np.array([0.5, 2.5])) is None      # one row fails
    assert pb.violated_disjunct(np.array([1.0, 1.5])) is None      # equality is not strict
    f = pb.violations(torch.tensor([[0.5, 1.5], [0.5, 2.5]], dtype=torch.float64))
    assert f[0, 0] == pytest.approx(-0.5) and f[1, 0] == pytest.approx(0.5)


def test_boxes_rounded_safely():
    text = header(2, 1) + "(assert (>= X_0 0.1))\n(assert (<= X_0 0.3))\n" \
        "(assert (>= X_1 -0.7))\n(assert (<= X_1 1))\n(assert (<= Y_0 0))\n"
    pb = problem_of(text)
    assert np.all(pb.outer_lo.double().numpy() <= pb.box_lo) and np.all(pb.outer_hi.double().numpy() >= pb.box_hi)
    assert np.all(pb.inner_lo.double().numpy() >= pb.box_lo) and np.all(pb.inner_hi.double().numpy() <= pb.box_hi)
    lo, hi = inward_float32([0.1], [0.1])                        # thinner than a float32 step
    assert lo[0] > hi[0]
    assert pb.box_containing(np.array([0.2, 0.0])) == 0
    assert pb.box_containing(np.array([0.35, 0.0])) is None


def test_inexact_spec_row_is_corrected():
    # 0.1 is not a float32: the bound of the float32 row is widened by |error| * max|y|
    text = header(1, 2) + unit_box(1) + "(assert (<= (+ (* 0.1 Y_0) Y_1) 0))\n"
    pb = problem_of(text, shape=(1, 1))
    assert pb.C_bound.shape == (3, 2)                             # row + identity rows
    lb = torch.tensor([[1.0, -2.0, -4.0]], dtype=torch.float32)
    ub = torch.tensor([[9.0, 3.0, 1.0]], dtype=torch.float32)
    err = abs(0.1 - float(np.float32(0.1)))
    assert pb.row_lower_bounds(lb, ub)[0, 0].item() == pytest.approx(1.0 - err * 3.0 - 0.0 * 4.0, abs=1e-15)
    exact = problem_of(header(1, 2) + unit_box(1) + "(assert (<= (- Y_0 Y_1) 0))\n", shape=(1, 1))
    assert exact.C_bound.shape == (1, 2)


# --------------------------------------------------------------------------- branch and bound pieces


def test_split_halves_cover_the_parent():
    lo = torch.tensor([[0.0, -1.0], [2.0, 2.0]])
    hi = torch.tensor([[1.0, 1.0], [4.0, 3.0]])
    d = Domains(lo, hi, torch.tensor([0, 1]), torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    kids = split(d, torch.tensor([1, 0]))
    assert torch.equal(kids.lo[0], lo[0]) and kids.hi[0].tolist() == [1.0, 0.0]
    assert kids.lo[2].tolist() == [0.0, 0.0] and torch.equal(kids.hi[2], hi[0])
    assert kids.hi[1].tolist() == [3.0, 3.0] and kids.lo[3].tolist() == [3.0, 2.0]
    assert kids.box.tolist() == [0, 1, 0, 1]


def test_proven_disjuncts_stay_proven():
    parent = torch.tensor([[math.inf, -1.0, -1.0]], dtype=torch.float64)
    child = torch.tensor([[-5.0, 0.5, math.nan]], dtype=torch.float64)
    out = combine(parent, child)
    assert out[0, 0] == math.inf and out[0, 1] == math.inf and math.isnan(out[0, 2])
    d = Domains(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, dtype=torch.long), out, torch.zeros(1))
    assert d.alive().tolist() == [[False, False, True]]           # NaN is not a proof


def test_split_scores_skip_unsplittable_inputs():
    lo = torch.tensor([[0.0, 1.0, 0.0]])
    hi = torch.tensor([[1.0, 1.0, 1.0]])
    hi[0, 2] = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))
    s = split_scores(torch.tensor([[0.0, 5.0, 9.0]]), lo, hi, torch.ones(1, 3))
    assert s[0, 1] == -math.inf and s[0, 2] == -math.inf and s[0, 0] > 0   # zero gradient: width


def test_queue_pops_lowest_priority_first():
    def doms(pr):
        n = len(pr)
        return Domains(torch.zeros(n, 1), torch.ones(n, 1), torch.zeros(n, dtype=torch.long),
                       torch.zeros(n, 1, dtype=torch.float64), torch.tensor(pr, dtype=torch.float64))
    q = DomainQueue(doms([]))
    q.push(doms([3.0, math.nan, 1.0]))
    q.push(doms([2.0]))
    assert q.pop(2).priority.tolist() == [1.0, 2.0]
    assert len(q) == 2 and q.pop(5).priority[0] == 3.0


def test_batch_sizer_respects_memory_and_time():
    s = BatchSizer(memory_budget=1000, call_seconds=1.0, max_batch=1024)
    for _ in range(8):
        s.update(s.size, seconds=0.001 * s.size, arena_bytes=10 * s.size)
    assert s.size == 64                                  # 1000 bytes / 10 per region, power of 2
    s = BatchSizer(memory_budget=1 << 30, call_seconds=0.1, max_batch=1024)
    for _ in range(8):
        s.update(s.size, seconds=0.01 * s.size, arena_bytes=1)
    assert s.size == 8                                   # 0.1 s / 0.01 s per region
    assert s.parents(queued=3) == 2


# --------------------------------------------------------------------------- verdicts on a known network


def test_input_search_bounds_soundly_at_once_where_float32_error_rules_exist(two_relu, tmp_path):
    """An MLP's input branch and bound uses MixedBounder (no float32 bound to confirm); a model
    with an op float32 sound plans refuse (sigmoid) confirms float32 proofs in float64; without
    sound_fp, plain float32 bounds."""
    from boundflow.verify.bab import MixedBounder
    from boundflow.verify.verifier import VerifyConfig, _bounders
    problem = problem_of(header(2, 2) + unit_box(2) + "(assert (<= Y_0 -1.0))\n")
    bab = _bounders(str(two_relu), problem, "crown", VerifyConfig())["bab"]
    assert isinstance(bab, MixedBounder) and bab.sound and bab.confirm is None
    sigmoid = tmp_path / "sigmoid.onnx"
    export_onnx(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()), torch.zeros(1, 2), sigmoid)
    bab = _bounders(str(sigmoid), problem, "crown", VerifyConfig())["bab"]
    assert type(bab) is Bounder and not bab.sound and bab.confirm.sound
    bab = _bounders(str(two_relu), problem, "crown", VerifyConfig(sound_fp=False))["bab"]
    assert type(bab) is Bounder and not bab.sound and bab.confirm is None


def test_holds_after_splitting(two_relu, tmp_path):
    # x in [0,1]^2: y0 = x0 + x1 > 1.6 and y1 = x0 - x1 > 0.6 would need x0 > 1.1
    prop = write(tmp_path, "p.vnnlib", header(2, 2) + unit_box(2) + "(assert (>= Y_0 1.6))\n(assert (>= Y_1 0.6))\n")
    res = verify(two_relu, prop, timeout=20)
    assert res.verdict == "holds", res.stats
    assert res.stats["decided_by"] == "bab" and res.counterexample is None


def test_violated_with_confirmed_counterexample(two_relu, tmp_path):
    prop = write(tmp_path, "p.vnnlib", header(2, 2) + unit_box(2) + "(assert (>= Y_0 1.4))\n(assert (>= Y_1 0.4))\n")
    res = verify(two_relu, prop, timeout=20)
    assert res.verdict == "violated", res.stats
    assert_counterexample(two_relu, prop, res)


def test_touching_unsafe_set_is_never_proven(two_relu, tmp_path):
    # The closed unsafe set is reached only at the corner x = (1, 0.5), where both rows hold with
    # equality: no proof exists and no strict counterexample either.
    prop = write(tmp_path, "p.vnnlib", header(2, 2) + unit_box(2) + "(assert (>= Y_0 1.5))\n(assert (>= Y_1 0.5))\n")
    t0 = time.perf_counter()
    res = verify(two_relu, prop, timeout=3)
    assert res.verdict in ("unknown", "timeout"), res.verdict
    assert time.perf_counter() - t0 < 3 + 2                        # the deadline is kept


def test_several_boxes_and_disjuncts(two_relu, tmp_path):
    # unsafe: y0 >= 1.9 or y1 >= 0.9; box 1 ([0,0.4]^2) is safe, box 2 ([0.95,1] x [0,1]) is not
    boxes = "(assert (or (and (>= X_0 0) (<= X_0 0.4) (>= X_1 0) (<= X_1 0.4))\n" \
            "            (and (>= X_0 0.95) (<= X_0 1) (>= X_1 0) (<= X_1 1))))\n"
    text = header(2, 2) + boxes + "(assert (or (>= Y_0 1.9) (>= Y_1 0.9)))\n"
    prop = write(tmp_path, "p.vnnlib", text)
    res = verify(two_relu, prop, timeout=20)
    assert res.verdict == "violated"
    assert_counterexample(two_relu, prop, res)
    assert res.counterexample[0][0] >= 0.95
    # with box 2 = [0.5, 0.8] x [0, 1]: y0 <= 1.8 and y1 <= 0.8 everywhere
    safe = write(tmp_path, "q.vnnlib", header(2, 2) + boxes.replace("0.95", "0.5").replace(
        "(<= X_0 1)", "(<= X_0 0.8)") + "(assert (or (>= Y_0 1.9) (>= Y_1 0.9)))\n")
    assert verify(two_relu, safe, timeout=20).verdict == "holds"


def test_double_model_verdicts(capsys, two_relu_double, tmp_path):
    """A float64 model end to end: proven by the bound, by input splitting, and violated with a
    counterexample onnxruntime confirms when fed float64 (it crashed feeding float32)."""
    out = tmp_path / "res.txt"
    cases = [("(assert (>= Y_0 2.5))\n", "unsat"), ("(assert (>= Y_0 1.6))\n(assert (>= Y_1 0.6))\n", "unsat"),
             ("(assert (>= Y_0 1.4))\n(assert (>= Y_1 0.4))\n", "sat")]
    for k, (rows, want) in enumerate(cases):
        prop = write(tmp_path, f"p{k}.vnnlib", header(2, 2) + unit_box(2) + rows)
        code = main(["verify", str(two_relu_double), str(prop), "--timeout", "3600", "--results", str(out)])
        assert code == 0, capsys.readouterr().err
        assert out.read_text().splitlines()[0] == want
    res = verify(two_relu_double, prop, timeout=20)
    assert res.verdict == "violated"
    assert_counterexample(two_relu_double, prop, res)


def test_identity_model_verdicts(tmp_path):
    """output = input: proven by the bound, violated by the attack; with 32 inputs an unprovable
    property reaches ReLU branch and bound, which has nothing to split: "unknown" (it reported a
    timeout before the deadline, and CROWN crashed on such a model before that)."""
    from onnx import helper

    for n in (3, 32):
        path = onnx_file([helper.make_node("Identity", ["x"], ["y"])], {}, [1, n], [1, n], tmp_path / f"id{n}.onnx")
        holds = write(tmp_path, "h.vnnlib", header(n, n) + unit_box(n) + "(assert (>= Y_0 1.5))\n")
        assert verify(path, holds, timeout=20).verdict == "holds"
        violated = write(tmp_path, "v.vnnlib", header(n, n) + unit_box(n) + "(assert (>= Y_0 0.5))\n")
        res = verify(path, violated, timeout=20)
        assert res.verdict == "violated"
        assert_counterexample(path, violated, res)
    touching = write(tmp_path, "t.vnnlib", header(32, 32) + unit_box(32) + "(assert (>= Y_0 1))\n")
    res = verify(tmp_path / "id32.onnx", touching, timeout=20)
    assert res.verdict == "unknown" and res.stats["decided_by"] == "relu_bab", res.stats


def test_zero_timeout(two_relu, tmp_path):
    prop = write(tmp_path, "p.vnnlib", header(2, 2) + unit_box(2) + "(assert (>= Y_0 1.6))\n(assert (>= Y_1 0.6))\n")
    assert verify(two_relu, prop, timeout=0).verdict == "timeout"


# --------------------------------------------------------------------------- VNN-COMP 2021 instances


def expected_rows(shared) -> dict[tuple[str, str, str], dict]:
    with open(shared / VNNCOMP / "expected.csv", newline="") as f:
        return {(r["benchmark"], r["onnx"], Path(r["vnnlib"]).name): r for r in csv.DictReader(f)}


def check_against_expected(shared, benchmark, onnx_rel, vnnlib_rel, res: Result) -> None:
    """Never "holds" where the majority says violated (nor the reverse); "violated" only with a
    counterexample confirmed here; a solved answer agrees with a clear majority."""
    folder = shared / VNNCOMP / benchmark
    row = expected_rows(shared)[(benchmark, Path(onnx_rel).name, Path(vnnlib_rel).name)]
    exp, holds, violated = row["expected"], int(row["holds_votes"]), int(row["violated_votes"])
    if res.verdict == "violated":
        assert_counterexample(folder / onnx_rel, folder / vnnlib_rel, res)
    if res.verdict in suite.SOLVED and exp in suite.SOLVED:
        clear = (holds == 0) if exp == "violated" else (violated <= 1 and holds >= 2 * violated + 2)
        if exp == "violated" or clear:
            assert res.verdict == exp, (onnx_rel, vnnlib_rel, res.verdict, row)


TEST_BENCHMARK = [("test_nano.onnx", "test_nano.vnnlib"), ("test_tiny.onnx", "test_tiny.vnnlib"),
                  ("test_small.onnx", "test_small.vnnlib"), ("test_sat.onnx", "test_prop.vnnlib"),
                  ("test_unsat.onnx", "test_prop.vnnlib")]


@pytest.mark.parametrize("onnx_name,vnnlib_name", TEST_BENCHMARK)
def test_test_benchmark(shared, onnx_name, vnnlib_name):
    folder = shared / VNNCOMP / "test"
    res = verify(folder / onnx_name, folder / vnnlib_name, timeout=30)
    exp = expected_rows(shared)[("test", onnx_name, vnnlib_name)]["expected"]
    assert res.verdict == exp, res.stats
    check_against_expected(shared, "test", onnx_name, vnnlib_name, res)


EASY = [  # (benchmark, onnx, vnnlib, timeout): quick ones, plus two hard ones on a short leash
    ("acasxu", "ACASXU_run2a_1_1_batch_2000.onnx", "prop_1.vnnlib", 20),
    ("acasxu", "ACASXU_run2a_1_2_batch_2000.onnx", "prop_2.vnnlib", 20),
    ("acasxu", "ACASXU_run2a_2_1_batch_2000.onnx", "prop_2.vnnlib", 20),
    ("acasxu", "ACASXU_run2a_2_1_batch_2000.onnx", "prop_3.vnnlib", 20),
    ("acasxu", "ACASXU_run2a_1_7_batch_2000.onnx", "prop_3.vnnlib", 20),
    ("acasxu", "ACASXU_run2a_3_3_batch_2000.onnx", "prop_2.vnnlib", 3),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_2_0.03.vnnlib", 20),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_7_0.03.vnnlib", 20),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_10_0.05.vnnlib", 20),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_0_0.05.vnnlib", 3),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_9_0.03.vnnlib", 20),      # ReLU branch and bound
    ("mnistfc", "mnist-net_256x2.onnx", "prop_13_0.03.vnnlib", 20),     # three disjuncts at once
    ("oval21", "nets/cifar_base_kw.onnx", "vnnlib/cifar_base_kw-img4549-eps0.00392156862745098.vnnlib", 30),
    ("oval21", "nets/cifar_base_kw.onnx", "vnnlib/cifar_base_kw-img4631-eps0.016339869281045753.vnnlib", 6),
]


@pytest.mark.parametrize("benchmark,onnx_name,vnnlib_name,timeout", EASY)
def test_vnncomp_instances(shared, benchmark, onnx_name, vnnlib_name, timeout):
    folder = shared / VNNCOMP / benchmark
    t0 = time.perf_counter()
    res = verify(folder / onnx_name, folder / vnnlib_name, timeout=timeout)
    assert time.perf_counter() - t0 < timeout + 2
    check_against_expected(shared, benchmark, onnx_name, vnnlib_name, res)
    if timeout >= 20:                                       # the easy ones are solved
        assert res.verdict in suite.SOLVED, (res.verdict, res.stats)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_verify_in_a_callers_no_grad_or_inference_mode(shared, mode):
    """verify inside a caller's no_grad or inference_mode block decides as outside: its attack,
    slopes and branch scores need autograd (both failed before: "element 0 of tensors does
    not require grad")."""
    cases = [("acasxu", "ACASXU_run2a_1_1_batch_2000.onnx", "prop_1.vnnlib", "holds"),
             ("acasxu", "ACASXU_run2a_1_9_batch_2000.onnx", "prop_7.vnnlib", "violated"),
             ("mnistfc", "mnist-net_256x2.onnx", "prop_0_0.03.vnnlib", "holds")]
    with mode():
        verdicts = [verify(shared / VNNCOMP / b / o, shared / VNNCOMP / b / v, timeout=20).verdict
                    for b, o, v, _ in cases]
    assert verdicts == [want for *_, want in cases]


def test_clipping_shrinks_the_input_search(shared):
    """ACAS Xu 1_1 property 4: clipping each domain to where its linear bounds allow a
    violation (verify/clip.py) proves it in far fewer domains (686 against 1,626 measured),
    some of them by clipping alone."""
    from boundflow.verify.bab import BabConfig
    from boundflow.verify.verifier import VerifyConfig
    folder = shared / VNNCOMP / "acasxu"
    net, prop = folder / "ACASXU_run2a_1_1_batch_2000.onnx", folder / "prop_4.vnnlib"
    clipped = verify(net, prop, timeout=60)
    plain = verify(net, prop, timeout=60, config=VerifyConfig(bab=BabConfig(clip=False)))
    assert clipped.verdict == plain.verdict == "holds", (clipped.stats, plain.stats)
    assert clipped.stats["bab"]["clipped_proofs"] > 0 and plain.stats["bab"]["clipped_proofs"] == 0
    assert clipped.stats["bab"]["domains_bounded"] < 0.7 * plain.stats["bab"]["domains_bounded"]


# --------------------------------------------------------------------------- CLI and result files


def test_result_file_format():
    x = np.array([0.1, -2.5], dtype=np.float32)
    y = np.array([1.0, 3.0e-8])
    text = result_file_text(Result("violated", (x, y), 0.1))
    lines = text.splitlines()
    assert lines[0] == "sat"
    assert lines[1] == f"((X_0 {float(x[0])!r})" and lines[2] == f" (X_1 {float(x[1])!r})"
    assert lines[3] == " (Y_0 1.0)" and lines[4] == f" (Y_1 {3.0e-8!r}))"
    assert np.float32(float(lines[1].split()[1].rstrip(")"))) == x[0]   # exact round trip
    assert result_file_text(Result("holds", None, 0.1)) == "unsat\n"
    assert result_file_text(Result("unknown", None, 0.1)) == "unknown\n"
    assert result_file_text(Result("timeout", None, 0.1)) == "timeout\n"
    assert result_file_text(None) == "error\n"


def test_cli_verify_writes_results(capsys, two_relu, tmp_path):
    # --timeout counts from the start of the process (here: pytest's), hence the large value
    prop = write(tmp_path, "p.vnnlib", header(2, 2) + unit_box(2) + "(assert (>= Y_0 1.4))\n(assert (>= Y_1 0.4))\n")
    out = tmp_path / "res.txt"
    code = main(["verify", str(two_relu), str(prop), "--timeout", "3600", "--results", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert stdout.startswith("violated ") and stdout.count("\n") == 1 and "onnxruntime" in stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "sat" and len(lines) == 1 + 2 + 2
    x = np.array([float(l.split()[1].rstrip(")")) for l in lines[1:3]])
    assert np.all((0 <= x) & (x <= 1))
    holds = write(tmp_path, "h.vnnlib", header(2, 2) + unit_box(2) + "(assert (>= Y_0 2.5))\n")
    assert main(["verify", str(two_relu), str(holds), "--timeout", "3600", "--results", str(out)]) == 0
    assert out.read_text() == "unsat\n"


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_cli_verify_malformed_vnnlib(capsys, two_relu, tmp_path, name):
    text, line, fragment = MALFORMED[name]
    prop = write(tmp_path, f"{name}.vnnlib", text)
    out = tmp_path / "res.txt"
    code = main(["verify", str(two_relu), str(prop), "--timeout", "5", "--results", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 2 and stdout == ""
    assert err.startswith("boundflow: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert fragment in err and str(prop) in err
    if line is not None:
        assert f"{prop}:{line}:" in err
    assert out.read_text() == "error\n"


@pytest.mark.parametrize("error,fragment", [
    (KeyError("t"), "internal error: KeyError: 't' (at "),
    (RuntimeError("onnxruntime said\n  something"), "internal error: RuntimeError: onnxruntime said something"),
    (OSError(5, "Input/output error", "x.onnx"), "x.onnx: Input/output error")])
@pytest.mark.parametrize("debug", [False, True])
def test_cli_verify_internal_error(capsys, monkeypatch, two_relu, tmp_path, error, fragment, debug):
    """Whatever fails inside verify: the result file says error, stderr names the cause in one
    line (and the traceback with --debug), exit status 2, and no verdict on stdout."""
    from boundflow.verify import verifier

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(verifier, "verify", broken)
    prop = write(tmp_path, "p.vnnlib", header(2, 2) + unit_box(2) + "(assert (>= Y_0 2.5))\n")
    out = tmp_path / "res.txt"
    argv = ["verify", str(two_relu), str(prop), "--timeout", "5", "--results", str(out)]
    assert main(argv + ["--debug"] * debug) == 2
    stdout, err = capsys.readouterr()
    assert stdout == "" and out.read_text() == "error\n"
    last = err.splitlines()[-1]
    assert last.startswith("boundflow: error: ") and fragment in last
    assert ("Traceback" in err) == debug
    if not debug:
        assert err.count("\n") == 1


def test_cli_verify_bad_arguments(capsys, two_relu, tmp_path):
    prop = write(tmp_path, "p.vnnlib", header(2, 2) + unit_box(2) + "(assert (>= Y_0 2.5))\n")
    for argv, fragment in [
        (["verify", str(two_relu), str(prop), "--timeout", "0"], "--timeout must be > 0"),
        (["verify", str(tmp_path / "nope.onnx"), str(prop), "--timeout", "5"], "no such file"),
        (["verify", str(two_relu), str(tmp_path / "nope.vnnlib"), "--timeout", "5"], "no such file"),
        (["verify", str(two_relu), str(prop)], "--timeout"),
        (["run-suite", str(tmp_path / "none.csv")], "no such instances file"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err


def test_cli_verify_input_count_mismatch(capsys, two_relu, tmp_path):
    prop = write(tmp_path, "p.vnnlib", header(3, 2) + unit_box(3) + "(assert (>= Y_0 2.5))\n")
    assert main(["verify", str(two_relu), str(prop), "--timeout", "5"]) == 2
    assert "declares 3 inputs" in capsys.readouterr().err


def test_process_age_counts_from_process_start():
    from boundflow.verify.commands import process_age

    age = process_age()
    assert 0 < age < 24 * 3600
    time.sleep(0.05)
    assert process_age() > age


def test_outcome_flags_wrong_answers(tmp_path):
    inst = suite.Instance("b", "m.onnx", "p.vnnlib", 10.0, tmp_path / "m.onnx", tmp_path / "p.vnnlib", "holds")
    wrong = suite.Outcome(inst, "violated", 1.0)
    assert wrong.wrong and not suite.Outcome(inst, "holds", 1.0).wrong
    assert not suite.Outcome(inst, "timeout", 1.0).wrong
    counts = suite.tally([wrong, suite.Outcome(inst, "holds", 2.0)])
    assert counts["wrong"] == 1 and counts["holds"] == 1 and counts["violated"] == 1
    line = suite.progress_line(1, 2, wrong, counts, color=True)
    assert "WRONG (expected holds)" in line and "\033[31m" in line
    assert "\033[" not in suite.progress_line(1, 2, wrong, counts, color=False)
    assert "wrong answers 1" in suite.summary_table([wrong])


def test_run_suite_end_to_end(shared, tmp_path):
    """Two instances in parallel processes; the expected verdict of one is made wrong on purpose,
    so the flagging and counting is exercised on real output."""
    bench = tmp_path / "mini"
    bench.mkdir()
    test = shared / VNNCOMP / "test"
    (bench / "mini_instances.csv").write_text(
        f"{test / 'test_sat.onnx'},{test / 'test_prop.vnnlib'},30\n"
        f"{test / 'test_tiny.onnx'},{test / 'test_tiny.vnnlib'},30\n")
    (bench / "expected.csv").write_text(
        "benchmark,onnx,vnnlib,expected,holds_votes,violated_votes\n"
        "mini,test_sat.onnx,test_prop.vnnlib,holds,3,0\n"
        "mini,test_tiny.onnx,test_tiny.vnnlib,holds,3,0\n")
    out = tmp_path / "results.csv"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "boundflow", "run-suite", str(bench / "mini_instances.csv"),
                           "--jobs", "2", "--timeout-cap", "20", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("] mini ") == 2 and "WRONG (expected holds)" in proc.stdout
    assert "wrong answers 1" in proc.stdout and "solved 2 of 2" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    assert [r["verdict"] for r in rows] == ["violated", "holds"]
    assert [r["wrong"] for r in rows] == ["WRONG", ""]
    assert list(rows[0]) == list(suite.CSV_FIELDS)
    assert all(float(r["seconds"]) > 0 for r in rows)


def test_progress_lines_only_when_enabled(caplog):
    from boundflow.verify.progress import Progress

    progress = Progress("search", every=0.0)
    with caplog.at_level(logging.WARNING, logger="boundflow.verify"):
        progress.tick(domains=3)
    assert caplog.text == ""
    with caplog.at_level(logging.INFO, logger="boundflow.verify"):
        progress.tick(domains=5, queued=2)
    assert "search" in caplog.text and "domains 5, queued 2" in caplog.text


def test_progress_outlook_says_whether_the_queue_empties_in_time(caplog, monkeypatch):
    from boundflow.verify import progress as P

    assert P.outlook(100, 40, 2.0, 10.0).startswith("queue -30/s: empties in ~1 s at this rate, before")
    assert "after the deadline (5 s left)" in P.outlook(1000, 900, 1.0, 5.0)
    assert "not emptying" in P.outlook(10, 50, 1.0, 60.0) and "not emptying" in P.outlook(7, 7, 1.0, 60.0)
    assert P.outlook(5, 0, 1.0, 1.0) == "queue empty"
    assert "no deadline" in P.outlook(50, 10, 1.0, math.inf)
    clock = iter([0.0, 1.0, 2.0, 3.0])
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    progress = P.Progress("search", every=0.5)
    with caplog.at_level(logging.INFO, logger="boundflow.verify"):
        progress.tick(100, 30.0, domains=1)             # t = 1: the first line has no rate yet
        progress.tick(60, 30.0, domains=2)              # t = 2: -40 per second
    first, second = caplog.text.strip().splitlines()
    assert "domains 1, queued 100" in first and "outlook" not in first
    assert "queued 60, outlook queue -40/s: empties in ~2 s at this rate, before the deadline (28 s left)" in second


def test_read_finished_rows_of_a_results_file(tmp_path):
    """--resume's reading of a results file: its rows by instance; a foreign or torn row, or
    another file, is an error naming the line."""
    insts = [suite.Instance("b", f"m{k}.onnx", "p.vnnlib", 10.0, tmp_path / f"m{k}.onnx", tmp_path / "p.vnnlib",
                            "holds") for k in range(3)]
    out = tmp_path / "results.csv"
    assert suite.read_finished(out, insts) == {}
    suite.write_csv([suite.Outcome(insts[2], "violated", 1.5), suite.Outcome(insts[0], "holds", 2.0)], out)
    finished = suite.read_finished(out, insts)
    assert sorted(finished) == [0, 2] and finished[2].verdict == "violated" and finished[2].wrong
    assert finished[0].seconds == 2.0
    header = ",".join(suite.CSV_FIELDS) + "\n"
    for text, fragment in [("onnx,vnnlib\n", "not a run-suite results file"),
                           (header + "b,m9.onnx,p.vnnlib,holds,1.0,holds,\n", "results.csv:2: b m9.onnx p.vnnlib is not an instance"),
                           (header + "b,m0.onnx,p.vnnlib,hol", "results.csv:2: a malformed row")]:
        out.write_text(text)
        with pytest.raises(SpecError, match=fragment):
            suite.read_finished(out, insts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_steps_as_torch_adam_does(dtype):
    """The optimiser of alpha- and beta-CROWN (written out, see verify.alpha.Adam) takes
    torch.optim.Adam's steps, also where gradients are zero or so small that the second moment
    is subnormal (it raises those before the root)."""
    from boundflow.verify.alpha import Adam

    g = torch.Generator().manual_seed(0)
    ours = torch.rand(3000, generator=g, dtype=dtype)
    ours[1000:2000] = 0.0                               # where a tiny step shows
    theirs = ours.clone()
    ours.requires_grad_(True)
    theirs.requires_grad_(True)
    opt, ref = Adam([{"params": [ours], "lr": 0.1}], decay=1.0), torch.optim.Adam([theirs], lr=0.1)
    tiny = 1e-160 if dtype == torch.float64 else 1e-22
    for _ in range(4):
        grad = torch.randn(3000, generator=g, dtype=dtype)
        grad[:1000] = 0.0
        grad[1000:2000] *= tiny                         # squares below the smallest normal number
        opt.step([grad])
        theirs.grad = grad.clone()
        ref.step()
        assert torch.equal(ours.detach(), theirs.detach())
