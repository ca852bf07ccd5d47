"""Memory benchmark of the storage plan: ``python -m boundflow.bench.memory --json FILE
[--plot out.png] [--quick] [--models NAME ...] [--repeats N] [--runs N]``.

For each model and method (IBP, CROWN) it plans with storage reuse on and off
(``PlannerConfig.enable_storage_reuse``) and reports, both ways:

- planned bytes: ``logical_bytes`` (every logical buffer on its own), ``physical_bytes`` (the
  arenas) and ``peak_planned_bytes`` (the most bytes live at once: no plan can do better);
- the measured peak of a run, each configuration in a fresh subprocess (``--child``). There the
  model is loaded and planned first; that process's memory is the baseline. Then
    ``rss_peak_delta_bytes``: the RSS high-water mark (VmHWM, reset through
    /proc/self/clear_refs after the baseline) minus the baseline RSS, over ``--runs`` runs of a
    fresh PythonTaskExecutor (arena pages count once written);
    ``profiler_peak_bytes``: the most bytes torch's CPU allocator held during one run of another
    fresh executor, from ``torch.profiler`` with ``profile_memory=True`` (its allocation events
    summed in time order; the arena counts at its full size), and
    ``profiler_peak_minus_arena_bytes``: the temporaries a run holds besides the arena;
- run time: the two configurations timed side by side in this process (one torch thread,
  ``time_interleaved``; at least ``--repeats`` runs each, more for short runs so that the timed
  runs take ``--min-time`` seconds): wall-clock and thread-CPU medians, and reuse-on / reuse-off
  ratios.

Cases: mnist-net_256x6 (mnistfc) on the box of prop_0_0.03.vnnlib; oval21 cifar_wide_kw on the
L-inf box of radius 2/255 around a fixed random image in [0, 1] (torch seed 0), clipped to
[0, 1]; the golden small models (mlp_small, cnn_small, permute_net, resnet_block) on a fixture's
box. Bounds are on every output (no spec matrix). ``--quick`` runs CROWN on permute_net with few
repeats.

Checks (``checks`` in the JSON): for CROWN on mnist-net_256x6 and cifar_wide_kw, physical bytes
with reuse at most half the logical bytes, and both measured peaks lower with reuse than without;
on every row, reuse slows a run by at most 5% (median thread-CPU time ratio <= 1.05).

``--plot`` writes a PNG of one plan's packing (``--plot-case``, default mnist-net_256x6; CROWN;
the first case when that one is not run): one rectangle per logical buffer, x its lifetime in
op steps, y its bytes in the arena, with reuse on (left) and off (right).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import boundflow
from boundflow.bench.common import (fmt, machine_info, shared_dir, table, time_interleaved, time_once, versions,
                                    write_json)
from boundflow.bench.methods import Case, fixture_case, model_case, select
from boundflow.ir.task import BFTaskModule
from boundflow.planner.config import PlannerConfig
from boundflow.planner.liveness import op_lifetimes
from boundflow.planner.pipeline import plan
from boundflow.runtime.python_executor import PythonTaskExecutor

METHODS = ("ibp", "crown")
CIFAR_EPS = 2 / 255
CIFAR_SEED = 0
GOLDEN_SMALL = ("mlp_small__eps0.05", "cnn_small__eps0.02", "permute_net__eps0.05", "resnet_block__eps0.01")
CHECKED_CASES = ("mnist-net_256x6__prop_0_0.03", "cifar_wide_kw__eps2_255")
QUICK_CASES = ("permute_net__eps0.05",)
QUICK_METHODS = ("crown",)       # each method costs two fresh processes
PLOT_CASE = "mnist-net_256x6__prop_0_0.03"
MAX_SLOWDOWN = 1.05
QUICK = {"repeats": 5, "warmup": 1, "runs": 1, "min_time": 0.05}
DEFAULT = {"repeats": 40, "warmup": 3, "runs": 3, "min_time": 2.0}
MAX_REPEATS = 5000
CONFIGS = {"reuse_on": True, "reuse_off": False}


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------
def cifar_case(shared: Path) -> Case:
    """cifar_wide_kw on [x0 - eps, x0 + eps] clipped to [0, 1], x0 = torch.rand with a fixed seed."""
    x0 = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(CIFAR_SEED))
    lo, hi = (x0 - CIFAR_EPS).clamp(0, 1), (x0 + CIFAR_EPS).clamp(0, 1)
    path = shared / "benchmarks" / "vnncomp2021" / "oval21" / "nets" / "cifar_wide_kw.onnx"
    return Case("cifar_wide_kw__eps2_255", path, f"linf eps=2/255 around torch.rand seed {CIFAR_SEED}, clip [0,1]",
                lo.numpy().ravel(), hi.numpy().ravel(), None)


def all_cases(shared: Path) -> list[Case]:
    cases = [model_case(shared, "mnistfc/mnist-net_256x6.onnx", "mnistfc/prop_0_0.03.vnnlib"), cifar_case(shared)]
    for name in GOLDEN_SMALL:
        fx = fixture_case(shared / "golden", name)
        cases.append(Case(fx.name, fx.model, fx.box, fx.lower, fx.upper, None))
    return cases


def case_inputs(case: Case, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The executor's inputs for one region: box = stack(lower, upper), [2, 1, *input_shape]."""
    lo = torch.from_numpy(case.lower).reshape((1,) + input_shape)
    hi = torch.from_numpy(case.upper).reshape((1,) + input_shape)
    return {"box": torch.stack((lo, hi))}


def plan_case(case: Case, method: str, reuse: bool) -> tuple[BFTaskModule, dict[str, torch.Tensor]]:
    graph, _ = boundflow.api.load_model(str(case.model))
    module = plan(graph, method, PlannerConfig(enable_storage_reuse=reuse))
    return module, case_inputs(case, tuple(graph.shape(graph.inputs[0])))


# --------------------------------------------------------------------------------------------
# measuring one configuration (in its own process)
# --------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def reset_rss_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def profiler_peak_bytes(prof) -> int:
    """The most bytes the CPU allocator held at once during a torch.profiler(profile_memory=True)
    session: every event's own allocations minus frees, summed in time order."""
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak


@torch.no_grad()
def measure(case: Case, method: str, reuse: bool, runs: int) -> dict[str, Any]:
    """Measured peaks of running one plan, above the baseline after loading and planning."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    module, inputs = plan_case(case, method, reuse)
    gc.collect()
    hwm_reset = reset_rss_peak()
    base = _proc_status_kib("VmRSS")
    executor = PythonTaskExecutor()
    for _ in range(runs):
        executor.run(module, inputs)
    rss_delta = (_proc_status_kib("VmHWM") - base) * 1024 if hwm_reset else None
    arena = executor.stats["arena_bytes"]
    del executor
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        PythonTaskExecutor().run(module, inputs)
    peak = profiler_peak_bytes(prof)
    return {"rss_peak_delta_bytes": rss_delta, "rss_hwm_reset": hwm_reset, "rss_baseline_bytes": base * 1024,
            "profiler_peak_bytes": peak, "arena_bytes": arena, "profiler_peak_minus_arena_bytes": peak - arena}


def measure_in_subprocesses(case: Case, method: str, shared: Path, runs: int) -> dict[str, dict[str, Any]]:
    """measure() for reuse on and off, each in a fresh Python process (the two run at once: each
    measures only its own memory)."""
    procs = {label: subprocess.Popen([sys.executable, "-m", "boundflow.bench.memory", "--child", case.name, method,
                                      label, "--runs", str(runs), "--shared", str(shared)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for label in CONFIGS}
    out = {}
    for label, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {case.name} {method} {label} failed (exit {proc.returncode}):\n{stderr}")
        out[label] = json.loads(stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------------------------
# one row: a case and a method, reuse on and off
# --------------------------------------------------------------------------------------------
def _plan_numbers(module: BFTaskModule) -> dict[str, Any]:
    s = module.stats
    return {k: s[k] for k in ("logical_bytes", "physical_bytes", "peak_planned_bytes", "num_buffers", "reuse_stats")}


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run_row(case: Case, method: str, shared: Path, repeats: int, warmup: int, runs: int,
            min_time: float) -> dict[str, Any]:
    planned = {label: plan_case(case, method, reuse) for label, reuse in CONFIGS.items()}
    executor = PythonTaskExecutor()
    calls = {label: (lambda m=m, i=i: executor.run(m, i)) for label, (m, i) in planned.items()}
    # short runs get more repeats, so a 5% difference stands out of the timer's noise
    once_ms, _ = time_once(calls["reuse_off"])
    repeats = min(max(repeats, math.ceil(min_time * 1e3 / max(once_ms, 1e-3))), MAX_REPEATS)
    timed = time_interleaved(calls, repeats, warmup)
    results = {label: executor.run(m, i)["bounds"] for label, (m, i) in planned.items()}
    measured = measure_in_subprocesses(case, method, shared, runs)
    row: dict[str, Any] = {"case": case.name, "model": case.model.name, "box": case.box, "method": method}
    for label, (module, _) in planned.items():
        wall, cpu = timed[label]
        row[label] = dict(_plan_numbers(module), **measured[label], time_ms=wall, cpu_ms=cpu)
    on, off = row["reuse_on"], row["reuse_off"]
    row.update(
        physical_over_logical=_ratio(on["physical_bytes"], on["logical_bytes"]),
        rss_peak_ratio=_ratio(on["rss_peak_delta_bytes"], off["rss_peak_delta_bytes"]),
        profiler_peak_ratio=_ratio(on["profiler_peak_bytes"], off["profiler_peak_bytes"]),
        time_ratio=_ratio(on["time_ms"]["median"], off["time_ms"]["median"]),
        cpu_time_ratio=_ratio(on["cpu_ms"]["median"], off["cpu_ms"]["median"]),
        same_bounds=bool(torch.equal(results["reuse_on"], results["reuse_off"])))
    return row


def checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's checks; a check whose case was not run is None."""
    out: dict[str, Any] = {}
    for name in CHECKED_CASES:
        r = next((r for r in rows if r["case"] == name and r["method"] == "crown"), None)
        if r is None:
            out[name] = {"physical_le_half_logical": None, "measured_peak_lower": None}
            continue
        on, off = r["reuse_on"], r["reuse_off"]
        rss_lower = (on["rss_peak_delta_bytes"] is not None and off["rss_peak_delta_bytes"] is not None
                     and on["rss_peak_delta_bytes"] < off["rss_peak_delta_bytes"])
        out[name] = {"physical_le_half_logical": 2 * on["physical_bytes"] <= on["logical_bytes"],
                     "rss_peak_lower": rss_lower,
                     "profiler_peak_lower": on["profiler_peak_bytes"] < off["profiler_peak_bytes"]}
        out[name]["measured_peak_lower"] = out[name]["rss_peak_lower"] and out[name]["profiler_peak_lower"]
    worst = max(rows, key=lambda r: r["cpu_time_ratio"])
    out["reuse_slowdown"] = {"limit": MAX_SLOWDOWN, "worst_cpu_time_ratio": worst["cpu_time_ratio"],
                             "worst_case": f"{worst['case']} {worst['method']}",
                             "pass": all(r["cpu_time_ratio"] <= MAX_SLOWDOWN for r in rows)}
    out["same_bounds"] = all(r["same_bounds"] for r in rows)
    return out


# --------------------------------------------------------------------------------------------
# the packing plot
# --------------------------------------------------------------------------------------------
def packing_rows(module: BFTaskModule) -> list[dict[str, Any]]:
    """One entry per logical buffer: its live interval in op steps ([start, end), op k reading
    at k and writing at k + 0.5), its place in the arenas stacked by dtype, and what it holds."""
    life = op_lifetimes(list(module.ops()), set(module.inputs.values()), set(module.outputs.values()))
    plan_ = module.memory_plan
    base, top = {}, 0
    for dtype in sorted(plan_.arena_bytes):
        base[dtype], top = top, top + plan_.arena_bytes[dtype]
    rows = []
    for b, spec in module.buffers.items():
        dtype, off = plan_.offsets[b]
        rows.append({"id": b, "kind": spec.name.split("(")[0], "dtype": dtype, "start": life[b].start / 2,
                     "end": (life[b].end + 1) / 2, "offset": base[dtype] + off, "bytes": spec.nbytes})
    return rows


def plot_packing(modules: dict[str, BFTaskModule], title: str, path: str) -> None:
    """Buffer lifetimes against arena offset, one panel per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    top = max(m.memory_plan.physical_bytes for m in modules.values())
    unit, scale = ("MiB", 2**20) if top >= 2**20 else ("KiB", 2**10)
    fig, axes = plt.subplots(1, len(modules), figsize=(7 * len(modules), 6), squeeze=False)
    kinds = sorted({r["kind"] for m in modules.values() for r in packing_rows(m)})
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    for ax, (label, module) in zip(axes[0], modules.items()):
        rows = packing_rows(module)
        for r in rows:
            ax.add_patch(Rectangle((r["start"], r["offset"] / scale), r["end"] - r["start"], r["bytes"] / scale,
                                   facecolor=colours[r["kind"]], edgecolor="black", linewidth=0.3, alpha=0.8))
        mp = module.memory_plan
        ax.axhline(mp.physical_bytes / scale, color="red", linestyle="--", linewidth=1)
        ax.set_xlim(min(r["start"] for r in rows) - 0.5, max(r["end"] for r in rows) + 0.5)
        ax.set_ylim(0, mp.physical_bytes / scale * 1.05)
        ax.set_xlabel("op step (lifetime)")
        ax.set_ylabel(f"arena offset ({unit}; float32 arena, then int64)")
        ax.set_title(f"{label}: physical {mp.physical_bytes / scale:.1f} {unit}, "
                     f"logical {mp.logical_bytes / scale:.1f} {unit}, {len(rows)} buffers", fontsize=10)
    handles = [Rectangle((0, 0), 1, 1, facecolor=colours[k]) for k in kinds]
    fig.legend(handles, kinds, loc="lower center", ncol=min(len(kinds), 8), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# report and entry point
# --------------------------------------------------------------------------------------------
def _mib(n) -> str | None:
    return None if n is None else f"{n / 2**20:.3f}"


def report(rows: list[dict[str, Any]], chk: dict[str, Any]) -> str:
    header = ["case", "method", "logical MiB", "phys on", "phys off", "planned peak", "rss on", "rss off",
              "prof on", "prof off", "ms on", "ms off", "cpu ratio"]
    body = []
    for r in rows:
        on, off = r["reuse_on"], r["reuse_off"]
        body.append([r["case"], r["method"], _mib(on["logical_bytes"]), _mib(on["physical_bytes"]),
                     _mib(off["physical_bytes"]), _mib(on["peak_planned_bytes"]), _mib(on["rss_peak_delta_bytes"]),
                     _mib(off["rss_peak_delta_bytes"]), _mib(on["profiler_peak_bytes"]),
                     _mib(off["profiler_peak_bytes"]), fmt(on["time_ms"]["median"]), fmt(off["time_ms"]["median"]),
                     fmt(r["cpu_time_ratio"])])
    lines = [table(body, header), "", "checks:"]
    for name in CHECKED_CASES:
        c = chk[name]
        lines.append(f"  {name} crown: physical <= logical/2: {c['physical_le_half_logical']}; "
                     f"measured peak lower with reuse: {c['measured_peak_lower']}")
    s = chk["reuse_slowdown"]
    lines.append(f"  reuse slows no run by more than {(s['limit'] - 1) * 100:.0f}% (thread-CPU medians): {s['pass']} "
                 f"(worst {fmt(s['worst_cpu_time_ratio'])} on {s['worst_case']})")
    lines.append(f"  identical bounds with reuse on and off: {chk['same_bounds']}")
    return "\n".join(lines)


def _child(args, shared: Path) -> int:
    name, method, label = args.child
    case = next(c for c in all_cases(shared) if c.name == name)
    print(json.dumps(measure(case, method, CONFIGS[label], args.runs)))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m boundflow.bench.memory",
                                 description="Planned and measured peak memory with storage reuse on and off.")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-': stdout)")
    ap.add_argument("--plot", metavar="PNG", help="write the packing plot of one plan to PNG")
    ap.add_argument("--plot-case", default=PLOT_CASE, help=f"the case to plot (default {PLOT_CASE})")
    ap.add_argument("--models", nargs="+", metavar="NAME", help="case names or model stems (glob patterns)")
    ap.add_argument("--repeats", type=int, help=f"timed runs per configuration (default {DEFAULT['repeats']})")
    ap.add_argument("--warmup", type=int, help=f"untimed runs first (default {DEFAULT['warmup']})")
    ap.add_argument("--runs", type=int, help=f"runs inside the RSS measurement (default {DEFAULT['runs']})")
    ap.add_argument("--min-time", type=float, help=f"at least this many seconds of timed runs per configuration "
                                                   f"(more repeats for short runs; default {DEFAULT['min_time']})")
    ap.add_argument("--quick", action="store_true",
                    help=f"{', '.join(QUICK_METHODS)} on {', '.join(QUICK_CASES)} only, few repeats")
    ap.add_argument("--shared", metavar="DIR", help="the shared data folder (default $BOUNDFLOW_SHARED or ../shared)")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "METHOD", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    repeats, warmup, runs, min_time = (preset[k] if getattr(args, k) is None else getattr(args, k)
                                       for k in ("repeats", "warmup", "runs", "min_time"))
    if repeats < 1 or warmup < 0 or runs < 1 or min_time < 0:
        ap.error("need --repeats >= 1, --warmup >= 0, --runs >= 1, --min-time >= 0")
    args.runs = runs
    shared = shared_dir(args.shared)
    if args.child:
        return _child(args, shared)

    torch.set_num_threads(1)
    cases = select(all_cases(shared), args.models or (list(QUICK_CASES) if args.quick else None))
    methods = QUICK_METHODS if args.quick else METHODS
    log = sys.stderr if args.json == "-" else sys.stdout
    machine = machine_info()
    rows = []
    for case in cases:
        for method in methods:
            print(f"running {case.name} {method}", file=log, flush=True)
            rows.append(run_row(case, method, shared, repeats, warmup, runs, min_time))
    chk = checks(rows)
    print(report(rows, chk), file=log, flush=True)
    plotted = None
    if args.plot:
        case = next((c for c in cases if c.name == args.plot_case), cases[0])
        modules = {label: plan_case(case, "crown", reuse)[0] for label, reuse in CONFIGS.items()}
        plot_packing(modules, f"{case.name}, CROWN: buffer lifetimes vs arena offset", args.plot)
        plotted = {"case": case.name, "method": "crown", "path": args.plot}
    if args.json:
        write_json({
            "machine": dict(machine, load_average_end=machine_info()["load_average"]),
            "versions": dict(versions(), boundflow_module=boundflow.__version__),
            "config": {"repeats": repeats, "min_time_s": min_time, "warmup": warmup, "runs": runs, "quick": args.quick,
                       "shared": str(shared), "cases": [c.name for c in cases], "methods": list(methods),
                       "torch_threads": 1, "max_slowdown": MAX_SLOWDOWN,
                       "time_ratio": "reuse_on.time_ms.median / reuse_off.time_ms.median (cpu_time_ratio: "
                                     "the same for cpu_ms)"},
            "results": rows,
            "checks": chk,
            "plot": plotted,
        }, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
