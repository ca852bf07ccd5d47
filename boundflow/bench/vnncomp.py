"""VNN-COMP 2021 subsets: solved counts, wrong answers and whole-process time per benchmark.

    python -m boundflow.bench.vnncomp --json out.json --benchmarks mnistfc,acasxu,oval21 \\
        --limit 10 --timeout-cap 30 [--filter mnistfc=256x2] [--jobs 1]
    python -m boundflow.bench.vnncomp --preset issue --json out.json
    python -m boundflow.bench.vnncomp --preset ops --json out.json
    python -m boundflow.bench.vnncomp --benchmarks acasxu --limit 45 --ray local --jobs 2 --json out.json

``--preset issue`` runs the subsets the verification issue sets as the target (all 30 mnistfc
mnist-net_256x2 instances at a 60 s cap, the first 45 ACAS Xu instances at 60 s, the first 5
oval21 instances at 120 s) and puts alpha-beta-CROWN's reference numbers beside ours, with the
ratios: solved counts, and its median time over ours on the same instances (ACAS Xu: its
reference covers the first 10). ``--preset ops`` runs the operators issue's subsets of
../shared/benchmarks/vnncomp2021_ops (ERAN's Sigmoid network and VeriVital's MaxPool network,
the first 10 instances each, at 60 s) beside alpha-beta-CROWN's 2021 answers (on a GPU).

Each instance runs as a fresh ``boundflow verify`` process with one torch thread, timed from
launch to exit, as VNN-COMP measures it (Python and torch start-up included). Instances are the
first ``--limit`` lines of ``<benchmark>/<benchmark>_instances.csv`` (after ``--filter``), with
timeouts capped at ``--timeout-cap``. Medians are over all instances run (unsolved ones count
with the time they took) and over the solved ones. Parallel jobs (``--jobs``) share the
machine's cores, so keep 1 for timings.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

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
# benchmark -> (onnx filter, first N, timeout cap in s)
PRESETS = {"issue": {"mnistfc": ("256x2", 30, 60.0), "acasxu": ("", 45, 60.0), "oval21": ("", 5, 120.0)},
           "ops": {"eran": ("", 10, 60.0), "verivital": ("", 10, 60.0)}}
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
    p.add_argument("--ray", metavar="local|auto|ADDRESS", help="run the instances as Ray tasks (as run-suite --ray)")
    p.add_argument("--data-root", metavar="DIR", help="with --ray: as run-suite --data-root")
    p.add_argument("--shared", help="the shared data folder (default: $BOUNDFLOW_SHARED or ../shared)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="fixed subsets with their caps and the reference numbers (overrides "
                        "--benchmarks, --limit, --timeout-cap, --filter)")
    return p.parse_args(argv)


def plan_runs(args) -> dict[str, tuple[str, int, float]]:
    """benchmark -> (onnx filter, first N, timeout cap)."""
    if args.preset:
        return dict(PRESETS[args.preset])
    filters = {name: text for name, _, text in (f.partition("=") for f in args.filter)}
    return {b: (filters.get(b, ""), args.limit, args.timeout_cap)
            for b in (b.strip() for b in args.benchmarks.split(",")) if b}


def select(benchmark: str, shared: str | None, text: str, limit: int, cap: float) -> list[suite.Instance]:
    suite_dir = SUITES.get(benchmark, "vnncomp2021")
    csv_path = shared_dir(shared) / "benchmarks" / suite_dir / benchmark / f"{benchmark}_instances.csv"
    instances = [i for i in suite.read_instances(csv_path, cap) if text in i.onnx]
    return instances[:limit]


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


def run_benchmark(benchmark: str, plan: tuple[str, int, float], args, runner) -> dict:
    """Run one benchmark's instances with ``runner``, a progress line each; its summary."""
    text, limit, cap = plan
    instances = select(benchmark, args.shared, text, limit, cap)
    print(f"{benchmark}: {len(instances)} instances, timeout cap {cap} s, {runner.describe()}", flush=True)
    t0 = time.perf_counter()
    outcomes = suite.run_reported(instances, runner, color=sys.stdout.isatty(),
                                  emit=lambda line: print(line, flush=True))
    result = summarise(outcomes)
    result["wall_s"] = time.perf_counter() - t0
    result["versus"] = against_reference(benchmark, text, outcomes)
    return result


def main(argv=None) -> int:
    from boundflow.verify.commands import suite_runner

    args = parse_args(argv)
    runs = plan_runs(args)
    t0 = time.perf_counter()
    with suite_runner(args.ray, args.jobs, args.method, 1, args.data_root) as runner:
        start_s = time.perf_counter() - t0     # a Ray's start (--ray local) or joining a cluster
        results = {benchmark: run_benchmark(benchmark, plan, args, runner) for benchmark, plan in runs.items()}
        slots = runner.describe()
    if args.ray:
        print(f"\nRay ({args.ray}): {start_s:.1f} s to start or join, not in the wall times")
    rows = [[b, r["instances"], r["solved"], r["holds"], r["violated"], r["unknown"] + r["timeout"],
             r["error"], r["wrong"], f"{r['median_s']:.2f}", f"{r['median_solved_s'] or 0:.2f}", f"{r['wall_s']:.1f}"]
            for b, r in results.items()]
    print()
    print(table(rows, ["benchmark", "n", "solved", "holds", "violated", "unsolved", "error", "wrong",
                       "median s", "median solved s", "wall s"]))
    versus = [[b, v["reference"]["instances"], v["ours_on_same"]["solved"], v["reference"]["solved"],
               f"{v['ours_on_same']['median_s']:.2f}", f"{v['reference']['median_s']:.2f}",
               f"{v['median_speedup']:.1f}x" if v["median_speedup"] else "-"]
              for b, r in results.items() if (v := r["versus"])]
    if versus:
        print()
        print(table(versus, ["benchmark", "same n", "solved", "ref solved", "median s", "ref median s",
                             "ref / ours"]))
    out = {"benchmark": "vnncomp2021", "machine": machine_info(), "versions": versions(),
           "config": {"runs": {b: {"onnx_filter": t, "limit": n, "timeout_cap_s": c} for b, (t, n, c) in runs.items()},
                      "preset": args.preset, "method": args.method, "jobs": args.jobs,
                      "ray": args.ray, "runner": slots, "runner_start_s": start_s,
                      "torch_threads_per_instance": 1, "timing": "whole process, launch to exit"},
           "results": results}
    if args.json:
        write_json(out, args.json)
    return 1 if any(r["wrong"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
