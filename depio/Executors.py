"""Executors: how a pipeline runs its tasks (names and signatures as in depio 0.1.x).

An executor only chooses a backend; the scheduler is the same for all of them.
"""
from __future__ import annotations

import os
from concurrent.futures import Executor
from typing import Any, Dict, Optional

from .executor_base import AbstractTaskExecutor
from .runtime.backends import Backend, DispatcherBackend, FuturesBackend, InlineBackend
from .runtime.launchers import LocalLauncher


class SequentialExecutor(AbstractTaskExecutor):
    """One task at a time, in the pipeline's own process and main thread: `breakpoint()` works."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)

    def make_backend(self) -> Backend:
        return InlineBackend(echo=True)


class ParallelExecutor(AbstractTaskExecutor):
    """Local parallelism: `depio-worker` processes on this machine, one slot per core by default.

    `workers` x `slots_per_worker` tasks run at once. `internal_executor`, as in 0.1.x, is a
    `concurrent.futures.Executor` of your own that runs the tasks instead."""

    def __init__(self, internal_executor: Optional[Executor] = None, max_jobs_pending: Optional[int] = None,
                 max_jobs_queued: Optional[int] = None, workers: Optional[int] = None,
                 slots_per_worker: int = 1, heartbeat: float = 1.0, liveness: int = 3,
                 retries_on_worker_loss: int = 1, **kwargs: Any):
        super().__init__(max_jobs_pending, max_jobs_queued, retries_on_worker_loss)
        if internal_executor is not None and not isinstance(internal_executor, Executor):
            raise TypeError("ParallelExecutor: internal_executor must be a concurrent.futures.Executor, "
                            f"got {type(internal_executor).__name__}")
        self.internal_executor = internal_executor
        self.slots_per_worker = max(1, int(slots_per_worker))
        self.workers = int(workers) if workers else max(1, (os.cpu_count() or 1) // self.slots_per_worker)
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.options: Dict[str, Any] = kwargs

    def make_backend(self) -> Backend:
        if self.internal_executor is not None:
            return FuturesBackend(self.internal_executor)
        return DispatcherBackend(LocalLauncher(self.workers, self.slots_per_worker, self.heartbeat, self.liveness),
                                 heartbeat=self.heartbeat, liveness=self.liveness)

    def describe(self) -> str:
        if self.internal_executor is not None:
            return f"ParallelExecutor({type(self.internal_executor).__name__})"
        return f"ParallelExecutor({self.workers} workers x {self.slots_per_worker} slots)"


def __getattr__(name: str) -> Any:
    """The Slurm executors live in depio.slurm (which derives them from depio.executor_base, not
    from this module): loaded on first use, so that local runs never import submitit's helpers."""
    if name in ("SubmitItExecutor", "SlurmPilotExecutor"):
        from . import slurm
        return getattr(slurm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AbstractTaskExecutor", "SequentialExecutor", "ParallelExecutor", "SubmitItExecutor", "SlurmPilotExecutor"]
