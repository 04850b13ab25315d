"""The base of every executor, apart from the executors themselves.

`depio.Executors` (local executors, and the Slurm ones by name), `depio.slurm` and `depio.pool` all
derive from it; keeping it here lets the dependency go one way: Executors -> slurm -> executor_base.
`from depio.Executors import AbstractTaskExecutor` keeps working.
"""
from __future__ import annotations

from typing import Optional

from .runtime.backends import Backend


class AbstractTaskExecutor:
    """Base of the executors; `max_jobs_queued` caps tasks handed out and not yet ended,
    `max_jobs_pending` caps those handed out and not yet started."""

    def __init__(self, max_jobs_pending: Optional[int] = None, max_jobs_queued: Optional[int] = None,
                 retries_on_worker_loss: int = 1):
        for name, value in (("max_jobs_pending", max_jobs_pending), ("max_jobs_queued", max_jobs_queued)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be at least 1, got {value}")
        self.max_jobs_pending = max_jobs_pending
        self.max_jobs_queued = max_jobs_queued
        self.retries_on_worker_loss = retries_on_worker_loss

    def make_backend(self) -> Backend:
        """A fresh backend for one run."""
        raise TypeError(f"{type(self).__name__} does not say how to run tasks")

    def describe(self) -> str:
        return type(self).__name__
