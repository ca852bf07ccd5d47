"""Run a suite's instances as Ray tasks: ``boundflow run-suite INSTANCES.csv --ray local|auto|ADDRESS``.

Each instance is one Ray task that runs ``boundflow verify`` in a fresh process on a worker
(:func:`boundflow.verify.suite.execute`, as the local runner does), so a crash or an
out-of-memory kill loses that instance only, and the worker kills the process past its
timeout. The instance's files go to the worker through Ray's object store (each file once), or
the worker reads them under ``data_root``, a folder every node sees (the instances csv's folder
as the nodes see it). The result comes back to the driver, which turns it into an outcome
exactly as the local runner does.

The task tells the driver when it starts on its worker, and the driver kills a task that has
not answered ``DRIVER_GRACE_S`` after the worker's own kill (a hung worker), counting from that
start: a task can wait long before it (Ray starting a fresh worker that imports boundflow, on a
loaded node, takes tens of seconds). At most as many tasks are in flight as there are slots
(``jobs``, else the cluster's CPUs over the threads per instance), so an interrupted suite loses
no queued work. A worker that dies mid-instance (killed, out of memory, its node lost; Ray kills
its process group, ``boundflow verify`` with it) costs one retry of that instance; a second
death records it as ``error``.

A Ray that ``--ray local`` starts runs its workers, and so the instances, at this process's
priority: Ray's default (niceness 15, below its own processes) gives an instance a few percent
of a core beside any other work on the machine, where the local runner's process gets a fair
share, and it times out.

``ray`` is an optional dependency: ``pip install -e ".[ray]"``.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from boundflow.errors import BoundflowError
from boundflow.verify import suite
from boundflow.verify.suite import Attempt, Instance, Outcome

# The driver gives a task this long past the worker's own kill (timeout + KILL_GRACE_S after
# the task started) to answer: the result's way back from a loaded node. Then it kills the task.
DRIVER_GRACE_S = 60.0
# How often the driver looks for overdue tasks while none finishes.
POLL_S = 1.0
# Tries of an instance whose worker dies (the first and one retry).
TRIES = 2
# Seconds to reach a cluster's address before joining it (Ray itself retries for ever).
CONNECT_TIMEOUT_S = 10.0


class RayRunnerError(BoundflowError):
    """Ray is missing, or the cluster cannot be reached or used."""


def import_ray():
    """The ``ray`` module, or an error naming the extra that installs it."""
    try:
        import ray
    except ImportError as e:
        raise RayRunnerError(f'--ray needs the ray extra: pip install -e ".[ray]" (or pip install '
                             f'"boundflow[ray]"); importing ray failed: {e}') from None
    return ray


def _lost_errors(ray) -> tuple[type[BaseException], ...]:
    """The errors of a task whose worker (or node) died, not of the task's own code."""
    ex = ray.exceptions
    return (ex.WorkerCrashedError, ex.OutOfMemoryError, ex.NodeDiedError, ex.ObjectLostError,
            ex.LocalRayletDiedError)


def verify_on_worker(model, prop, names: tuple[str, str], timeout: float, method: str,
                     threads: int) -> Iterator[Attempt | None]:
    """The Ray task: ``boundflow verify`` in a fresh process on this worker. ``model`` and
    ``prop`` are the files' bytes (written to a temporary folder under their names) or paths.
    A generator: None as it starts (the driver's deadline counts from there), then the attempt."""
    yield None
    if isinstance(model, str):
        yield suite.execute(Path(model), Path(prop), timeout, method, threads)
        return
    with tempfile.TemporaryDirectory(prefix="boundflow-ray-") as tmp:
        paths = []
        for sub, name, data in (("model", names[0], model), ("prop", names[1], prop)):
            path = Path(tmp) / sub / name
            path.parent.mkdir()
            path.write_bytes(data)
            paths.append(path)
        yield suite.execute(paths[0], paths[1], timeout, method, threads)


@dataclass
class _Running:
    index: int
    instance: Instance
    tries: int
    started: float | None = None    # when the task started on its worker (driver's clock)

    def seconds(self, now: float) -> float:
        return 0.0 if self.started is None else now - self.started

    def overdue(self, now: float) -> bool:
        return self.seconds(now) > self.instance.timeout + suite.KILL_GRACE_S + DRIVER_GRACE_S


class RayRunner:
    """Runs instances as Ray tasks. ``address``: ``"local"`` (start a Ray instance on this
    machine with ``jobs`` x ``threads`` CPUs, default all cores, and stop it at the end),
    ``"auto"`` (join the cluster running here, ``ray start --head``), a cluster's address, or
    None (use the Ray this process is already connected to). Use it as a context manager."""

    def __init__(self, address: str | None, jobs: int | None = None, method: str = "crown",
                 threads: int = 1, data_root: str | os.PathLike | None = None,
                 notice: Callable[[str], None] = print):
        self.address, self.jobs, self.method, self.threads = address, jobs, method, threads
        self.data_root = None if data_root is None else Path(data_root)
        self.notice = notice
        self.owns = False
        self.slots = 0
        self._refs: dict[Path, object] = {}

    # ------------------------------------------------------------------ connection

    def __enter__(self) -> "RayRunner":
        ray = import_ray()
        if self.address not in (None, "local", "auto"):
            check_reachable(self.address)
        if self.address is None:
            if not ray.is_initialized():
                raise RayRunnerError("RayRunner(None) uses this process's Ray, but ray.init() was not called")
        elif ray.is_initialized():
            raise RayRunnerError("Ray is already initialised in this process; use RayRunner(None) to run on it")
        else:
            self._connect(ray)
        self.slots = self._slots(ray)
        return self

    def _connect(self, ray) -> None:
        options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            if self.address == "local":
                # "local": a new instance even where a cluster runs or RAY_ADDRESS is set
                # workers at this process's priority, not Ray's niceness 15 (the module's docstring)
                ray.init(address="local", num_cpus=(self.jobs or os.cpu_count() or 1) * self.threads,
                         _system_config={"worker_niceness": 0}, **options)
            else:
                ray.init(address=self.address, **options)
        except ConnectionError as e:
            raise RayRunnerError(f"--ray {self.address}: cannot connect to a Ray cluster{self._hint()}: {e}") from None
        except ray.exceptions.AuthenticationError as e:
            raise RayRunnerError(f"--ray {self.address}: the cluster refused this driver ({_first_line(e)}); "
                                 f"copy the head's token (ray get-auth-token) to ~/.ray/auth_token") from None
        self.owns = True

    def _hint(self) -> str:
        if self.address == "auto":
            return " (start one with 'ray start --head')"
        if "RAY_AUTH_MODE" not in os.environ:
            # Ray sends its token only to a cluster it found itself, never to an address given
            return (" (Ray's token authentication, on by default, needs RAY_AUTH_MODE=token and the "
                    "head's token in ~/.ray/auth_token to join a cluster by its address)")
        return ""

    def _slots(self, ray) -> int:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        capacity = cpus // self.threads
        if capacity < 1:
            self.__exit__(None, None, None)
            raise RayRunnerError(f"the Ray cluster has {cpus} CPUs, fewer than --threads {self.threads}")
        if self.jobs is not None and self.jobs > capacity:
            self.notice(f"--jobs {self.jobs}: the Ray cluster has room for {capacity} instances at a time; "
                        f"running {capacity}")
        return min(self.jobs or capacity, capacity)

    def __exit__(self, *exc) -> None:
        if self.owns:
            import_ray().shutdown()
            self.owns = False

    def describe(self) -> str:
        where = "this process's Ray" if self.address is None else f"Ray ({self.address})"
        return f"{self.slots} at a time on {where}"

    # ------------------------------------------------------------------ running

    def outcomes(self, instances: list[Instance]) -> Iterator[tuple[int, Outcome]]:
        """(index, outcome) of every instance, as each finishes; tasks still running are
        cancelled when the caller stops early (an interrupt)."""
        if not self.slots:
            raise RayRunnerError("RayRunner.outcomes outside its 'with' block")
        ray = import_ray()
        task = ray.remote(num_cpus=self.threads, max_retries=0)(verify_on_worker)
        waiting = deque(enumerate(instances))
        running: dict[object, _Running] = {}
        try:
            while waiting or running:
                while waiting and len(running) < self.slots:
                    index, inst = waiting.popleft()
                    missing = self._missing(inst)
                    if missing:
                        yield index, Outcome(inst, "error", 0.0, missing)
                        continue
                    running[self._submit(task, inst)] = _Running(index, inst, 1)
                if running:
                    yield from self._collect(ray, task, running)
        finally:
            for gen in running:
                ray.cancel(gen, force=True)
            self._refs.clear()

    def _collect(self, ray, task, running: dict) -> Iterator[tuple[int, Outcome]]:
        """Wait for a task to start or finish (or a poll to pass); yield what finished or overran."""
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
        for gen in ready:
            job = running[gen]
            try:
                attempt = ray.get(next(gen))
            except _lost_errors(ray) as e:
                del running[gen]
                outcome = self._lost(task, job, e, running)
                if outcome is not None:
                    yield job.index, outcome
                continue
            if job.started is None:     # verify_on_worker's first item: it started
                job.started = time.monotonic()
                continue
            del running[gen]
            yield job.index, suite.outcome_of(job.instance, attempt)
        now = time.monotonic()
        for gen in [g for g, job in running.items() if job.overdue(now)]:
            job = running.pop(gen)
            ray.cancel(gen, force=True)
            yield job.index, Outcome(job.instance, "timeout", job.seconds(now),
                                     f"killed by the driver: no answer {DRIVER_GRACE_S:g} s past the worker's kill")

    def _lost(self, task, job: _Running, error: Exception, running: dict) -> Outcome | None:
        """A worker died under ``job``: submit it again (into ``running``), or, on its last
        try, the ``error`` outcome."""
        inst = job.instance
        reason = f"{type(error).__name__}: {_first_line(error)}"
        if job.tries >= TRIES:
            return Outcome(inst, "error", job.seconds(time.monotonic()),
                           f"the worker died {job.tries} times ({reason})")
        self.notice(f"retrying {inst.benchmark} {Path(inst.onnx).name} {Path(inst.vnnlib).name}: "
                    f"the worker died ({reason})")
        running[self._submit(task, inst)] = _Running(job.index, inst, job.tries + 1)
        return None

    def _submit(self, task, inst: Instance):
        names = (Path(inst.onnx).name, Path(inst.vnnlib).name)
        if self.data_root is not None:
            model, prop = str(self.data_root / inst.onnx), str(self.data_root / inst.vnnlib)
        else:
            model, prop = self._shipped(inst.model_path), self._shipped(inst.prop_path)
        return task.remote(model, prop, names, inst.timeout, self.method, self.threads)

    def _shipped(self, path: Path):
        """The object-store reference of a file's bytes, put there once per suite."""
        if path not in self._refs:
            self._refs[path] = import_ray().put(path.read_bytes())
        return self._refs[path]

    def _missing(self, inst: Instance) -> str:
        """Why the driver cannot ship the instance's files ('' when it can, or need not)."""
        if self.data_root is not None:
            return ""
        for what, path in (("model", inst.model_path), ("property", inst.prop_path)):
            if not path.is_file():
                return f"{what} {path}: no such file"
        return ""


def check_reachable(address: str) -> None:
    """Fail at once where nothing listens at ``address`` (HOST:PORT), where ``ray.init`` would
    retry for ever."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayRunnerError(f"--ray {address}: expected local, auto or HOST:PORT (a Ray head's address)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RayRunnerError(f"--ray {address}: nothing answers there ({e}); is the cluster's head "
                             f"running ('ray start --head')?") from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
