"""Run a VNN-COMP ``instances.csv``: one fresh ``boundflow verify`` process per instance.

A fresh process per instance is what VNN-COMP measures (start-up included), isolates a crash
to its instance, and lets a process that overruns its timeout be killed. Rows are compared with
the majority verdicts in an ``expected.csv`` found beside the instances (or in a folder above),
so a wrong answer is flagged and counted.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from boundflow.errors import SpecError

VERDICT_ORDER = ("holds", "violated", "unknown", "timeout", "error")
SOLVED = ("holds", "violated")
# A process is killed this long after its instance's timeout (it is expected to stop itself
# within 2 s; the rest is start-up on a loaded machine).
KILL_GRACE_S = 15.0
RESULT_FILE_VERDICTS = {"unsat": "holds", "sat": "violated", "unknown": "unknown",
                        "timeout": "timeout", "error": "error"}


@dataclass
class Instance:
    """One line of an instances.csv; paths resolved against the csv's folder."""
    benchmark: str
    onnx: str
    vnnlib: str
    timeout: float
    model_path: Path
    prop_path: Path
    expected: str | None = None


@dataclass
class Outcome:
    """What running an instance gave: verdict, whole-process seconds, and the details."""
    instance: Instance
    verdict: str
    seconds: float
    message: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def wrong(self) -> bool:
        """A solved verdict that contradicts a clear expected verdict."""
        exp = self.instance.expected
        return self.verdict in SOLVED and exp in SOLVED and self.verdict != exp


# --------------------------------------------------------------------------- reading


def read_instances(csv_path, timeout_cap: float | None = None) -> list[Instance]:
    """The instances of a VNN-COMP csv (``onnx,vnnlib,timeout`` per line, no header), with
    timeouts capped and expected verdicts attached when an expected.csv is found."""
    path = Path(csv_path)
    if not path.is_file():
        raise SpecError(f"{path}: no such instances file")
    benchmark = path.parent.name
    expected = _expected_verdicts(path, benchmark)
    out = []
    with path.open(newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            out.append(_instance(path, lineno, row, benchmark, timeout_cap, expected))
    if not out:
        raise SpecError(f"{path}: no instances")
    return out


def _instance(path: Path, lineno: int, row: list[str], benchmark: str, cap, expected) -> Instance:
    if len(row) != 3:
        raise SpecError(f"{path}:{lineno}: expected 'onnx,vnnlib,timeout', got {len(row)} fields")
    onnx, vnnlib, timeout = (c.strip() for c in row)
    try:
        seconds = float(timeout)
    except ValueError:
        raise SpecError(f"{path}:{lineno}: timeout {timeout!r} is not a number") from None
    if cap is not None:
        seconds = min(seconds, cap)
    key = (Path(onnx).name, Path(vnnlib).name)
    return Instance(benchmark, onnx, vnnlib, seconds, path.parent / onnx, path.parent / vnnlib,
                    expected.get(key))


def _expected_verdicts(csv_path: Path, benchmark: str) -> dict[tuple[str, str], str]:
    """{(onnx name, vnnlib name): expected verdict} for ``benchmark`` from the nearest
    expected.csv in the csv's folder or up to two folders above; empty when there is none."""
    for folder in (csv_path.parent, *list(csv_path.parents)[1:3]):
        candidate = folder / "expected.csv"
        if candidate.is_file():
            with candidate.open(newline="") as f:
                return {(Path(r["onnx"]).name, Path(r["vnnlib"]).name): r["expected"]
                        for r in csv.DictReader(f) if r.get("benchmark") == benchmark}
    return {}


# --------------------------------------------------------------------------- running


def verify_command(inst: Instance, results: Path, method: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "boundflow", "verify", str(inst.model_path), str(inst.prop_path),
            "--timeout", repr(inst.timeout), "--results", str(results), "--method", method,
            "--threads", str(threads), "--json"]


def run_instance(inst: Instance, method: str = "crown", threads: int = 1) -> Outcome:
    """Run ``boundflow verify`` on one instance in a fresh process; whole-process seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="boundflow-suite-") as tmp:
        results = Path(tmp) / "result.txt"
        cmd = verify_command(inst, results, method, threads)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=inst.timeout + KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            return Outcome(inst, "timeout", time.perf_counter() - t0, "killed: ran past its timeout")
        seconds = time.perf_counter() - t0
        text = results.read_text() if results.is_file() else ""
    return _outcome(inst, proc, text, seconds)


def _outcome(inst: Instance, proc: subprocess.CompletedProcess, result_text: str, seconds: float) -> Outcome:
    """Read the verdict from the result file, the details from the JSON summary line."""
    first = result_text.split("\n", 1)[0].strip()
    verdict = RESULT_FILE_VERDICTS.get(first)
    stats: dict = {}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        stats = json.loads(lines[-1])
    if verdict is None or proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return Outcome(inst, "error", seconds, err[-1] if err else f"exit status {proc.returncode}")
    return Outcome(inst, verdict, seconds, stats=stats)


def run_suite(instances: list[Instance], jobs: int = 1, method: str = "crown", threads: int = 1,
              on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run every instance (``jobs`` at a time); ``on_outcome`` sees each as it finishes.
    Returns the outcomes in the instances' order."""
    outcomes: dict[int, Outcome] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_instance, inst, method, threads): i for i, inst in enumerate(instances)}
        for fut in as_completed(futures):
            outcomes[futures[fut]] = fut.result()
            if on_outcome is not None:
                on_outcome(outcomes[futures[fut]])
    return [outcomes[i] for i in range(len(instances))]


# --------------------------------------------------------------------------- reporting


def tally(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts = {v: 0 for v in VERDICT_ORDER}
    counts["wrong"] = 0
    for o in outcomes:
        counts[o.verdict] += 1
        counts["wrong"] += o.wrong
    return counts


def progress_line(done: int, total: int, outcome: Outcome, counts: dict[str, int], color: bool) -> str:
    """``[ 3/10] bench model prop  verdict  1.23 s  | holds 2 violated 1 ... wrong 0``."""
    inst = outcome.instance
    verdict = f"{outcome.verdict:<8}"
    note = ""
    if outcome.wrong:
        note = f"  WRONG (expected {inst.expected})"
        if color:
            verdict, note = f"\033[31m{verdict}\033[0m", f"\033[31m{note}\033[0m"
    elif outcome.verdict == "error" and outcome.message:
        note = f"  ({outcome.message})"
    running = "  ".join(f"{k} {counts[k]}" for k in (*VERDICT_ORDER, "wrong"))
    width = len(str(total))
    return (f"[{done:>{width}}/{total}] {inst.benchmark} {Path(inst.onnx).name} {Path(inst.vnnlib).name}  "
            f"{verdict} {outcome.seconds:7.2f} s{note}  | {running}")


def summary_table(outcomes: list[Outcome]) -> str:
    """Count, median and total seconds per verdict, then the solved and wrong counts."""
    rows = []
    for v in VERDICT_ORDER:
        secs = [o.seconds for o in outcomes if o.verdict == v]
        if secs:
            rows.append([v, str(len(secs)), f"{statistics.median(secs):.2f}", f"{sum(secs):.2f}"])
    secs = [o.seconds for o in outcomes]
    rows.append(["all", str(len(secs)), f"{statistics.median(secs):.2f}", f"{sum(secs):.2f}"])
    header = ["verdict", "count", "median s", "total s"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = tally(outcomes)
    known = sum(o.instance.expected is not None for o in outcomes)
    lines.append(f"solved {counts['holds'] + counts['violated']} of {len(outcomes)}; "
                 f"wrong answers {counts['wrong']} (of {known} with an expected verdict)")
    return "\n".join(lines)


CSV_FIELDS = ("benchmark", "onnx", "vnnlib", "verdict", "seconds", "expected", "wrong")


def write_csv(outcomes: list[Outcome], path) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for o in outcomes:
            i = o.instance
            w.writerow([i.benchmark, i.onnx, i.vnnlib, o.verdict, f"{o.seconds:.3f}",
                        i.expected or "", "WRONG" if o.wrong else ""])
