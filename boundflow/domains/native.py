"""Loops compiled with numba, for rules that torch can only compute in several passes over the
same bytes, or in many calls where each costs more than the work.

IBP through a dense layer at batch 1 is bound by memory, not arithmetic: every torch form of
it (centre/radius through W and |W|, the (l, u) form [[W+, W-], [W-, W+]]) reads two or four
times the weights a forward pass reads, so mnist-net_256x2's 1 MB of weights become 2-4 MB
streamed on every call. `_dense_interval` reads each weight once for both sums, four rows at a
time (784 -> 256 on this CPU: 10 us against the forward's 12.5 and torch's best form's 30).
numba is a dependency; where it is not installed, `dense_interval_run` says so (None) and the
rules keep their torch forms.

An elementwise interval rule is a few comparisons and selections around one evaluation of f,
each a torch call of about a microsecond at batch 1, which is what a small net's IBP is made of
(sin: 13 calls, 23 us in nonlinear_mix, where the forward's sin is one call). The elementwise
loops take the finite case in one call of ~0.3 us. f itself stays torch's (the rule evaluates it
with torch and the loop reads the values: no function is written twice, and the loop's result is
the torch rule's); a loop that meets a value that is not finite, or an interval outside f's
domain, returns False and the torch rule runs instead, to give the same result or the same
error.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

# several rows (tokens, regions) take the loop too while it does at most this many
# multiply-adds: it reads the weights once per row, where a matrix product reuses them from
# cache (this CPU: 64 -> 64 over 16 rows 6.0 us against the lu_form's 8.9, over 64 rows 23
# against 19; 8 -> 8 over 256 rows 5.8 against 11, 16 -> 16 over 256 rows 16 against 13)
ROWS_MAX_MACS = 1 << 16


def _dense_interval(w, b, s, out):
    """out[:, k] = (l', u') of x -> w x + b over the box s[:, k] = (l, u), for each row k:
    centre and radius (as to_cr computes them), then one pass over w for both w c + b and
    |w| r. Float reassociation is allowed (a vectorised sum), as in any matrix product.
    Four rows of w at a time: four streams of weights in flight, where one row alone leaves
    the loads waiting (784 -> 256 on this CPU: 10 us against 15)."""
    n_out, n_in = w.shape
    half = np.float32(0.5)
    centres, radii = half * s[0] + half * s[1], half * s[1] - half * s[0]
    last = n_out - 1
    for k in range(s.shape[1]):
        c, r = centres[k], radii[k]
        for i in range(0, n_out, 4):
            # (a last block of fewer rows repeats the last row: the same values written twice)
            rows = (i, min(i + 1, last), min(i + 2, last), min(i + 3, last))
            m0, m1, m2, m3 = b[rows[0]], b[rows[1]], b[rows[2]], b[rows[3]]
            r0 = r1 = r2 = r3 = np.float32(0.0)
            for j in range(n_in):
                cj, rj = c[j], r[j]
                w0, w1, w2, w3 = w[rows[0], j], w[rows[1], j], w[rows[2], j], w[rows[3], j]
                m0 += w0 * cj
                m1 += w1 * cj
                m2 += w2 * cj
                m3 += w3 * cj
                r0 += abs(w0) * rj
                r1 += abs(w1) * rj
                r2 += abs(w2) * rj
                r3 += abs(w3) * rj
            for row, mid, rad in ((rows[0], m0, r0), (rows[1], m1, r1), (rows[2], m2, r2), (rows[3], m3, r3)):
                out[0, k, row] = mid - rad
                out[1, k, row] = mid + rad


def _spec_dense_interval(spec, w, b, s, out):
    """out[:, 0, k] = (l', u') of x -> (spec w) x + spec b over the box s[:, 0] = (l, u), for
    each row k of spec: that row of spec w made first (one pass over w), then as
    _dense_interval."""
    n_spec, n_out = spec.shape
    n_in = w.shape[1]
    half = np.float32(0.5)
    c, r = half * s[0, 0] + half * s[1, 0], half * s[1, 0] - half * s[0, 0]
    row = np.empty(n_in, dtype=np.float32)
    for k in range(n_spec):
        row[:] = 0
        mid = np.float32(0.0)
        for o in range(n_out):
            mid += spec[k, o] * b[o]
            for j in range(n_in):
                row[j] += spec[k, o] * w[o, j]
        rad = np.float32(0.0)
        for j in range(n_in):
            mid += row[j] * c[j]
            rad += abs(row[j]) * r[j]
        out[0, 0, k] = mid - rad
        out[1, 0, k] = mid + rad


# -- elementwise rules ----------------------------------------------------------------------------
# Arrays [2, n]: s = stack(l, u) of the input(s), out = the rule's destination, which holds f at
# the ends as torch computed them on entry where the rule has an f (one array read and written:
# two could overlap, which would keep LLVM from vectorising). NaN and inf go to the torch rule.

def _periodic_range(s, out, offsets, turns):
    """The range of sin or cos (periodic.py): the ends' values (in out), -1 where [l, u] may hold a
    minimum of the wave of f, 1 where one of the wave of -f, decided as periodic.contains does
    (the same formula and doubt, in float64)."""
    most = 0.0
    for e in range(2):
        for i in range(s.shape[1]):
            x = np.float64(s[e, i])
            if not math.isfinite(x):
                return False
            most = max(most, abs(x))
    doubt = 2e-14 * most
    low_l, low_u, high_l, high_u = offsets[0] + doubt, offsets[1] + doubt, offsets[2] + doubt, offsets[3] + doubt
    for i in range(s.shape[1]):
        l, u = np.float64(s[0, i]), np.float64(s[1, i])
        a, b = out[0, i], out[1, i]
        trough = math.floor(l * turns[0] + low_l) + math.floor(u * turns[1] + low_u) >= 0
        crest = math.floor(l * turns[0] + high_l) + math.floor(u * turns[1] + high_u) >= 0
        # (selections, not branches: which way a box goes is data the CPU cannot predict)
        out[0, i] = -1.0 if trough else min(a, b)
        out[1, i] = 1.0 if crest else max(a, b)
    return True


def _curve_range(s, out, pole, at, f_at):
    """The range of a curve (convex.py) from f at (l raised to the domain, u) (in out): their min and
    max, with f_at = f(at) where at is in [l, u] (the stationary point; NaN: none). False where
    a value is not finite or [l, u] reaches the pole (NaN: none)."""
    ok = True
    for i in range(s.shape[1]):      # (no early exit, selections not branches: this vectorises)
        l, u = s[0, i], s[1, i]
        a, b = out[0, i], out[1, i]
        off_pole = (pole != pole) | (l - pole > 0) | (pole - u > 0)
        ok &= math.isfinite(a) & math.isfinite(b) & off_pole
        inside = (l <= at) & (at <= u)
        lo = a if a < b else b
        hi = b if a < b else a
        out[0, i] = f_at if inside & (f_at < lo) else lo
        out[1, i] = f_at if inside & (f_at > hi) else hi
    return ok


def _valley_range(s, out, at, f_min):
    """The range of a function that falls to its minimum at `at` and rises after (gelu.py),
    from its values at the ends (in out): their min and max, f_min (a lower bound on the
    minimum) where [l, u] may hold `at`, with gelu.interval's doubt 1e-12 (1 + |l|)."""
    ok = True
    for i in range(s.shape[1]):
        l, u = np.float64(s[0, i]), np.float64(s[1, i])
        a, b = out[0, i], out[1, i]
        ok &= math.isfinite(a) & math.isfinite(b)
        doubt = 1e-12 * (1 + abs(l))
        holds = (l - doubt <= at) & (u + doubt >= at)
        lo = a if a < b else b
        out[0, i] = f_min if holds else lo
        out[1, i] = b if a < b else a
    return ok


def _product_range(x, y, out):
    """The least and the largest of the four products of the bounds of x and of y (mul.py)."""
    ok = True
    for i in range(x.shape[1]):
        a, b, c, d = x[0, i] * y[0, i], x[0, i] * y[1, i], x[1, i] * y[0, i], x[1, i] * y[1, i]
        ok &= math.isfinite(a) & math.isfinite(b) & math.isfinite(c) & math.isfinite(d)
        ab_lo, ab_hi = (a if a < b else b), (b if a < b else a)
        cd_lo, cd_hi = (c if c < d else d), (d if c < d else c)
        out[0, i] = ab_lo if ab_lo < cd_lo else cd_lo
        out[1, i] = ab_hi if ab_hi > cd_hi else cd_hi
    return ok


# the dense loops' sums may be reassociated (vectorised) and their products contracted into
# fused multiply-adds, as any matrix product's; the elementwise loops round as torch does
SUMS = frozenset({"reassoc", "contract"})


@functools.cache
def _compiled(loop, fastmath: frozenset = frozenset()):
    """`loop` compiled (cached on disk by numba, beside this file or in the user's cache
    directory, where either is writable), or None where numba is not installed."""
    try:
        import numba
    except ModuleNotFoundError as e:
        if e.name != "numba":
            raise
        return None
    # (never fastmath=True: NaN and inf keep their meaning, which it would let the compiler
    # assume away)
    flags = dict(fastmath=set(fastmath), nogil=True, boundscheck=False)
    try:
        return numba.njit(loop, cache=True, **flags)
    except RuntimeError:    # numba finds no writable cache directory: compile in each process
        return numba.njit(loop, **flags)


def available() -> bool:
    return _compiled(_dense_interval, SUMS) is not None


def _applies(*ts: torch.Tensor) -> bool:
    """Whether the loops can take these tensors: float32 on the CPU, outside autograd (the
    loops have no derivative)."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad for t in ts)


def _run(kernel, args: tuple, dest: torch.Tensor | None, shape: tuple, flat: tuple):
    """run() calling kernel(*args, out) with out the kernel's `flat` view of dest, or of a fresh
    tensor of `shape` per run when dest is None."""
    if dest is None:
        def fresh():
            y = torch.empty(shape, dtype=torch.float32)
            kernel(*args, y.view(flat).numpy())
            return (y,)
        return fresh
    into = dest.detach().view(flat).numpy()

    def run():
        kernel(*args, into)
        return (dest,)
    return run


def spec_interval_run(spec: torch.Tensor, w: torch.Tensor, b: torch.Tensor, s: torch.Tensor,
                      dest: torch.Tensor | None):
    """run() for C @ (x -> w x + b) over one region's box s [2, 1, in] (spec: C's one matrix
    [S, out], w [out, in], b [out]), into dest [2, 1, S] (fresh when None);
    None where the loop does not apply (as dense_interval_run)."""
    kernel = _compiled(_spec_dense_interval, SUMS)
    if (kernel is None or not _applies(spec, w, b, s) or s.numel() != 2 * w.shape[1]
            or not (s.is_contiguous() and spec.is_contiguous()) or dest is not None and not dest.is_contiguous()):
        return None
    args = (spec.detach().numpy(), w.contiguous().numpy(), b.contiguous().numpy(), s.detach().view(2, 1, -1).numpy())
    shape = (2, 1, spec.shape[0])
    return _run(kernel, args, dest, shape, shape)


def dense_interval_run(w: torch.Tensor, b: torch.Tensor, s: torch.Tensor, dest: torch.Tensor | None):
    """run() for stack(l, u) s [2, ..., in] through x -> w x + b (w [out, in], b [out], both
    contiguous) with the compiled loop, into dest ([2, ..., out]; a fresh tensor per run when
    None); None where the loop does not apply: numba missing, not float32 CPU tensors, a
    strided dest, autograd wanted (the loop has no derivative), or more rows than
    ROWS_MAX_MACS allows. A strided s is copied per run (the same bits as a contiguous one)."""
    kernel = _compiled(_dense_interval, SUMS)
    n_out, n_in = w.shape
    rows = s.numel() // (2 * n_in)
    if (kernel is None or rows > 1 and rows * n_in * n_out > ROWS_MAX_MACS or not _applies(w, b, s)
            or dest is not None and not dest.is_contiguous()):
        return None
    if not s.is_contiguous():
        return lambda: dense_interval_run(w, b, s.contiguous(), dest)()
    args = (w.numpy(), b.numpy(), s.detach().view(2, rows, n_in).numpy())
    return _run(kernel, args, dest, tuple(s.shape[:-1]) + (n_out,), (2, rows, n_out))


def elementwise_run(loop, ins: tuple, dest: torch.Tensor | None, fallback, fill=None, consts: tuple = ()):
    """run() of an elementwise interval rule by `loop` (one of the above; consts its last
    arguments) over ins (each stack(l, u) [2, ...], all of one shape) into dest (a fresh
    tensor per run when None). fill(into), when given, first writes there the values the loop
    reads (torch's f at the ends); where the loop returns False, the rule's torch run()
    (fallback) gives the result. None where the loop does not apply: numba missing, not
    float32 CPU tensors, autograd wanted (the loops have no derivative), strided tensors."""
    kernel = _compiled(loop)
    if (kernel is None or not _applies(*ins) or any(t.shape != ins[0].shape or not t.is_contiguous() for t in ins)
            or dest is not None and not (dest.shape == ins[0].shape and dest.is_contiguous())):
        return None
    flat = tuple(t.detach().view(2, -1).numpy() for t in ins)

    def into(out: torch.Tensor):
        at = out.detach().view(2, -1).numpy()
        args = flat + (at,) + consts
        if fill is None:
            return lambda: (out,) if kernel(*args) else fallback()

        def run():
            fill(out)
            return (out,) if kernel(*args) else fallback()
        return run
    if dest is None:
        return lambda: into(torch.empty(ins[0].shape, dtype=torch.float32))()
    return into(dest)
