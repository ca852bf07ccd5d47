"""Four-quadrant memory ablation: BoundFlow's storage reuse x TVM's StaticPlanBlockMemory.

``python -m boundflow.bench.static_plan_baseline [--models ...] [--min-tasks N] [--warmup N]
[--iters N] [--json FILE] [--plot FILE.png] [--quick]``

The two mechanisms plan different memory. BoundFlow's reuse (``PlannerConfig.
enable_storage_reuse``) places the logical buffers of the whole task DAG in one arena, so
buffers with disjoint lifetimes share bytes *across* tasks; it decides the arena's size
(``storage_plan.physical_bytes``). TVM's ``StaticPlanBlockMemory`` plans the intermediates
*inside* each compiled Relax function (``MemoryPlanMode.DEFAULT`` runs it,
``DISABLE_STATIC_PLAN`` does not); it decides what the functions allocate
(``tvm.alloc_storage_total_bytes``, summed over every function, sizes that depend on the data at
their upper bound). Each row runs one quadrant of one (model, method):

  planner  num_tasks, num_edges, storage_plan (logical/physical buffers and bytes), reuse_stats,
           timings, config_dump
  tvm      memory_plan_mode, alloc_storage / alloc_tensor counts, alloc_storage_total_bytes
           (estimate from the IR), measured (TVMTaskExecutor.measure_memory: heap peak of one
           run on the naive allocator, and the bytes the alloc_storage calls asked for),
           compile_ms and whether the compile cache served the module
  runtime  run_ms and cpu_ms (median and spread over --iters timed runs after --warmup)

``ratios`` compares TVMTaskExecutor (DEFAULT, reuse on) with PythonTaskExecutor (torch kernels,
same plan) per (model, method), timed in the same process with the same thread count.

Models: the golden fixtures (../shared/golden) of the small MLP and CNN, mnist-net_256x2 with the
box of mnistfc prop_0_0.03, and oval21's cifar_base_kw; their own input boxes.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import boundflow
from boundflow.bench.common import fmt, machine_info, shared_dir, table, time_calls, versions, write_json
from boundflow.ir.task import BFTaskModule
from boundflow.planner.config import PlannerConfig
from boundflow.runtime.python_executor import PythonTaskExecutor
from boundflow.runtime.tvm_executor import MemoryPlanMode, TVMExecutorOptions, TVMTaskExecutor, require_tvm

# model name -> golden fixture whose model and box it uses
MODELS = {
    "mlp_small": "mlp_small__eps0.05",
    "cnn_small": "cnn_small__eps0.02",
    "mnist-net_256x2": "mnist-net_256x2__prop_0_0.03",
    "cifar_base_kw": "cifar_base_kw__cifar_base_kw-img2908-eps0.019869281045751634",
}
METHODS = ("ibp", "crown")
QUADRANTS = [(reuse, static) for reuse in (False, True) for static in (False, True)]
QUICK = {"models": ["mlp_small"], "iters": 3, "warmup": 1}
DEFAULT = {"models": list(MODELS), "iters": 20, "warmup": 3}


@dataclass
class Case:
    model: str
    fixture: str
    path: Path
    lower: torch.Tensor        # [*input_shape]
    upper: torch.Tensor


def load_case(shared: Path, model: str) -> Case:
    fixture = MODELS[model]
    raw = json.loads((shared / "golden" / f"{fixture}.json").read_text())
    shape = tuple(raw["input_shape"])
    as_tensor = lambda xs: torch.from_numpy(np.array(xs, dtype=np.float32).reshape(shape))  # noqa: E731
    return Case(model, fixture, shared / "golden" / raw["model"], as_tensor(raw["x_lower"]), as_tensor(raw["x_upper"]))


def select(names: list[str] | None) -> list[str]:
    """Model names matching the glob patterns (every model when None)."""
    if not names:
        return list(MODELS)
    chosen = [m for m in MODELS if any(fnmatch.fnmatch(m, p) for p in names)]
    if not chosen:
        raise SystemExit(f"no model matches {names}; models: {', '.join(MODELS)}")
    return chosen


def storage_plan(module: BFTaskModule) -> dict[str, Any]:
    plan = module.memory_plan
    return {"reuse": plan.reuse, "logical_buffers": len(module.buffers),
            "physical_buffers": len(set(plan.offsets.values())), "logical_bytes": plan.logical_bytes,
            "physical_bytes": plan.physical_bytes, "arena_bytes": dict(plan.arena_bytes)}


def planner_row(module: BFTaskModule) -> dict[str, Any]:
    s = module.stats
    return {"num_tasks": s["num_tasks"], "num_edges": s["num_edges"], "storage_plan": storage_plan(module),
            "reuse_stats": s["reuse_stats"], "timings": s["timings"], "config_dump": module.config_dump}


def tvm_row(executor: TVMTaskExecutor, module: BFTaskModule, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    compiled = executor.compile_stats(module)
    ms = compiled["memory_stats"]
    measured = executor.measure_memory(module, inputs)
    return {"memory_plan_mode": compiled["memory_plan_mode"], "alloc_storage": ms["alloc_storage"],
            "alloc_tensor": ms["alloc_tensor"], "alloc_storage_total_bytes": ms["alloc_storage_total_bytes"],
            "alloc_storage_max_bytes": ms["alloc_storage_max_bytes"],
            "alloc_storage_dynamic": ms["alloc_storage_dynamic"], "constant_bytes": ms["constant_bytes"],
            "measured": {k: measured[k] for k in ("peak_bytes", "alloc_storage_bytes", "method", "allocator")},
            "compile_ms": compiled["compile_ms"], "compile_cache": compiled["cache"],
            "kernels": compiled["kernels"], "kernels_scheduled": compiled["kernels_scheduled"],
            "relax_functions": sum(len(t["functions"]) for t in compiled["tasks"])}


def inputs_for(case: Case, module: BFTaskModule) -> dict[str, torch.Tensor]:
    box = module.buffers[module.inputs["box"]]
    return {"box": torch.stack((case.lower, case.upper)).unsqueeze(1).reshape(box.shape)}


def run_model(case: Case, method: str, min_tasks: int, iters: int, warmup: int) -> tuple[list[dict], dict]:
    """The four quadrant rows of one (model, method), and its TVM/torch time ratio."""
    graph, _ = boundflow.load_model(str(case.path))
    rows, times = [], {}
    reference = None
    for reuse, static in QUADRANTS:
        config = PlannerConfig(min_tasks=min_tasks, enable_storage_reuse=reuse)
        module = boundflow.plan(graph, method, config)
        inputs = inputs_for(case, module)
        mode = MemoryPlanMode.DEFAULT if static else MemoryPlanMode.DISABLE_STATIC_PLAN
        executor = TVMTaskExecutor(TVMExecutorOptions(memory_plan_mode=mode))
        wall, cpu, out = time_calls(lambda: executor.run(module, inputs), iters, warmup)
        if reference is None:
            python = PythonTaskExecutor()
            py_wall, py_cpu, reference = time_calls(lambda: python.run(module, inputs), iters, warmup)
            times["python"] = {"run_ms": py_wall, "cpu_ms": py_cpu}
        if not torch.allclose(out["bounds"], reference["bounds"], rtol=1e-5, atol=1e-5):
            raise AssertionError(f"{case.model} {method}: TVM and Python bounds differ "
                                 f"(max {(out['bounds'] - reference['bounds']).abs().max().item():.3g})")
        if reuse and static:
            times["tvm"] = {"run_ms": wall, "cpu_ms": cpu}
        rows.append({"model": case.model, "fixture": case.fixture, "method": method,
                     "quadrant": {"bf_reuse": reuse, "tvm_static_plan": static},
                     "planner": planner_row(module), "tvm": tvm_row(executor, module, inputs),
                     "runtime": {"run_ms": wall, "cpu_ms": cpu, "arena_bytes": executor.stats["arena_bytes"]}})
    ratio = {"model": case.model, "method": method, "tvm_ms": times["tvm"]["run_ms"]["median"],
             "python_ms": times["python"]["run_ms"]["median"],
             "tvm_cpu_ms": times["tvm"]["cpu_ms"]["median"], "python_cpu_ms": times["python"]["cpu_ms"]["median"]}
    ratio["tvm_over_python"] = ratio["tvm_ms"] / ratio["python_ms"]
    ratio["tvm_over_python_cpu"] = ratio["tvm_cpu_ms"] / ratio["python_cpu_ms"]
    return rows, ratio


def bench_static_plan_baseline(models: list[str] | None = None, methods=METHODS, min_tasks: int = 1,
                               iters: int = DEFAULT["iters"], warmup: int = DEFAULT["warmup"],
                               shared: str | Path | None = None, log=None) -> dict[str, Any]:
    """Every quadrant of every (model, method): {"machine", "versions", "config", "results",
    "ratios"}."""
    tvm = require_tvm()
    root = shared_dir(shared)
    names = select(models)
    machine = machine_info()
    rows, ratios = [], []
    for name in names:
        case = load_case(root, name)
        for method in methods:
            if log:
                print(f"running {name} {method}", file=log, flush=True)
            r, ratio = run_model(case, method, min_tasks, iters, warmup)
            rows.extend(r)
            ratios.append(ratio)
    return {"machine": dict(machine, load_average_end=machine_info()["load_average"],
                            tvm_threads=tvm.runtime.num_threads()),
            "versions": dict(versions(("boundflow", "torch", "numpy", "onnx", "onnxruntime", "apache-tvm"))),
            "config": {"models": names, "methods": list(methods), "min_tasks": min_tasks, "iters": iters,
                       "warmup": warmup, "shared": str(root),
                       "quadrants": "bf_reuse = PlannerConfig.enable_storage_reuse; tvm_static_plan = "
                                    "MemoryPlanMode.DEFAULT (on) / DISABLE_STATIC_PLAN (off)",
                       "alloc_storage_total_bytes": "sum over Relax functions of the IR's alloc_storage sizes, "
                                                    "symbolic sizes at their upper bound",
                       "ratios": "TVMTaskExecutor (DEFAULT, reuse on) / PythonTaskExecutor, median wall and "
                                 "thread-CPU time of run()"},
            "results": rows, "ratios": ratios}


def report(result: dict[str, Any]) -> str:
    header = ["model", "method", "bf reuse", "tvm plan", "tasks", "arena B", "tvm alloc B", "allocs",
              "measured peak B", "run ms", "compile ms"]
    body = []
    for r in result["results"]:
        q, t = r["quadrant"], r["tvm"]
        body.append([r["model"], r["method"], "on" if q["bf_reuse"] else "off", "on" if q["tvm_static_plan"] else "off",
                     r["planner"]["num_tasks"], r["planner"]["storage_plan"]["physical_bytes"],
                     t["alloc_storage_total_bytes"], t["alloc_storage"], t["measured"]["peak_bytes"],
                     fmt(r["runtime"]["run_ms"]["median"]), fmt(t["compile_ms"])])
    ratio_rows = [[x["model"], x["method"], fmt(x["tvm_ms"]), fmt(x["python_ms"]), fmt(x["tvm_over_python"]),
                   fmt(x["tvm_over_python_cpu"])] for x in result["ratios"]]
    return "\n".join([table(body, header), "", "TVM / torch (PythonTaskExecutor), same plan:",
                      table(ratio_rows, ["model", "method", "tvm ms", "torch ms", "ratio", "ratio (cpu)"])])


def plot(result: dict[str, Any], dest: str | Path) -> None:
    """One panel per (method, model), each on its own scale: a bar per quadrant, BoundFlow's
    arena bytes with TVM's alloc_storage bytes stacked on top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(methods), len(models), figsize=(3.2 * len(models), 3.0 * len(methods)),
                             squeeze=False)
    labels = [f"reuse {'on' if reuse else 'off'}\nplan {'on' if static else 'off'}" for reuse, static in QUADRANTS]
    for i, method in enumerate(methods):
        for j, model in enumerate(models):
            ax = axes[i][j]
            quads = [next(r for r in rows if r["model"] == model and r["method"] == method and
                          (r["quadrant"]["bf_reuse"], r["quadrant"]["tvm_static_plan"]) == q) for q in QUADRANTS]
            arena = [q["planner"]["storage_plan"]["physical_bytes"] / 1e3 for q in quads]
            tvm_kb = [q["tvm"]["alloc_storage_total_bytes"] / 1e3 for q in quads]
            xs = np.arange(len(QUADRANTS))
            ax.bar(xs, arena, color="C0", label="BoundFlow arena (physical bytes)")
            ax.bar(xs, tvm_kb, bottom=arena, color="C1", hatch="//", alpha=0.7,
                   label="TVM alloc_storage (sum over functions)")
            ax.set_xticks(xs, labels, fontsize=7)
            ax.set_title(f"{model} {method}", fontsize=9)
            ax.set_ylabel("KB", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("BoundFlow storage reuse x TVM StaticPlanBlockMemory")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m boundflow.bench.static_plan_baseline",
                                 description="BoundFlow storage reuse on/off x TVM StaticPlanBlockMemory on/off, "
                                             "for IBP and CROWN.")
    ap.add_argument("--models", nargs="+", metavar="NAME",
                    help=f"glob patterns over {', '.join(MODELS)} (default: all)")
    ap.add_argument("--min-tasks", type=int, default=1, help="PlannerConfig.min_tasks (default 1)")
    ap.add_argument("--warmup", type=int, help=f"untimed runs (default {DEFAULT['warmup']}, --quick {QUICK['warmup']})")
    ap.add_argument("--iters", type=int, help=f"timed runs (default {DEFAULT['iters']}, --quick {QUICK['iters']})")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-': stdout)")
    ap.add_argument("--plot", metavar="FILE.png", help="write the four-quadrant bar chart")
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK['models'])} only, few runs (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--shared", metavar="DIR", help="the shared data folder (default $BOUNDFLOW_SHARED or ../shared)")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    iters = args.iters if args.iters is not None else preset["iters"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    if iters < 1 or warmup < 0 or args.min_tasks < 1 or args.threads < 1:
        ap.error("need --iters >= 1, --warmup >= 0, --min-tasks >= 1, --threads >= 1")
    torch.set_num_threads(args.threads)
    log = sys.stderr if args.json == "-" else sys.stdout
    result = bench_static_plan_baseline(args.models or preset["models"], METHODS, args.min_tasks, iters, warmup,
                                        args.shared, log)
    result["config"].update(quick=args.quick, threads=args.threads)
    print(report(result), file=log, flush=True)
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
