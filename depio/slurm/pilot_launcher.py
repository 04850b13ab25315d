"""Pilot jobs: start long-lived workers as Slurm job arrays, one group of pilots per request shape.

The base group runs with the executor's parameters and takes every task its pilots fit (most tasks
ask for nothing special). A task asking for more (a GPU, more memory, another partition) gets a
group of its own shape: pilots whose job asks for that shape for each of their slots (`--gres`,
`--cpus-per-task`, `--mem`, `--partition`, `--constraint`), sized by that shape's own queue and
started only while it has work. Each group's pilots are one array per sbatch call.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

from ..runtime.resources import DEFAULT, Offer, Resources, fits, from_shape, request_of
from .addresses import _remove, write_key_file
from .cluster import Cluster
from .job import run_pilot
from .orphans import cancel_orphans, job_mark, with_mark
from .pacing import Pacer
from .query import QUERY_INTERVAL, SlurmQuery, scancel, wait_gone
from .states import _terminal
from .submission import _minutes, _Params, _python_path_setup, _slurm_executor, sbatch_options

log = logging.getLogger("depio.slurm")

GroupKey = Optional[tuple]         # None: the base group; else a request shape


class _Pilot:
    def __init__(self, job_id: str, group: GroupKey, job=None):
        self.job_id = job_id
        self.group = group
        self.job = job
        self.submitted = time.monotonic()
        self.registered = False
        self.ended = False
        self.state = "PENDING"
        self.reason = ""


class _Group:
    """Pilots of one shape: their job parameters, slots and what each slot offers."""

    def __init__(self, key: GroupKey, params: Dict[str, Any], slots: int, walltime_min: float, constraint: str):
        self.key, self.params, self.slots = key, params, slots
        self.walltime_min, self.constraint = walltime_min, constraint
        r = request_of(None, params)
        per = max(1, slots)
        self.offer = Offer(cpus=max(1, r.cpus // per), gpus=r.gpus // per, mem_mb=r.mem_mb // per,
                           time_min=walltime_min, constraint=constraint,
                           partition=r.partition or os.environ.get("SBATCH_PARTITION", "") or "?",
                           features=tuple(x for x in constraint.replace("&", ",").split(",") if x))


def _scaled(r: Resources, slots: int) -> Resources:
    return Resources(r.cpus * slots, r.gpus * slots, r.mem_mb * slots, r.time_min, r.partition, r.constraint)


def make_group(shape: tuple, base: Dict[str, Any], slots: int, walltime_min: float, margin: float,
               cluster: Cluster) -> _Group:
    """The pilots for tasks of `shape`: the base parameters, with that shape for each of as many slots
    as a node of its partition can hold (at least one)."""
    r = from_shape(shape)
    slots = next((s for s in range(slots, 0, -1) if cluster.too_big(_scaled(r, s)) is None), 1)
    params = dict(base)
    params.pop("gpus_per_node", None)
    params["cpus_per_task"] = max(int(params.get("cpus_per_task") or 1), r.cpus * slots)
    params.update(sbatch_options(_scaled(r, slots)))
    if r.time_min > walltime_min:
        walltime_min = r.time_min + margin / 60
        params["time"] = max(1, int(-(-walltime_min // 1)))
    log.info("pilot group for tasks asking %s: %d slot(s) per pilot", r.describe(), slots)
    return _Group(shape, params, slots, walltime_min, r.constraint or str(params.get("constraint") or ""))


class SlurmPilotLauncher:
    """Starts pilot workers as Slurm jobs and keeps enough of each group while it has work. Launcher
    interface as `LocalLauncher`: start(address, key), stop(), alive(), on_all_gone, too_big()."""

    def __init__(self, workers: int, slots: int, parameters: Dict[str, Any], folder: Path,
                 min_workers: int, max_workers: int, walltime_min: float, margin: float,
                 idle_timeout: Optional[float], heartbeat: float, liveness: int, max_failures: int,
                 internal_executor=None, query_interval: float = QUERY_INTERVAL, cluster: Optional[Cluster] = None):
        self.workers, self.slots = workers, slots
        self.parameters = parameters
        self.folder = Path(folder)
        self.min_workers, self.max_workers = min_workers, max_workers
        self.walltime_min, self.margin = walltime_min, margin
        self.idle_timeout = idle_timeout
        self.group_idle_timeout = idle_timeout    # a shape group's pilots (a pool keeps its base ones)
        self.poll_interval: Optional[float] = None    # a pool: rebalance this often (no one pokes it)
        self.heartbeat, self.liveness = heartbeat, liveness
        self.max_failures = max_failures
        self.failures = 0            # pilots that ended without ever connecting
        self.broken = False          # sbatch itself failed: launch nothing more
        self.internal_executor = internal_executor
        self.query_interval = query_interval
        self.cluster = cluster or Cluster()
        self.on_all_gone: Optional[Callable[[str], None]] = None
        self.notice: Callable[[str], None] = lambda line: None
        self.backend: Any = None
        self.pilots: Dict[str, _Pilot] = {}
        self.groups: Dict[GroupKey, _Group] = {None: _Group(None, parameters, slots, walltime_min,
                                                            str(parameters.get("constraint") or ""))}
        self.query = SlurmQuery()
        self.pacer = Pacer()
        self.sbatch_calls = 0
        self.submitted = 0
        self.lock = threading.RLock()
        self.io: "queue.Queue" = queue.Queue()
        self.key_file: Optional[Path] = None
        self.mark = ""
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._gone_reported = False
        self._last_query = 0.0
        self.last_error = ""

    # ------------------------------------------------------------ groups
    def group_for(self, shape: Optional[tuple]) -> GroupKey:
        """The group whose pilots run a task of this shape: the base group if its pilots fit it."""
        if shape is None or fits(from_shape(shape), self.groups[None].offer):
            return None
        with self.lock:
            if shape not in self.groups:
                self.groups[shape] = make_group(shape, self.parameters, self.slots, self.walltime_min, self.margin,
                                                self.cluster)
        return shape

    def too_big(self, request: Resources) -> Optional[str]:
        """Why no pilot could ever run a task asking `request` (no node of its partition is that big)."""
        if request is DEFAULT:
            return None
        base = request_of(None, self.parameters)
        partition = request.partition or base.partition
        return self.cluster.too_big(Resources(request.cpus, request.gpus, request.mem_mb, request.time_min,
                                              partition, request.constraint))

    # ------------------------------------------------------------ interface
    def start(self, address: str, key: bytes) -> None:
        self.address = address
        self.key_file = write_key_file(self.folder, key)
        self.mark = job_mark(self.folder)
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
        d = getattr(self.backend, "dispatcher", None)
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
        try:
            line = cancel_orphans(self.folder, self.query)
            if line:
                self.notice(line)
        except Exception:
            log.exception("looking for jobs of an earlier run failed")
        while True:
            due = self._periodic_due()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            if self.poll_interval is not None:
                timeout = self.poll_interval if timeout is None else min(timeout, self.poll_interval)
            try:
                kind, arg = self.io.get(timeout=timeout)
            except queue.Empty:
                kind, arg = "tick", None
            try:
                if kind == "stop":
                    self._cancel_all()
                    return
                if kind == "launch" and getattr(self.backend, "base_needed", True):
                    self._launch(None, arg)
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

    def _launch(self, key: GroupKey, n: int) -> None:
        if n <= 0 or self._stopping or not self._may_launch():
            return
        g = self.groups[key]
        params = with_mark(dict(g.params), self.mark)
        params["setup"] = list(params.get("setup") or []) + _python_path_setup()
        params.setdefault("job_name", "depio-pilot")
        walltime_s = _minutes(params.get("time", g.walltime_min)) * 60.0
        # Slurm's warning (SIGUSR2) `margin` s before the limit rather than submitit's 90 s; the pilot
        # takes it as "the limit is at most warning + 60 s away" (Slurm may send it 60 s early), not
        # as "leave now": with a short walltime the warning came at the start and pilots left at once
        params.setdefault("signal_delay_s", max(1, int(round(min(self.margin, walltime_s / 2)))))
        args = dict(address=self.address, key_file=str(self.key_file), slots=g.slots, walltime_s=walltime_s,
                    margin=self.margin, heartbeat=self.heartbeat, liveness=self.liveness,
                    idle_timeout=self.idle_timeout if key is None else self.group_idle_timeout, warning_s=float(params["signal_delay_s"]), constraint=g.constraint)
        wait = self.pacer.due(0.0, n, 0) - time.monotonic()
        if wait > 0:
            time.sleep(wait)             # this thread's own pace: one sbatch per second at most
        try:
            with _Params(self.executor, params) as ex:
                self.sbatch_calls += 1
                if n == 1:
                    jobs = [ex.submit(run_pilot, **args)]
                else:
                    with ex.batch():
                        jobs = [ex.submit(run_pilot, **args) for _ in range(n)]
        except Exception as e:
            self.pacer.sent(ok=True)
            self.last_error = f"sbatch failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
            log.error(self.last_error)
            self.broken = True       # do not hammer sbatch with the same error
            return
        self.pacer.sent(ok=True)
        self.submitted += n
        if not self._last_query:
            self._last_query = time.monotonic()
        with self.lock:
            for job in jobs:
                self.pilots[str(job.job_id)] = _Pilot(str(job.job_id), key, job)
        log.info("submitted %d pilot job(s)%s: %s", n, "" if key is None else f" for tasks asking "
                 f"{from_shape(key).describe()}", ", ".join(str(j.job_id) for j in jobs))

    def _may_launch(self) -> bool:
        return not self.broken and self.failures < self.max_failures

    def _rebalance(self) -> None:
        if self._stopping or self.backend is None:
            return
        work = self.backend.work()          # group -> (tasks handed out and not ended, not started)
        any_alive = False
        for key in list(self.groups):
            flight, waiting = work.get(key, (0, 0))
            with self.lock:
                alive = [p for p in self.pilots.values() if not p.ended and p.group == key]
                unseen = [p for p in alive if not p.registered]
            if flight:
                need = self._need(key, flight, waiting, len(alive), len(unseen))
                if need > 0 and self._may_launch():
                    self._launch(key, need)
                    with self.lock:
                        alive = [p for p in self.pilots.values() if not p.ended and p.group == key]
            any_alive = any_alive or bool(alive)
            if flight and not alive and not self._may_launch():
                self._all_gone()
        if any(f for f, _ in work.values()) and not any_alive and not self._may_launch():
            self._all_gone()
        self._retire_idle(work)

    def _retire_idle(self, work: Dict[GroupKey, tuple]) -> None:
        """Pilots of a group without work make room for another group whose pilots wait in Slurm
        (they would only leave after their idle timeout, holding the node)."""
        with self.lock:
            waiting = {p.group for p in self.pilots.values() if not p.ended and not p.registered}
            idle = [p for p in self.pilots.values() if not p.ended and p.registered and not work.get(p.group, (0,))[0]
                    and waiting - {p.group}]
            for p in idle:
                p.ended, p.state = True, "ENDED"
        if idle:
            log.info("pilot job(s) %s without work leave for other groups' pilots", ", ".join(p.job_id for p in idle))
            scancel([p.job_id for p in idle])

    def _need(self, key: GroupKey, flight: int, waiting: int, alive: int, unseen: int) -> int:
        """Pilots to start now for a group with `flight` tasks handed out, `waiting` of them not started."""
        g = self.groups[key]
        if key is None:
            target = max(self.min_workers, min(self.workers, self.max_workers))
            if waiting > g.slots * (alive - unseen) and not unseen:
                target = self.max_workers         # a backlog and nobody on the way: grow
            return (target if waiting else self.min_workers) - alive
        # a shape's group: sized by its own queue, between 1 and max_workers pilots
        target = min(self.max_workers, max(1, -(-flight // g.slots)))
        return target - alive if waiting else 0

    def _all_gone(self) -> None:
        if self._gone_reported or self.on_all_gone is None:
            return
        self._gone_reported = True
        ended = [p for p in self.pilots.values() if p.state not in ("ENDED", "RUNNING")]
        why = "; ".join(f"job {p.job_id} {p.state}" + (f" ({p.reason})" if p.reason and p.reason != "None" else "")
                        for p in ended[-3:])
        self.on_all_gone(f"no Slurm pilot worker left, and no more may be started ({self.failures} pilot job(s) "
                         f"ended without connecting, limit {self.max_failures})"
                         + (f": {self.last_error}" if self.last_error else "") + (f"; {why}" if why else ""))

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

