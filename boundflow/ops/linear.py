"""linear: y = x @ W.T + b over the last axis. Inputs (x, W [out, in], b [out]?). Frontends
lower matrix products with one constant side to it: ONNX Gemm and MatMul, aten linear, mm,
bmm, matmul and addmm (a product of two variables goes to mul.matmul)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from boundflow.domains import binds, fp, native, shaped, writes_into
from boundflow.domains.interval import from_cr, to_cr
from boundflow.domains.linear import sound, sum_lead
from boundflow.domains.rounding import Enclosed, magnitude
from boundflow.ops import mul
from boundflow.ops.registry import Op, onnx_lowering, register, torch_lowering

if TYPE_CHECKING:
    from boundflow.frontends.builder import Builder, Constant

aten = torch.ops.aten


def forward(x, w, b=None, attrs=None):
    return F.linear(x, w, b)


def _weight_and_bias(graph, node) -> tuple[torch.Tensor, torch.Tensor]:
    ps = [graph.data(i) for i in node.inputs if not graph.is_variable(i)]
    w = ps[0]
    return w, ps[1] if len(ps) > 1 else torch.zeros(w.shape[0], dtype=w.dtype)


# up to this many weights (in x out), a float32 plan also gets the (l, u) form of the layer,
# used at batch 1 where the compiled loop (domains/native.py, on CPU) is not: its one product
# beats the centre/radius form's three calls (this CPU: 7.6 vs 22 us at 50 x 50) while its
# weights (4x the forward's) stay in cache
LU_FORM_MAX = 1 << 14
# several rows (a sequence's tokens, several regions) take the lu_form too when its product
# has at most this many multiply-adds: 2.5x faster than the centre/radius form's three
# products for 4 rows of 8 -> 8 (5 us against 13), slower for 64 rows of 64 -> 64
LU_ROWS_MAX_MACS = 1 << 17


def interval_params(graph, node, dtype=torch.float32):
    """[stack(W.T, |W|.T), stack(b, 0)]: centre and radius in one batched matmul (W.T
    contiguous: a transposed operand costs batched products up to 1.5x). Float32 plans also
    get W [out, in] for the compiled loop (native.dense_interval_run), and small layers
    [[W+, W-], [W-, W+]].T and (b, b), so that (l, u) -> (l', u') is one product (l' = W+ l +
    W- u + b, u' = W- l + W+ u + b); not sound_fp plans (float64), whose error rules (fp_error)
    bound the centre/radius form's rounding."""
    w, b = _weight_and_bias(graph, node)
    ps = [torch.stack((w.t(), w.abs().t())), torch.stack((b, torch.zeros_like(b))).unsqueeze(1)]
    if dtype == torch.float32:
        ps.append(w.contiguous())
        if w.numel() <= LU_FORM_MAX:
            ps += lu_form(w, b)
    return ps


def lu_form(w: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """The (l, u) form of x -> W x + b (W [out, in]): [[W+, W-], [W-, W+]].T and (b, b)."""
    return [lu_blocks(w.t()), torch.cat((b, b))]


def lu_blocks(w: torch.Tensor) -> torch.Tensor:
    """[[W+, W-], [W-, W+]] over w's first two axes (the blocks of an (l, u) form)."""
    pos, neg = w.clamp(min=0), w.clamp(max=0)
    return torch.cat((torch.cat((pos, neg), 1), torch.cat((neg, pos), 1)))


def lu_rows(s: torch.Tensor, w_lu: torch.Tensor, b_lu: torch.Tensor, shape, dest: torch.Tensor | None):
    """run() for stack(l, u) of several rows through the lu_form: each row's (l, u) made one
    row of a matrix (a copy), one product, and the (l', u') rows put back (a copy)."""
    n_in, n_out = w_lu.shape[0] // 2, w_lu.shape[1] // 2
    rows, bias = s.numel() // (2 * n_in), b_lu.view(1, -1)
    if dest is None or not s.is_contiguous():
        return lambda: (torch.addmm(bias, s.reshape(2, rows, n_in).transpose(0, 1).reshape(rows, -1), w_lu)
                        .view(rows, 2, n_out).transpose(0, 1).reshape(shape),)
    pairs, back = s.view(2, rows, n_in).transpose(0, 1), dest.view(2, rows, n_out).transpose(0, 1)

    def run():
        back.copy_(torch.addmm(bias, pairs.reshape(rows, -1), w_lu).view(rows, 2, n_out))
        return (dest,)
    return run


def lu_interval(s: torch.Tensor, w_lu: torch.Tensor, b_lu: torch.Tensor, shape, dest: torch.Tensor | None):
    """run() for one region's stack(l, u) through the lu_form: the interval as `shape` (into
    dest, of that shape, when given)."""
    if not s.is_contiguous():                         # its one-row copy is made per run
        return lambda: lu_interval(s.contiguous(), w_lu, b_lu, shape, dest)()
    row, bias = s.view(1, -1), b_lu.view(1, -1)
    if dest is None:
        return lambda: (torch.addmm(bias, row, w_lu).view(shape),)
    flat = dest.view(1, -1)

    def run():
        torch.addmm(bias, row, w_lu, out=flat)
        return (dest,)
    return run


@binds
def interval(ins, ps, attrs, out=(None,)):
    """The compiled loop for one region or a few rows of a float32 CPU plan; else the lu_form
    for one region or a few rows of a small layer; else centre and radius through W and |W|."""
    (s,) = ins
    w_cr, b_cr = ps[:2]                               # [2, in, out], [2, 1, out]
    n_in, n_out = w_cr.shape[1:]
    shape = tuple(s.shape[:-1]) + (n_out,)
    dest = shaped(out[0], shape)
    loop = None if len(ps) < 3 else native.dense_interval_run(ps[2], b_cr[0, 0], s, dest)
    if loop is not None:
        return loop
    if len(ps) > 3 and s.numel() == 2 * n_in:         # one region: (l, u) is one row
        return lu_interval(s, ps[3], ps[4], shape, dest)
    if len(ps) > 3 and s.numel() * ps[3].shape[1] <= LU_ROWS_MAX_MACS:
        return lu_rows(s, ps[3], ps[4], shape, dest)

    def run():
        cr = to_cr(s)
        out_cr = torch.baddbmm(b_cr, cr.reshape(2, -1, n_in), w_cr).view(shape)
        return (from_cr(out_cr, dest),)
    return run


def backward_params(graph, node, dtype=torch.float32):
    return list(_weight_and_bias(graph, node))


PRUNE_MIN_MACS = 1 << 20       # products smaller than this are not worth the check
PRUNE_MIN_WIDTH = 128          # a dropped column saves this many products per row: below it the
                               # check and the gather cost more (ACAS Xu's 50-wide layers: 2-5x)
PRUNE_MAX_LIVE = 0.75          # drop the dead columns when at most this share of them live


@writes_into
def backward(ins, ps, attrs, out=(None, None)):
    """A @ W. Columns of A that are zero in every row (the neurons a ReLU after this layer
    settles as inactive: often most of them) are dropped from the product first: the same sum
    without its zero terms, so no extra rounding either. Not under autograd: a column can be
    zero at the current slopes (alpha = 0) and still have a gradient that moves them."""
    a, bias = ins
    w, b = ps
    new_bias = torch.add(bias, torch.matmul(sum_lead(a, 1), b), out=out[1])
    n_out = w.shape[0]
    if w.shape[1] >= PRUNE_MIN_WIDTH and a.numel() * w.shape[1] >= PRUNE_MIN_MACS and not a.requires_grad:
        # (NaN or inf keep their column: amax propagates them, and they are not 0)
        live = a.reshape(-1, n_out).abs().amax(0).ne(0).nonzero().squeeze(1)
        if live.numel() <= PRUNE_MAX_LIVE * n_out:
            a, w = a.index_select(-1, live), w.index_select(0, live)
    # one matrix product over A's rows (what matmul does without out=; with out= it may batch
    # differently and round differently)
    shape = tuple(a.shape[:-1]) + (w.shape[1],)
    dest = shaped(out[0], shape)
    rows = torch.mm(a.flatten(0, -2), w, out=None if dest is None else dest.flatten(0, -2))
    return (rows.view(shape) if dest is None else dest), new_bias


def matrix(graph, node, dtype, max_bytes):
    """W and b themselves, when the leading axes of x are units (one row per output neuron)."""
    if math.prod(graph.shape(node.inputs[0])[:-1]) != 1:
        return None
    return _weight_and_bias(graph, node)


def fp_params(graph, node, dtype):
    # the longest sums: a row of the (l, u) form (2 in + 1 terms), A @ W (out features) and
    # the backward bias update (every output element); dot_length's product of fan-in and
    # fan-out is harmless in float64, not in float32
    n_in = graph.shape(node.inputs[0])[-1]
    n = max(2 * n_in + 1, graph.values[node.outputs[0]].type.numel + 1) + 4
    weights = fp.weights(graph, node, dtype, n)
    if len(weights) == 1:                       # no bias: no error from one
        weights.append(torch.zeros(weights[0].shape[0], dtype=dtype))
    return weights


def fp_error(ins, ps, attrs):
    s, raw = ins
    w_err, b_err = ps                                      # gamma |W| + dW, gamma |b| + db
    return fp.finish(raw, F.linear(magnitude(s), w_err, b_err), attrs["n"])


LINEAR = register(Op("linear", forward, interval, sound(backward), fp_error, mixing=True, matrix=matrix, fp32=True,
                     interval_params=interval_params, backward_params=backward_params, fp_params=fp_params,
                     error_of_inputs=True))


# -- frontends: matrix products with a constant side -------------------------------------------

def _product_shape(b: Builder, left: tuple, right: tuple) -> tuple[int, ...]:
    """The shape of left @ right under numpy / torch.matmul broadcasting."""
    try:
        return tuple(torch.matmul(torch.empty(left, device="meta"), torch.empty(right, device="meta")).shape)
    except RuntimeError as e:
        b.unsupported(f"operands of shapes {list(left)} and {list(right)} do not multiply ({e})")


def _single_matrix(b: Builder, mat: Constant) -> Constant:
    """The one 2-D matrix of a constant operand that may be batched, but the same in every entry."""
    if len(mat.shape) == 2:
        return mat
    flat = mat.value.map(lambda t: t.reshape(-1, *t.shape[-2:]))
    if not torch.equal(flat.value, flat.value[:1].expand_as(flat.value)):
        b.unsupported("batched product with a different constant matrix per batch entry")
    return mat.derive(Enclosed(flat.value[0], flat.err.amax(0)))


def _row_bias(bias: Constant, out_shape: tuple[int, ...]) -> Constant | None:
    """The bias as one row [n] when it adds the same row to every row of the product, else None."""
    row = bias.map(lambda t: t.expand(out_shape).reshape(-1, out_shape[-1])[0])
    full, first = bias.value.map(lambda t: t.expand(out_shape)), row.value
    same = torch.equal(full.value, first.value.expand(out_shape)) and torch.equal(full.err, first.err.expand(out_shape))
    return row if same else None


def matmul(b: Builder, left: str | Constant, right: str | Constant, alpha: float = 1.0,
           bias: Constant | None = None, transposed: bool = False) -> str:
    """alpha * (left @ right) + bias (numpy / torch.matmul semantics): one operand is a variable,
    the other a Constant (two variables: mul.matmul). transposed: the variable operand is the
    variable with its last two axes swapped (ONNX Gemm's transA / transB).

    x @ C is linear(x, C^T); C @ x swaps the last two axes of x, applies linear with C and swaps
    back ((C x)^T = x^T C^T). A rank-1 constant is a one-row weight followed by a reshape that
    drops the unit axis. A batched constant must be the same matrix in every batch entry and
    must not broadcast the variable. A bias that adds the same row to every row is the linear's
    own bias; any other is added after the product.
    """
    if isinstance(left, str) and isinstance(right, str):
        if transposed:
            b.unsupported("a product of two variables with a transposed operand (transA / transB)")
        plain = alpha == 1.0 and bias is None
        y = mul.matmul(b, left, right, b.output if plain else None)
        return y if plain else b.affine(y, b.literal(alpha), bias, out=b.output)
    if not isinstance(left, str) and not isinstance(right, str):
        raise AssertionError("a product of two constants should have been folded")
    var_left = isinstance(left, str)
    x, mat = (left, right) if var_left else (right, left)
    xs = b.shape(x)
    operand = xs[:-2] + (xs[-1], xs[-2]) if transposed else xs
    pair = (operand, mat.shape) if var_left else (mat.shape, operand)
    want = _product_shape(b, *pair)
    core = mat.shape[-2:]                   # the matrix (or vector) each batch entry multiplies by
    if _product_shape(b, *((operand, core) if var_left else (core, operand))) != want:
        b.unsupported(f"constant operand of shape {list(mat.shape)} broadcasts the variable of shape "
                      f"{list(operand)} to {list(want)}")
    if var_left:
        x = b.swap_last_two(x) if transposed else x
        row = _row_bias(bias, want) if bias is not None and len(mat.shape) > 1 else None
        bias = None if row is not None else bias
        y = _variable_times_constant(b, x, mat, alpha, row, b.output if bias is None else None)
    else:
        y = _constant_times_variable(b, mat, x, alpha, transposed, b.output if bias is None else None)
    return y if bias is None else b.affine(y, shift=bias, out=b.output)


def _variable_times_constant(b: Builder, x: str, mat: Constant, alpha: float, row: Constant | None,
                             out: str | None) -> str:
    """x @ C, plus `row` (a bias of the linear) when C is a matrix."""
    if len(mat.shape) == 1:                 # [..., k] @ [k] -> [...]
        y = b.linear(x, mat.map(lambda t: t[None, :]).scaled(alpha))
        return b.reshape(y, b.shape(x)[:-1], out)
    w = _single_matrix(b, mat).map(lambda t: t.transpose(0, 1)).scaled(alpha)      # [out, in]
    return b.linear(x, w, row, out=out)


def _constant_times_variable(b: Builder, mat: Constant, x: str, alpha: float, transposed: bool,
                             out: str | None) -> str:
    """C @ x; transposed: x is given with its last two axes already swapped."""
    xs = b.shape(x)
    vector = len(mat.shape) == 1
    w = (mat.map(lambda t: t[None, :]) if vector else _single_matrix(b, mat)).scaled(alpha)
    if len(xs) == 1:                        # C @ v is linear(v, C); a rank-1 C is a dot product
        return b.reshape(b.linear(x, w), (), out) if vector else b.linear(x, w, out=out)
    yt = b.linear(x if transposed else b.swap_last_two(x), w)
    return b.reshape(yt, xs[:-2] + (xs[-1],), out) if vector else b.swap_last_two(yt, out)


@onnx_lowering("Gemm")
def _onnx_gemm(b) -> str:
    """alpha * A' @ B' + beta * C, A' = A or A^T (transA), B' likewise."""
    operands, transposed = [], False
    for i, (what, flag) in enumerate((("A", "transA"), ("B", "transB"))):
        operand = b.operand(b.input(i), what)
        if isinstance(operand, str):
            transposed = transposed or bool(b.attr(flag, 0))
        elif b.attr(flag, 0):
            operand = operand.map(lambda t: t.T)
        operands.append(operand)
    c = b.input(2)
    bias = None if c is None else b.const(c, "C").scaled(float(b.attr("beta", 1.0)))
    return matmul(b, *operands, alpha=float(b.attr("alpha", 1.0)), bias=bias, transposed=transposed)


@onnx_lowering("MatMul")
def _onnx_matmul(b) -> str:
    return matmul(b, b.operand(b.input(0), "A"), b.operand(b.input(1), "B"))


@torch_lowering(aten.linear.default)
def _torch_linear(b) -> str:
    x = b.var(b.arg(0))
    w = b.const(b.arg(1), "linear weight")
    if len(w.shape) != 2:
        b.unsupported(f"linear weight of rank {len(w.shape)}")
    bias = b.arg(2, "bias")
    return b.linear(x, w, None if bias is None else b.const(bias, "linear bias"), out=b.output)


@torch_lowering(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _torch_matmul(b) -> str:
    # mm / bmm / matmul differ only in which ranks torch accepts
    return matmul(b, b.operand(b.arg(0), "left-hand matrix"), b.operand(b.arg(1), "right-hand matrix"))


@torch_lowering(aten.addmm.default)
def _torch_addmm(b) -> str:
    """addmm(bias, m1, m2, beta=, alpha=) = beta * bias + alpha * m1 @ m2."""
    left, right = b.operand(b.arg(1), "left-hand matrix"), b.operand(b.arg(2), "right-hand matrix")
    bias = b.const(b.arg(0), "bias").scaled(float(b.kwarg("beta", 1)))
    return matmul(b, left, right, alpha=float(b.kwarg("alpha", 1)), bias=bias)
