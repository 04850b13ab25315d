"""Per-task mode (`SubmitItExecutor`): one Slurm job per task attempt, served by the pipeline's
dispatcher like every other worker (keys, liveness, resources and limits exist once).

Each attempt goes to the dispatcher pinned to a token (`resources.pinned_shape`) and to the
launcher (`task_jobs.SlurmTaskLauncher`), which submits its job; the job's worker registers with
that pin, runs the task and leaves. What the dispatcher reports passes through here on its way
to the scheduler: a start or a result also updates the task's Slurm state (as `SlurmState`
messages: the scheduler actor alone writes tasks), and a lost worker or a crashed task's process
is held back until Slurm has said why (CANCELLED, TIMEOUT, OUT_OF_MEMORY fail the task with the
reason; a node failure or preemption runs it again).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import pykka

from ..executor_base import AbstractTaskExecutor
from ..runtime import protocol as P
from ..runtime.backends import Backend, DispatcherBackend
from ..runtime.events import BackendFailed, SlurmState
from ..runtime.resources import pinned_shape, request_of
from .addresses import bind_address
from .cluster import Cluster
from .query import QUERY_INTERVAL
from .submission import DEFAULT_PARAMS, resource_parameters, sbatch_parameters
from .task_jobs import SlurmTaskLauncher, _Attempt

log = logging.getLogger("depio.slurm")


class SlurmTaskBackend(DispatcherBackend):
    """See the module docstring."""

    runs_followers = False       # every task its own job

    def __init__(self, folder: Path, parameters: Dict[str, Any], internal_executor=None, address: Optional[str] = None,
                 heartbeat: float = 1.0, liveness: int = 5, query_interval: float = QUERY_INTERVAL,
                 recheck_interval: float = 2.0, default_partition: bool = False, key_file: Optional[str] = None):
        self.folder = Path(folder)
        self.parameters = parameters
        self.default_partition = default_partition      # the partition is upstream's built-in "gpu"
        self.drop_partition = False
        self.cluster = Cluster()
        launcher = SlurmTaskLauncher(self.folder, internal_executor, heartbeat, liveness, query_interval,
                                     recheck_interval, self.cluster)
        launcher.notice = self.notice       # the run's view shows it
        # a configured key wins; else a fresh one for this run, handed to the jobs in a mode-600 file
        key = P.load_key(key_file) or P.new_key()
        super().__init__(launcher=launcher, bind=bind_address(address), key=key, heartbeat=heartbeat,
                         liveness=liveness)
        self.sbatch_params: Dict[int, Dict[str, Any]] = {}

    @property
    def address(self) -> str:
        return self.worker_address

    @property
    def sbatch_calls(self) -> int:
        return self.launcher.sbatch_calls

    def bind(self, scheduler, graph) -> None:
        super().bind(scheduler, graph)
        self.launcher.tell = self._tell
        self._check_cluster(graph)

    def _tell(self, msg: object) -> None:
        if isinstance(msg, P.ClientReport) and msg.done:
            for r in msg.done:
                a = self.launcher.attempt(r.key, r.attempt)
                if a is not None:
                    a.over = True
        try:
            self.scheduler.tell(msg)
        except pykka.ActorDeadError:
            pass

    def _check_cluster(self, graph) -> None:
        """Before anything runs: the built-in default partition where the cluster has none of that
        name (say so, use the cluster's default), and tasks that no node could ever run (fail the run,
        naming them and what they asked for)."""
        if self.default_partition:
            self.drop_partition = self.cluster.missing_default_partition(str(self.parameters.get("slurm_partition", "")),
                                                                         self.notice)
        base = dict(self.parameters)
        if self.drop_partition:
            base.pop("slurm_partition", None)
        problems = []
        for t in graph.tasks:
            why = self.cluster.too_big(request_of(t, base))
            if why:
                problems.append(f"task {t.name} {why}")
        if problems:
            self._tell(BackendFailed("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")))

    def _params(self, task) -> Dict[str, Any]:
        own = getattr(task, "slurm_parameters", None)
        params = sbatch_parameters(self.parameters, own)
        explicit = resource_parameters(task.resources) if getattr(task, "resources", None) else {}
        if self.drop_partition and not (own and ("slurm_partition" in own or "partition" in own)) \
                and "partition" not in explicit:
            params.pop("partition", None)
        if explicit:
            if "gres" in explicit:          # the explicit GPU count replaces any other spelling of one
                for name in ("gpus_per_node", "gpus_per_task", "gres"):
                    params.pop(name, None)
            if "mem" in explicit:
                for name in ("mem_per_cpu", "mem_per_gpu"):
                    params.pop(name, None)
            params.update(explicit)
        return params

    def submit(self, specs, functions) -> None:
        if self._closing:
            return
        attempts, pinned = [], []
        for spec in specs:
            task = self.graph.tasks[spec.key]
            a = _Attempt(spec, task.name, self._params(task))
            attempts.append(a)
            pinned.append(dataclasses.replace(spec, shape=pinned_shape(a.token)))
            self._tell(SlurmState(spec.key, "SUBMITTING", ""))
        super().submit(pinned, functions)
        self.launcher.want(attempts)

    def cancel(self, keys, reason) -> None:
        super().cancel(keys, reason)
        self.launcher.cancel(None if keys is None else set(keys))

    def _deliver(self, msg: object) -> None:
        """Reports on their way to the scheduler: Slurm states along, losses held until Slurm said why."""
        if isinstance(msg, P.ClientReport) and not self._closing:
            msg = self._relay(msg)
            if msg is None:
                return
        super()._deliver(msg)

    def _relay(self, msg: P.ClientReport) -> Optional[P.ClientReport]:
        launcher = self.launcher
        started, done, lost = [], [], []
        for key, attempt, t, worker in msg.started:
            a = launcher.attempt(key, attempt)
            if a is not None:
                launcher.started(a, t)
                self._tell(SlurmState(key, "RUNNING", a.job_id or None))
                worker = a.label
            started.append((key, attempt, t, worker))
        for r in msg.done:
            a = launcher.attempt(r.key, r.attempt)
            if a is None:
                done.append(r)
                continue
            if a.started is None:
                launcher.started(a, r.started)
            if r.error and r.error.get("kind") == "WorkerCrash":     # killed by Slurm (OOM, ...)? ask it first
                launcher.lost(a, r.error.get("message", "the task's process died"), crash=r)
                continue
            a.finished = a.over = True
            self._tell(SlurmState(r.key, "COMPLETED", a.job_id or None))
            done.append(dataclasses.replace(r, worker=a.label))
        for x in msg.lost:
            a = launcher.attempt(x.key, x.attempt)
            if a is None:
                lost.append(x)
            else:
                launcher.lost(a, x.reason)
        if not (started or done or lost or msg.returned):
            return None
        return P.ClientReport(tuple(started), tuple(done), tuple(lost), msg.returned)

    def describe(self) -> str:
        return f"SlurmTaskBackend({self.worker_address or 'not started'})"


class SubmitItExecutor(AbstractTaskExecutor):
    """Slurm through submitit, one job per task (depio 0.1.x's mode), results over ZeroMQ.

    `parameters` (default: upstream's `{"slurm_time": 2880, "slurm_partition": "gpu", "slurm_mem": 32,
    "gpus_per_node": 0}`, in AutoExecutor spelling) are overridden per task by `task.slurm_parameters`
    (decorator keywords such as `slurm_gpus_per_task=1`). Where the cluster has no "gpu" partition and
    the partition came from that default, jobs go to the cluster's default partition (said in one
    line). `$SBATCH_*` variables reach sbatch and win over the script's lines (e.g.
    `SBATCH_PARTITION=debug`, `SBATCH_RESERVATION=...`). `internal_executor`: a
    `submitit.AutoExecutor`/`SlurmExecutor` of your own (its folder and parameters are used).
    `max_jobs_queued` caps this run's unfinished jobs in Slurm, `max_jobs_pending` those not yet
    started. `address` (or `$DEPIO_ADDRESS`): where the jobs connect back; default: this host's
    outward interface. `key_file` (or `$DEPIO_KEY`): a key of your own; default: a fresh one per run."""

    def __init__(self, folder=None, internal_executor=None, parameters: Optional[Dict[str, Any]] = None,
                 max_jobs_pending: int = 45, max_jobs_queued: int = 20, address: Optional[str] = None,
                 heartbeat: float = 1.0, liveness: int = 5, retries_on_worker_loss: int = 1,
                 key_file: Optional[str] = None):
        super().__init__(max_jobs_pending, max_jobs_queued, retries_on_worker_loss)
        if folder is None and internal_executor is not None and getattr(internal_executor, "folder", None):
            folder = internal_executor.folder
        self.folder = Path(folder) if folder is not None else Path("slurm")
        self.internal_executor = internal_executor
        self.default_partition = parameters is None and internal_executor is None
        self.parameters = dict(DEFAULT_PARAMS if self.default_partition else parameters or {})
        self.address = address
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.key_file = key_file

    def make_backend(self) -> Backend:
        return SlurmTaskBackend(self.folder, self.parameters, self.internal_executor, self.address,
                                self.heartbeat, self.liveness, default_partition=self.default_partition,
                                key_file=self.key_file)

    def describe(self) -> str:
        return f"SubmitItExecutor(folder={str(self.folder)!r})"
