"""run-suite on Ray (``--ray``): the same verdicts as the local runner, a killed worker's
instance retried, the CLI on a cluster's address and on a Ray of its own, resuming.

One Ray instance of 2 CPUs, started by this module as ``--ray local`` starts its own (workers at
normal priority), serves every test but the ``--ray local`` one; the CLI tests join it as a
second driver (``--ray ADDRESS``). CI installs the ray extra,
so there (BOUNDFLOW_SHARED set) a missing ray is a failure, not a skip.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from boundflow.cli import main
from boundflow.verify import suite

# one module, one Ray: with pytest-xdist (--dist loadgroup) these tests share a worker
pytestmark = pytest.mark.xdist_group("ray")

VNNCOMP = Path("benchmarks") / "vnncomp2021"
REPO = Path(__file__).resolve().parents[1]


def _import_ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("BOUNDFLOW_SHARED"):
            raise  # CI installs the ray extra (scripts/run.sh test)
        pytest.skip('ray not installed (pip install -e ".[ray]")')
    return ray


@pytest.fixture(scope="module")
def ray_address():
    ray = _import_ray()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _env() -> dict[str, str]:
    # token: Ray sends its token (~/.ray/auth_token) to a cluster given by address only so
    return dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="token")


def _cli(args: list[str], **kwargs) -> tuple[int, str]:
    """(pid, stdout) of ``boundflow run-suite ARGS``, which must succeed."""
    kwargs.setdefault("env", _env())
    with subprocess.Popen([sys.executable, "-m", "boundflow", "run-suite", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout + stderr
    return proc.pid, stdout


def _instances(shared: Path, cap: float = 60.0) -> list[suite.Instance]:
    """The shared test benchmark, an mnistfc and an ACAS Xu instance."""
    root = shared / VNNCOMP
    return (suite.read_instances(root / "test" / "test_instances.csv", cap)
            + suite.read_instances(root / "mnistfc" / "mnistfc_instances.csv", cap)[:1]
            + suite.read_instances(root / "acasxu" / "acasxu_instances.csv", cap)[:1])


def test_ray_gives_the_local_runners_verdicts(ray_address, shared):
    from boundflow.verify.ray_runner import RayRunner

    instances = _instances(shared)
    local = suite.run_suite(instances, jobs=2)
    with RayRunner(None, jobs=2) as runner:
        on_ray = suite.run_suite(instances, runner=runner)
    assert [o.verdict for o in on_ray] == [o.verdict for o in local], \
        [(o.instance.vnnlib, o.verdict, o.message) for o in on_ray + local]
    assert all(o.verdict in suite.SOLVED and not o.wrong for o in on_ray), \
        [(o.instance.vnnlib, o.verdict, o.message) for o in on_ray]
    assert all(o.stats.get("verdict") == o.verdict for o in on_ray)


# --------------------------------------------------------------------------- a worker dies


def _children() -> dict[int, list[int]]:
    """{pid: child pids} of every process on the machine (from /proc)."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _verify_processes(root: int) -> list[tuple[int, int, str]]:
    """(pid, parent pid, property file name) of the ``boundflow verify`` processes below ``root``."""
    tree, found, todo = _children(), [], [root]
    while todo:
        parent = todo.pop()
        for pid in tree.get(parent, []):
            todo.append(pid)
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"verify" in argv[:4] and len(argv) > 5:
                found.append((pid, parent, Path(argv[5].decode()).name))
    return found


class _WorkerKiller(threading.Thread):
    """Kills the Ray worker running ``boundflow verify`` on a property (and that process),
    ``kills[name]`` times per property name: a worker dying mid-instance."""

    def __init__(self, kills: dict[str, int]):
        super().__init__(daemon=True)
        self.left, self.killed, self.stop = dict(kills), [], threading.Event()

    def run(self) -> None:
        seen: set[int] = set()
        while not self.stop.is_set() and any(self.left.values()):
            for pid, worker, name in _verify_processes(os.getpid()):
                if self.left.get(name) and pid not in seen:
                    seen.add(pid)
                    self.left[name] -= 1
                    self.killed.append(name)
                    for victim in (worker, pid):   # the worker first, so it cannot answer
                        try:
                            os.kill(victim, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            time.sleep(0.05)


def test_a_killed_worker_is_retried_once(ray_address, shared):
    """A worker killed mid-instance: the instance runs again and gets its verdict; killed on
    its retry too, the instance is an error. The suite finishes either way. The timeouts are
    far above the instances' seconds (a few, most of it start-up): on a loaded 2-core machine
    a verify process can get a fraction of a core, and timeouts are not what this tests."""
    from boundflow.verify.ray_runner import RayRunner

    instances = [dataclasses.replace(inst, timeout=300.0)
                 for inst in suite.read_instances(shared / VNNCOMP / "test" / "test_instances.csv")[:3]]
    names = [Path(i.vnnlib).name for i in instances]    # nano, tiny, small
    killer = _WorkerKiller({names[1]: 1, names[2]: 2})
    notices: list[str] = []
    killer.start()
    try:
        with RayRunner(None, jobs=2, notice=notices.append) as runner:
            outcomes = suite.run_suite(instances, runner=runner)
    finally:
        killer.stop.set()
        killer.join()
    assert sorted(killer.killed) == sorted([names[1], names[2], names[2]])
    assert [o.verdict for o in outcomes[:2]] == ["holds", "holds"], [o.message for o in outcomes]
    assert outcomes[2].verdict == "error" and "the worker died 2 times (WorkerCrashedError" in outcomes[2].message
    assert sum("retrying" in n and names[1] in n for n in notices) == 1, notices
    assert sum("retrying" in n and names[2] in n for n in notices) == 1, notices


def test_the_driver_kills_a_task_past_its_deadline(ray_address, shared, monkeypatch):
    """A task that has not answered by its deadline (here a second after it started on its
    worker, as if the worker hung) is cancelled by the driver and recorded as a timeout; the
    time before it started (a fresh worker's start) does not count."""
    from boundflow.verify import ray_runner

    inst = suite.read_instances(shared / VNNCOMP / "test" / "test_instances.csv", 30)[0]
    monkeypatch.setattr(ray_runner, "DRIVER_GRACE_S", 1.0 - inst.timeout - suite.KILL_GRACE_S)
    with ray_runner.RayRunner(None, jobs=1) as runner:
        [outcome] = suite.run_suite([inst], runner=runner)
    assert outcome.verdict == "timeout" and outcome.message.startswith("killed by the driver")
    assert 1.0 <= outcome.seconds < 1.0 + 2 * ray_runner.POLL_S


# --------------------------------------------------------------------------- the CLI


def _mini(tmp_path: Path, shared: Path, absolute: bool) -> Path:
    """A two-instance suite 'mini' (test_nano holds, test_sat violated) whose expected.csv
    wrongly expects test_sat to hold; paths absolute, or relative to the test folder."""
    test = shared / VNNCOMP / "test"
    bench = tmp_path / "mini"
    bench.mkdir()
    where = (lambda name: test / name) if absolute else (lambda name: name)
    (bench / "mini_instances.csv").write_text(
        f"{where('test_nano.onnx')},{where('test_nano.vnnlib')},60\n"
        f"{where('test_sat.onnx')},{where('test_prop.vnnlib')},60\n")
    (bench / "expected.csv").write_text(
        "benchmark,onnx,vnnlib,expected,holds_votes,violated_votes\n"
        "mini,test_nano.onnx,test_nano.vnnlib,holds,3,0\n"
        "mini,test_sat.onnx,test_prop.vnnlib,holds,3,0\n")
    return bench / "mini_instances.csv"


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_cli_on_a_cluster_with_data_root_and_resume(ray_address, shared, tmp_path):
    """--ray ADDRESS with --data-root (the csv's paths are relative to a folder only the
    workers read), the local runner's progress lines and table; then --ray auto --resume
    re-runs only the instance whose row is gone."""
    instances = _mini(tmp_path, shared, absolute=False)
    out = tmp_path / "results.csv"
    args = [str(instances), "--ray", ray_address, "--data-root", str(shared / VNNCOMP / "test"), "--out", str(out)]
    first = _cli(args)[1]
    assert f"2 instances from {instances}, 2 at a time on Ray ({ray_address})" in first
    assert first.count("] mini ") == 2 and "WRONG (expected holds)" in first
    assert "holds 1  violated 1  unknown 0  timeout 0  error 0  wrong 1" in first
    assert "solved 2 of 2; wrong answers 1 (of 2 with an expected verdict)" in first
    assert "verdict   count  median s  total s" in first
    rows = _rows(out)
    assert [r["verdict"] for r in rows] == ["holds", "violated"] and [r["wrong"] for r in rows] == ["", "WRONG"]

    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[2])     # the first instance's row lost: an interrupt
    auto = [a if a != ray_address else "auto" for a in args]      # auto: the cluster of $RAY_ADDRESS
    second = _cli(auto + ["--resume"], env=dict(_env(), RAY_ADDRESS=ray_address))[1]
    assert "2 at a time on Ray (auto)" in second and "resuming: 1 of 2 instances already in" in second
    assert second.count("] mini ") == 1 and "[2/2] mini test_nano.onnx test_nano.vnnlib  holds" in second
    assert "solved 2 of 2; wrong answers 1" in second
    assert [r["vnnlib"] for r in _rows(out)] == ["test_nano.vnnlib", "test_prop.vnnlib"]
    assert [r["verdict"] for r in _rows(out)] == ["holds", "violated"]


def test_cli_ray_local_starts_and_stops_its_own_ray(shared, tmp_path):
    """--ray local ships the files to a Ray it starts, and leaves no process behind."""
    _import_ray()
    instances = _mini(tmp_path, shared, absolute=True)
    pid, stdout = _cli([str(instances), "--ray", "local", "--jobs", "1", "--timeout-cap", "60"],
                       start_new_session=True)
    assert "2 instances from" in stdout and "1 at a time on Ray (local)" in stdout
    assert "solved 2 of 2; wrong answers 1" in stdout
    deadline = time.monotonic() + 30
    while (left := _session_members(pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "processes of the suite's Ray still running"


def _session_members(sid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_cli_ray_errors_name_the_problem(capsys, tmp_path, monkeypatch, shared):
    instances = _mini(tmp_path, shared, absolute=True)
    for argv, fragment in [
        ([str(instances), "--resume"], "--resume needs --out"),
        ([str(instances), "--data-root", str(tmp_path)], "--data-root goes with --ray"),
        ([str(instances), "--ray", "local", "--jobs", "0"], "--jobs and --threads must be >= 1"),
        ([str(instances), "--ray", "nohost"], "--ray nohost: expected local, auto or HOST:PORT"),
        ([str(instances), "--ray", "127.0.0.1:1"], "--ray 127.0.0.1:1: nothing answers there"),
    ]:
        assert main(["run-suite", *argv]) == 2
        assert fragment in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)    # as if the extra were not installed
    assert main(["run-suite", str(instances), "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert 'boundflow: error: --ray needs the ray extra: pip install -e ".[ray]"' in err
    assert "Traceback" not in err
