"""Batched recording of what ended: the runtime reports each ended task, the writer turns thousands
a second into a few transactions (`StateStore.write_batch`)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, List, Mapping, Optional

from .files import HashMemo
from .records import MadeRecord, RunTask

if TYPE_CHECKING:
    from .store import StateStore


class StateWriter:
    """Buffers what the runtime reports as tasks end and writes it in batches (one transaction per
    `batch` tasks or per `interval` seconds, from `poll()`), so that thousands of tasks a second cost
    a few transactions. A made record is kept only for a task whose status is FINISHED."""

    def __init__(self, store: StateStore, run_id: Optional[str], memo: Optional[HashMemo] = None,
                 batch: int = 2000, interval: float = 0.5):
        self.store, self.run_id, self.memo = store, run_id, memo
        self.batch, self.interval = batch, interval
        self.tasks: List[RunTask] = []
        self.made: List[MadeRecord] = []
        self._last = time.monotonic()

    def ended(self, task: RunTask, made: Optional[MadeRecord] = None) -> None:
        self.tasks.append(task)
        if made is not None and task.status == "FINISHED":
            self.made.append(made)

    def poll(self) -> None:
        if len(self.tasks) >= self.batch or (self.tasks and time.monotonic() - self._last >= self.interval):
            self.flush()

    def flush(self) -> None:
        if self.tasks or self.made or (self.memo is not None and self.memo.dirty):
            tasks, made = self.tasks, self.made
            self.tasks, self.made = [], []
            self.store.write_batch(self.run_id, tasks, made, self.memo)
        self._last = time.monotonic()

    def close(self, counts: Optional[Mapping[str, int]] = None) -> None:
        """Write what is left and end the run."""
        self.flush()
        if self.run_id is not None:
            self.store.end_run(self.run_id, counts)


__all__ = ["StateWriter"]
