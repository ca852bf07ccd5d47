"""CPU schedules for the fused PrimFuncs of a lowered module.

TVM's legalized loops are plain loop nests: a matmul runs one multiply-add at a time, tens of
times slower than torch. Bound propagation is mostly matmuls of two shapes, both with the
output's last axis contiguous in one operand ("NN"): the interval pass's W c (one row, a GEMV
whose reduction is the *outer* axis of W, which dlight's CPU GEMV rule leaves alone) and the
CROWN pass's A W (2S rows, S symbolic when it is the data's unstable count).

``MatmulNN`` schedules those as a register-blocked microkernel: the output tile [mi rows x nj
columns] lives in registers (``cache_write`` "local"), each step of the reduction loads one
nj-vector of W and broadcasts mi entries of A, and the tile is written back once, with the
elementwise epilogue fused into the write-back. dlight's CPU rules (GEMV with inner reduction,
row reductions) take what it declines. A stride-1 convolution has the same shape, with
j + (kernel offset) as the data's last index, so ``MatmulNN`` tiles it too: output channels
x output columns. ``InnerReduction`` schedules reductions along contiguous axes (CROWN's
concretization A c and the bias terms). Elementwise kernels are left to LLVM's vectorizer.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

ACCUMULATOR_VECTORS = 8          # register tile of the microkernel, in vectors of the target


def schedule_passes(schedule: str) -> list[tvm.transform.Pass]:
    """The passes that apply `schedule` ("boundflow", "dlight" or "none") to every PrimFunc."""
    if schedule == "none":
        return []
    dlight_rules = [dl.cpu.GEMV(), dl.cpu.Reduction()]
    if schedule == "dlight":
        return [dl.ApplyDefaultSchedule(*dlight_rules)]
    return [dl.ApplyDefaultSchedule(MatmulNN(), InnerReduction(), *dlight_rules)]


def _lanes(target: Target) -> int:
    """float32 lanes of one vector register."""
    return max(llvm_get_vector_width(target) // 32, 1)


def _root(sch: s_tir.Schedule) -> s_tir.schedule.SBlockRV | None:
    """The root block, or None for a PrimFunc written without blocks (e.g. scatter)."""
    body = sch.mod["main"].body
    if not isinstance(body, s_tir.SBlockRealize):
        return None
    return sch.get_sblock(body.block.name_hint)


def _single_reduction(func, target: Target):
    """(schedule, block) for an llvm PrimFunc with exactly one reduction block, else None."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    root = _root(sch)
    if root is None:
        return None
    reductions = [b for b in sch.get_child_blocks(root) if not _is_spatial(sch.get(b))]
    if len(reductions) != 1:
        return None
    return sch, reductions[0]


def _is_spatial(block: s_tir.SBlock) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in block.iter_vars)


def _is_padding(block: s_tir.SBlock) -> bool:
    """A block storing if_then_else(in bounds, x, 0): zero padding."""
    value = getattr(block.body, "value", None)
    return isinstance(value, tvm.ir.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name.endswith("if_then_else")


def _inline_producers(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    """Inline every elementwise producer of `block` (reshapes, |A|, centre and radius) into it,
    so the kernel reads the function's inputs directly. Zero padding stays a separate copy
    (with its own producers inlined): inlined, it would put a bounds check on every load of
    the inner loop."""
    changed = True
    while changed:
        changed = False
        for producer in sch.get_producers(block):
            if not _is_spatial(sch.get(producer)):
                continue
            if _is_padding(sch.get(producer)):
                _inline_producers(sch, producer)
                continue
            try:
                sch.compute_inline(producer)
            except ScheduleError:      # not inlinable (e.g. read in two places): leave it
                continue
            changed = True
            break


def _inline_consumers(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    """Inline the elementwise epilogue chain after `block` into it."""
    changed = True
    while changed:
        changed = False
        for consumer in sch.get_consumers(block):
            if not _is_spatial(sch.get(consumer)):
                continue
            try:
                sch.reverse_compute_inline(consumer)
            except ScheduleError:      # e.g. a consumer that also reads another block's output
                continue
            changed = True
            break


def _index_vars(indices) -> list[tirx.Var | None]:
    """Each index as the plain block var it is, or None for a compound expression."""
    return [e if isinstance(e, tirx.Var) else None for e in indices]


def _uses(expr, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


class MatmulNN(ScheduleRule):
    """C[..., i, j] = sum_k A[..., i, k] B[..., k, j] with j the last axis of C and B (any
    extra elementwise producers and consumers inlined).

    Rows with a symbolic count (CROWN's unstable neurons) are padded to the tile height with
    ``pad_einsum``: a predicate on the rows would keep TVM from shrinking the register tile to
    its static size (it then allocates a row-count-sized buffer per tile). The padded copy of
    A and the copy back of C cost far less than the predicated kernel."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        found = _single_reduction(func, target)
        if found is None:
            return None
        sch, main = found
        axes = self._axes(sch.get(main))
        if axes is None:
            return None
        j, i = axes
        lanes = _lanes(target)
        nj = self._vector_tile(sch.get(main).iter_vars[j].dom.extent, lanes)
        if nj is None:
            return None
        mi = max(ACCUMULATOR_VECTORS * lanes // nj, 1)
        if i is not None and isinstance(sch.get(main).iter_vars[i].dom.extent, tirx.IntImm):
            mi = min(mi, int(sch.get(main).iter_vars[i].dom.extent))
        padded = i is not None and not isinstance(sch.get(main).iter_vars[i].dom.extent, tirx.IntImm)
        if padded:
            padded = self._pad_rows(sch, main, i, mi)
            if not padded:
                i = None           # no padding possible: one row per tile, no predicate
        if not padded:
            _inline_producers(sch, main)
        self._tile(sch, main, j, i, nj, mi, padded)
        return sch

    @staticmethod
    def _pad_rows(sch: s_tir.Schedule, main, i: int, mi: int) -> bool:
        """Pad the row axis to a multiple of mi; producers are inlined into the padding copies,
        which stay separate so that the kernel reads without a bounds check."""
        before = {sch.get(b).name_hint for b in sch.get_producers(main)}
        pads = [1] * len(sch.get(main).iter_vars)
        pads[i] = mi
        try:
            sch.pad_einsum(main, pads)
        except ScheduleError:        # operands indexed by expressions, not plain axes
            return False
        for producer in sch.get_producers(main):
            if sch.get(producer).name_hint in before:
                sch.compute_inline(producer)
            else:
                _inline_producers(sch, producer)
                sch.vectorize(sch.get_loops(producer)[-1])
        return True

    @staticmethod
    def _axes(block: s_tir.SBlock) -> tuple[int, int | None] | None:
        """(position of j, position of i or None) among the block's iter vars, or None when the
        block is no NN matmul: j must be the last index of the output and, plus reduction
        offsets at most (a stride-1 convolution's x + rx), of every operand that uses it, and
        appear nowhere else. i: an output axis only the operands without j use (A's rows, a
        convolution's output channels)."""
        if len(block.writes) != 1 or not block.reads:
            return None
        ivars = [iv.var for iv in block.iter_vars]
        out_idx = _index_vars([r.min for r in block.writes[0].region])
        j_var = out_idx[-1]
        if j_var is None or not any(j_var.same_as(v) for v in ivars):
            return None
        j = next(p for p, v in enumerate(ivars) if v.same_as(j_var))
        if block.iter_vars[j].iter_type != tirx.IterVar.DataPar:
            return None
        with_j = 0
        for read in block.reads:
            mins = [r.min for r in read.region]
            if not any(_uses(m, j_var) for m in mins):
                continue
            offset = tvm.sym.Analyzer().simplify(mins[-1] - j_var)
            if _uses(offset, j_var) or any(_uses(m, j_var) for m in mins[:-1]):
                return None
            with_j += 1
        if with_j == 0 or with_j == len(block.reads):
            return None            # no operand streams along j, or none without it: not a matmul

        def used_by(var, streaming: bool) -> bool:
            return any(_uses(r.min, var) for read in block.reads for r in read.region
                       if any(_uses(x.min, j_var) for x in read.region) == streaming)

        rows = [p for p, iv in enumerate(block.iter_vars)
                if iv.iter_type == tirx.IterVar.DataPar and p != j and not _is_one(iv.dom.extent)
                and any(v is not None and v.same_as(iv.var) for v in out_idx[:-1])
                and used_by(iv.var, False) and not used_by(iv.var, True)]
        return j, (rows[-1] if rows else None)

    @staticmethod
    def _vector_tile(extent, lanes: int) -> int | None:
        """Columns per tile: a multiple of the vector width dividing the extent."""
        if not isinstance(extent, tirx.IntImm):
            return None
        n = int(extent)
        for cand in (2 * lanes, lanes, lanes // 2, lanes // 4):
            if cand >= 4 and n % cand == 0:
                return cand
        return n if n <= 2 * lanes else None

    @staticmethod
    def _tile(sch: s_tir.Schedule, main, j: int, i: int | None, nj: int, mi: int, padded: bool) -> None:
        """Register tile [mi rows, nj columns] accumulated over the whole reduction, then
        written back (through the unpadding copy when the rows were padded)."""
        loops = sch.get_loops(main)
        block = sch.get(main)
        spatial = [p for p, iv in enumerate(block.iter_vars) if iv.iter_type == tirx.IterVar.DataPar]
        reduce = [loops[p] for p, iv in enumerate(block.iter_vars) if iv.iter_type != tirx.IterVar.DataPar]
        jo, ji = sch.split(loops[j], [None, nj])
        outer = [loops[p] for p in spatial if p not in (j, i)]
        if i is not None:
            io, ii = sch.split(loops[i], [None, mi])
            sch.reorder(*outer, jo, io, *reduce, ii, ji)
            tile_root, inner = io, [ii]
        else:
            sch.reorder(*outer, jo, *reduce, ji)
            tile_root, inner = jo, []
        write_back = sch.cache_write(main, 0, "local")
        if padded:
            # the unpadding copy is the epilogue's producer: never inline it into the padded
            # write-back (its bounds would be lost); fuse the epilogue into it instead
            (unpad,) = sch.get_consumers(write_back)
            _inline_consumers(sch, unpad)
            sch.vectorize(sch.get_loops(unpad)[-1])
        else:
            _inline_consumers(sch, write_back)
        sch.reverse_compute_at(write_back, tile_root, preserve_unit_loops=True)
        # vectorize and parallelize while the update is still a reduction block: after
        # decompose_reduction it has no init, and both refuse a loop over such a block
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(write_back)[-1])
        for loop in inner:
            sch.unroll(loop)
        sch.parallel(sch.fuse(*outer, jo) if outer else jo)
        init = sch.decompose_reduction(main, reduce[0])
        sch.vectorize(sch.get_loops(init)[-1])


class InnerReduction(ScheduleRule):
    """out[s...] = sum_k f(X[s..., k], ...) with k the trailing (contiguous) axes of every
    operand that uses it: CROWN's concretization A c, |A| r, the bias terms A b, and row sums.
    The reduction is split into vector-wide partial sums (``rfactor``) computed next to each
    output element, then added up."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        found = _single_reduction(func, target)
        if found is None:
            return None
        sch, main = found
        _inline_producers(sch, main)
        block = sch.get(main)
        kinds = [iv.iter_type == tirx.IterVar.DataPar for iv in block.iter_vars]
        nred = kinds.count(False)
        if nred == 0 or any(kinds[len(kinds) - nred:]) or not self._trailing(block, nred):
            return None
        extent = 1
        for iv in block.iter_vars[len(kinds) - nred:]:
            if not isinstance(iv.dom.extent, tirx.IntImm):
                return None
            extent *= int(iv.dom.extent)
        lanes = _lanes(target)
        if extent % lanes:
            return None
        loops = sch.get_loops(main)
        spatial, reduce = loops[:len(kinds) - nred], loops[len(kinds) - nred:]
        k = sch.fuse(*reduce) if len(reduce) > 1 else reduce[0]
        _, ki = sch.split(k, [None, lanes])
        partial = sch.rfactor(ki, factor_axis=len(block.writes[0].region))
        _inline_consumers(sch, main)
        if spatial:
            sch.compute_at(partial, sch.get_loops(main)[len(spatial) - 1], preserve_unit_loops=True)
        p_loops = sch.get_loops(partial)
        lane_loop, outer_k = p_loops[-2], p_loops[-1]
        sch.reorder(outer_k, lane_loop)
        sch.vectorize(lane_loop)
        if spatial:
            sch.parallel(sch.get_loops(main)[0])
        sch.decompose_reduction(partial, outer_k)
        return sch

    @staticmethod
    def _trailing(block: s_tir.SBlock, nred: int) -> bool:
        """Every read that uses a reduction var ends in exactly the reduction vars, in order."""
        red_vars = [iv.var for iv in block.iter_vars[len(block.iter_vars) - nred:]]
        used = False
        for read in block.reads:
            mins = [r.min for r in read.region]
            if not any(_uses(m, v) for m in mins for v in red_vars):
                continue
            tail = mins[len(mins) - nred:]
            if len(tail) != nred or not all(isinstance(t, tirx.Var) and t.same_as(v) for t, v in zip(tail, red_vars)):
                return False
            if any(_uses(m, v) for m in mins[:len(mins) - nred] for v in red_vars):
                return False
            used = True
        return used


def _is_one(extent) -> bool:
    return isinstance(extent, tirx.IntImm) and int(extent) == 1
