"""TVMTaskExecutor: runs a BFTaskModule task by task with TVM-compiled Relax functions.

The Python driver is PythonTaskExecutor's: it allocates the arenas the memory plan describes
and walks the tasks in order. Each task is lowered to a Relax function
(``boundflow.backends.tvm.lower``); the functions of a module are compiled together, once, for
the CPU (``...tvm.pipeline``, cached by structural hash, target and options), and each is called
with its input buffers and weights passed as DLPack views of the torch arenas, without copies.
The VM returns fresh tensors (TVM allocates a function's results itself); their bytes are
copied into the planned buffers, as the Python executor copies its kernels' results
(``stats["output_copy_bytes"]``).

Ops with data-dependent output sizes (``bound.unstable``) cannot be compiled: they run as their
torch kernel between Relax functions, on purpose and counted (``options.host_ops``,
``stats["host_op_calls"]``); a task holding one is cut there into several functions.

TVM itself is optional: this module imports it only when an executor is created, and says how
to install it when it is missing.
"""
from __future__ import annotations

import enum
import time
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from boundflow.ops import KERNELS
from boundflow.errors import BoundflowError
from boundflow.ir.task import BFTaskModule
from boundflow.runtime.arena import allocate, bind_inputs, input_views

INSTALL_HINT = 'pip install -e ".[tvm]"'
TVM_ALIGNMENT = 64          # bytes; TVM's DLPack import refuses tensors at other addresses


class TVMUnavailableError(BoundflowError, ImportError):
    """The TVM executor was asked for, but TVM is not installed."""


class MemoryPlanMode(enum.Enum):
    """What TVM's own memory planner (StaticPlanBlockMemory) does inside each function.

    DEFAULT              TVM's default pipeline: intermediates with static sizes share storage
    DISABLE_STATIC_PLAN  the same pass list without StaticPlanBlockMemory: every tensor gets
                         its own storage
    FORCE_STATIC_PLAN    DEFAULT, plus each function's symbolic index counts annotated with
                         their upper bound (``tir_var_upper_bound``, the planned size), so
                         intermediates whose size depends on the data are planned and shared
                         at that bound too, instead of being allocated at run time at their
                         actual size: fewer, static allocations, but sized for the worst case.
                         The same as DEFAULT for functions without a symbolic size (IBP plans
                         have none; the compile cache then shares DEFAULT's module)
    """

    DEFAULT = "default"
    DISABLE_STATIC_PLAN = "disable_static_plan"
    FORCE_STATIC_PLAN = "force_static_plan"


@dataclass(frozen=True)
class TVMExecutorOptions:
    """Every field but cache_dir is part of the compile cache key."""

    memory_plan_mode: MemoryPlanMode = MemoryPlanMode.DEFAULT
    # "boundflow": BoundFlow's CPU schedules, then dlight's CPU rules for the rest;
    # "dlight": dlight's CPU rules only; "none": TVM's untuned default loops
    schedule: str = "boundflow"
    # ops run as their torch kernel between Relax functions (data-dependent output sizes)
    host_ops: tuple[str, ...] = ("bound.unstable",)
    # None: LLVM for this machine's CPU; else a TVM target string (or its JSON form), kind llvm
    target: str | None = None
    # mirror compiled functions in this directory (shared between processes and runs)
    cache_dir: str | None = None

    def __post_init__(self):
        if not isinstance(self.memory_plan_mode, MemoryPlanMode):
            raise ValueError(f"memory_plan_mode must be a MemoryPlanMode, got {self.memory_plan_mode!r}")
        if self.schedule not in ("boundflow", "dlight", "none"):
            raise ValueError(f"schedule must be 'boundflow', 'dlight' or 'none', got {self.schedule!r}")
        object.__setattr__(self, "host_ops", tuple(self.host_ops))

    def compile_key(self) -> dict[str, Any]:
        """The options as plain data, cache_dir left out (it does not change the code)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cache_dir"}
        out["memory_plan_mode"] = self.memory_plan_mode.value
        out["host_ops"] = list(self.host_ops)
        return out


def require_tvm():
    """The tvm module; a TVMUnavailableError naming the install command when it is missing."""
    import boundflow.backends.tvm  # noqa: F401  (first: keeps TVM's pool from pinning this thread)
    try:
        import tvm
    except ImportError as e:
        raise TVMUnavailableError(f"the TVM executor needs Apache TVM, which is not installed ({e}); "
                                  f"install it with: {INSTALL_HINT}") from e
    return tvm


_DEFAULT_CACHES: dict[str | None, Any] = {}


def default_cache(cache_dir: str | None = None):
    """The process-wide compile cache for cache_dir (one per directory, one in memory only)."""
    if cache_dir not in _DEFAULT_CACHES:
        from boundflow.backends.tvm.pipeline import CompileCache
        _DEFAULT_CACHES[cache_dir] = CompileCache(cache_dir)
    return _DEFAULT_CACHES[cache_dir]


@dataclass
class _HostStep:
    kernel: Any
    name: str
    inputs: list[int]
    outputs: list[int]
    params: list[torch.Tensor | None]
    attrs: dict


@dataclass
class _RelaxStep:
    name: str                        # the Relax function
    fn: Any                          # the VM's function of that name
    families: list[int]              # buffer ids whose counts form the leading shape argument
    inputs: list[int]
    params: list[Any]                # tvm tensors (DLPack views of the module's weights)
    outputs: list[int]


@dataclass
class _Prepared:
    arenas: dict[str, torch.Tensor]
    views: list[torch.Tensor | None]          # static views, by buffer id; None for dynamic ones
    tvm_views: list[Any]                      # the same views as tvm tensors
    slots: list[tuple[torch.Tensor, int] | None]
    # role -> an input's view: a caller may write the input there itself and pass the view
    # (bind_inputs then copies nothing)
    inputs: dict
    steps: list[_HostStep | _RelaxStep]
    family_roots: frozenset[int]
    executable: Any                           # the compiled module, for measuring VMs
    compile_info: dict[str, Any] = field(default_factory=dict)


class TVMTaskExecutor:
    """Same interface as PythonTaskExecutor: run(module, inputs) -> outputs, plus stats."""

    name = "tvm"

    def __init__(self, options: TVMExecutorOptions | None = None, cache=None):
        self._tvm = require_tvm()
        from boundflow.backends.tvm import pipeline
        self.options = options or TVMExecutorOptions()
        self.target = (pipeline.host_target() if self.options.target is None
                       else self._tvm.target.Target(self.options.target))
        self.cache = cache if cache is not None else default_cache(self.options.cache_dir)
        self._prepared: weakref.WeakKeyDictionary[BFTaskModule, _Prepared] = weakref.WeakKeyDictionary()
        self.stats: dict[str, Any] = {
            "runs": 0, "prepares": 0, "arena_bytes": 0, "run_ms_total": 0.0,
            "compile_hits": 0, "compile_misses": 0, "compile_disk_hits": 0, "compile_ms_total": 0.0,
            "relax_functions": 0, "relax_calls": 0, "host_op_calls": {}, "output_copy_bytes": 0,
            "weight_copies": 0,
        }

    # -- preparing -----------------------------------------------------------------------
    def prepare(self, module: BFTaskModule) -> _Prepared:
        """Arenas, the lowered and compiled module (from the cache when it can), and the steps."""
        hit = self._prepared.get(module)
        if hit is not None:
            return hit
        if module.device.type != "cpu":
            raise ValueError(f"the TVM executor compiles for the CPU only; this plan is for {module.device} "
                             "(use executor='python', or device='cpu')")
        from boundflow.backends.tvm.lower import LoweredFunction, dynamic_extents, lower_module

        arenas, views, slots = allocate(module, TVM_ALIGNMENT)
        from_dlpack = self._tvm.runtime.from_dlpack
        tvm_views = [None if v is None else from_dlpack(v) for v in views]
        lowered = lower_module(module, self.options.host_ops)
        compiled, source = self.cache.get(lowered, self.target, self.options)
        self._count_compile(source, compiled)
        sources = dict(module.params, **lowered.derived)
        weights = {}
        for name in dict.fromkeys(p for f in lowered.functions for p in f.params):
            t = _aligned(sources[name])
            if t is not sources[name]:
                self.stats["weight_copies"] += 1          # once per plan, not per run
            weights[name] = from_dlpack(t)
        steps: list[_HostStep | _RelaxStep] = []
        for step in lowered.steps:
            if isinstance(step, LoweredFunction):
                steps.append(_RelaxStep(step.name, compiled.vm[step.name], step.families, step.inputs,
                                        [weights[p] for p in step.params], step.outputs))
            else:
                (op,) = step.ops
                steps.append(_HostStep(KERNELS[op.op], op.op, op.inputs, op.outputs,
                                       [module.params[p] if p else None for p in op.params], op.attrs))
        roots = frozenset(e.family for e in dynamic_extents(module).values())
        # the mode is this executor's: a cache entry may be shared with a mode compiling the same
        info = dict(compiled.compile_stats, cache=source, key=compiled.key,
                    memory_plan_mode=self.options.memory_plan_mode.value,
                    tasks={f.name: f.task for f in lowered.functions})
        prepared = _Prepared(arenas, views, tvm_views, slots, input_views(module, views), steps, roots,
                             compiled.executable, info)
        self._prepared[module] = prepared
        self.stats["prepares"] += 1
        self.stats["relax_functions"] += len(lowered.functions)
        self.stats["arena_bytes"] = sum(a.numel() * a.element_size() for a in arenas.values())
        return prepared

    def _count_compile(self, source: str, compiled) -> None:
        if source == "hit":
            self.stats["compile_hits"] += 1
        elif source == "disk":
            self.stats["compile_disk_hits"] += 1
        else:
            self.stats["compile_misses"] += 1
            self.stats["compile_ms_total"] += compiled.compile_stats["compile_ms"]

    def compile_stats(self, module: BFTaskModule) -> dict[str, Any]:
        """How the module was compiled: cache "hit", "disk" or "miss"; compile_ms (build and
        JIT, of the whole module: its tasks are compiled together), passes, kernels and how many
        a schedule rule took; memory_stats over all functions and, per task, memory_plan_mode
        and memory_stats summed over the task's Relax functions."""
        info = self.prepare(module).compile_info
        per_task: dict[int, list[str]] = {}
        for name, task in info["tasks"].items():
            per_task.setdefault(task, []).append(name)
        tasks = [{"task": t, "memory_plan_mode": info["memory_plan_mode"], "functions": names,
                  "memory_stats": sum_memory_stats([info["functions"][n]["memory_stats"] for n in names])}
                 for t, names in sorted(per_task.items())]
        totals = sum_memory_stats([t["memory_stats"] for t in tasks])
        keys = ("memory_plan_mode", "compile_ms", "jit_ms", "cache", "key", "passes", "schedule", "kernels",
                "kernels_scheduled", "forced_upper_bounds")
        return {k: info[k] for k in keys} | {"memory_stats": totals, "tasks": tasks}

    # -- running -------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, module: BFTaskModule, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = self._execute(self.prepare(module), module, inputs, lambda step, args: step.fn(*args))
        self.stats["runs"] += 1
        self.stats["run_ms_total"] += (time.perf_counter() - t0) * 1e3
        return out

    @torch.no_grad()
    def measure_memory(self, module: BFTaskModule, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """A run on a measuring VM (``boundflow.backends.tvm.analysis.VMMemoryProbe``), after a
        warm-up run: per
        Relax function, the IR-side estimate (``alloc_storage_total_bytes``, symbolic sizes at
        their upper bound) beside the measured heap peak and the bytes the alloc_storage calls
        asked for at run time; totals over functions (peak: the largest of any)."""
        from boundflow.backends.tvm.analysis import VMMemoryProbe

        p = self.prepare(module)
        probe = VMMemoryProbe(p.executable)
        measured: dict[str, dict[str, Any]] = {}

        def call(step: _RelaxStep, args: list):
            result, measured[step.name] = probe.call(step.name, *args)
            return result

        for _ in range(2):      # the first run also pays one-off allocations (constants, caches)
            self._execute(p, module, inputs, call)
        functions = {name: dict(m, estimate_bytes=p.compile_info["functions"][name]["memory_stats"]
                                ["alloc_storage_total_bytes"]) for name, m in measured.items()}
        peaks = [m["peak_bytes"] for m in functions.values()]
        return {"memory_plan_mode": self.options.memory_plan_mode.value, "allocator": "naive",
                "method": "glibc mallinfo2 sampled after every VM call instruction" if probe.available
                          else "unavailable (no glibc mallinfo2): peaks are None",
                "estimate_bytes": sum(m["estimate_bytes"] for m in functions.values()),
                "alloc_storage_bytes": sum(m["alloc_storage_bytes"] for m in functions.values()),
                "peak_bytes": max(peaks) if probe.available and peaks else None,
                "functions": functions}

    @torch.no_grad()
    def _execute(self, p: _Prepared, module: BFTaskModule, inputs: dict[str, torch.Tensor], call) -> dict:
        """The driver: inputs into the arena, then every step in order; `call(step, args)` runs
        a Relax step's function."""
        env: list[torch.Tensor | None] = list(p.views)
        tvm_env: list[Any] = list(p.tvm_views)
        bind_inputs(module, env, inputs)
        counts: dict[int, int] = {}
        host_calls = self.stats["host_op_calls"]
        for step in p.steps:
            if isinstance(step, _HostStep):
                results = step.kernel([env[i] for i in step.inputs], step.params, step.attrs)
                host_calls[step.name] = host_calls.get(step.name, 0) + 1
            else:
                args = [tvm_env[i] if tvm_env[i] is not None else self._tvm.runtime.from_dlpack(env[i])
                        for i in step.inputs]
                if step.families:
                    args.insert(0, self._tvm.runtime.ShapeTuple([counts[f] for f in step.families]))
                results = [torch.from_dlpack(t) for t in call(step, args + step.params)]
                self.stats["relax_calls"] += 1
                self.stats["output_copy_bytes"] += sum(t.numel() * t.element_size() for t in results)
            for bid, t in zip(step.outputs, results):
                self._store(p, env, tvm_env, bid, t)
                if bid in p.family_roots:
                    counts[bid] = t.shape[0]
        return {role: env[bid].clone() for role, bid in module.outputs.items()}

    @staticmethod
    def _store(p: _Prepared, env: list, tvm_env: list, bid: int, t: torch.Tensor) -> None:
        """Copy a result into its planned buffer (a view of the data's size when dynamic)."""
        view = p.views[bid]
        if view is None:
            arena, start = p.slots[bid]
            view = arena.narrow(0, start, t.numel()).view(t.shape)
            env[bid] = view
            tvm_env[bid] = None          # converted when a later function reads it
        view.copy_(t)


def sum_memory_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and byte totals added up over functions; the max is the largest of any."""
    out: dict[str, Any] = {}
    for s in stats:
        for k, v in s.items():
            if k == "op_names":
                names = out.setdefault(k, {})
                for name, n in v.items():
                    names[name] = names.get(name, 0) + n
            elif k.endswith("max_bytes"):
                out[k] = max(out.get(k, 0), v)
            else:
                out[k] = out.get(k, 0) + v
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it at an address TVM accepts (DLPack import needs 64-byte alignment;
    weights loaded from ONNX can sit anywhere in their file's buffer)."""
    if t.data_ptr() % TVM_ALIGNMENT == 0 and t.is_contiguous():
        return t
    return t.clone(memory_format=torch.contiguous_format)
