"""maxpool2d: the largest input of each window, over the last two axes of [..., C, H, W].
attrs kernel (kh, kw), stride, padding (top, left, bottom, right; padded positions never win),
dilation, ceil_mode (windows that start inside the padded input but run past its end count too).

Relaxation of one output y = max_i x_i, x_i in [l_i, u_i] (i over its window):

  lower  y >= sum_i w_i x_i for any weights on the simplex (CROWN: all on the input with the
         largest l_i; alpha-CROWN optimises them, as alpha in [0, 1] normalised to sum 1)
  upper  y <= x_j when that input dominates, l_j >= max_{i != j} u_i (then y = x_j); else the
         constant max_i u_i

Windows may overlap (stride < kernel) and have any dilation and padding: the backward rule
spreads each window's coefficients over its inputs with a fold, which sums where windows
overlap. The lines live on the output's shape: [2k + 1, B, *out] (k lower weights, k upper
weights, the upper intercept), k = kh kw.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from boundflow.domains.linear import halves, sound
from boundflow.domains.rounding import gamma, magnitude, slack, unit_roundoff
from boundflow.ops import conv
from boundflow.ops.reduce import onnx_axes
from boundflow.ops.registry import Op, Relaxation, onnx_lowering, register, torch_lowering
from boundflow.runtime.device import constant

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder

aten = torch.ops.aten


def out_size(n: int, k: int, s: int, d: int, pad_lo: int, pad_hi: int, ceil_mode: bool) -> int:
    """ONNX / torch pooling: floor (or ceil) of (n + pads - d (k - 1) - 1) / s + 1; with ceil,
    a last window must start inside the input or its leading padding."""
    span = n + pad_lo + pad_hi - d * (k - 1) - 1
    count = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (count - 1) * s >= n + pad_lo:
        count -= 1
    return count


def _geometry(attrs, h: int, w: int):
    """(extra bottom/right padding so every window fits, output height, output width)."""
    (kh, kw), (sh, sw), (dh, dw) = attrs["kernel"], attrs["stride"], attrs["dilation"]
    top, left, bottom, right = attrs["padding"]
    ho = out_size(h, kh, sh, dh, top, bottom, attrs["ceil_mode"])
    wo = out_size(w, kw, sw, dw, left, right, attrs["ceil_mode"])
    need_h = (ho - 1) * sh + dh * (kh - 1) + 1
    need_w = (wo - 1) * sw + dw * (kw - 1) + 1
    return max(0, need_h - (h + top + bottom)), max(0, need_w - (w + left + right)), ho, wo


def windows(x: torch.Tensor, attrs, fill: float) -> torch.Tensor:
    """x [..., C, H, W] as its windows [..., C, k, Ho, Wo]; padding reads `fill`."""
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    top, left, bottom, right = attrs["padding"]
    eb, er, ho, wo = _geometry(attrs, h, w)
    xp = F.pad(x.reshape((-1, c, h, w)), (left, right + er, top, bottom + eb), value=fill)
    cols = F.unfold(xp, attrs["kernel"], dilation=attrs["dilation"], stride=attrs["stride"])
    return cols.reshape(lead + (c, math.prod(attrs["kernel"]), ho, wo))


def fold(a: torch.Tensor, attrs, in_hw: tuple[int, int]) -> torch.Tensor:
    """The transpose of `windows`: coefficients per window element [..., C, k, Ho, Wo] summed
    onto the input [..., C, H, W] (padding dropped)."""
    lead, (c, k, ho, wo) = a.shape[:-4], a.shape[-4:]
    h, w = in_hw
    top, left, bottom, right = attrs["padding"]
    eb, er, _, _ = _geometry(attrs, h, w)
    size = (h + top + bottom + eb, w + left + right + er)
    x = F.fold(a.reshape((-1, c * k, ho * wo)), size, attrs["kernel"], dilation=attrs["dilation"],
               stride=attrs["stride"])
    return x[:, :, top:top + h, left:left + w].reshape(lead + (c, h, w))


def forward(x, attrs):
    return windows(x, attrs, -math.inf).amax(-3)


def interval(ins, ps, attrs):
    return (windows(ins[0], attrs, -math.inf).amax(-3),)         # max is increasing in each input


def _dominant(lo_w: torch.Tensor, hi_w: torch.Tensor):
    """(index of the largest lower bound per window, whether that input dominates the others)."""
    best = lo_w.argmax(-3, keepdim=True)
    others = hi_w.scatter(-3, best, -math.inf).amax(-3, keepdim=True)
    return best, lo_w.gather(-3, best) >= others


def relax(ins, ps, attrs):
    """stack(lower, upper) of the input -> [2k + 1, B, *out]: CROWN's lower weights (one-hot on
    the largest lower bound), the upper weights (one-hot where that input dominates) and the
    upper intercept (max u elsewhere)."""
    lo_w, hi_w = windows(ins[0], attrs, -math.inf)                     # [B, *lead, C, k, Ho, Wo] each
    best, dominant = _dominant(lo_w, hi_w)
    onehot = torch.zeros_like(lo_w).scatter(-3, best, 1.0)
    upper = onehot * dominant
    icpt = hi_w.amax(-3, keepdim=True).masked_fill(dominant, 0.0)
    return (torch.cat([onehot.movedim(-3, 0), upper.movedim(-3, 0), icpt.movedim(-3, 0)]),)


def _back(a, bias, w_lo, w_up, icpt, attrs, s: int):
    """Lower rows (the first s): positive coefficients take the lower weights, negative ones the
    upper line; upper rows the other way round. Weights [k, B, 1 or R, *out]."""
    def rows(t, lower):
        return t if t.shape[2] == 1 else (t[:, :, :s] if lower else t[:, :, s:])

    def side(a, lower):
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        wp, wn = (rows(w_lo, lower), w_up) if lower else (w_up, rows(w_lo, lower))
        coeff = pos.unsqueeze(0) * wp + neg.unsqueeze(0) * wn                # [k, B, R, *out]
        extra = ((neg if lower else pos) * icpt).flatten(2).sum(-1)
        return coeff.movedim(0, -3), extra

    lo, up = side(a[:, :s], True), side(a[:, s:], False)
    coeff = torch.cat([lo[0], up[0]], 1)                                      # [B, R, *lead, C, k, Ho, Wo]
    in_hw = tuple(attrs["in_shape"][-2:])
    return fold(coeff, attrs, in_hw), bias + torch.cat([lo[1], up[1]], 1)


def backward(ins, ps, attrs):
    """_back for CROWN's lines, whose weights sit on one element per window (the upper ones
    there or nowhere): each window's coefficient goes to that input with one scatter-add (a
    sum where windows overlap), not through k weights and a fold (~5x the time)."""
    a, bias, lines = ins
    k = (lines.shape[0] - 1) // 2
    s = halves(a, attrs)
    best = lines[:k].argmax(0, keepdim=True)                                  # [1, B, *out]
    h, w = attrs["in_shape"][-2:]
    pixels = _pixel_table(tuple(attrs["kernel"]), tuple(attrs["stride"]), tuple(attrs["padding"]),
                          tuple(attrs["dilation"]), attrs["ceil_mode"], h, w)
    pixels = constant(pixels, pixels.dtype, a.device)
    pixels = pixels.view((k,) + (1,) * (lines.dim() - 3) + tuple(pixels.shape[1:]))   # broadcast over B, *lead, C
    pixel = pixels.expand((k,) + tuple(lines.shape[1:])).gather(0, best)[0]
    dominant = lines[k:2 * k].gather(0, best)[0].unsqueeze(1)                # the upper weight there
    icpt = lines[2 * k].unsqueeze(1)
    pos = a.clamp(min=0)
    neg = a - pos
    coeff = torch.cat([torch.addcmul(pos[:, :s], neg[:, :s], dominant), torch.addcmul(neg[:, s:], pos[:, s:], dominant)], 1)
    extra = torch.cat([(neg[:, :s] * icpt).flatten(2).sum(-1), (pos[:, s:] * icpt).flatten(2).sum(-1)], 1)
    lead = a.shape[:-2]                                                       # [B, R, *lead, C]
    flat = coeff.new_zeros(lead.numel(), h * w + 1)                           # (+1: padding's slot)
    j = coeff.shape[-2] * coeff.shape[-1]                                     # windows per channel
    flat.scatter_add_(1, pixel.unsqueeze(1).expand(coeff.shape).reshape(lead.numel(), j), coeff.reshape(lead.numel(), j))
    return flat[:, :h * w].reshape(tuple(lead) + (h, w)), bias + extra


@functools.lru_cache(maxsize=256)
def _pixel_table(kernel, stride, padding, dilation, ceil_mode, h: int, w: int) -> torch.Tensor:
    """[k, Ho, Wo]: the flat input position of each window element (h w on the padding)."""
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation, "ceil_mode": ceil_mode}
    with torch.inference_mode(False):                   # (autograd may save it: scatter's index)
        image = torch.arange(h * w, dtype=torch.float64).view(1, h, w)
        return windows(image, attrs, float(h * w))[0].to(torch.int64)


def _inside(attrs, like: torch.Tensor) -> torch.Tensor:
    """[k, 1, ..., Ho, Wo] (like's rank): which window elements lie on the input, not on its
    padding."""
    h, w = attrs["in_shape"][-2:]
    inside = windows(like.new_ones((1, h, w)), attrs, 0.0)[0]          # [k, Ho, Wo]
    return inside.reshape((inside.shape[0],) + (1,) * (like.dim() - 3) + tuple(inside.shape[1:]))


def backward_alpha(ins, ps, attrs):
    """backward with each row's lower weights alpha [B, k, R, *out] in [0, 1], normalised to sum
    1 over the window's elements on the input (a convex combination of the inputs bounds their
    max from below; padding holds no input); None: CROWN's."""
    a, bias, lines, alpha = ins[:4]
    if alpha is None:
        return backward(ins[:3], ps, attrs)
    k = (lines.shape[0] - 1) // 2
    alpha = alpha.movedim(1, 0)                                       # [k, B, R, *out]
    alpha = alpha * _inside(attrs, alpha)
    w_lo = alpha / alpha.sum(0, keepdim=True).clamp(min=torch.finfo(alpha.dtype).tiny)
    w_up, icpt = lines[k:2 * k].unsqueeze(2), lines[2 * k].unsqueeze(1)
    return _back(a, bias, w_lo, w_up, icpt, attrs, halves(a, attrs))


def alpha_start(op, env) -> torch.Tensor:
    """CROWN's lower weights (one-hot), one set per row of A: [B, k, R, *out]."""
    a, lines = env[op.inputs[0]], env[op.inputs[2]]
    k = (lines.shape[0] - 1) // 2
    return lines[:k].unsqueeze(2).expand((k,) + tuple(a.shape)).movedim(0, 1).clone()


def fp_lines(ins, ps, attrs):
    """e of the backward rules (over the output): the products A * weight, the fold's sums of
    up to k terms per input, the normalised weights' sum off 1 by k ulps (|x| <= max|x| of the
    window), and the intercept sums over the layer."""
    s, lines = ins
    k = (lines.shape[0] - 1) // 2
    m = windows(magnitude(s), attrs, 0.0).amax(-3)
    u = unit_roundoff(s.dtype)
    icpt = lines[2 * k].abs()
    n = math.prod(lines.shape[2:]) + 4
    return (2 * (gamma(k + 2, s.dtype) * m + k * u * m + gamma(n, s.dtype) * icpt) + slack(n + k, s.dtype),)


def lines_shape(graph, node) -> tuple[int, ...]:
    """[2k + 1, *output shape]."""
    return (2 * math.prod(node.attrs["kernel"]) + 1,) + tuple(graph.shape(node.outputs[0]))


MAXPOOL = register(Op(
    "maxpool2d", forward, interval, sound(backward), fp=None,
    relaxation=Relaxation(relax, 0, fp_lines, sound(backward_alpha), alpha_start,
                          params_of=lambda graph, node: math.prod(node.attrs["kernel"]), lines_shape=lines_shape)))


# -- frontends ------------------------------------------------------------------------------------

def max_pool(b: Builder, x: str, kernel, stride, padding, dilation, ceil_mode: bool, out: str | None = None) -> str:
    if len(b.shape(x)) < 3:
        b.unsupported("max pooling needs a [..., C, H, W] input")
    attrs = {"kernel": tuple(int(k) for k in kernel), "stride": tuple(int(s) for s in stride),
             "padding": tuple(int(p) for p in padding), "dilation": tuple(int(d) for d in dilation),
             "ceil_mode": bool(ceil_mode)}
    if any(padding_only_window(n, k, s, d, lo, hi, attrs["ceil_mode"]) for n, k, s, d, lo, hi in zip(
            b.shape(x)[-2:], attrs["kernel"], attrs["stride"], attrs["dilation"], attrs["padding"][:2],
            attrs["padding"][2:])):
        b.unsupported(f"padding {list(attrs['padding'])} with dilation {list(attrs['dilation'])}: a window "
                      "would hold padding only (its maximum is undefined)")
    return b.emit("maxpool2d", [x], attrs, out=out)


def padding_only_window(n: int, k: int, s: int, d: int, pad_lo: int, pad_hi: int, ceil_mode: bool) -> bool:
    """Whether some window along one axis reads no input element: every tap o s + j d of
    output o falls outside [pad_lo, pad_lo + n)."""
    return any(not any(pad_lo <= o * s + j * d < pad_lo + n for j in range(k))
               for o in range(out_size(n, k, s, d, pad_lo, pad_hi, ceil_mode)))


@onnx_lowering("MaxPool")
def _onnx_max_pool(b) -> str:
    x = b.var(b.input(0))
    kernel = tuple(b.attr("kernel_shape", ()))
    if len(kernel) != 2 or len(b.shape(x)) != 4:
        b.unsupported("only 2-D max pooling on [N, C, H, W] is supported")
    if len(b.outputs) > 1 and b.outputs[1]:
        b.unsupported("the Indices output (where each maximum came from) is not supported")
    stride, padding, dilation = conv.onnx_window(b, b.shape(x), kernel)
    return max_pool(b, x, kernel, stride, padding, dilation, b.attr("ceil_mode", 0), b.output)


@onnx_lowering("GlobalMaxPool")
def _onnx_global_max_pool(b) -> str:
    x = b.var(b.input(0))
    if len(b.shape(x)) != 4:
        b.unsupported("only [N, C, H, W] inputs are supported")
    return max_pool(b, x, b.shape(x)[-2:], (1, 1), (0, 0, 0, 0), (1, 1), False, b.output)


def _pair(v) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


@torch_lowering(aten.max_pool2d_with_indices.default, aten.max_pool2d.default)
def _torch_max_pool(b):
    # (x, kernel_size, stride=[] (= kernel), padding=0, dilation=1, ceil_mode=False)
    x = b.var(b.arg(0))
    kernel = _pair(b.arg(1, "kernel_size"))
    stride = _pair(b.arg(2, "stride") or kernel)
    ph, pw = _pair(b.arg(3, "padding", 0))
    y = max_pool(b, x, kernel, stride, (ph, pw, ph, pw), _pair(b.arg(4, "dilation", 1)), b.arg(5, "ceil_mode", False),
                 b.output)
    return (y, None)          # (values, indices): only the values are meaningful


# -- the largest (smallest) entry along axes: one window over them -----------------------------------

def reduce_max(b: Builder, x: str, axes, keepdims: bool, smallest: bool = False, out: str | None = None) -> str:
    """max (min: -max(-x)) of x over `axes` (None or empty: every axis): the reduced axes are moved
    last and flattened into one window of a [M, 1, 1, K] max pool."""
    shape = b.shape(x)
    rank = len(shape)
    axes = sorted({b.axis(int(a), rank) for a in axes}) if axes else list(range(rank))
    kept = [a for a in range(rank) if a not in axes]
    want = [1 if a in axes else shape[a] for a in range(rank)] if keepdims else [shape[a] for a in kept]
    k = math.prod(shape[a] for a in axes)
    if smallest:
        x = b.affine(x, b.literal(-1.0))
    if kept + axes != list(range(rank)):
        x = b.transpose(x, kept + axes)
    x = b.reshape(x, (math.prod(shape[a] for a in kept), 1, 1, k))
    y = max_pool(b, x, (1, k), (1, k), (0, 0, 0, 0), (1, 1), False)
    if smallest:
        return b.affine(b.reshape(y, want), b.literal(-1.0), out=out)
    return b.reshape(y, want, out=out)


def _onnx_reduce_max(b, smallest: bool) -> str:
    x = b.var(b.input(0))
    axes = onnx_axes(b, 18)
    if not axes and b.attr("noop_with_empty_axes", 0):
        return x
    return reduce_max(b, x, axes, b.attr("keepdims", 1), smallest, b.output)


@onnx_lowering("ReduceMax")
def _onnx_reduce_max_op(b) -> str:
    return _onnx_reduce_max(b, smallest=False)


@onnx_lowering("ReduceMin")
def _onnx_reduce_min_op(b) -> str:
    return _onnx_reduce_max(b, smallest=True)


def _torch_amax(b, smallest: bool) -> str:
    # amax / amin (x, dim=[], keepdim=False): an empty dim reduces every axis
    return reduce_max(b, b.var(b.arg(0)), b.arg(1, "dim", []), b.arg(2, "keepdim", False), smallest, b.output)


def _torch_max_dim(b, smallest: bool):
    # max.dim / min.dim (x, dim, keepdim=False) -> (values, indices): only the values are meaningful
    return (reduce_max(b, b.var(b.arg(0)), [b.arg(1, "dim")], b.arg(2, "keepdim", False), smallest, b.output), None)


torch_lowering(aten.amax.default)(lambda b: _torch_amax(b, smallest=False))
torch_lowering(aten.amin.default)(lambda b: _torch_amax(b, smallest=True))
torch_lowering(aten.max.dim)(lambda b: _torch_max_dim(b, smallest=False))
torch_lowering(aten.min.dim)(lambda b: _torch_max_dim(b, smallest=True))
