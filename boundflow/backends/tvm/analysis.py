"""Memory statistics of a Relax module: what TVM allocates, read off the IR.

``collect_relax_memory_stats(ir_mod)`` counts the allocation calls of every Relax function and
adds up the bytes of the storage ones from their size and dtype. Run it on a module after
``StaticPlanBlockMemory`` and ``LowerAllocTensor`` (the executor snapshots the module just
before ``VMShapeLower``), where every allocation is explicit. Op names by lowering stage, in
TVM 0.27:

  relax.builtin.alloc_tensor                   before memory planning: one per tensor
  relax.memory.alloc_storage / alloc_tensor    after StaticPlanBlockMemory / LowerAllocTensor
  relax.vm.alloc_storage / alloc_tensor        after LowerRuntimeBuiltin

A storage whose size depends on a symbolic variable counts as dynamic; with ``upper_bounds``
(var name -> largest value) its bytes are counted at that bound, else it is reported unbounded
and left out of the byte totals. The totals are what the IR asks for, not a peak: storages with
disjoint lifetimes are still added up. ``VMMemoryProbe`` measures what a run really
allocates, for the side-by-side comparison.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Callable

import tvm
from tvm import relax, tirx

ALLOC_STORAGE_OPS = ("relax.memory.alloc_storage", "relax.vm.alloc_storage")
ALLOC_TENSOR_OPS = ("relax.builtin.alloc_tensor", "relax.memory.alloc_tensor", "relax.vm.alloc_tensor")


def collect_relax_memory_stats(ir_mod: tvm.IRModule, upper_bounds: dict[str, int] | None = None,
                               function: str | None = None) -> dict[str, Any]:
    """Allocation counts and storage bytes of every Relax function in ir_mod (of `function` only
    when given)."""
    upper_bounds = upper_bounds or {}
    stats: dict[str, Any] = {"alloc_storage": 0, "alloc_tensor": 0, "alloc_storage_total_bytes": 0,
                             "alloc_storage_max_bytes": 0, "alloc_storage_dynamic": 0,
                             "alloc_storage_unbounded": 0, "constant_bytes": 0, "op_names": {}}

    def visit(expr):
        if isinstance(expr, tvm.ir.Constant) and isinstance(expr.ty, relax.TensorType):
            stats["constant_bytes"] += _tensor_bytes(expr.value)
        if not isinstance(expr, tvm.ir.Call) or not isinstance(expr.op, tvm.ir.Op):
            return
        name = expr.op.name
        if name in ALLOC_TENSOR_OPS:
            stats["alloc_tensor"] += 1
        elif name in ALLOC_STORAGE_OPS:
            stats["alloc_storage"] += 1
            nbytes, dynamic = _storage_bytes(expr, upper_bounds)
            stats["alloc_storage_dynamic"] += dynamic
            if nbytes is None:
                stats["alloc_storage_unbounded"] += 1
            else:
                stats["alloc_storage_total_bytes"] += nbytes
                stats["alloc_storage_max_bytes"] = max(stats["alloc_storage_max_bytes"], nbytes)
        else:
            return
        stats["op_names"][name] = stats["op_names"].get(name, 0) + 1

    for gv, func in ir_mod.functions_items():
        if isinstance(func, relax.Function) and function in (None, gv.name_hint):
            relax.analysis.post_order_visit(func, visit)
    return stats


def _storage_bytes(call: tvm.ir.Call, upper_bounds: dict[str, int]) -> tuple[int | None, bool]:
    """(bytes, depends on a symbolic var) of an alloc_storage call: its size shape times the
    width of its dtype argument."""
    size = call.args[0]
    if not isinstance(size, relax.ShapeExpr):
        return None, True
    width = next(a.value.bits // 8 for a in call.args[1:] if isinstance(getattr(a, "value", None), tvm.DataType))
    n, dynamic = 1, False
    for dim in size.values:
        if not isinstance(dim, tirx.IntImm):
            dynamic = True
            dim = _at_upper_bound(dim, upper_bounds)
            if dim is None:
                return None, True
        n *= int(dim)
    return n * width, dynamic


def _at_upper_bound(expr, upper_bounds: dict[str, int]) -> int | None:
    """expr with every var at its upper bound (allocation sizes grow with their vars), or None."""
    free = tirx.analysis.undefined_vars(expr)
    if any(v.name not in upper_bounds for v in free):
        return None
    analyzer = tvm.sym.Analyzer()
    for v in free:
        analyzer.bind(v, tirx.IntImm("int64", upper_bounds[v.name]))   # shape vars are int64
    value = analyzer.simplify(expr)
    return int(value) if isinstance(value, tirx.IntImm) else None


def _tensor_bytes(data) -> int:
    n = 1
    for d in data.shape:
        n *= int(d)
    return n * (tvm.DataType(str(data.dtype)).bits // 8)


# ------------------------------------------------------------------------------------------
# measured: what the VM really allocates during a run
# ------------------------------------------------------------------------------------------
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_in_use() -> Callable[[], int] | None:
    """glibc's count of heap bytes in use (small blocks + mmapped ones), or None off glibc."""
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class VMMemoryProbe:
    """Measures what a Relax VM allocates while it runs a function.

    TVM 0.27 exposes no allocator statistics to Python (its pooled allocator keeps its
    counters in C++; the only registered memory-manager function is ``clear``). So the probe
    runs the executable on a VM with the *naive* allocator, whose every ``alloc_storage`` is a
    heap allocation freed when the storage dies, and samples glibc's bytes-in-use
    (``mallinfo2``) after every VM call instruction: the largest rise over the value at the
    call's start is the function's peak. It also adds up the sizes the ``alloc_storage`` calls
    ask for at run time (symbolic sizes resolved), to set beside the IR-side estimate. The
    samples also see the probe's own small Python objects (a few KB)."""

    def __init__(self, executable):
        self.in_use = _heap_in_use()
        self.vm = relax.VirtualMachine(executable, tvm.cpu(), memory_cfg="naive")
        self._base = self._peak = self._calls = self._bytes = 0
        self.vm.set_instrument(self._instrument)

    @property
    def available(self) -> bool:
        return self.in_use is not None

    def _instrument(self, func, symbol, before, ret, *args) -> int:
        if before and symbol == "vm.builtin.alloc_storage":
            self._calls += 1
            self._bytes += _shape_bytes(args[1], args[3])
        if not before and self.in_use is not None:
            self._peak = max(self._peak, self.in_use() - self._base)
        return 0        # VMInstrumentReturnKind.kNoOp: run the call as usual

    def call(self, name: str, *args):
        """Run function `name`; returns (its result, {peak_bytes, alloc_storage_calls,
        alloc_storage_bytes})."""
        self._peak = self._calls = self._bytes = 0
        self._base = self.in_use() if self.in_use is not None else 0
        out = self.vm[name](*args)
        return out, {"peak_bytes": self._peak if self.in_use is not None else None,
                     "alloc_storage_calls": self._calls, "alloc_storage_bytes": self._bytes}


def _shape_bytes(shape, dtype: str) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * (tvm.DataType(str(dtype)).bits // 8)
