"""Recording a run as it goes: each ended task's history, and how a FINISHED task's products were
made, written in batched transactions from a thread of its own."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from operator import attrgetter
from typing import Iterable, List, Optional, Sequence, Set

from ..TaskStatus import TaskStatus, TERMINAL_STATES
from .codec import encode_history
from .records import MadeRecord
from .tasks import TaskState, needs_state

log = logging.getLogger("depio.state")

FINISHED, SKIPPED = TaskStatus.FINISHED, TaskStatus.SKIPPED
_STATUS_NAME = attrgetter("_status._name_")     # in C (`.name` is a Python-level property)


class Recorder:
    """One run's history and made records, written in batched transactions from a thread of its
    own (every INTERVAL seconds, and once more at the end: `finish()` starts that last pass while the
    pipeline stops its workers, `close()` waits for it), so that recording stays off the scheduler's
    and the pipeline loop's way; the history goes packed (`codec.encode_history`). Only a task that
    ended FINISHED is recorded as made; SKIPPED tasks are counted, not listed (an up-to-date run of
    100,000 tasks writes one row)."""

    INTERVAL = 2.0          # seconds between transactions at most: what a kill -9 may lose (those tasks rerun)
    BATCH = 5000            # tasks per transaction at most

    def __init__(self, state: TaskState, tasks: Sequence, log_dir: Optional[os.PathLike] = None,
                 script: Optional[str] = None, may_make: Optional[Iterable] = None):
        self.state, self.tasks, self.may_make = state, tasks, may_make
        if script is None:
            script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c") else ""
        self.script, self.log_dir = script, log_dir
        self.run_id = ""                        # set by `_begin`, in the recorder's thread
        self.todo = list(range(len(tasks)))
        self.makers: Set[int] = set()          # tasks that may be recorded as made: set by `_begin`
        self.pending = 0
        self.packed: List[bytes] = []          # history batches not written yet
        self.made: List[MadeRecord] = []
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="depio-state-recorder", daemon=True)
        self._thread.start()

    def _begin(self) -> bool:
        """Begin the run's record (and prune old runs) here, off the run's way to its first task."""
        try:
            self.run_id = self.state.store.begin_run(self.script, log_dir=self.log_dir)
            # known before anything runs: then the last pass, which the run waits for, looks no
            # further into a task that made nothing (10,000 tasks' attributes cost milliseconds)
            if self.may_make is None:
                self.makers = {i for i, t in enumerate(self.tasks) if t.products or needs_state(t)}
            else:
                self.makers = {t._queue_id - 1 for t in self.may_make}
            self.may_make = None
            return True
        except Exception as e:
            self.failed = True
            log.warning("cannot record this run in %s: %s", self.state.store.path, e)
            return False

    def _loop(self) -> None:
        if not self._begin():
            return
        while not self._stop.wait(self.INTERVAL):
            self.poll()
        self.poll(final=True)
        if self.failed:
            return
        status = list(map(_STATUS_NAME, self.tasks))
        counts = {s: status.count(s) for s in set(status)}     # in C; a Counter costs 3 ms per 10,000
        try:
            self.state.store.end_run(self.run_id, counts)
        except Exception as e:
            log.warning("cannot end the run's record in %s: %s", self.state.store.path, e)

    @classmethod
    def start(cls, state: Optional[TaskState], tasks: Sequence, log_dir: Optional[os.PathLike] = None,
              may_make: Optional[Iterable] = None) -> Optional["Recorder"]:
        """A recorder, or None when there is no store. A run that cannot be recorded (logged, here or in
        the recorder's thread) goes on without history rather than fail. `may_make`: the tasks that
        may be recorded as made (those with products or a build mode that reads the store), each
        `tasks[t._queue_id - 1]`, when the caller knows them (None: every task is looked at)."""
        if state is None:
            return None
        try:
            return cls(state, tasks, log_dir, may_make=may_make)
        except Exception as e:
            log.warning("cannot record this run in %s: %s", state.store.path, e)
            return None

    def poll(self, final: bool = False) -> None:
        """Take the tasks that ended since the last call; write a batch when one is due. A store that
        fails (a full disk, a lock held too long) is logged once and recording stops: never the run."""
        if self.failed:
            return
        try:
            self._poll(final)
        except Exception as e:
            self.failed = True
            log.warning("recording the run in %s failed, recording stops: %s", self.state.store.path, e)

    failed = False

    def _poll(self, final: bool) -> None:
        tasks, terminal = self.tasks, TERMINAL_STATES
        done = [i for i in self.todo if tasks[i]._status in terminal]
        if len(done) == len(self.todo):
            self.todo = []
        elif done:
            gone = set(done)
            self.todo = [i for i in self.todo if i not in gone]
        ended = [i for i in done if tasks[i]._status is not SKIPPED]
        if ended:
            makers = self.makers
            keys = [self._made(tasks[i]) if i in makers and tasks[i]._status is FINISHED else "" for i in ended] \
                if makers else [""] * len(ended)
            self.packed.append(encode_history([tasks[i] for i in ended], keys))
            self.pending += len(ended)
        if final or self.pending >= self.BATCH or (self.packed or self.made) and \
                time.monotonic() - self.last >= self.INTERVAL:
            self._flush()

    def _made(self, t) -> str:
        """Record how a FINISHED task's products were made; its key ("" when it cannot be recorded)."""
        try:
            rec = self.state.current(t)
        except Exception as e:       # a product deleted meanwhile, an unreadable file: not recorded
            log.warning("cannot record how %s was made: %s", t.label, e)
            return ""
        self.made.append(rec)
        return rec.key

    def _flush(self) -> None:
        memo, settled = self.state._memo, self.state.settled
        if self.packed or self.made or settled or (memo is not None and memo.dirty):
            packed, made = self.packed, self.made
            self.packed, self.made, self.pending = [], [], 0
            quick = [settled.popleft() for _ in range(len(settled))]
            self.state.store.write_batch(self.run_id, (), made, memo, packed=packed, quick=quick)
        self.last = time.monotonic()

    def finish(self) -> None:
        """Every task has ended: write what is left and end the run with its counts by status (tasks
        that never ended count too), in the recorder's thread."""
        self._stop.set()

    def close(self) -> None:
        """`finish()`, and wait until it is written."""
        self._stop.set()
        self._thread.join()


__all__ = ["Recorder"]
