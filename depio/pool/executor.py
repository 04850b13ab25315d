"""The pipeline's side of a pool: `PoolExecutor`, the backend choice that joins a running pool."""
from __future__ import annotations

import os
from typing import Optional

from ..executor_base import AbstractTaskExecutor
from ..runtime.backends import Backend, DispatcherBackend
from .registry import POOL_ENV, resolve_pool


class PoolExecutor(AbstractTaskExecutor):
    """Run a pipeline's tasks on a running pool: `PoolExecutor("default")`, a connection file, or a
    client address (`tcp://host:port`, key from `key_file` or $DEPIO_KEY). If the pool goes away
    during a run, the run fails and says so."""

    def __init__(self, pool: str = "default", key_file: Optional[str] = None, max_jobs_pending: Optional[int] = None,
                 max_jobs_queued: Optional[int] = None, retries_on_worker_loss: int = 1,
                 heartbeat: float = 1.0, liveness: int = 3):
        super().__init__(max_jobs_pending, max_jobs_queued, retries_on_worker_loss)
        self.pool = pool
        self.key_file = key_file
        self.heartbeat = heartbeat
        self.liveness = liveness

    def make_backend(self) -> Backend:
        info = resolve_pool(self.pool, self.key_file)
        if "://" not in self.pool and not info.running:
            raise RuntimeError(f"pool {info.name!r} is not running: start it with `depio pool start --name "
                               f"{info.name} --local N`")
        return DispatcherBackend(None, address=info.client_address, key=info.key_bytes, heartbeat=self.heartbeat,
                                 liveness=self.liveness, name=f"pipeline pid {os.getpid()}")

    def describe(self) -> str:
        return f"PoolExecutor({self.pool!r})"


def executor_from_environment() -> Optional[PoolExecutor]:
    """`DEPIO_POOL=name` (or an address) makes an unchanged script run on that pool."""
    spec = os.environ.get(POOL_ENV, "").strip()
    return PoolExecutor(spec) if spec else None
