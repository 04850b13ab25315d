"""Pilot mode (`SlurmPilotExecutor`): long-lived workers as a Slurm job array; also a pool's pilots."""
from __future__ import annotations

import atexit
import logging
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple


from ..runtime import protocol as P
from ..runtime.backends import Backend, DispatcherBackend
from ..executor_base import AbstractTaskExecutor
from .states import _terminal
from .query import QUERY_INTERVAL, SlurmQuery, scancel, wait_gone
from .addresses import _remove, bind_address, write_key_file
from .submission import DEFAULT_PARAMS, _Params, _minutes, _python_path_setup, _slurm_executor, sbatch_parameters
from .job import run_pilot

log = logging.getLogger("depio.slurm")


class _Pilot:
    def __init__(self, job_id: str, job=None):
        self.job_id = job_id
        self.job = job
        self.submitted = time.monotonic()
        self.registered = False
        self.ended = False
        self.state = "PENDING"
        self.reason = ""


class SlurmPilotLauncher:
    """Starts pilot workers as Slurm jobs (a job array per submission) and keeps enough of them
    while work remains. Launcher interface as `LocalLauncher`: start(address, key), stop(),
    alive(), on_all_gone."""

    def __init__(self, workers: int, slots: int, parameters: Dict[str, Any], folder: Path,
                 min_workers: int, max_workers: int, walltime_min: float, margin: float,
                 idle_timeout: Optional[float], heartbeat: float, liveness: int, max_failures: int,
                 internal_executor=None, query_interval: float = QUERY_INTERVAL):
        self.workers = workers
        self.slots = slots
        self.parameters = parameters
        self.folder = Path(folder)
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.walltime_min = walltime_min
        self.margin = margin
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_failures = max_failures
        self.failures = 0            # pilots that ended without ever connecting
        self.broken = False          # sbatch itself failed: launch nothing more
        self.internal_executor = internal_executor
        self.query_interval = query_interval
        self.on_all_gone: Optional[Callable[[str], None]] = None
        self.backend: Optional["SlurmPilotBackend"] = None
        self.pilots: Dict[str, _Pilot] = {}
        self.query = SlurmQuery()
        self.sbatch_calls = 0
        self.submitted = 0
        self.lock = threading.RLock()
        self.io: "queue.Queue" = queue.Queue()
        self.key_file: Optional[Path] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._gone_reported = False
        self._last_query = 0.0
        self.last_error = ""

    # ------------------------------------------------------------ interface
    def start(self, address: str, key: bytes) -> None:
        self.address = address
        self.key_file = write_key_file(self.folder, key)
        self.executor = _slurm_executor(self.folder, self.internal_executor)
        self._thread = threading.Thread(target=self._loop, name="depio-slurm-pilots", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        self.io.put(("launch", max(self.min_workers, min(self.workers, self.max_workers))))

    def poke(self) -> None:
        """Something changed (tasks submitted, a worker came or went): rebalance, off this thread."""
        if self._thread is not None and not self._stopping:
            self.io.put(("rebalance", None))

    def alive(self) -> List[str]:
        with self.lock:
            return [p.job_id for p in self.pilots.values() if not p.ended]

    def stop(self, grace: float = 3.0, told: Optional[Set[int]] = None) -> None:
        """The dispatcher told the workers to leave; cancel whatever is still in Slurm and wait until
        squeue no longer lists it. (`told`, the PIDs that heard the Shutdown, matters only locally.)"""
        self._stopping = True
        if self._thread is None:
            return
        self.io.put(("stop", grace))
        self._thread.join(90)
        _remove(self.key_file)

    def _atexit(self) -> None:
        if not self._stopping:
            scancel(self.alive())
            _remove(self.key_file)

    # ------------------------------------------------------------ events from the backend
    def workers_changed(self) -> None:
        """The dispatcher's worker set changed: which pilots are registered, which are gone."""
        d = self.backend.dispatcher if self.backend is not None else None
        if d is None:
            return
        snap = None
        for _ in range(5):
            try:
                snap = d.snapshot()
                break
            except RuntimeError:     # read without a lock while it changed
                time.sleep(0.01)
        if snap is None:
            return
        now_ids = {w.get("slurm_job_id") for w in snap["workers"] if w.get("slurm_job_id")}
        with self.lock:
            for p in self.pilots.values():
                if p.ended:
                    continue
                if p.job_id in now_ids:
                    if not p.registered:
                        p.registered, p.state = True, "RUNNING"
                elif p.registered:
                    p.ended, p.state = True, "ENDED"
                    log.info("pilot job %s left", p.job_id)
        self.poke()

    # ------------------------------------------------------------ the launcher's thread
    def _loop(self) -> None:
        while True:
            due = self._periodic_due()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            try:
                kind, arg = self.io.get(timeout=timeout)
            except queue.Empty:
                kind, arg = "tick", None
            try:
                if kind == "stop":
                    self._cancel_all()
                    return
                if kind == "launch":
                    self._launch(arg)
                if due is not None and time.monotonic() >= due:
                    self._check()
                if kind in ("rebalance", "tick", "launch"):
                    self._rebalance()
            except Exception:
                log.exception("pilot launcher failed")

    def _periodic_due(self) -> Optional[float]:
        with self.lock:
            unseen = any(not p.ended and not p.registered for p in self.pilots.values())
        return self._last_query + self.query_interval if unseen else None

    def _launch(self, n: int) -> None:
        if n <= 0 or self._stopping or not self._may_launch():
            return
        params = dict(self.parameters)
        params["setup"] = list(params.get("setup") or []) + _python_path_setup()
        params.setdefault("job_name", "depio-pilot")
        walltime_s = _minutes(params.get("time", self.walltime_min)) * 60.0
        # Slurm's warning (SIGUSR2) `margin` s before the limit rather than submitit's 90 s; the pilot
        # takes it as "the limit is at most warning + 60 s away" (Slurm may send it 60 s early), not
        # as "leave now": with a short walltime the warning came at the start and pilots left at once
        params.setdefault("signal_delay_s", max(1, int(round(min(self.margin, walltime_s / 2)))))
        args = dict(address=self.address, key_file=str(self.key_file), slots=self.slots, walltime_s=walltime_s,
                    margin=self.margin, heartbeat=self.heartbeat, liveness=self.liveness,
                    idle_timeout=self.idle_timeout, warning_s=float(params["signal_delay_s"]))
        try:
            with _Params(self.executor, params) as ex:
                self.sbatch_calls += 1
                if n == 1:
                    jobs = [ex.submit(run_pilot, **args)]
                else:
                    with ex.batch():
                        jobs = [ex.submit(run_pilot, **args) for _ in range(n)]
        except Exception as e:
            self.last_error = f"sbatch failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
            log.error(self.last_error)
            self.broken = True       # do not hammer sbatch with the same error
            return
        self.submitted += n
        if not self._last_query:
            self._last_query = time.monotonic()
        with self.lock:
            for job in jobs:
                self.pilots[str(job.job_id)] = _Pilot(str(job.job_id), job)
        log.info("submitted %d pilot job(s): %s", n, ", ".join(str(j.job_id) for j in jobs))

    def _may_launch(self) -> bool:
        return not self.broken and self.failures < self.max_failures

    def _rebalance(self) -> None:
        if self._stopping or self.backend is None:
            return
        work, waiting = self.backend.work()
        with self.lock:
            alive = [p for p in self.pilots.values() if not p.ended]
            unseen = [p for p in alive if not p.registered]
        if work:
            target = max(self.min_workers, min(self.workers, self.max_workers))
            busy_slots = self.slots * (len(alive) - len(unseen))
            if waiting > busy_slots and not unseen:
                target = self.max_workers         # a backlog and nobody on the way: grow
            need = target - len(alive)
            if waiting == 0:
                need = self.min_workers - len(alive)   # nothing waits: no churn of idle pilots
            if need > 0 and self._may_launch():
                self._launch(need)
                with self.lock:
                    alive = [p for p in self.pilots.values() if not p.ended]
        if work and not alive and not self._gone_reported and self.on_all_gone is not None:
            self._gone_reported = True
            ended = [p for p in self.pilots.values() if p.state not in ("ENDED", "RUNNING")]
            why = "; ".join(f"job {p.job_id} {p.state}" + (f" ({p.reason})" if p.reason and p.reason != "None" else "")
                            for p in ended[-3:])
            self.on_all_gone(f"no Slurm pilot worker left, and no more may be started ({self.failures} pilot job(s) "
                             f"ended without connecting, limit {self.max_failures})" + (f": {self.last_error}" if self.last_error else "") + (f"; {why}" if why else ""))

    def _check(self) -> None:
        """One batched squeue (rate limited) for pilots submitted but never heard of."""
        with self.lock:
            ids = [p.job_id for p in self.pilots.values() if not p.ended and not p.registered]
        if not ids:
            return
        self._last_query = time.monotonic()
        st = self.query.states(ids)
        with self.lock:
            for jid in ids:
                p = self.pilots[jid]
                if p.registered or p.ended or jid not in st:
                    continue
                p.state, p.reason = st[jid]
                if _terminal(p.state):
                    p.ended = True
                    self.failures += 1
                    log.warning("pilot job %s ended without connecting: %s (%s)", jid, p.state, p.reason)

    def _cancel_all(self) -> None:
        with self.lock:
            ids = [p.job_id for p in self.pilots.values() if not p.ended or p.registered]
        scancel(ids)
        left = wait_gone(self.query, ids, 20.0) if ids else []
        if left:
            log.error("pilot jobs still listed after scancel: %s", ", ".join(left))


class SlurmPilotBackend(DispatcherBackend):
    """The pipeline's dispatcher, bound where compute nodes reach it, with pilot workers in Slurm."""

    def __init__(self, launcher: SlurmPilotLauncher, bind: str, heartbeat: float, liveness: int):
        super().__init__(launcher=launcher, bind=bind, heartbeat=heartbeat, liveness=liveness)
        launcher.backend = self
        self._flight: Dict[Tuple[int, int], bool] = {}     # (key, attempt) -> started
        self._flock = threading.Lock()

    def work(self) -> Tuple[bool, int]:
        """(tasks handed out and not ended?, how many of them not started)"""
        with self._flock:
            return bool(self._flight), sum(1 for s in self._flight.values() if not s)

    def submit(self, specs, functions) -> None:
        with self._flock:
            for s in specs:
                self._flight[(s.key, s.attempt)] = False
        super().submit(specs, functions)
        self.launcher.poke()

    def cancel(self, keys, reason) -> None:
        with self._flock:
            if keys is None:
                self._flight.clear()
            else:
                for k in [k for k in self._flight if k[0] in set(keys)]:
                    del self._flight[k]
        super().cancel(keys, reason)

    def observe(self, msg) -> None:
        if isinstance(msg, P.ClientReport):
            with self._flock:
                for key, attempt, _, worker in msg.started:
                    if (key, attempt) in self._flight:
                        self._flight[(key, attempt)] = True
                    m = re.match(r"pilot-([0-9_]+)@", worker or "")
                    if m and key < len(self.graph.tasks):
                        t = self.graph.tasks[key]
                        t._slurmid, t._slurmstate = m.group(1), "RUNNING"
                for r in msg.done:
                    self._flight.pop((r.key, r.attempt), None)
                    # a short task's start is not reported separately: its result names the pilot
                    m = re.match(r"pilot-([0-9_]+)@", r.worker or "")
                    if m and r.key < len(self.graph.tasks):
                        t = self.graph.tasks[r.key]
                        t._slurmid, t._slurmstate = m.group(1), t._slurmstate or "RUNNING"   # the pilot's state
                for lost in msg.lost:
                    self._flight.pop((lost.key, lost.attempt), None)
                for returned in msg.returned:
                    self._flight.pop((returned.key, returned.attempt), None)
            if msg.lost or msg.done or msg.returned:
                self.launcher.poke()
        elif isinstance(msg, P.WorkersChanged):
            self.launcher.workers_changed()

    @property
    def slurm_queries(self) -> int:
        return self.launcher.query.queries


class SlurmPilotExecutor(AbstractTaskExecutor):
    """Pilot workers: `workers` `depio-worker`s as Slurm jobs (one job array), `slots` tasks at once
    each, streaming many tasks from the pipeline's dispatcher. Thousands of tasks cost a few sbatch
    calls; Slurm is asked about jobs at most once per 30 s.

    `walltime` (minutes; default `parameters["slurm_time"]` or 60) is each pilot's time limit; a pilot
    takes no task it cannot finish (by the task's `timeout`) and leaves `margin` seconds before the
    limit. While tasks remain, the launcher keeps `workers` pilots (at least `min_workers`, and up to
    `max_workers` when tasks wait and no pilot is on its way), replacing those that end, within
    giving up once `max_failures` pilot jobs ended without ever connecting (or sbatch failed).
    Idle pilots leave after `idle_timeout` seconds.
    `address` / `$DEPIO_ADDRESS`: where pilots connect back (default: this host's outward interface)."""

    def __init__(self, workers: int = 2, slots: int = 1, parameters: Optional[Dict[str, Any]] = None,
                 folder=None, min_workers: Optional[int] = None, max_workers: Optional[int] = None,
                 walltime: Optional[float] = None, margin: Optional[float] = None,
                 idle_timeout: Optional[float] = 60.0, address: Optional[str] = None, heartbeat: float = 1.0,
                 liveness: int = 5, max_failures: Optional[int] = None, internal_executor=None,
                 max_jobs_pending: Optional[int] = None, max_jobs_queued: Optional[int] = None,
                 retries_on_worker_loss: int = 1):
        super().__init__(max_jobs_pending, max_jobs_queued, retries_on_worker_loss)
        self.workers = max(1, int(workers))
        self.slots = max(1, int(slots))
        self.min_workers = max(1, int(min_workers)) if min_workers is not None else min(self.workers, 1)
        self.max_workers = max(self.workers, int(max_workers)) if max_workers is not None else self.workers
        self.min_workers = min(self.min_workers, self.max_workers)
        base = dict(DEFAULT_PARAMS if parameters is None else parameters)
        params = sbatch_parameters(base)
        if walltime is not None:
            params["time"] = max(1, int(-(-_minutes(walltime) // 1)))   # sbatch takes whole minutes
        self.walltime = _minutes(params.setdefault("time", 60))
        params.setdefault("cpus_per_task", self.slots)
        self.parameters = params
        self.margin = float(margin) if margin is not None else min(60.0, max(5.0, 0.05 * self.walltime * 60))
        self.folder = Path(folder) if folder is not None else Path("slurm")
        self.idle_timeout = idle_timeout
        self.address = address
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_failures = max_failures if max_failures is not None else self.max_workers + 2
        self.internal_executor = internal_executor

    def make_backend(self) -> Backend:
        launcher = SlurmPilotLauncher(self.workers, self.slots, self.parameters, self.folder, self.min_workers,
                                      self.max_workers, self.walltime, self.margin, self.idle_timeout,
                                      self.heartbeat, self.liveness, self.max_failures, self.internal_executor)
        return SlurmPilotBackend(launcher, bind_address(self.address), self.heartbeat, self.liveness)

    def describe(self) -> str:
        return f"SlurmPilotExecutor({self.workers} pilots x {self.slots} slots)"


class _PoolView:
    """What a pilot launcher asks of its backend, answered for a pool: there is always work to be
    ready for, so the launcher keeps its pilots (and replaces those that reach their walltime)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    def work(self) -> Tuple[bool, int]:
        try:
            waiting = sum(c["queued"] for c in self.dispatcher.snapshot()["clients"])
        except RuntimeError:       # read without a lock while it changed
            waiting = 0
        return True, waiting


def pool_pilots(dispatcher, key: bytes, workers: int, slots: int = 1, walltime: float = 60.0,
                parameters: Optional[Dict[str, Any]] = None, folder=None, heartbeat: float = 1.0,
                liveness: int = 5) -> SlurmPilotLauncher:
    """Start and keep `workers` pilot jobs for a `depio pool` (`depio pool start --slurm N`)."""
    params = sbatch_parameters(dict(parameters or {}))
    params["time"] = max(1, int(-(-_minutes(walltime) // 1)))      # whole minutes, as sbatch wants
    params.setdefault("cpus_per_task", slots)
    margin = min(60.0, max(5.0, 0.05 * _minutes(walltime) * 60))
    launcher = SlurmPilotLauncher(workers, slots, params, Path(folder or "slurm"), workers, workers,
                                  _minutes(walltime), margin, None, heartbeat, liveness, workers + 2)
    launcher.backend = _PoolView(dispatcher)      # type: ignore[assignment]
    dispatcher.on_workers_changed = launcher.workers_changed
    launcher.start(dispatcher.worker_address, key)
    return launcher
