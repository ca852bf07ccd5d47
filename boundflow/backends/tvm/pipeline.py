"""Compile a lowered module: the Relax pass list, the CPU target, and the compile cache.

The pass list is TVM's default CPU pipeline written out pass by pass, so that a pass can be
removed and the list can be read. It mirrors apache-tvm 0.27.0.post1,
``tvm/relax/backend/cpu_generic/pipeline.py``: ``get_default_pipeline(target)`` =
``library_dispatch_passes + legalize_passes + dataflow_lower_passes + finalize_passes``
(``tests/test_tvm_executor.py`` checks the names against that file's functions, so a TVM
upgrade that changes them fails loudly). BoundFlow adds three things:

- the CPU schedules (``schedule.schedule_passes``) right after fusion, where TVM's GPU
  pipelines apply dlight: untuned TIR loops are tens of times slower than torch;
- ``DeadCodeElimination`` after ``RewriteDataflowReshape``: that pass turns reshape kernels
  into views but leaves their PrimFuncs in the module, and LLVM compiling dozens of dead
  kernels was most of the compile time;
- a snapshot of the module after the memory passes and before ``VMShapeLower``, where every
  allocation is an explicit call with a symbolic size, for ``collect_relax_memory_stats``.

``MemoryPlanMode`` decides ``StaticPlanBlockMemory``: DEFAULT runs it, DISABLE_STATIC_PLAN
removes it (``LowerAllocTensor`` then gives every tensor its own storage), FORCE_STATIC_PLAN
runs it with ``tir_var_upper_bound`` on the functions, so storage whose size depends on a
symbolic index count is planned (and reused) at its upper bound instead of being allocated at
run time at its actual size.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax import transform as T
from tvm.target import codegen

from boundflow.backends.tvm.analysis import collect_relax_memory_stats
from boundflow.backends.tvm.lower import LoweredModule
from boundflow.backends.tvm.schedule import schedule_passes
from boundflow.runtime.tvm_executor import MemoryPlanMode, TVMExecutorOptions

# the backend's own code goes into every cache key: a changed schedule rule or pass list must
# not be served an on-disk module built by the old one
BACKEND_DIGEST = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(Path(__file__).parent.glob("*.py")))
                                ).hexdigest()
STATIC_PLAN_PASS = "StaticPlanBlockMemory"
SNAPSHOT_BEFORE = "VMShapeLower"

# (stage in cpu_generic/pipeline.py, pass name, factory)
PASSES: list[tuple[str, str, Callable[[], tvm.transform.Pass]]] = [
    ("library_dispatch", "DispatchSampling", relax.backend.DispatchSampling),
    ("library_dispatch", "DispatchSortScan", relax.backend.DispatchSortScan),
    ("legalize", "LegalizeOps", T.LegalizeOps),
    ("legalize", "AnnotateTIROpPattern", T.AnnotateTIROpPattern),
    ("legalize", "FoldConstant", T.FoldConstant),
    ("legalize", "FuseOps", T.FuseOps),
    ("legalize", "FuseTIR", T.FuseTIR),
    ("dataflow_lower", "RewriteDataflowReshape", T.RewriteDataflowReshape),
    ("dataflow_lower", "ToNonDataflow", T.ToNonDataflow),
    ("dataflow_lower", "RemovePurityChecking", T.RemovePurityChecking),
    ("dataflow_lower", "CallTIRRewrite", T.CallTIRRewrite),
    ("finalize", STATIC_PLAN_PASS, T.StaticPlanBlockMemory),
    ("finalize", "LowerAllocTensor", T.LowerAllocTensor),
    ("finalize", "KillAfterLastUse", T.KillAfterLastUse),
    ("finalize", "LowerRuntimeBuiltin", T.LowerRuntimeBuiltin),
    ("finalize", "ComputePrimValue", T.ComputePrimValue),
    ("finalize", "VMShapeLower", T.VMShapeLower),
    ("finalize", "AttachGlobalSymbol", T.AttachGlobalSymbol),
]


def host_target() -> tvm.target.Target:
    """LLVM for this machine's CPU (its vector width matters to the schedules)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def pass_names(mode: MemoryPlanMode) -> list[str]:
    """The TVM passes the pipeline runs in this mode, in order (schedules not included)."""
    drop = STATIC_PLAN_PASS if mode is MemoryPlanMode.DISABLE_STATIC_PLAN else None
    return [name for _, name, _ in PASSES if name != drop]


def build_pipeline(mode: MemoryPlanMode, schedule: str, snapshot: Callable[[tvm.IRModule], None]) -> tvm.transform.Pass:
    """The pass list for one memory plan mode and schedule choice, with the memory snapshot."""
    keep = set(pass_names(mode))
    seq: list[tvm.transform.Pass] = []
    for _, name, factory in PASSES:
        if name not in keep:
            continue
        if name == SNAPSHOT_BEFORE:
            seq.append(_snapshot_pass(snapshot))
        seq.append(factory())
        if name == "FuseTIR":
            seq.extend(schedule_passes(schedule))
        if name == "RewriteDataflowReshape":
            # reshapes are views now; their PrimFuncs are dead, and LLVM would compile them
            seq.append(T.DeadCodeElimination())
    return tvm.transform.Sequential(seq, name="boundflow_cpu_pipeline")


def _snapshot_pass(record: Callable[[tvm.IRModule], None]) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="BoundflowMemorySnapshot")
    def snapshot(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        record(mod)
        return mod

    return snapshot


def with_memory_plan_attrs(lowered: LoweredModule, mode: MemoryPlanMode) -> tvm.IRModule:
    """FORCE_STATIC_PLAN: tell StaticPlanBlockMemory the largest value of each symbolic var of
    each function's signature (and that it is not negative), so it plans those storages
    statically. Other modes: the module unchanged."""
    ir_mod = lowered.ir_mod
    bounded = {f.name: f.upper_bounds for f in lowered.functions if f.upper_bounds}
    if mode is not MemoryPlanMode.FORCE_STATIC_PLAN or not bounded:
        return ir_mod
    funcs = {}
    for gv, func in ir_mod.functions_items():
        bounds = bounded.get(gv.name_hint)
        if bounds:
            func = func.with_attr("tir_var_upper_bound", dict(bounds)).with_attr("tir_non_negative_var", list(bounds))
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=ir_mod.attrs)


# ------------------------------------------------------------------------------------------
# compile + cache
# ------------------------------------------------------------------------------------------
@dataclass
class Compiled:
    """A compiled module: its VM, and what compiling it cost and planned."""

    vm: relax.VirtualMachine
    executable: Any                       # relax.VMExecutable, or the loaded library on a disk hit
    key: str
    compile_stats: dict[str, Any] = field(default_factory=dict)


class CompileCache:
    """Compiled modules by key (see cache_key): structural hash of the module, target, pass list
    and every compile option. Optionally mirrored in a directory as
    ``<key>.so`` (the exported library) and ``<key>.json`` (its compile stats)."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._entries: dict[str, tuple[tvm.IRModule, Compiled]] = {}
        self.stats = {"hits": 0, "misses": 0, "disk_hits": 0, "disk_writes": 0, "compile_ms_total": 0.0}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, lowered: LoweredModule, target: tvm.target.Target,
            options: TVMExecutorOptions) -> tuple[Compiled, str]:
        """The compiled module and where it came from: "hit", "disk" or "miss"."""
        ir_mod = with_memory_plan_attrs(lowered, options.memory_plan_mode)
        key = cache_key(ir_mod, target, options)
        entry = self._entries.get(key)
        if entry is not None and tvm_ffi.structural_equal(entry[0], ir_mod):
            self.stats["hits"] += 1
            return entry[1], "hit"
        compiled = self._load(key)
        if compiled is None:
            compiled = compile_module(lowered, ir_mod, target, options, key)
            self.stats["compile_ms_total"] += compiled.compile_stats["compile_ms"]
            self.stats["misses"] += 1
            self._store(compiled)
            source = "miss"
        else:
            self.stats["disk_hits"] += 1
            source = "disk"
        self._entries[key] = (ir_mod, compiled)
        return compiled, source

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.cache_dir / f"{key}.so", self.cache_dir / f"{key}.json"

    def _load(self, key: str) -> Compiled | None:
        if self.cache_dir is None:
            return None
        lib, meta = self._paths(key)
        if not (lib.is_file() and meta.is_file()):
            return None
        module = tvm.runtime.load_module(str(lib))
        return Compiled(relax.VirtualMachine(module, tvm.cpu()), module, key, json.loads(meta.read_text()))

    def _store(self, compiled: Compiled) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        lib, meta = self._paths(compiled.key)
        tmp_lib, tmp_meta = lib.with_suffix(".tmp.so"), meta.with_suffix(".tmp.json")
        compiled.executable.export_library(str(tmp_lib))
        tmp_meta.write_text(json.dumps(compiled.compile_stats))
        tmp_lib.replace(lib)                     # atomic: a reader never sees half a library
        tmp_meta.replace(meta)
        self.stats["disk_writes"] += 1


def cache_key(ir_mod: tvm.IRModule, target: tvm.target.Target, options: TVMExecutorOptions) -> str:
    """Hex digest over the structural hash of the module as compiled (memory_plan_mode's
    function attributes applied), the target, the pass list and every other compile option.

    memory_plan_mode enters through what it changes, the pass list and the attributes, so
    FORCE_STATIC_PLAN on a module without symbolic sizes, which TVM compiles exactly as
    DEFAULT, shares DEFAULT's entry."""
    opts = options.compile_key()
    mode = MemoryPlanMode(opts.pop("memory_plan_mode"))
    parts = {"ir": tvm_ffi.structural_hash(ir_mod), "target": str(target), "tvm": tvm.__version__,
             "backend": BACKEND_DIGEST, "passes": pass_names(mode), "options": opts}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def compile_module(lowered: LoweredModule, ir_mod: tvm.IRModule, target: tvm.target.Target,
                   options: TVMExecutorOptions, key: str) -> Compiled:
    """Build ir_mod (lowered's module with the mode's attributes) with the pass list of
    options.memory_plan_mode; memory stats per Relax function, from the snapshot before
    VMShapeLower."""
    mode = options.memory_plan_mode
    snapshots: list[tvm.IRModule] = []
    pipeline = build_pipeline(mode, options.schedule, snapshots.append)
    t0 = time.perf_counter()
    with target:
        executable = tvm.compile(ir_mod, target, relax_pipeline=pipeline)
    t1 = time.perf_counter()
    vm = relax.VirtualMachine(executable, tvm.cpu())   # LLVM emits the machine code here (JIT)
    t2 = time.perf_counter()
    snapshot = snapshots[-1]
    functions = {f.name: {"memory_stats": collect_relax_memory_stats(snapshot, f.upper_bounds, function=f.name),
                          "upper_bounds": dict(f.upper_bounds)}
                 for f in lowered.functions}
    kernels = [f for _, f in snapshot.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    stats = {
        "memory_plan_mode": mode.value,
        "compile_ms": (t2 - t0) * 1e3,
        "jit_ms": (t2 - t1) * 1e3,
        "passes": pass_names(mode),
        "schedule": options.schedule,
        "kernels": len(kernels),
        "kernels_scheduled": sum(bool(f.attrs and f.attrs.get("tirx.is_scheduled")) for f in kernels),
        "forced_upper_bounds": mode is MemoryPlanMode.FORCE_STATIC_PLAN
                               and any(f.upper_bounds for f in lowered.functions),
        "functions": functions,
    }
    return Compiled(vm, executable, key, stats)
