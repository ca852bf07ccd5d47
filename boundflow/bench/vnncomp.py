"""VNN-COMP 2021 subsets: solved counts, wrong answers and whole-process time per benchmark.

    python -m boundflow.bench.vnncomp --json out.json --benchmarks mnistfc,acasxu,oval21 \\
        --limit 10 --timeout-cap 30 [--filter mnistfc=256x2] [--jobs 1]

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

from boundflow.bench.common import machine_info, shared_dir, table, versions, write_json
from boundflow.verify import suite


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
    p.add_argument("--jobs", type=int, default=1, help="instances in parallel (default: %(default)s)")
    p.add_argument("--shared", help="the shared data folder (default: $BOUNDFLOW_SHARED or ../shared)")
    return p.parse_args(argv)


def select(benchmark: str, args) -> list[suite.Instance]:
    csv_path = shared_dir(args.shared) / "benchmarks" / "vnncomp2021" / benchmark / f"{benchmark}_instances.csv"
    instances = suite.read_instances(csv_path, args.timeout_cap)
    for f in args.filter:
        name, _, text = f.partition("=")
        if name == benchmark:
            instances = [i for i in instances if text in i.onnx]
    return instances[: args.limit]


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


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    for benchmark in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
        instances = select(benchmark, args)
        done: list = []

        def report(outcome, total=len(instances)) -> None:
            done.append(outcome)
            print(suite.progress_line(len(done), total, outcome, suite.tally(done), sys.stdout.isatty()),
                  flush=True)

        print(f"{benchmark}: {len(instances)} instances, timeout cap {args.timeout_cap} s", flush=True)
        results[benchmark] = summarise(suite.run_suite(instances, args.jobs, args.method, 1, report))
    rows = [[b, r["instances"], r["solved"], r["holds"], r["violated"], r["unknown"] + r["timeout"],
             r["error"], r["wrong"], f"{r['median_s']:.2f}", f"{r['median_solved_s'] or 0:.2f}"]
            for b, r in results.items()]
    print()
    print(table(rows, ["benchmark", "n", "solved", "holds", "violated", "unsolved", "error", "wrong",
                       "median s", "median solved s"]))
    out = {"benchmark": "vnncomp2021", "machine": machine_info(), "versions": versions(),
           "config": {"timeout_cap_s": args.timeout_cap, "limit": args.limit, "filters": args.filter,
                      "method": args.method, "jobs": args.jobs, "torch_threads_per_instance": 1,
                      "timing": "whole process, launch to exit"},
           "results": results}
    if args.json:
        write_json(out, args.json)
    return 1 if any(r["wrong"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
