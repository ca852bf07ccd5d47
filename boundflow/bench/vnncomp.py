"""VNN-COMP 2021 subsets: solved counts, wrong answers and whole-process time per benchmark.

    python -m boundflow.bench.vnncomp --json out.json --benchmarks mnistfc,acasxu,oval21 \\
        --limit 10 --timeout-cap 30 [--filter mnistfc=256x2] [--jobs 1]
    python -m boundflow.bench.vnncomp --preset issue --json out.json
    python -m boundflow.bench.vnncomp --preset ops --json out.json
    python -m boundflow.bench.vnncomp --preset deep --json out.json
    python -m boundflow.bench.vnncomp --benchmarks acasxu --limit 45 --ray local --jobs 2 --json out.json

``--preset issue`` runs the subsets the verification issue sets as the target (all 30 mnistfc
mnist-net_256x2 instances at a 60 s cap, the first 45 ACAS Xu instances at 60 s, the first 5
oval21 instances at 120 s) and puts alpha-beta-CROWN's reference numbers beside ours, with the
ratios: solved counts, and its median time over ours on the same instances (ACAS Xu: its
reference covers the first 10). ``--preset ops`` runs the operators issue's subsets of
../shared/benchmarks/vnncomp2021_ops (ERAN's Sigmoid network and VeriVital's MaxPool network,
the first 10 instances each, at 60 s) beside alpha-beta-CROWN's 2021 answers (on a GPU).
``--preset deep`` runs the deeper-networks issue's targets: every mnist-net_256x4 and
mnist-net_256x6 instance, every oval21 and every ACAS Xu instance, each at its own timeout
(hours in all), one instance at a time with all the machine's cores (the targets are per
instance, on this machine).

Every run also puts alpha-beta-CROWN's VNN-COMP 2021 answers (expected.csv, on the
competition's GPU machine) on the same instances beside ours: its solved count and median time.

Each instance runs as a fresh ``boundflow verify`` process with ``--threads`` torch threads
(default: one, as the reference numbers were measured; ``--preset deep``: the cores divided by
``--jobs``), timed from
launch to exit, as VNN-COMP measures it (Python and torch start-up included). Instances are the
first ``--limit`` lines of ``<benchmark>/<benchmark>_instances.csv`` (after ``--filter``), with
timeouts capped at ``--timeout-cap``. Medians are over all instances run (unsolved ones count
with the time they took) and over the solved ones. Parallel jobs (``--jobs``) share the
machine's cores, so keep 1 for timings.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from boundflow.bench.common import machine_info, shared_dir, table, versions, write_json
from boundflow.verify import suite


# alpha-beta-CROWN (Dec 2025 release) on a machine like ours, one torch thread, its VNN-COMP 2021
# configs without MIP solvers or CPLEX cuts, whole-process times, as the issue reports them
# (its subsets: the first ``instances`` after the onnx ``filter``)
REFERENCE = {
    "mnistfc": {"tool": "alpha-beta-CROWN", "filter": "256x2", "instances": 30, "solved": 29, "median_s": 11.0},
    "acasxu": {"tool": "alpha-beta-CROWN", "filter": "", "instances": 10, "solved": 10, "median_s": 14.0},
    "oval21": {"tool": "alpha-beta-CROWN", "filter": "", "instances": 5, "solved": 4, "median_s": 40.2},
    # VNN-COMP 2021 on the competition's GPU machine (vnncomp2021_ops/expected.csv; ERAN: the
    # operators issue counts 8 solved within 300 s)
    "eran": {"tool": "alpha-beta-CROWN 2021 (GPU)", "filter": "", "instances": 10, "solved": 8, "median_s": 9.06},
    "verivital": {"tool": "alpha-beta-CROWN 2021 (GPU)", "filter": "", "instances": 10, "solved": 10, "median_s": 6.7},
}


@dataclass(frozen=True)
class Run:
    """The instances of one benchmark a run takes: those whose onnx name contains
    ``onnx_filter``, the first ``limit`` (None: all), timeouts capped at ``cap`` (None: each
    instance's own)."""
    benchmark: str
    onnx_filter: str = ""
    limit: int | None = None
    cap: float | None = None


# run name -> its instances
PRESETS = {"issue": {"mnistfc": Run("mnistfc", "256x2", 30, 60.0), "acasxu": Run("acasxu", "", 45, 60.0),
                     "oval21": Run("oval21", "", 5, 120.0)},
           "ops": {"eran": Run("eran", "", 10, 60.0), "verivital": Run("verivital", "", 10, 60.0)},
           "deep": {"mnistfc 256x4": Run("mnistfc", "256x4"), "mnistfc 256x6": Run("mnistfc", "256x6"),
                    "oval21": Run("oval21"), "acasxu": Run("acasxu")}}
# where each benchmark's folder is under ../shared/benchmarks
SUITES = {"eran": "vnncomp2021_ops", "verivital": "vnncomp2021_ops"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m boundflow.bench.vnncomp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON here ('-': stdout)")
    p.add_argument("--benchmarks", default="mnistfc,acasxu,oval21", help="comma-separated (default: %(default)s)")
    p.add_argument("--limit", type=int, default=10, help="first N instances per benchmark (default: %(default)s)")
    p.add_argument("--timeout-cap", type=float, default=60.0, help="seconds (default: %(default)s)")
    p.add_argument("--filter", action="append", default=[], metavar="BENCH=TEXT",
                   help="keep only instances of BENCH whose onnx name contains TEXT (repeatable)")
    p.add_argument("--method", default="crown", help="bound method of the search (default: %(default)s)")
    p.add_argument("--jobs", type=int, help="instances in parallel (default: 1; with --ray: the Ray's CPUs)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per instance (default: 1; --preset deep: the cores / --jobs)")
    p.add_argument("--ray", metavar="local|auto|ADDRESS", help="run the instances as Ray tasks (as run-suite --ray)")
    p.add_argument("--data-root", metavar="DIR", help="with --ray: as run-suite --data-root")
    p.add_argument("--shared", help="the shared data folder (default: $BOUNDFLOW_SHARED or ../shared)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="fixed subsets with their caps and the reference numbers (overrides "
                        "--benchmarks, --limit, --timeout-cap, --filter)")
    return p.parse_args(argv)


def threads_per_instance(args) -> int:
    """``--threads``, else 1, but for ``--preset deep`` (its targets are per instance on the whole
    machine) the cores shared by the local jobs."""
    if args.threads:
        return args.threads
    if args.preset == "deep" and not args.ray:
        return max(1, (os.cpu_count() or 1) // (args.jobs or 1))
    return 1


def plan_runs(args) -> dict[str, Run]:
    """Run name -> its instances."""
    if args.preset:
        return dict(PRESETS[args.preset])
    filters = {name: text for name, _, text in (f.partition("=") for f in args.filter)}
    return {b: Run(b, filters.get(b, ""), args.limit, args.timeout_cap)
            for b in (b.strip() for b in args.benchmarks.split(",")) if b}


def suite_folder(shared: str | None, benchmark: str) -> Path:
    return shared_dir(shared) / "benchmarks" / SUITES.get(benchmark, "vnncomp2021")


def select(shared: str | None, run: Run) -> list[suite.Instance]:
    csv_path = suite_folder(shared, run.benchmark) / run.benchmark / f"{run.benchmark}_instances.csv"
    instances = [i for i in suite.read_instances(csv_path, run.cap) if run.onnx_filter in i.onnx]
    return instances[:run.limit]


def abcrown_2021(shared: str | None, benchmark: str, outcomes: list[suite.Outcome]) -> dict | None:
    """alpha-beta-CROWN's VNN-COMP 2021 answers on the same instances (expected.csv columns
    abcrown_2021_result/_s; its timeouts were the competition's): solved count and median
    time, beside ours; None when expected.csv has no such columns."""
    path = suite_folder(shared, benchmark) / "expected.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        # by file name: expected.csv names oval21's properties with their folder ("vnnlib/...")
        rows = {(Path(r["onnx"]).name, Path(r["vnnlib"]).name): r for r in csv.DictReader(f)
                if r.get("benchmark") == benchmark}
    theirs = [rows.get((Path(o.instance.onnx).name, Path(o.instance.vnnlib).name)) for o in outcomes]
    if not outcomes or any(r is None or not r.get("abcrown_2021_result") for r in theirs):
        return None
    secs = [float(r["abcrown_2021_s"]) for r in theirs]
    solved = [r["abcrown_2021_result"] in suite.SOLVED for r in theirs]
    ours = summarise(outcomes)
    return {"tool": "alpha-beta-CROWN, VNN-COMP 2021 (GPU)", "instances": len(outcomes), "solved": sum(solved),
            "median_s": statistics.median(secs), "ours_solved": ours["solved"], "ours_median_s": ours["median_s"],
            "solved_minus_abcrown": ours["solved"] - sum(solved),
            "only_abcrown": [_name(o) for o, s in zip(outcomes, solved) if s and o.verdict not in suite.SOLVED],
            "only_ours": [_name(o) for o, s in zip(outcomes, solved) if not s and o.verdict in suite.SOLVED]}


def _name(outcome: suite.Outcome) -> str:
    """The instance as its model and property file names (ACAS Xu's nets share properties)."""
    return f"{Path(outcome.instance.onnx).name} {Path(outcome.instance.vnnlib).name}"


def against_reference(benchmark: str, text: str, outcomes: list[suite.Outcome]) -> dict | None:
    """The reference beside ours on the instances it covers (the same filter, the first
    ``instances``); None when this run does not cover them."""
    ref = REFERENCE.get(benchmark)
    if ref is None or text != ref["filter"] or len(outcomes) < ref["instances"]:
        return None
    ours = summarise(outcomes[: ref["instances"]])
    return {"reference": ref,
            "ours_on_same": {"instances": ref["instances"], "solved": ours["solved"], "median_s": ours["median_s"],
                             "wrong": ours["wrong"]},
            "solved_minus_reference": ours["solved"] - ref["solved"],
            "median_speedup": ref["median_s"] / ours["median_s"] if ours["median_s"] else None}


def summarise(outcomes: list[suite.Outcome]) -> dict:
    counts = suite.tally(outcomes)
    secs = [o.seconds for o in outcomes]
    solved = [o.seconds for o in outcomes if o.verdict in suite.SOLVED]
    return {
        "instances": len(outcomes),
        "solved": len(solved),
        **counts,
        "median_s": statistics.median(secs) if secs else None,
        "median_solved_s": statistics.median(solved) if solved else None,
        "total_s": sum(secs),
        "rows": [{"onnx": o.instance.onnx, "vnnlib": o.instance.vnnlib, "timeout": o.instance.timeout,
                  "verdict": o.verdict, "seconds": o.seconds, "expected": o.instance.expected,
                  "wrong": o.wrong, "message": o.message} for o in outcomes],
    }


def run_benchmark(name: str, run: Run, args, runner) -> dict:
    """Run one run's instances with ``runner``, a progress line each; its summary."""
    instances = select(args.shared, run)
    cap = "each instance's own timeout" if run.cap is None else f"timeout cap {run.cap} s"
    print(f"{name}: {len(instances)} instances, {cap}, {runner.describe()}", flush=True)
    t0 = time.perf_counter()
    outcomes = suite.run_reported(instances, runner, color=sys.stdout.isatty(),
                                  emit=lambda line: print(line, flush=True))
    result = summarise(outcomes)
    result["wall_s"] = time.perf_counter() - t0
    result["versus"] = against_reference(run.benchmark, run.onnx_filter, outcomes)
    result["abcrown_2021"] = abcrown_2021(args.shared, run.benchmark, outcomes)
    return result


def main(argv=None) -> int:
    from boundflow.verify.commands import suite_runner

    args = parse_args(argv)
    runs = plan_runs(args)
    threads = threads_per_instance(args)
    t0 = time.perf_counter()
    with suite_runner(args.ray, args.jobs, args.method, threads, args.data_root) as runner:
        start_s = time.perf_counter() - t0     # a Ray's start (--ray local) or joining a cluster
        results = {name: run_benchmark(name, run, args, runner) for name, run in runs.items()}
        slots = runner.describe()
    if args.ray:
        print(f"\nRay ({args.ray}): {start_s:.1f} s to start or join, not in the wall times")
    rows = [[b, r["instances"], r["solved"], r["holds"], r["violated"], r["unknown"] + r["timeout"],
             r["error"], r["wrong"], f"{r['median_s']:.2f}", f"{r['median_solved_s'] or 0:.2f}", f"{r['wall_s']:.1f}"]
            for b, r in results.items()]
    print()
    print(table(rows, ["run", "n", "solved", "holds", "violated", "unsolved", "error", "wrong",
                       "median s", "median solved s", "wall s"]))
    versus = [[b, v["reference"]["instances"], v["ours_on_same"]["solved"], v["reference"]["solved"],
               f"{v['ours_on_same']['median_s']:.2f}", f"{v['reference']['median_s']:.2f}",
               f"{v['median_speedup']:.1f}x" if v["median_speedup"] else "-"]
              for b, r in results.items() if (v := r["versus"])]
    if versus:
        print()
        print(table(versus, ["benchmark", "same n", "solved", "ref solved", "median s", "ref median s",
                             "ref / ours"]))
    abcrown = [[b, a["instances"], a["ours_solved"], a["solved"], f"{a['ours_median_s']:.2f}", f"{a['median_s']:.2f}"]
               for b, r in results.items() if (a := r["abcrown_2021"])]
    if abcrown:
        print()
        print(table(abcrown, ["run", "n", "solved", "abcrown 2021 solved", "median s", "abcrown 2021 median s"]))
    out = {"benchmark": "vnncomp2021", "machine": machine_info(), "versions": versions(),
           "config": {"runs": {name: {"benchmark": r.benchmark, "onnx_filter": r.onnx_filter, "limit": r.limit,
                                      "timeout_cap_s": r.cap} for name, r in runs.items()},
                      "preset": args.preset, "method": args.method, "jobs": args.jobs,
                      "ray": args.ray, "runner": slots, "runner_start_s": start_s,
                      "torch_threads_per_instance": threads, "timing": "whole process, launch to exit"},
           "results": results}
    if args.json:
        write_json(out, args.json)
    return 1 if any(r["wrong"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
