"""The ``boundflow verify`` and ``boundflow run-suite`` subcommands (registered by cli.py)."""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

METHODS = ("crown", "crown-ibp", "ibp", "alpha-crown")
# Seconds of the timeout left for writing the result and exiting: the search stops this
# early, so that a last step running over its estimate still ends in time.
EXIT_RESERVE_S = 1.0
# The watchdog answers "timeout" and ends the process this long before the timeout; if it
# cannot (see _Watchdog), the process ends without an answer but the one written first.
WATCHDOG_RESERVE_S = 0.25
KILL_RESERVE_S = 0.05

_VERIFY_EPILOG = """\
The property is a VNN-COMP VNNLIB file: it asserts a counterexample (input box(es) and an
unsafe output set). Verdicts:
  holds     every disjunct of the unsafe set is proven unreachable      (result file: unsat)
  violated  a counterexample, confirmed by onnxruntime on MODEL.onnx    (result file: sat + point)
  unknown   the search gave up before the timeout                       (result file: unknown)
  timeout   the timeout passed                                          (result file: timeout)
Any error (a malformed model or property, or a failure inside the verifier) prints one line
'boundflow: error: ...' to stderr, writes 'error' to the result file and exits with status 2.
The timeout counts from the start of the process, as VNN-COMP measures it; the search stops
about a second early to leave time for writing the result and exiting.

examples:
  boundflow verify net.onnx prop.vnnlib --timeout 60
  boundflow verify net.onnx prop.vnnlib --timeout 60 --results out.txt --threads 1
"""

_SUITE_EPILOG = """\
INSTANCES.csv has lines 'onnx,vnnlib,timeout' (VNN-COMP format, paths relative to the csv).
Each instance runs as a fresh 'boundflow verify' process. When an expected.csv (columns
benchmark, onnx, vnnlib, expected, ...) is found beside the csv or up to two folders above,
answers that contradict it are flagged WRONG and counted.

With --out, each row is written as its instance finishes; --resume keeps the rows a results
file already has and runs only the other instances (after an interrupt).

With --ray, every instance is a Ray task running 'boundflow verify' in a fresh process on a
worker (needs the ray extra: pip install -e ".[ray]"): --ray local starts Ray on this machine
(--jobs workers, default one per core) and stops it at the end; --ray auto joins the cluster
running here ('ray start --head' on one node, 'ray start --address=HEAD:6379' on the others);
--ray HOST:PORT joins that one. The instances' files are sent to the workers, unless
--data-root names the csv's folder as every node sees it (a shared file system). A worker that
dies mid-instance costs one retry; a second death records the instance as error.

examples:
  boundflow run-suite benchmarks/acasxu/acasxu_instances.csv --timeout-cap 30 --out acas.csv
  boundflow run-suite benchmarks/test/test_instances.csv --jobs 2
  boundflow run-suite benchmarks/acasxu/acasxu_instances.csv --ray auto --out acas.csv --resume
"""


def add_commands(sub) -> None:
    """Register ``verify`` and ``run-suite`` on cli.py's subparsers."""
    from boundflow.cli import add_device_argument

    v = sub.add_parser(
        "verify", help="decide a VNNLIB property: holds / violated / unknown / timeout",
        description="Verify a VNN-COMP property on an ONNX model and print a one-line summary.",
        epilog=_VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("model", metavar="MODEL.onnx", help="the network, an ONNX file")
    v.add_argument("property", metavar="PROP.vnnlib", help="the property, a VNNLIB file")
    v.add_argument("--timeout", type=float, required=True, metavar="S", help="seconds (whole process)")
    v.add_argument("--results", metavar="FILE", help="write the VNN-COMP result file here")
    v.add_argument("--method", choices=METHODS, default="crown",
                   help="bound method of the branch and bound (default: %(default)s)")
    v.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's choice)")
    v.add_argument("--seed", type=int, default=0, help="seed of the attacks (default: %(default)s)")
    v.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object (verdict, seconds, stats)")
    v.add_argument("--progress", action="store_true",
                   help="print a progress line to stderr every 5 s of branch and bound")
    v.add_argument("--debug", action="store_true",
                   help="on an error, also print the full traceback to stderr")
    add_device_argument(v)
    v.set_defaults(run=cmd_verify)

    s = sub.add_parser(
        "run-suite", help="run a VNN-COMP instances.csv, with progress and a summary",
        description="Run every instance of a VNN-COMP instances.csv, one process each.",
        epilog=_SUITE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("instances", metavar="INSTANCES.csv")
    s.add_argument("--timeout-cap", type=float, metavar="S", help="cap every instance's timeout at S seconds")
    s.add_argument("--out", metavar="RESULTS.csv", help="write one row per instance here")
    s.add_argument("--jobs", type=int, metavar="N",
                   help="instances run in parallel (default: 1; with --ray: the cluster's CPUs / --threads)")
    s.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads per instance (default: %(default)s)")
    s.add_argument("--method", choices=METHODS, default="crown", help="as for verify (default: %(default)s)")
    s.add_argument("--resume", action="store_true",
                   help="keep the rows --out already has, run only the other instances")
    s.add_argument("--ray", metavar="local|auto|ADDRESS",
                   help="run the instances as Ray tasks: on a Ray started here (local), the cluster "
                        "running here (auto) or at ADDRESS (host:port)")
    s.add_argument("--data-root", metavar="DIR",
                   help="with --ray: the workers read the instances' files under DIR (the csv's "
                        "folder as every node sees it) instead of receiving them")
    s.set_defaults(run=cmd_run_suite)


# --------------------------------------------------------------------------- verify


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc); 0 where that is unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / ticks)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


class _Watchdog:
    """Answers "timeout" and ends the process near the timeout if ``verify`` has not answered
    by then: a phase that cannot stop (loading, a bound pass) must not take the answer with it
    when VNN-COMP kills the process. Leaving the ``with`` block claims the answer for the caller.

    The answering thread needs the GIL, which C code (an extension module's import) can hold
    for seconds on a loaded machine; so "timeout" is written to the result file first, and
    faulthandler's C thread ends the process without the GIL a moment after the answer was due
    (exit status 1, every thread's traceback on stderr)."""

    def __init__(self, args):
        from boundflow.verify.verifier import Result, result_file_text

        self.args, self.result_type, self.result_text = args, Result, result_file_text
        self.answer = threading.Lock()
        self.caller = threading.get_ident()
        self.delay = max(0.0, args.timeout - WATCHDOG_RESERVE_S - process_age())
        self.timer = threading.Timer(self.delay, self._expire)
        self.timer.daemon = True

    def __enter__(self):
        _write_results(self.args.results, self.result_text(self.result_type("timeout", None, 0.0)))
        self.timer.start()
        faulthandler.dump_traceback_later(self.delay + WATCHDOG_RESERVE_S - KILL_RESERVE_S, exit=True)
        return self

    def __exit__(self, *exc) -> None:
        self.answer.acquire()       # blocks only while the watchdog answers (and exits)
        self.timer.cancel()
        faulthandler.cancel_dump_traceback_later()

    def _expire(self) -> None:
        if not self.answer.acquire(blocking=False):
            return
        result = self.result_type("timeout", None, process_age(), {"decided_by": "watchdog", "method": self.args.method})
        print(f"boundflow: warning: verify ran past its deadline (in {self._where()}); answering "
              f"timeout at {result.seconds:.2f} s of {self.args.timeout:g}", file=sys.stderr)
        _write_results(self.args.results, self.result_text(result))
        print(_summary_json(result, self.args) if self.args.json else _summary_line(result, self.args))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def _where(self) -> str:
        """The innermost BoundFlow frames of the verifying thread: which phase overran."""
        frame = sys._current_frames().get(self.caller)
        ours = [f for f in traceback.extract_stack(frame) if "boundflow" in f.filename] if frame else []
        return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(ours[-3:])) or "?"


def cmd_verify(args) -> int:
    from boundflow.cli import EXIT_ERROR, CliError, _existing_file
    from boundflow.errors import BoundflowError
    from boundflow.verify.verifier import VerifyConfig, result_file_text, verify

    if not args.timeout > 0:
        raise CliError(f"--timeout must be > 0, got {args.timeout}")
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.progress:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log = logging.getLogger("boundflow.verify")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        with _Watchdog(args) if args.owns_process else contextlib.nullcontext():
            model = _existing_file(args.model, "model")
            prop = _existing_file(args.property, "property")
            budget = args.timeout - process_age() - EXIT_RESERVE_S
            result = verify(model, prop, budget, method=args.method,
                            config=VerifyConfig(seed=args.seed, device=args.device))
            text = result_file_text(result)
            summary = _summary_json(result, args) if args.json else _summary_line(result, args)
    except (CliError, BoundflowError, OSError):
        _write_results(args.results, result_file_text(None))
        if args.debug:
            traceback.print_exc()
        raise
    except Exception as e:  # the command boundary: any other failure is an error, loudly, never a verdict
        _write_results(args.results, result_file_text(None))
        if args.debug:
            traceback.print_exc()
        print(f"boundflow: error: {_internal_error(e)}", file=sys.stderr)
        return EXIT_ERROR
    _write_results(args.results, text)
    print(summary)
    return 0


def _internal_error(e: Exception) -> str:
    """One line naming an unexpected exception and the line that raised it."""
    where = traceback.extract_tb(e.__traceback__)[-1]
    message = " ".join(str(e).split())
    return (f"internal error: {type(e).__name__}{': ' + message if message else ''} "
            f"(at {where.filename}:{where.lineno}; --debug prints the traceback)")


def _write_results(path: str | None, text: str) -> None:
    if path is not None:
        Path(path).write_text(text)


def _summary_line(result, args) -> str:
    """``violated  0.41 s  net.onnx prop.vnnlib  (attack; counterexample confirmed ...)``."""
    st = result.stats
    how = st.get("decided_by", "?")
    if result.verdict == "violated":
        how += "; counterexample confirmed by onnxruntime"
    bab = st.get("bab")
    if bab:
        how += f"; {bab['domains_bounded']} domains bounded, {bab['leaves_proven']} proven"
    return (f"{result.verdict}  {result.seconds:.2f} s  {args.model} {args.property}  "
            f"({how}; method {st.get('method')})")


def _summary_json(result, args) -> str:
    out = {"verdict": result.verdict, "seconds": result.seconds, "model": args.model,
           "property": args.property, "stats": result.stats}
    return json.dumps(out, default=float)


# --------------------------------------------------------------------------- run-suite


def cmd_run_suite(args) -> int:
    from boundflow.cli import CliError
    from boundflow.verify import suite

    _check_suite_args(args, CliError)
    instances = suite.read_instances(args.instances, args.timeout_cap)
    with suite_runner(args.ray, args.jobs, args.method, args.threads, args.data_root) as runner:
        print(f"{len(instances)} instances from {args.instances}, {runner.describe()}", flush=True)
        outcomes = suite.run_reported(instances, runner, args.out, args.resume, sys.stdout.isatty(),
                                      lambda line: print(line, flush=True))
    print()
    print(suite.summary_table(outcomes))
    if args.out:
        print(f"results: {args.out}")
    return 0


def _check_suite_args(args, error) -> None:
    if (args.jobs is not None and args.jobs < 1) or args.threads < 1:
        raise error("--jobs and --threads must be >= 1")
    if args.timeout_cap is not None and not args.timeout_cap > 0:
        raise error(f"--timeout-cap must be > 0, got {args.timeout_cap}")
    if args.resume and not args.out:
        raise error("--resume needs --out (the results file to resume)")
    if args.data_root is not None and args.ray is None:
        raise error("--data-root goes with --ray")


def suite_runner(ray: str | None, jobs: int | None, method: str, threads: int, data_root: str | None = None):
    """The runner of a suite, as a context manager: local processes (``ray`` None), or Ray
    tasks (a Ray it starts is stopped when the block ends)."""
    from boundflow.verify import suite

    if ray is None:
        return contextlib.nullcontext(suite.LocalRunner(jobs or 1, method, threads))
    from boundflow.verify.ray_runner import RayRunner

    return RayRunner(ray, jobs, method, threads, data_root, notice=lambda line: print(line, flush=True))
