"""Operators beyond ReLU networks against auto_LiRPA 0.7.1 (../shared/golden_ops, the format of
../shared/golden). Every method of ours is sound (it contains the fixture's 2,000 onnxruntime
samples) and at least as tight as auto_LiRPA's (IBP, CROWN-IBP and CROWN up to 1e-5 relative;
alpha-CROWN's mean width within 2%). Where auto_LiRPA failed (its fixture records the error),
soundness is the check. One entry per fixture whose operators BoundFlow registers; the others
come with their op families."""
from __future__ import annotations

import pytest
import torch

import boundflow
from golden import load_fixture

FIXTURES = ["sigmoid_tanh_mlp__eps0.1", "sigmoid_tanh_mlp__eps0.5", "maxpool_cnn__eps0.02", "maxpool_cnn__eps0.1",
            "nonlinear_mix__eps0.05", "nonlinear_mix__eps0.2", "convtranspose_net__eps0.02",
            "convtranspose_net__eps0.1", "bivariate_mul__eps0.05", "bivariate_mul__eps0.2",
            "attention_tiny__eps0.02", "attention_tiny__eps0.1"]
METHODS = [("ibp", "IBP"), ("crown-ibp", "CROWN-IBP"), ("crown", "CROWN"), ("alpha-crown", "alpha-CROWN")]


def _fixture(shared, name):
    return load_fixture(shared, name, "golden_ops")


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("method,key", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("sound_fp", [False, True], ids=["float32", "sound_fp"])
def test_sound_and_as_tight_as_auto_lirpa(shared, name, method, key, sound_fp):
    fx = _fixture(shared, name)
    lb, ub = boundflow.compute_bounds(str(fx.model), fx.lower, fx.upper, method=method, C=fx.C, sound_fp=sound_fp)
    lb, ub = lb[0].double(), ub[0].double()
    emp_lo, emp_hi = (t.double() for t in fx.empirical)
    tol = 1e-5 * emp_lo.abs().clamp(min=1)
    assert (lb <= emp_lo + tol).all(), f"above a sample by {(lb - emp_lo).max():.3e}"
    assert (ub >= emp_hi - tol).all(), f"below a sample by {(emp_hi - ub).max():.3e}"
    ref = fx.reference(key)
    if ref is None:
        return                                  # auto_LiRPA failed here; soundness is the check
    ref_lb, ref_ub = (t.double() for t in ref)
    width, ref_width = (ub - lb).mean().item(), (ref_ub - ref_lb).mean().item()
    if method == "alpha-crown":                 # an optimiser: within 2% of its mean width
        assert width <= 1.02 * ref_width, f"mean width {width:.6g} vs auto_LiRPA {ref_width:.6g}"
        return
    assert (lb >= ref_lb - 1e-6 - 1e-5 * ref_lb.abs()).all(), f"looser lb by {(ref_lb - lb).max():.3e}"
    assert (ub <= ref_ub + 1e-6 + 1e-5 * ref_ub.abs()).all(), f"looser ub by {(ub - ref_ub).max():.3e}"


@pytest.mark.parametrize("name", FIXTURES)
def test_forward_equals_onnxruntime(shared, name):
    import onnxruntime as ort

    from boundflow.domains.concrete import evaluate
    fx = _fixture(shared, name)
    graph, _ = boundflow.load_model(str(fx.model))
    sess = ort.InferenceSession(str(fx.model))
    x = fx.lower + (fx.upper - fx.lower) * torch.rand((8,) + fx.input_shape, generator=torch.Generator().manual_seed(0))
    ours = evaluate(graph, x.reshape((8,) + tuple(graph.shape(graph.inputs[0]))))[0].reshape(8, -1)
    for i in range(8):
        want = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x[i].numpy()})[0]).reshape(-1)
        assert torch.allclose(ours[i], want, rtol=1e-5, atol=1e-6)


# -- the torch frontend ----------------------------------------------------------------------------

def _torch_nets():
    """Small torch modules with each registered op family, and their input shape."""
    nn = torch.nn
    torch.manual_seed(0)
    yield "sigmoid_tanh", nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)), (1, 5)
    yield "maxpool", nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                                   nn.Conv2d(3, 2, 2), nn.MaxPool2d(2, stride=1, dilation=2, ceil_mode=True),
                                   nn.Flatten(), nn.Linear(8, 2)), (1, 2, 9, 9)


@pytest.mark.parametrize("name,module,shape", list(_torch_nets()), ids=[n for n, _, _ in _torch_nets()])
@pytest.mark.parametrize("method", [m for m, _ in METHODS])
def test_torch_frontend_bounds_contain_samples(name, module, shape, method):
    module = module.eval()
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    lo, hi = x0 - 0.1, x0 + 0.1
    lb, ub = boundflow.compute_bounds(module, lo, hi, method=method)
    pts = lo + (hi - lo) * torch.rand((200,) + shape[1:], generator=torch.Generator().manual_seed(2))
    corners = torch.where(torch.rand((200,) + shape[1:], generator=torch.Generator().manual_seed(3)) < 0.5, lo, hi)
    with torch.no_grad():
        y = module(torch.cat([pts, corners])).reshape(400, -1)
    assert (y >= lb - 1e-5).all() and (y <= ub + 1e-5).all()
    graph, _ = boundflow.load_model(module, x0)
    from boundflow.domains.concrete import evaluate
    assert torch.allclose(evaluate(graph, pts[:8].unsqueeze(1))[0].reshape(8, -1), y[:8], atol=1e-6)
