"""select / gather: y = x indexed along one per-region axis by a constant list (attrs axis,
index: entry k of y is x[index[k]], or 0 where index[k] = -1). select's index hits each input
element at most once (slices, splits, zero padding, flips); gather's may repeat (edge and
reflect padding, broadcasting, tiling, nearest upsampling, Gather with repeated indices).
Both rules are exact but for gather's backward sums of A over repeated indices, which its fp
rule bounds. The backward rule is a scatter (index_add), never a dense matrix.

Frontends lower Slice, Gather (constant indices), Split, Pad (constant with any value, reflect,
edge, wrap), Expand, Tile, Resize / Upsample (nearest, integer scales) and their aten
counterparts to chains of them, one node per indexed axis."""
from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import torch

from boundflow.domains import fp
from boundflow.domains.linear import sound
from boundflow.domains.rounding import gamma, magnitude
from boundflow.ops.registry import Op, onnx_lowering, register, torch_lowering
from boundflow.runtime.device import constant

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder

aten = torch.ops.aten


def _on(index: tuple, like: torch.Tensor) -> torch.Tensor:
    """An index list as a tensor on like's device (made once per device and list)."""
    return constant(index, torch.int64, like.device)


def take(x: torch.Tensor, axis: int, index) -> torch.Tensor:
    """x indexed along its axis `axis`; -1 gives zeros."""
    index = tuple(index)
    if min(index) < 0:
        zero = x.new_zeros(x.shape[:axis] + (1,) + x.shape[axis + 1:])
        index = tuple(x.shape[axis] if i < 0 else i for i in index)
        x = torch.cat([x, zero], axis)
    return x.index_select(axis, _on(index, x))


def forward(x, attrs=None):
    return take(x, attrs["axis"] + 1, attrs["index"])


def interval(ins, ps, attrs):
    return (take(ins[0], attrs["axis"] + 2, attrs["index"]),)


def backward(ins, ps, attrs):
    """The transpose of the selection: A scattered back (summed where an index repeats)."""
    a, bias = ins
    axis, index = attrs["axis"] + 2, tuple(attrs["index"])
    shape = list(a.shape)
    shape[axis] = attrs["in_shape"][attrs["axis"]]
    kept = tuple(k for k, i in enumerate(index) if i >= 0)
    if len(kept) < len(index):
        a, index = a.index_select(axis, _on(kept, a)), tuple(index[k] for k in kept)
    return a.new_zeros(shape).index_add_(axis, _on(index, a), a), bias


def gather_fp_error(ins, ps, attrs):
    """The backward rule adds up to m coefficients per input element (m: the most any index
    repeats): gamma(m) |A| max|y| covers their rounding. The forward rule is exact."""
    s, raw = ins
    m = max(Counter(i for i in attrs["index"] if i >= 0).values(), default=1)
    return fp.finish(raw, gamma(m, raw.dtype) * magnitude(raw), attrs["n"])


# the backward rules hand the bias on as it is (a view of their input)
SELECT = register(Op("select", forward, interval, backward, coordinatewise=True, aliasing=frozenset({"linear.select"})))
GATHER = register(Op("gather", forward, interval, sound(backward), gather_fp_error,
                     fp_params=lambda graph, node, dtype: [], aliasing=frozenset({"linear.gather"})))


# -- frontends: index lists per axis ---------------------------------------------------------------

def index_axes(b: Builder, x: str, picks: dict[int, list[int]], out: str | None = None) -> str:
    """x indexed along each axis of `picks` (axis -> index list, -1 for zeros), one node per
    axis that is not left as it is; the last one writes `out`."""
    shape = b.shape(x)
    steps = [(a, [int(i) for i in idx]) for a, idx in sorted(picks.items()) if list(idx) != list(range(shape[a]))]
    for k, (axis, idx) in enumerate(steps):
        if not idx:
            b.unsupported(f"an empty result along axis {axis}")
        valid = [i for i in idx if i >= 0]
        if any(not 0 <= i < shape[axis] for i in valid) or any(i < -1 for i in idx):
            raise AssertionError(f"frontend bug: index {idx} out of range for axis {axis} of {list(shape)}")
        op = "select" if len(set(valid)) == len(valid) else "gather"
        x = b.emit(op, [x], {"axis": axis, "index": tuple(idx)}, out=out if k == len(steps) - 1 else None)
    return x


def slice_index(n: int, start: int, end: int, step: int) -> list[int]:
    """ONNX / python slicing of an axis of length n (negative indices count from the end,
    out-of-range ones clamp)."""
    if step == 0:
        raise ValueError("slice step 0")
    return list(range(*slice(start, end, step).indices(n)))


def pad_index(b: Builder, n: int, before: int, after: int, mode: str) -> list[int]:
    """The index list of an axis of length n padded by (before, after) (negative: cropped)."""
    positions = range(-before, n + after)
    if mode == "constant":
        return [i if 0 <= i < n else -1 for i in positions]
    if mode == "edge":
        return [min(max(i, 0), n - 1) for i in positions]
    if mode == "wrap":
        return [i % n for i in positions]
    if mode == "reflect":
        if max(before, after) > n - 1:
            b.unsupported(f"reflect padding by {max(before, after)} of an axis of length {n} (at most {n - 1})")
        return [-i if i < 0 else 2 * (n - 1) - i if i >= n else i for i in positions]
    b.unsupported(f"pad mode {mode!r}")


def pad(b: Builder, x: str, before, after, mode: str = "constant", value: float = 0.0, out: str | None = None) -> str:
    """x padded by before[a], after[a] along each axis a (numpy.pad's modes; constant with any
    value: a zero pad, then the value added on the border)."""
    shape = b.shape(x)
    if mode != "constant" and min(list(before) + list(after)) < 0:
        b.unsupported(f"negative pads (cropping) with mode {mode!r}")
    picks = {a: pad_index(b, shape[a], before[a], after[a], mode) for a in range(len(shape)) if before[a] or after[a]}
    if mode != "constant" or value == 0.0:
        return index_axes(b, x, picks, out)
    y = index_axes(b, x, picks)
    border = np.zeros(b.shape(y))
    for a, idx in picks.items():
        edge = np.array([i < 0 for i in idx]).reshape([-1 if k == a else 1 for k in range(len(shape))])
        border = np.maximum(border, np.broadcast_to(edge, border.shape))
    return b.affine(y, shift=b.literal(border * value), out=out)


def broadcast(b: Builder, x: str, target, out: str | None = None) -> str:
    """x broadcast to `target` (numpy rules: missing leading axes and size-1 axes repeat)."""
    shape = b.shape(x)
    try:
        full = tuple(np.broadcast_shapes(tuple(shape), tuple(target)))
    except ValueError:
        b.unsupported(f"shape {list(shape)} does not broadcast to {list(target)}")
    if len(full) > len(shape):
        shape = (1,) * (len(full) - len(shape)) + tuple(shape)
        x = b.reshape(x, shape, out=None if full != shape else out)
    return index_axes(b, x, {a: [0] * full[a] for a in range(len(full)) if shape[a] != full[a]}, out)


def tile(b: Builder, x: str, repeats, out: str | None = None) -> str:
    shape = b.shape(x)
    if len(repeats) != len(shape) or any(int(r) < 1 for r in repeats):
        b.unsupported(f"repeats {list(repeats)} for a tensor of shape {list(shape)}")
    return index_axes(b, x, {a: [i % shape[a] for i in range(shape[a] * int(r))]
                             for a, r in enumerate(repeats) if int(r) != 1}, out)


def take_indices(b: Builder, x: str, axis: int, indices: np.ndarray, out: str | None = None) -> str:
    """numpy.take(x, indices, axis) for constant integer indices of any rank (negative ones count
    from the end): a selection along the axis, then a reshape to the indices' shape."""
    shape = b.shape(x)
    n = shape[axis]
    flat = [int(i) for i in np.asarray(indices).reshape(-1)]
    if any(not -n <= i < n for i in flat):
        b.unsupported(f"indices {flat} out of range for axis {axis} of length {n}")
    want = tuple(shape[:axis]) + tuple(np.shape(indices)) + tuple(shape[axis + 1:])
    if len(flat) == 0:
        b.unsupported("an empty index")
    if want == tuple(b.shape(x)[:axis]) + (len(flat),) + tuple(shape[axis + 1:]):
        return index_axes(b, x, {axis: [i % n for i in flat]}, out)
    return b.reshape(index_axes(b, x, {axis: [i % n for i in flat]}), want, out)


def nearest_index(b: Builder, n: int, out_n: int, mode: str, rounding: str) -> list[int]:
    """ONNX Resize (mode nearest) along an axis of length n upsampled by an integer factor to
    out_n: input coordinate per output coordinate, rounded per nearest_mode, clamped."""
    if out_n % n:
        b.unsupported(f"nearest resizing from {n} to {out_n} (only integer scales)")
    s = out_n // n
    if mode in ("half_pixel", "pytorch_half_pixel"):
        coords = [(i + 0.5) / s - 0.5 if out_n > 1 or mode == "half_pixel" else 0.0 for i in range(out_n)]
    elif mode == "asymmetric":
        coords = [i / s for i in range(out_n)]
    elif mode == "tf_half_pixel_for_nn":
        coords = [(i + 0.5) / s for i in range(out_n)]
    else:
        b.unsupported(f"coordinate_transformation_mode {mode!r} (supported: half_pixel, pytorch_half_pixel, "
                      f"asymmetric, tf_half_pixel_for_nn)")
    rules = {"round_prefer_floor": lambda c: math.ceil(c - 0.5), "round_prefer_ceil": lambda c: math.floor(c + 0.5),
             "floor": math.floor, "ceil": math.ceil}
    if rounding not in rules:
        b.unsupported(f"nearest_mode {rounding!r}")
    return [min(max(rules[rounding](c), 0), n - 1) for c in coords]


def resize_nearest(b: Builder, x: str, out_shape, mode: str, rounding: str, out: str | None = None) -> str:
    shape = b.shape(x)
    if len(out_shape) != len(shape):
        b.unsupported(f"output shape {list(out_shape)} for an input of rank {len(shape)}")
    return index_axes(b, x, {a: nearest_index(b, shape[a], int(m), mode, rounding)
                             for a, m in enumerate(out_shape) if int(m) != shape[a]}, out)


# -- ONNX --------------------------------------------------------------------------------------------

def _ints(b, name: str | None, what: str) -> list[int] | None:
    return None if name is None else [int(v) for v in np.asarray(b.array(name, what)).reshape(-1)]


@onnx_lowering("Slice")
def _onnx_slice(b) -> str:
    x = b.var(b.input(0))
    shape = b.shape(x)
    if b.opset < 10:
        starts, ends, axes, steps = b.attr("starts"), b.attr("ends"), b.attr("axes"), None
    else:
        starts, ends = _ints(b, b.input(1), "starts"), _ints(b, b.input(2), "ends")
        axes, steps = _ints(b, b.input(3), "axes"), _ints(b, b.input(4), "steps")
    axes = list(range(len(starts))) if axes is None else [b.axis(int(a), len(shape)) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    if 0 in steps:
        b.unsupported("a slice step of 0")
    picks = {a: slice_index(shape[a], int(s), int(e), int(t)) for a, s, e, t in zip(axes, starts, ends, steps)}
    return index_axes(b, x, picks, b.output)


@onnx_lowering("Gather")
def _onnx_gather(b) -> str:
    x = b.var(b.input(0))
    if not np.issubdtype(np.asarray(b.array(b.input(1), "indices")).dtype, np.integer):
        b.unsupported("non-integer indices")
    axis = b.axis(int(b.attr("axis", 0)), len(b.shape(x)))
    return take_indices(b, x, axis, b.array(b.input(1), "indices"), b.output)


@onnx_lowering("Split")
def _onnx_split(b) -> str:
    x = b.var(b.input(0))
    shape = b.shape(x)
    axis = b.axis(int(b.attr("axis", 0)), len(shape))
    n, parts = shape[axis], len(b.outputs)
    sizes = b.attr("split") if b.opset < 13 else _ints(b, b.input(1), "split")
    if sizes is None:                          # equal parts, the last smaller (opset 18)
        size = -(-n // int(b.attr("num_outputs", parts)))
        sizes = [min(size, n - k * size) for k in range(parts)]
    if len(sizes) != parts or sum(sizes) != n or min(sizes) < 0:
        b.unsupported(f"split sizes {list(sizes)} of an axis of length {n} into {parts} outputs")
    first, start = None, 0
    for k, (name, size) in enumerate(zip(b.outputs, sizes)):
        if name:
            y = index_axes(b, x, {axis: list(range(start, start + size))}, name)
            first = y if k == 0 else first
            if k:
                b.define_variable(name, y)
        start += size
    return first


@onnx_lowering("Pad")
def _onnx_pad(b) -> str:
    x = b.var(b.input(0))
    rank = len(b.shape(x))
    mode = b.attr("mode", "constant")
    if b.opset < 11:
        pads, value = list(b.attr("pads")), float(b.attr("value", 0.0))
    else:
        pads = _ints(b, b.input(1), "pads")
        value = 0.0 if b.input(2) is None else float(np.asarray(b.array(b.input(2), "constant_value")).reshape(-1)[0])
    axes = list(range(rank)) if b.input(3) is None else [b.axis(a, rank) for a in _ints(b, b.input(3), "axes")]
    before, after = [0] * rank, [0] * rank
    for k, a in enumerate(axes):
        before[a], after[a] = pads[k], pads[k + len(axes)]
    return pad(b, x, before, after, mode, value, b.output)


@onnx_lowering("Expand")
def _onnx_expand(b) -> str:
    return broadcast(b, b.var(b.input(0)), _ints(b, b.input(1), "shape"), b.output)


@onnx_lowering("Tile")
def _onnx_tile(b) -> str:
    return tile(b, b.var(b.input(0)), _ints(b, b.input(1), "repeats"), b.output)


def _onnx_out_shape(b, shape, scales, sizes) -> list[int]:
    if sizes:
        return sizes
    if scales is None or len(scales) != len(shape):
        b.unsupported("needs scales or sizes for every axis")
    if any(float(s) != int(s) or s < 1 for s in scales):
        b.unsupported(f"scales {list(scales)} (only integer upsampling)")
    return [d * int(s) for d, s in zip(shape, scales)]


@onnx_lowering("Resize")
def _onnx_resize(b) -> str:
    x = b.var(b.input(0))
    if b.attr("mode", "nearest") != "nearest":
        b.unsupported(f"mode {b.attr('mode')!r} (only nearest)")
    for name, default in (("antialias", 0), ("axes", None), ("keep_aspect_ratio_policy", "stretch")):
        if b.attr(name, default) != default:
            b.unsupported(f"attribute {name}={b.attr(name)!r}")
    scale_input = 1 if b.opset < 11 else 2
    scales = None if b.input(scale_input) is None else [float(s) for s in
                                                        np.asarray(b.array(b.input(scale_input), "scales")).reshape(-1)]
    sizes = _ints(b, b.input(3), "sizes") if b.opset >= 11 else None
    mode = b.attr("coordinate_transformation_mode", "half_pixel") if b.opset >= 11 else "asymmetric"
    rounding = b.attr("nearest_mode", "round_prefer_floor") if b.opset >= 11 else "floor"
    return resize_nearest(b, x, _onnx_out_shape(b, b.shape(x), scales, sizes), mode, rounding, b.output)


@onnx_lowering("Upsample")
def _onnx_upsample(b) -> str:
    x = b.var(b.input(0))
    if b.attr("mode", "nearest") != "nearest":
        b.unsupported(f"mode {b.attr('mode')!r} (only nearest)")
    scales = b.attr("scales") if b.attr("scales") is not None else \
        [float(s) for s in np.asarray(b.array(b.input(1), "scales")).reshape(-1)]
    return resize_nearest(b, x, _onnx_out_shape(b, b.shape(x), scales, None), "asymmetric", "floor", b.output)


# -- torch -------------------------------------------------------------------------------------------

@torch_lowering(aten.slice.Tensor)
def _torch_slice(b) -> str:
    # slice(x, dim=0, start=None, end=None, step=1)
    x = b.var(b.arg(0))
    shape = b.shape(x)
    axis = b.axis(int(b.arg(1, "dim", 0)), len(shape))
    start, end = b.arg(2, "start"), b.arg(3, "end")
    index = slice_index(shape[axis], 0 if start is None else int(start), shape[axis] if end is None else int(end),
                        int(b.arg(4, "step", 1)))
    return index_axes(b, x, {axis: index}, b.output)


@torch_lowering(aten.select.int)
def _torch_select(b) -> str:
    x = b.var(b.arg(0))
    return take_indices(b, x, b.axis(int(b.arg(1)), len(b.shape(x))), np.int64(b.arg(2)), b.output)


@torch_lowering(aten.index_select.default)
def _torch_index_select(b) -> str:
    x = b.var(b.arg(0))
    index = b.entry(b.arg(2)).data if b.is_const(b.arg(2)) else b.unsupported("indices that depend on the input")
    return take_indices(b, x, b.axis(int(b.arg(1)), len(b.shape(x))), np.asarray(index), b.output)


@torch_lowering(aten.index.Tensor, aten._unsafe_index.Tensor)
def _torch_index(b) -> str:
    """x[..., i0, i1, ...] with constant integer index tensors on consecutive axes that are
    one axis each (a single index tensor of any rank, or an outer product: index k varies
    only along axis k of their broadcast shape, as torch's upsampling and padding
    decompositions write them)."""
    x = b.var(b.arg(0))
    given = [(a, t) for a, t in enumerate(b.arg(1)) if t is not None]
    if not given:
        return x
    arrays = []
    for a, t in given:
        if not b.is_const(t):
            b.unsupported("indices that depend on the input")
        arr = np.asarray(b.entry(t).data)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            b.unsupported("boolean or non-integer indices")
        arrays.append(arr)
    axes = [a for a, _ in given]
    if axes != list(range(axes[0], axes[0] + len(axes))):
        b.unsupported("index tensors on non-consecutive axes")
    if len(arrays) == 1:
        return take_indices(b, x, axes[0], arrays[0], b.output)
    k = len(arrays)
    for j, arr in enumerate(arrays):
        if arr.ndim > k or any(d != 1 for i, d in enumerate((1,) * (k - arr.ndim) + arr.shape) if i != j):
            b.unsupported("index tensors that are not an outer product of one index per axis")
    shape = b.shape(x)
    picks = {a: [int(i) % shape[a] for i in arr.reshape(-1)] for a, arr in zip(axes, arrays)}
    if any(not -shape[a] <= int(i) < shape[a] for a, arr in zip(axes, arrays) for i in arr.reshape(-1)):
        b.unsupported("indices out of range")
    return index_axes(b, x, picks, b.output)


@torch_lowering(aten.split_with_sizes.default, aten.split.Tensor)
def _torch_split(b) -> tuple:
    # split_with_sizes(x, sizes, dim=0) / split(x, size, dim=0): one select per part
    x = b.var(b.arg(0))
    shape = b.shape(x)
    axis = b.axis(int(b.arg(2, "dim", 0)), len(shape))
    sizes = b.arg(1)
    if isinstance(sizes, int):
        sizes = [min(sizes, shape[axis] - s) for s in range(0, shape[axis], sizes)]
    starts = np.cumsum([0] + list(sizes))
    return tuple(index_axes(b, x, {axis: list(range(starts[k], starts[k + 1]))}, b.fresh(f"part{k}"))
                 for k in range(len(sizes)))


@torch_lowering(aten.flip.default)
def _torch_flip(b) -> str:
    x = b.var(b.arg(0))
    shape = b.shape(x)
    axes = {b.axis(int(a), len(shape)) for a in b.arg(1)}
    return index_axes(b, x, {a: list(range(shape[a] - 1, -1, -1)) for a in axes}, b.output)


@torch_lowering(aten.repeat.default)
def _torch_repeat(b) -> str:
    x = b.var(b.arg(0))
    repeats = [int(r) for r in b.arg(1)]
    extra = len(repeats) - len(b.shape(x))
    if extra > 0:
        x = b.reshape(x, (1,) * extra + tuple(b.shape(x)))
    return tile(b, x, repeats, b.output)


@torch_lowering(aten.expand.default)
def _torch_expand(b) -> str:
    x = b.var(b.arg(0))
    return broadcast(b, x, b.expected_shape(), b.output)


@torch_lowering(aten.upsample_nearest2d.vec)
def _torch_upsample_nearest2d(b) -> str:
    # upsample_nearest2d.vec(x, output_size, scale_factors): source index floor(i * in / out)
    x = b.var(b.arg(0))
    out = b.expected_shape()
    return resize_nearest(b, x, out, "asymmetric", "floor", b.output)


@torch_lowering(aten.reflection_pad2d.default, aten.reflection_pad1d.default)
def _torch_reflection_pad(b) -> str:
    return torch_pad(b, b.var(b.arg(0)), [int(p) for p in b.arg(1)], "reflect")


@torch_lowering(aten.replication_pad2d.default, aten.replication_pad1d.default)
def _torch_replication_pad(b) -> str:
    return torch_pad(b, b.var(b.arg(0)), [int(p) for p in b.arg(1)], "edge")


def torch_pad(b, x: str, widths: list[int], mode: str, value: float = 0.0, out: str | None = None) -> str:
    """torch's pad widths: (left, right) of the last axis first, then of the one before, ..."""
    rank = len(b.shape(x))
    if len(widths) % 2 or len(widths) > 2 * rank:
        b.unsupported(f"pad widths {widths} for a tensor of rank {rank}")
    before, after = [0] * rank, [0] * rank
    for k in range(len(widths) // 2):
        before[rank - 1 - k], after[rank - 1 - k] = widths[2 * k], widths[2 * k + 1]
    return pad(b, x, before, after, mode, value, b.output if out is None else out)
