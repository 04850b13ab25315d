"""Pilot mode (`SlurmPilotExecutor`): long-lived workers as Slurm job arrays; also a pool's pilots.

The pipeline's dispatcher binds where compute nodes reach it, with a configured key (`key_file=`,
`$DEPIO_KEY`) or a fresh one for this run, which reaches the pilots through a mode-600 file. The
launcher (`pilot_launcher`) keeps one group of pilots per request shape; this backend tells it how
much work each group has, and tells the scheduler (`SlurmState`) which pilot job runs a task.
"""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pykka

from ..runtime import protocol as P
from ..runtime.backends import Backend, DispatcherBackend
from ..runtime.events import SlurmState
from ..runtime.resources import from_shape
from ..executor_base import AbstractTaskExecutor
from .addresses import bind_address
from .cluster import notice
from .pilot_launcher import GroupKey, SlurmPilotLauncher
from .submission import DEFAULT_PARAMS, _minutes, sbatch_parameters

_PILOT = re.compile(r"pilot-([0-9_]+)@")


class SlurmPilotBackend(DispatcherBackend):
    """The pipeline's dispatcher, bound where compute nodes reach it, with pilot workers in Slurm."""

    def __init__(self, launcher: SlurmPilotLauncher, bind: str, heartbeat: float, liveness: int,
                 key: Optional[bytes] = None):
        super().__init__(launcher=launcher, bind=bind, key=key, heartbeat=heartbeat, liveness=liveness)
        launcher.backend = self
        launcher.notice = self.notice
        self._flight: Dict[Tuple[int, int], list] = {}     # (key, attempt) -> [started, pilot group]
        self._flock = threading.Lock()
        self.base_needed = True

    def bind(self, scheduler, graph) -> None:
        super().bind(scheduler, graph)
        groups = [self.launcher.group_for(s) for s in self.shapes]
        self.base_needed = any(g is None for g in groups)

    def work(self) -> Dict[GroupKey, Tuple[int, int]]:
        """By pilot group: (tasks handed out and not ended, how many of them not started)."""
        out: Dict[GroupKey, list] = {}
        with self._flock:
            for started, group in self._flight.values():
                n = out.setdefault(group, [0, 0])
                n[0] += 1
                n[1] += not started
        return {g: (n[0], n[1]) for g, n in out.items()}

    def submit(self, specs, functions) -> None:
        group_for, shapes = self.launcher.group_for, self.shapes
        with self._flock:
            for s in specs:
                self._flight[(s.key, s.attempt)] = [False, group_for(shapes[s.key]) if shapes else None]
        super().submit(specs, functions)
        self.launcher.poke()

    def _slurm(self, key: int, worker: str, state: str) -> None:
        m = _PILOT.match(worker or "")
        if m and key < len(self.graph.tasks):
            try:
                self.scheduler.tell(SlurmState(key, state, m.group(1)))
            except pykka.ActorDeadError:
                pass

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
                        self._flight[(key, attempt)][0] = True
                    self._slurm(key, worker, "RUNNING")
                for r in msg.done:
                    # a short task's start is not reported separately: its result names the pilot
                    if self._flight.pop((r.key, r.attempt), None) is not None:
                        self._slurm(r.key, r.worker, "RUNNING")       # the pilot's state
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
    Idle pilots leave after `idle_timeout` seconds. A task asking for other resources than the
    pilots hold (`@task(..., slurm_gpus_per_task=1)`, `resources={"gpus": 1}`) runs on a group of
    pilots of its own shape (one array per sbatch call, sized by its own queue); each slot sees only
    its own GPUs. `address` / `$DEPIO_ADDRESS`: where pilots connect back (default: this host's
    outward interface). `key_file` / `$DEPIO_KEY`: a key of your own; default: a fresh one per run,
    handed to the pilots in a mode-600 file."""

    def __init__(self, workers: int = 2, slots: int = 1, parameters: Optional[Dict[str, Any]] = None,
                 folder=None, min_workers: Optional[int] = None, max_workers: Optional[int] = None,
                 walltime: Optional[float] = None, margin: Optional[float] = None,
                 idle_timeout: Optional[float] = 60.0, address: Optional[str] = None, heartbeat: float = 1.0,
                 liveness: int = 5, max_failures: Optional[int] = None, internal_executor=None,
                 max_jobs_pending: Optional[int] = None, max_jobs_queued: Optional[int] = None,
                 retries_on_worker_loss: int = 1, key_file: Optional[str] = None):
        super().__init__(max_jobs_pending, max_jobs_queued, retries_on_worker_loss)
        self.workers = max(1, int(workers))
        self.slots = max(1, int(slots))
        self.min_workers = max(1, int(min_workers)) if min_workers is not None else min(self.workers, 1)
        self.max_workers = max(self.workers, int(max_workers)) if max_workers is not None else self.workers
        self.min_workers = min(self.min_workers, self.max_workers)
        self.default_partition = parameters is None
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
        self.key_file = key_file

    def make_backend(self) -> Backend:
        params = dict(self.parameters)
        launcher = SlurmPilotLauncher(self.workers, self.slots, params, self.folder, self.min_workers,
                                      self.max_workers, self.walltime, self.margin, self.idle_timeout,
                                      self.heartbeat, self.liveness, self.max_failures, self.internal_executor)
        said: List[str] = []
        if self.default_partition and launcher.cluster.missing_default_partition(str(params.get("partition", "")),
                                                                                 said.append):
            params.pop("partition", None)
            launcher.groups[None].params.pop("partition", None)
        # a configured key wins; else a fresh one for this run (the pilots read it from a mode-600 file)
        key = P.load_key(self.key_file) or P.new_key()
        backend = SlurmPilotBackend(launcher, bind_address(self.address), self.heartbeat, self.liveness, key=key)
        for line in said:
            backend.notice(line)
        return backend

    def describe(self) -> str:
        return f"SlurmPilotExecutor({self.workers} pilots x {self.slots} slots)"


class _PoolView:
    """What a pilot launcher asks of its backend, answered for a pool. The base group always has
    work to be ready for, so the launcher keeps its pilots (and replaces those that reach their
    walltime). Tasks that ask for more than the base pilots hold wait in the dispatcher's routing,
    by shape: each shape's count becomes the work of its own pilot group, which the launcher starts
    while it has work and lets go when it has none. A shape no node of the cluster could ever hold
    gets no group (its sbatch would fail and stop every launch): its tasks fail at once in the
    dispatcher (`Routing.impossible`), unless a worker that fits them is registered."""

    def __init__(self, dispatcher, launcher: SlurmPilotLauncher):
        self.dispatcher = dispatcher
        self.launcher = launcher
        self.refused: Dict[tuple, str] = {}      # by shape: why no node could hold it ("": one could)
        self._said: set = set()                  # those the pool's log has named
        launcher.cluster.nodes(), launcher.cluster.partitions()   # asked here: the dispatcher's thread must not wait on scontrol
        dispatcher.assignment.routing.impossible = self.too_big

    def too_big(self, shape: tuple) -> Optional[str]:
        """Why no node of the cluster could hold a task of `shape` (None: some node could)."""
        why = self.refused.get(shape)
        if why is None:      # asked once per shape ("": some node could hold it)
            why = self.refused[shape] = self.launcher.too_big(from_shape(shape)) or ""
        return why or None

    def _read(self, read):
        """Read the dispatcher's state from this thread: it runs in another one, without locks."""
        for _ in range(5):
            try:
                return read()
            except RuntimeError:     # a dict or deque changed while it was read
                time.sleep(0.01)
        return None

    def work(self) -> Dict[GroupKey, Tuple[int, int]]:
        snap = self._read(self.dispatcher.snapshot)
        waiting = sum(c["queued"] for c in snap["clients"]) if snap else 0
        out: Dict[GroupKey, list] = {None: [max(1, waiting), waiting]}
        shaped = self._read(self.dispatcher.assignment.routing.work) or {}
        for shape, (flight, queued) in shaped.items():
            group = self._group(shape)
            if group is not False:
                n = out.setdefault(group, [0, 0])
                n[0] += flight
                n[1] += queued
        return {g: (n[0], n[1]) for g, n in out.items()}

    def _group(self, shape: tuple):
        """The pilot group for tasks of `shape`; False if no node could ever run them."""
        why = self.too_big(shape)
        if why:
            if shape not in self._said:
                self._said.add(shape)
                self.launcher.notice(f"pool: no pilot can be started for a task that {why}; such tasks go only "
                                     f"to the registered workers that fit them")
            return False
        return self.launcher.group_for(shape)


SHAPED_IDLE = 60.0      # seconds a pool's pilot of a shape group stays without work (as the executor's)


def pool_pilots(dispatcher, key: bytes, workers: int, slots: int = 1, walltime: float = 60.0,
                parameters: Optional[Dict[str, Any]] = None, folder=None, heartbeat: float = 1.0,
                liveness: int = 5, shaped_idle: float = SHAPED_IDLE, poll: float = 2.0) -> SlurmPilotLauncher:
    """Start and keep `workers` pilot jobs for a `depio pool` (`depio pool start --slurm N`), and a
    group of pilots for each resource shape its pipelines' tasks ask for while such tasks wait or
    run (pilots of a group leave after `shaped_idle` s without work). Nothing pokes a pool's
    launcher when a task arrives: it looks every `poll` seconds."""
    params = sbatch_parameters(dict(parameters or {}))
    params["time"] = max(1, int(-(-_minutes(walltime) // 1)))      # whole minutes, as sbatch wants
    params.setdefault("cpus_per_task", slots)
    margin = min(60.0, max(5.0, 0.05 * _minutes(walltime) * 60))
    launcher = SlurmPilotLauncher(workers, slots, params, Path(folder or "slurm"), workers, workers,
                                  _minutes(walltime), margin, None, heartbeat, liveness, workers + 2)
    launcher.group_idle_timeout = shaped_idle
    launcher.poll_interval = poll
    launcher.notice = notice
    launcher.backend = _PoolView(dispatcher, launcher)      # type: ignore[assignment]
    dispatcher.on_workers_changed = launcher.workers_changed
    launcher.start(dispatcher.worker_address, key)
    return launcher
