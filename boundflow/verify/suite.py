"""Run a VNN-COMP ``instances.csv``: one fresh ``boundflow verify`` process per instance.

A fresh process per instance is what VNN-COMP measures (start-up included), isolates a crash
to its instance, and lets a process that overruns its timeout be killed. Rows are compared with
the majority verdicts in an ``expected.csv`` found beside the instances (or in a folder above),
so a wrong answer is flagged and counted.

A runner decides where the processes run: :class:`LocalRunner` on this machine, ``jobs`` at a
time, or ``ray_runner.RayRunner`` as Ray tasks on a cluster's workers (both through
:func:`execute`); everything else (the CSV streamed row by row, resuming, the progress lines,
the final table) is :func:`run_reported`'s, the same for both.
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
from typing import Callable, Iterable, Iterator

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


def verify_command(model: Path, prop: Path, timeout: float, results: Path, method: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "boundflow", "verify", str(model), str(prop),
            "--timeout", repr(timeout), "--results", str(results), "--method", method,
            "--threads", str(threads), "--json"]


@dataclass
class Attempt:
    """What one ``boundflow verify`` process gave: its exit status and output, the result
    file's text, and whole-process seconds; ``killed`` when it ran past its timeout."""
    returncode: int
    stdout: str
    stderr: str
    result_text: str
    seconds: float
    killed: bool = False


def _child_env(threads: int) -> dict[str, str]:
    """This environment with ``threads`` threads, and this process's boundflow first on the
    path, so the child runs the same code (a Ray worker's too)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=path)


def execute(model: Path, prop: Path, timeout: float, method: str = "crown", threads: int = 1) -> Attempt:
    """Run ``boundflow verify`` on ``model`` and ``prop`` in a fresh process, killed
    ``KILL_GRACE_S`` after ``timeout``. The local runner calls this, and so does a Ray worker."""
    with tempfile.TemporaryDirectory(prefix="boundflow-suite-") as tmp:
        results = Path(tmp) / "result.txt"
        cmd = verify_command(model, prop, timeout, results, method, threads)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(threads),
                                  timeout=timeout + KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            return Attempt(-9, "", "", "", time.perf_counter() - t0, killed=True)
        seconds = time.perf_counter() - t0
        text = results.read_text() if results.is_file() else ""
    return Attempt(proc.returncode, proc.stdout, proc.stderr, text, seconds)


def outcome_of(inst: Instance, attempt: Attempt) -> Outcome:
    """Read the verdict from the result file, the details from the JSON summary line."""
    if attempt.killed:
        return Outcome(inst, "timeout", attempt.seconds, "killed: ran past its timeout")
    first = attempt.result_text.split("\n", 1)[0].strip()
    verdict = RESULT_FILE_VERDICTS.get(first)
    stats: dict = {}
    lines = attempt.stdout.strip().splitlines()
    if attempt.returncode == 0 and lines:
        stats = json.loads(lines[-1])
    if verdict is None or attempt.returncode != 0:
        err = attempt.stderr.strip().splitlines()
        return Outcome(inst, "error", attempt.seconds, err[-1] if err else f"exit status {attempt.returncode}")
    return Outcome(inst, verdict, attempt.seconds, stats=stats)


def run_instance(inst: Instance, method: str = "crown", threads: int = 1) -> Outcome:
    """Run ``boundflow verify`` on one instance in a fresh process; whole-process seconds."""
    return outcome_of(inst, execute(inst.model_path, inst.prop_path, inst.timeout, method, threads))


class LocalRunner:
    """Runs each instance's ``boundflow verify`` process on this machine, ``jobs`` at a time."""

    def __init__(self, jobs: int = 1, method: str = "crown", threads: int = 1):
        self.jobs, self.method, self.threads = max(1, jobs), method, threads

    def describe(self) -> str:
        return f"{self.jobs} at a time"

    def outcomes(self, instances: list[Instance]) -> Iterator[tuple[int, Outcome]]:
        """(index, outcome) of every instance, as each finishes. Instances not started yet are
        dropped when the caller stops early (an interrupt)."""
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            futures = {pool.submit(run_instance, inst, self.method, self.threads): i
                       for i, inst in enumerate(instances)}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def run_suite(instances: list[Instance], jobs: int = 1, method: str = "crown", threads: int = 1,
              on_outcome: Callable[[Outcome], None] | None = None, runner=None) -> list[Outcome]:
    """Run every instance with ``runner`` (default: a :class:`LocalRunner` of ``jobs``,
    ``method``, ``threads``); ``on_outcome`` sees each as it finishes. Returns the outcomes in
    the instances' order."""
    runner = runner or LocalRunner(jobs, method, threads)
    outcomes: dict[int, Outcome] = {}
    for i, outcome in runner.outcomes(instances):
        outcomes[i] = outcome
        if on_outcome is not None:
            on_outcome(outcome)
    return [outcomes[i] for i in range(len(instances))]


def run_reported(instances: list[Instance], runner, out=None, resume: bool = False,
                 color: bool = False, emit: Callable[[str], None] = print) -> list[Outcome]:
    """Run a suite as ``run-suite`` shows it: a progress line per finished instance with the
    running totals; with ``out``, each row appended to that CSV as it finishes (and the file
    rewritten in the instances' order at the end). ``resume`` keeps the rows ``out`` already
    has and runs only the other instances. The outcomes in the instances' order."""
    finished = read_finished(out, instances) if resume else {}
    if resume and finished:
        emit(f"resuming: {len(finished)} of {len(instances)} instances already in {out}")
    todo = [i for i in range(len(instances)) if i not in finished]
    done = [finished[i] for i in sorted(finished)]
    stream = _CsvStream(out, append=resume and _nonempty(out)) if out else None

    def report(outcome: Outcome) -> None:
        done.append(outcome)
        if stream is not None:
            stream.append(outcome)
        emit(progress_line(len(done), len(instances), outcome, tally(done), color))

    try:
        fresh = run_suite([instances[i] for i in todo], on_outcome=report, runner=runner)
    finally:
        if stream is not None:
            stream.close()
    outcomes = {**finished, **dict(zip(todo, fresh))}
    ordered = [outcomes[i] for i in range(len(instances))]
    if out:
        write_csv(ordered, out)
    return ordered


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
    """Write the results CSV whole (through a temporary file, so a reader never sees half)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        w.writerows(_csv_row(o) for o in outcomes)
    os.replace(tmp, path)

def _csv_row(o: Outcome) -> list[str]:
    i = o.instance
    return [i.benchmark, i.onnx, i.vnnlib, o.verdict, f"{o.seconds:.3f}", i.expected or "",
            "WRONG" if o.wrong else ""]


def _nonempty(path) -> bool:
    return Path(path).is_file() and Path(path).stat().st_size > 0


class _CsvStream:
    """A results CSV that gets each row as soon as its instance finishes."""

    def __init__(self, path, append: bool):
        self.file = Path(path).open("a" if append else "w", newline="")
        self.writer = csv.writer(self.file)
        if not append:
            self.writer.writerow(CSV_FIELDS)
            self.file.flush()

    def append(self, outcome: Outcome) -> None:
        self.writer.writerow(_csv_row(outcome))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_finished(path, instances: list[Instance]) -> dict[int, Outcome]:
    """{index in ``instances``: outcome} for the rows a results CSV at ``path`` already has
    (none when there is no file yet). A row that is no instance of ``instances`` is an error."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    slots: dict[tuple[str, str, str], list[int]] = {}
    for i, inst in enumerate(instances):
        slots.setdefault((inst.benchmark, inst.onnx, inst.vnnlib), []).append(i)
    finished: dict[int, Outcome] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        if tuple(next(reader, ())) != CSV_FIELDS:
            raise SpecError(f"{path}: not a run-suite results file (expected the header {','.join(CSV_FIELDS)})")
        for lineno, row in enumerate(reader, start=2):
            index, outcome = _finished_row(path, lineno, row, slots, instances)
            finished[index] = outcome
    return finished


def _finished_row(path: Path, lineno: int, row: list[str], slots, instances) -> tuple[int, Outcome]:
    where = f"{path}:{lineno}"
    if len(row) != len(CSV_FIELDS) or row[3] not in VERDICT_ORDER:
        raise SpecError(f"{where}: a malformed row (an interrupted write? delete the line to run it again)")
    free = slots.get((row[0], row[1], row[2]))
    if not free:
        raise SpecError(f"{where}: {row[0]} {row[1]} {row[2]} is not an instance of this suite "
                        f"(or is there twice): resume with the results file of the same instances")
    try:
        seconds = float(row[4])
    except ValueError:
        raise SpecError(f"{where}: seconds {row[4]!r} is not a number") from None
    index = free.pop(0)
    return index, Outcome(instances[index], row[3], seconds, "from the results file")
