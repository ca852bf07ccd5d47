"""maxpool2d (boundflow/ops/pool.py): the forward rule equals torch's max pooling for any kernel,
stride, padding, dilation and ceil_mode; fold is the transpose of the window read; the lines
bound the max for CROWN's weights and for any alpha."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from boundflow.ops import pool


@st.composite
def configs(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))   # torch's limit
    h = draw(st.integers(dh * (kh - 1) + 1, 9))
    w = draw(st.integers(dw * (kw - 1) + 1, 9))
    attrs = {"kernel": (kh, kw), "stride": (sh, sw), "padding": (ph, pw, ph, pw), "dilation": (dh, dw),
             "ceil_mode": draw(st.booleans())}
    return attrs, (draw(st.integers(1, 3)), h, w)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(configs(), st.integers(0, 2**31))
def test_forward_equals_torch(config, seed):
    attrs, shape = config
    x = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want = F.max_pool2d(x, attrs["kernel"], attrs["stride"], attrs["padding"][:2], attrs["dilation"],
                        ceil_mode=attrs["ceil_mode"])
    assert torch.equal(pool.forward(x, attrs), want)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(configs(), st.integers(0, 2**31))
def test_fold_is_the_transpose_of_windows(config, seed):
    """<fold(a), x> = <a, windows(x)> with zero padding."""
    attrs, shape = config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1,) + shape, generator=g, dtype=torch.float64)
    win = pool.windows(x, attrs, 0.0)
    a = torch.randn(win.shape, generator=g, dtype=torch.float64)
    lhs = (pool.fold(a, attrs, shape[-2:]) * x).sum()
    assert torch.allclose(lhs, (a * win).sum())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(configs(), st.integers(0, 2**31), st.booleans())
def test_crown_backward_is_the_weights_folded(config, seed, lower_only):
    """backward (CROWN's lines: a scatter onto each window's chosen input) = the general rule
    (every window element's weight, then fold), for any geometry, batch and leading axes."""
    attrs, shape = config
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn((2, 2) + shape, generator=g, dtype=torch.float64)       # B = 2, a leading axis
    radius = torch.rand(centre.shape, generator=g, dtype=torch.float64)
    (lines,) = pool.relax([torch.stack((centre - radius, centre + radius))], [], attrs)
    k = math.prod(attrs["kernel"])
    a = torch.randn((2, 6) + tuple(lines.shape[2:]), generator=g, dtype=torch.float64)
    bias = torch.randn(2, 6, generator=g, dtype=torch.float64)
    attrs = dict(attrs, in_shape=[2] + list(shape), lower_only=lower_only)
    s = 6 if lower_only else 3
    want = pool._back(a, bias, lines[:k].unsqueeze(2), lines[k:2 * k].unsqueeze(2), lines[2 * k].unsqueeze(1),
                      attrs, s)
    got = pool.backward([a, bias, lines], [], attrs)
    assert torch.allclose(got[0], want[0], rtol=1e-12, atol=1e-12) and torch.equal(got[1], want[1])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(configs(), st.integers(0, 2**31), st.booleans())
def test_lines_bound_the_max(config, seed, optimised):
    """For sampled points of the box, lower line <= max over the window <= upper line."""
    attrs, shape = config
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn((1,) + shape, generator=g, dtype=torch.float64)
    radius = torch.rand((1,) + shape, generator=g, dtype=torch.float64)
    box = torch.stack((centre - radius, centre + radius))
    (lines,) = pool.relax([box], [], attrs)
    k = math.prod(attrs["kernel"])
    w_lo, w_up, icpt = lines[:k], lines[k:2 * k], lines[2 * k]
    if optimised:           # the kernel's normalisation (over the window's inputs)
        alpha = torch.rand(w_lo.shape, generator=g, dtype=torch.float64)
        attrs_in = dict(attrs, in_shape=list(shape))
        alpha = alpha * pool._inside(attrs_in, alpha)
        w_lo = alpha / alpha.sum(0, keepdim=True).clamp(min=1e-300)
    for _ in range(20):
        x = centre + radius * (2 * torch.rand(centre.shape, generator=g, dtype=torch.float64) - 1)
        win = pool.windows(x, attrs, 0.0).movedim(-3, 0)        # [k, 1, C, Ho, Wo] (padding reads 0)
        valid = pool.windows(torch.ones_like(x), attrs, 0.0).movedim(-3, 0) > 0
        y = pool.forward(x, attrs)
        lower = (w_lo * win).sum(0)
        upper = (w_up * win).sum(0) + icpt
        assert (lower <= y + 1e-12).all()
        assert (upper >= y - 1e-12).all()
        assert (w_lo * ~valid).abs().sum() == 0                    # padding holds no input


@settings(max_examples=4, deadline=None, derandomize=True)
@given(st.integers(0, 2**16), st.floats(0.02, 0.3), st.sampled_from(["relu", "leaky_relu"]))
def test_activation_before_a_max_pool_bounded_through_every_neuron_of_its_input(seed, eps, activation):
    """An elementwise activation whose output feeds a max pool gets its CROWN bounds as its
    interval rule applied to a pass over every neuron of its input (planner: refine): sound
    (sampled points inside), and at least as tight as a CROWN pass from its output through its
    lines (the network cut there) intersected with its interval; for a ReLU the same."""
    import boundflow
    from boundflow.planner.config import PlannerConfig

    torch.manual_seed(seed)
    act = torch.nn.ReLU() if activation == "relu" else torch.nn.LeakyReLU(0.1)
    head = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Conv2d(3, 4, 2), act).eval()
    full = torch.nn.Sequential(head, torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(1, 1, 12, 12)
    lo, hi = x - eps, x + eps
    res = boundflow.bound(full, lo, hi, "crown", config=PlannerConfig(export_intermediate=True), device="cpu")
    # the activation's input, then its output (the exported bounds of the second conv's shape)
    act_in, got = sorted((t for t in res.intermediate.values() if t.shape[-3:] == (4, 4, 4)),
                         key=lambda t: float(t[0].min()))
    crown = torch.stack(boundflow.compute_bounds(head, lo, hi, method="crown", device="cpu"))
    interval = act(act_in).reshape(crown.shape)            # monotone: the interval's image
    want = torch.stack((torch.maximum(crown[0], interval[0]), torch.minimum(crown[1], interval[1])))
    got = got.reshape(want.shape)
    tol = 1e-5 * (1 + want.abs())
    assert (got[0] >= want[0] - tol).all() and (got[1] <= want[1] + tol).all()
    if activation == "relu":
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        points = head(lo + (hi - lo) * torch.rand((256,) + tuple(x.shape[1:]))).flatten(1)
    assert (points >= got[0] - tol[0]).all() and (points <= got[1] + tol[1]).all()
