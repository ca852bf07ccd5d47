"""The VNNLIB reader: the VNN-COMP 2021 files parse as expected; malformed files are refused
with the file and line at fault."""
from __future__ import annotations

import re

import numpy as np
import pytest

from boundflow.errors import SpecError
from boundflow.frontends.vnnlib import (
    format_row,
    outward_float32,
    parse_vnnlib,
    read_vnnlib,
)


@pytest.fixture(scope="module")
def bench(shared):
    return shared / "benchmarks" / "vnncomp2021"


def _mnist_label(path) -> int:
    m = re.search(r"label: (\d+)", path.read_text())
    assert m, path
    return int(m.group(1))


# --------------------------------------------------------------------------- real files


def test_mnistfc_all(bench):
    files = sorted((bench / "mnistfc").glob("*.vnnlib"))
    assert len(files) == 30
    for f in files:
        prop = read_vnnlib(f, num_inputs=784, num_outputs=10)
        assert prop.num_inputs == 784 and prop.num_outputs == 10
        assert len(prop.boxes) == 1
        lo, hi = prop.boxes[0]
        assert lo.shape == hi.shape == (784,)
        assert np.all(lo <= hi) and np.all(lo >= 0) and np.all(hi <= 1)
        eps = float(f.stem.split("_")[-1])
        assert np.max(hi - lo) <= 2 * eps + 1e-6
        # one disjunct per wrong class: Y_j >= Y_label, i.e. (e_label - e_j) . y <= 0
        label = _mnist_label(f)
        assert len(prop.disjuncts) == 9
        wrong = []
        for C, d in prop.disjuncts:
            assert C.shape == (1, 10) and d.shape == (1,)
            assert d[0] == 0.0
            assert C[0, label] == 1.0
            (j,) = np.flatnonzero(C[0] == -1.0)
            assert np.count_nonzero(C[0]) == 2
            wrong.append(int(j))
        assert sorted(wrong) == [j for j in range(10) if j != label]
        C_all, d_all, labels = prop.spec_matrix()
        assert C_all.shape == (9, 10) and d_all.shape == (9,)
        assert labels[0] == f"Y_{label} - Y_{wrong[0]}"


def test_mnist_spec_matrix_matches_golden(shared):
    import json

    g = json.loads((shared / "golden" / "mnist-net_256x2__prop_0_0.03__specC.json").read_text())
    prop = read_vnnlib(shared / "benchmarks/vnncomp2021/mnistfc/prop_0_0.03.vnnlib")
    C, d, _ = prop.spec_matrix()
    np.testing.assert_array_equal(C, np.array(g["C"]))
    np.testing.assert_array_equal(d, 0.0)
    lo, hi = prop.boxes[0]
    # the golden box is the float32 of the decimal bounds; ours rounds outward
    lo32, hi32 = outward_float32(lo, hi)
    assert np.all(lo32 <= np.float32(g["x_lower"])) and np.all(hi32 >= np.float32(g["x_upper"]))
    assert np.all(lo32 <= lo) and np.all(hi32 >= hi)


def test_acasxu_all(bench):
    files = sorted((bench / "acasxu").glob("prop_*.vnnlib"))
    assert len(files) == 10
    for f in files:
        prop = read_vnnlib(f, num_inputs=5, num_outputs=5)
        assert len(prop.boxes) == (2 if f.stem == "prop_6" else 1), f
        for lo, hi in prop.boxes:
            assert lo.shape == hi.shape == (5,) and np.all(lo <= hi)
        assert prop.disjuncts


def test_acasxu_prop_6_two_boxes(bench):
    prop = read_vnnlib(bench / "acasxu" / "prop_6.vnnlib")
    (lo1, hi1), (lo2, hi2) = prop.boxes
    np.testing.assert_array_equal(lo1, [-0.129289109, 0.11140846, -0.499999896, -0.5, -0.5])
    np.testing.assert_array_equal(hi1, [0.700434925, 0.499999896, -0.499204121, 0.5, 0.5])
    np.testing.assert_array_equal(lo2, [-0.129289109, -0.499999896, -0.499999896, -0.5, -0.5])
    np.testing.assert_array_equal(hi2, [0.700434925, -0.11140846, -0.499204121, 0.5, 0.5])
    # unsafe if COC (Y_0) is not minimal: four disjuncts Y_j <= Y_0
    assert len(prop.disjuncts) == 4
    C, d, labels = prop.spec_matrix()
    assert labels == ["Y_1 - Y_0", "Y_2 - Y_0", "Y_3 - Y_0", "Y_4 - Y_0"]
    assert prop.disjunct_rows() == [[0], [1], [2], [3]]


def test_acasxu_shapes(bench):
    p1 = read_vnnlib(bench / "acasxu" / "prop_1.vnnlib")
    # (>= Y_0 3.99...) -> -Y_0 <= -3.99...
    ((C, d),) = p1.disjuncts
    np.testing.assert_array_equal(C, [[-1, 0, 0, 0, 0]])
    assert d[0] == pytest.approx(-3.991125645861615)
    assert p1.spec_matrix()[2] == ["-Y_0"]

    p2 = read_vnnlib(bench / "acasxu" / "prop_2.vnnlib")  # four top-level asserts, ANDed
    assert len(p2.disjuncts) == 1 and p2.disjuncts[0][0].shape == (4, 5)

    p7 = read_vnnlib(bench / "acasxu" / "prop_7.vnnlib")  # OR of two ANDs of three
    assert [C.shape[0] for C, _ in p7.disjuncts] == [3, 3]
    assert len(p7.spec_matrix()[0]) == 6


def test_test_benchmark(bench):
    files = sorted((bench / "test").glob("*.vnnlib"))
    assert {f.name for f in files} >= {"test_nano.vnnlib", "test_prop.vnnlib", "test_small.vnnlib"}
    for f in files:
        prop = read_vnnlib(f)
        assert prop.boxes and prop.disjuncts
    nano = read_vnnlib(bench / "test" / "test_nano.vnnlib", num_inputs=1, num_outputs=1)
    assert [(lo.tolist(), hi.tolist()) for lo, hi in nano.boxes] == [([-1.0], [1.0])]
    assert [(C.tolist(), d.tolist()) for C, d in nano.disjuncts] == [([[1.0]], [-1.0])]
    # one clause that mixes the input box with the output constraint
    tiny = read_vnnlib(bench / "test" / "test_tiny.vnnlib", num_inputs=1, num_outputs=1)
    assert [(lo.tolist(), hi.tolist()) for lo, hi in tiny.boxes] == [([-1.0], [1.0])]
    assert [(C.tolist(), d.tolist()) for C, d in tiny.disjuncts] == [([[-1.0]], [-100.0])]
    prop = read_vnnlib(bench / "test" / "test_prop.vnnlib", num_inputs=5, num_outputs=5)
    assert len(prop.disjuncts) == 1 and prop.disjuncts[0][0].shape == (4, 5)


def test_oval21_some(bench):
    files = sorted((bench / "oval21" / "vnnlib").glob("*.vnnlib"))[:3]
    assert files
    for f in files:
        prop = read_vnnlib(f, num_inputs=3 * 32 * 32, num_outputs=10)
        assert len(prop.boxes) == 1 and len(prop.disjuncts) == 9
        lo, hi = prop.boxes[0]
        assert np.all(lo <= hi)


def test_input_count_mismatch(bench):
    with pytest.raises(SpecError, match="declares 5 inputs.*model has 784"):
        read_vnnlib(bench / "acasxu" / "prop_1.vnnlib", num_inputs=784)


# --------------------------------------------------------------------------- syntax


HEADER = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
BOX = "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 0.5))\n"


def test_linear_terms_and_numbers():
    text = HEADER + """
; comments ; anywhere
(assert (<= -1e0 X_0))  (assert (>= 1.0E+0 X_0)) ; inline
(assert (and (>= X_1 -.5) (< X_1 +2.5e-1)))
(assert (or
   (and (<= (+ Y_0 (* -2 Y_1) 3) (- 1)))
   (and (> (* 0.5 Y_1 4) (- Y_0 Y_1 1.5)))
   (and (<= Y_0 Y_1 7))
))
"""
    prop = parse_vnnlib(text)
    ((lo, hi),) = prop.boxes
    assert lo.tolist() == [-1.0, -0.5] and hi.tolist() == [1.0, 0.25]
    (C1, d1), (C2, d2), (C3, d3) = prop.disjuncts
    # Y_0 - 2 Y_1 + 3 <= -1  ->  Y_0 - 2 Y_1 <= -4
    assert C1.tolist() == [[1.0, -2.0]] and d1.tolist() == [-4.0]
    # 2 Y_1 > Y_0 - Y_1 - 1.5  ->  Y_0 - 3 Y_1 <= 1.5 (closure)
    assert C2.tolist() == [[1.0, -3.0]] and d2.tolist() == [1.5]
    # chain: Y_0 <= Y_1 and Y_1 <= 7
    assert C3.tolist() == [[1.0, -1.0], [0.0, 1.0]] and d3.tolist() == [0.0, 7.0]
    _, _, labels = prop.spec_matrix()
    assert labels == ["Y_0 - 2*Y_1", "Y_0 - 3*Y_1", "Y_0 - Y_1", "Y_1"]


def test_scaled_input_bound_and_intersection():
    text = HEADER + """
(assert (<= (* 2 X_0) 1)) (assert (>= (* -1 X_0) 1))
(assert (>= X_0 -3)) (assert (<= X_0 0.25))
(assert (>= X_1 0)) (assert (<= X_1 1))
(assert (<= Y_0 Y_1))
"""
    ((lo, hi),) = parse_vnnlib(text).boxes
    # 2 X_0 <= 1 -> X_0 <= 0.5; -X_0 >= 1 -> X_0 <= -1; tightest wins
    assert lo.tolist() == [-3.0, 0.0] and hi.tolist() == [-1.0, 1.0]


def test_disjunct_unreachable_and_dedup():
    text = HEADER + BOX + """
(assert (or (and (<= Y_0 Y_1) (<= Y_0 3)) (and (<= Y_0 Y_1))))
"""
    prop = parse_vnnlib(text)
    C, d, labels = prop.spec_matrix()
    assert labels == ["Y_0 - Y_1", "Y_0"]
    assert prop.disjunct_rows() == [[0, 1], [0]]
    assert prop.disjunct_unreachable([0.5, -10.0]) == [True, True]
    assert prop.disjunct_unreachable([-0.5, 4.0]) == [True, False]
    assert prop.disjunct_unreachable([-0.5, 3.0]) == [False, False]


def test_or_of_boxes_times_or_of_outputs():
    text = HEADER + """
(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1))
            (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1))))
(assert (or (and (<= Y_0 0)) (and (<= Y_1 0))))
"""
    prop = parse_vnnlib(text)
    assert [b[0].tolist() for b in prop.boxes] == [[0.0, 0.0], [2.0, 0.0]]
    assert len(prop.disjuncts) == 2


def test_format_row():
    assert format_row([0, -1, 0, 1]) == "Y_3 - Y_1"
    assert format_row([-1, 0]) == "-Y_0"
    assert format_row([0.5, -2]) == "0.5*Y_0 - 2*Y_1"
    assert format_row([0, 0]) == "0"


def test_outward_float32():
    lo, hi = outward_float32([0.1, -0.1, 1.0], [0.1, -0.1, 1.0])
    assert lo.dtype == hi.dtype == np.float32
    assert np.all(lo.astype(np.float64) <= [0.1, -0.1, 1.0])
    assert np.all(hi.astype(np.float64) >= [0.1, -0.1, 1.0])
    assert lo[2] == hi[2] == 1.0  # exact values stay


# --------------------------------------------------------------------------- malformed corpus

MALFORMED = {
    # name: (text, line of the error, message fragment)
    "missing_close_paren": (HEADER + BOX + "(assert (<= Y_0 Y_1)\n", 9, "never closed"),
    "extra_close_paren": (HEADER + BOX + "(assert (<= Y_0 Y_1)))\n", 9, "without a matching"),
    "undeclared_variable": (HEADER + BOX + "\n(assert (<= Y_0 Y_2))\n", 10, "undeclared variable Y_2"),
    "undeclared_input": (HEADER + "(assert (>= X_7 0))\n" + BOX + "(assert (<= Y_0 0))\n", 5,
                         "undeclared variable X_7"),
    "non_linear_term": (HEADER + BOX + "(assert (<= (* Y_0 Y_1) 1))\n", 9, "non-linear"),
    "empty_box": (HEADER + "(assert (>= X_0 1))\n(assert (<= X_0 0))\n"
                  "(assert (>= X_1 0))\n(assert (<= X_1 1))\n(assert (<= Y_0 0))\n", 6, "empty box"),
    "missing_lower_bound": (HEADER + "(assert (<= X_0 1))\n(assert (>= X_1 0))\n"
                            "(assert (<= X_1 1))\n(assert (<= Y_0 0))\n", 1, "X_0 has no lower bound"),
    "missing_upper_bound": (HEADER + "(assert (>= X_0 0))\n(assert (<= X_0 1))\n"
                            "(assert (>= X_1 0))\n(assert (<= Y_0 0))\n", 2, "X_1 has no upper bound"),
    "unknown_command": (HEADER + BOX + "(assert (<= Y_0 0))\n(push 1)\n", 10, "unknown command 'push'"),
    "unknown_operator": (HEADER + BOX + "(assert (not (<= Y_0 0)))\n", 9, "'not'"),
    "mixed_atom": (HEADER + BOX + "(assert (<= X_0 Y_0))\n", 9, "not supported yet"),
    "mixed_or": (HEADER + "(assert (or\n (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_0 0))\n"
                 " (and (>= X_0 1) (<= X_0 2) (>= X_1 0) (<= X_1 1) (<= Y_1 0))))\n", 5, "not supported yet"),
    "redeclared": (HEADER + "(declare-const Y_1 Real)\n" + BOX + "(assert (<= Y_0 0))\n", 5, "declared twice"),
    "bad_sort": ("(declare-const X_0 Int)\n", 1, "sort Int"),
    "bad_number": (HEADER + BOX + "(assert (<= Y_0 1.2.3))\n", 9, "1.2.3"),
    "no_output_constraint": (HEADER + BOX, None, "no output constraint"),
    "gap_in_inputs": ("(declare-const X_0 Real)\n(declare-const X_2 Real)\n(declare-const Y_0 Real)\n"
                      "(assert (<= Y_0 0))\n", 2, "X_1 is not"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files(tmp_path, name):
    text, line, fragment = MALFORMED[name]
    path = tmp_path / f"{name}.vnnlib"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        read_vnnlib(path)
    msg = str(info.value)
    assert str(path) in msg
    if line is not None:
        assert f"{path}:{line}:" in msg, msg
    assert fragment in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such VNNLIB file"):
        read_vnnlib(tmp_path / "nope.vnnlib")
