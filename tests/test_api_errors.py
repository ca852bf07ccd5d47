"""compute_bounds rejects bad input with clear BoundflowError subclasses that say what is wrong."""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import boundflow
from boundflow.errors import BoundflowError, ModelLoadError, ShapeError, UnsupportedOpError


def _mlp_proto(extra_op: str | None = None, node_name: str = "act0") -> onnx.ModelProto:
    """x[1,3] -> Gemm(4) -> Relu (or `extra_op`) -> Gemm(2)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node(extra_op or "Relu", ["h"], ["a"], name=node_name),
             helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    onnx.save(_mlp_proto(), str(path))
    return str(path)


def box(shape=(1, 3), eps=0.1):
    x = torch.zeros(shape)
    return x - eps, x + eps


def test_valid_model_works(mlp_path):
    lb, ub = boundflow.compute_bounds(mlp_path, *box(), method="crown")
    assert lb.shape == ub.shape == (1, 2) and (lb <= ub).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, torch.float64])
def test_boxes_that_need_grad_or_another_dtype_are_taken(mlp_path, dtype):
    """A box with requires_grad, or of another dtype than float32, gives float32's bounds (of
    a float64 box rounded outward, which contains it), and nothing to differentiate."""
    lo, hi = box(eps=1.0)
    want = boundflow.compute_bounds(mlp_path, lo, hi, method="crown")
    got = boundflow.compute_bounds(mlp_path, lo.to(dtype).requires_grad_(dtype.is_floating_point),
                                   hi.to(dtype), method="crown")
    assert all(t.grad_fn is None and not t.requires_grad for t in got)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_errors_are_boundflow_errors():
    for cls in (ModelLoadError, UnsupportedOpError, ShapeError, boundflow.SpecError):
        assert issubclass(cls, BoundflowError)


@pytest.mark.parametrize("shape", [(1, 4), (3,), (1, 3, 1), (2, 2, 3), (1, 1, 1, 3)])
def test_box_of_wrong_shape(mlp_path, shape):
    lo, hi = box(shape)
    with pytest.raises(ShapeError, match=r"x_lower has shape .*model's input has shape \[1, 3\]"):
        boundflow.compute_bounds(mlp_path, lo, hi)


@pytest.mark.parametrize("shape", [(2, 1, 3), (2, 3), (1, 3)])
def test_box_with_batch_axis_is_accepted(mlp_path, shape):
    lb, _ = boundflow.compute_bounds(mlp_path, *box(shape), method="ibp")
    assert lb.shape == (shape[0], 2)


def test_lower_above_upper_names_position(mlp_path):
    lo, hi = box()
    lo[0, 2] = 0.5                      # > hi[0, 2] = 0.1
    with pytest.raises(ShapeError, match=r"x_lower > x_upper at 1 position.*index \[0, 0, 2\]"):
        boundflow.compute_bounds(mlp_path, lo, hi)


def test_lower_above_upper_in_second_region(mlp_path):
    lo, hi = box((3, 3))
    lo[1, 0] = 1.0
    lo[2, 1] = 1.0
    with pytest.raises(ShapeError, match=r"x_lower > x_upper at 2 position.*index \[1, 0, 0\]"):
        boundflow.compute_bounds(mlp_path, lo, hi)


def test_lower_upper_shape_mismatch(mlp_path):
    lo, _ = box((1, 3))
    _, hi = box((1, 4))
    with pytest.raises(ShapeError, match=re.escape("x_lower has shape [1, 3] but x_upper has shape [1, 4]")):
        boundflow.compute_bounds(mlp_path, lo, hi)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["lower", "upper"])
def test_nan_or_inf_in_box(mlp_path, bad, which):
    lo, hi = box()
    (lo if which == "lower" else hi)[0, 1] = bad
    with pytest.raises(ShapeError, match=r"NaN or infinite"):
        boundflow.compute_bounds(mlp_path, lo, hi)


@pytest.mark.parametrize("C_shape", [(2, 3), (5,), (1, 2, 2, 2), (2, 1, 2)])
def test_C_of_wrong_shape(mlp_path, C_shape):
    with pytest.raises(ShapeError, match=r"C has shape .*expected \[S, 2\] or \[1, S, 2\]"):
        boundflow.compute_bounds(mlp_path, *box(), C=torch.ones(C_shape))


def test_C_with_nan(mlp_path):
    C = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(ShapeError, match=r"C contains NaN"):
        boundflow.compute_bounds(mlp_path, *box(), C=C)


def test_C_per_region_count_must_match(mlp_path):
    lo, hi = box((3, 3))
    with pytest.raises(ShapeError, match=r"expected \[S, 2\] or \[3, S, 2\]"):
        boundflow.compute_bounds(mlp_path, lo, hi, C=torch.ones(2, 1, 2))


def test_box_not_a_tensor(mlp_path):
    with pytest.raises(ShapeError, match=r"x_lower must be a torch tensor or numpy array"):
        boundflow.compute_bounds(mlp_path, [[0.0, 0.0, 0.0]], torch.zeros(1, 3))


@pytest.mark.parametrize("method", ["alpha_crown", "CROWN-Optimized", "", "backward", "deeppoly"])
def test_unknown_method(mlp_path, method):
    with pytest.raises(ValueError, match=r"unknown method"):
        boundflow.compute_bounds(mlp_path, *box(), method=method)


def test_unknown_crown_interm(mlp_path):
    with pytest.raises(ValueError, match=r"crown_interm must be one of"):
        boundflow.compute_bounds(mlp_path, *box(), crown_interm="dense")


def test_method_is_case_insensitive(mlp_path):
    a = boundflow.compute_bounds(mlp_path, *box(), method="CROWN-IBP")
    b = boundflow.compute_bounds(mlp_path, *box(), method="crown-ibp")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("op", ["Round", "Floor", "Hardmax"])
def test_unsupported_op_file(tmp_path, op):
    path = tmp_path / f"{op.lower()}.onnx"
    onnx.save(_mlp_proto(op, node_name=f"my_{op.lower()}_node"), str(path))
    with pytest.raises(UnsupportedOpError, match=rf"{op}.*my_{op.lower()}_node|my_{op.lower()}_node.*{op}") as e:
        boundflow.compute_bounds(str(path), *box())
    assert str(path) in str(e.value)


def test_unsupported_op_model_proto():
    with pytest.raises(UnsupportedOpError, match=r"Round node 'the_round'"):
        boundflow.compute_bounds(_mlp_proto("Round", "the_round"), *box())


def test_truncated_file_names_path(tmp_path):
    data = _mlp_proto().SerializeToString()
    for k, cut in enumerate([len(data) // 2, len(data) - 7, 10, 1]):
        path = tmp_path / f"truncated_{k}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=re.escape(str(path))):
            boundflow.compute_bounds(str(path), *box())


def test_empty_and_garbage_files(tmp_path):
    for name, data in [("empty.onnx", b""), ("garbage.onnx", b"\xff\xfe not an onnx model \x00\x01" * 10)]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelLoadError, match=re.escape(str(path))):
            boundflow.compute_bounds(str(path), *box())


def test_nonexistent_path(tmp_path):
    path = tmp_path / "does_not_exist.onnx"
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        boundflow.compute_bounds(str(path), *box())
    with pytest.raises(ModelLoadError):
        boundflow.compute_bounds(path, *box())          # a PathLike too


def test_model_of_wrong_type():
    with pytest.raises(ModelLoadError, match=r"model must be an ONNX path"):
        boundflow.compute_bounds(12345, *box())


def test_torch_module_with_box_of_wrong_shape():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    # the module's input shape is x_lower's: a [1, 5] box does not fit Linear(3, 2)
    with pytest.raises(ModelLoadError, match=r"could not export Sequential.*same reduction dim"):
        boundflow.compute_bounds(net, *box((1, 5)))


def test_torch_module_with_unsupported_op():
    class Squash(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return torch.round(self.fc(x))

    with pytest.raises(UnsupportedOpError, match=r"aten\.round.*'round_1'"):
        boundflow.compute_bounds(Squash(), *box())
