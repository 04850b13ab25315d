"""The main thread's picture of a run, kept from the scheduler's change feed.

The scheduler appends the index of each task whose state changed to a `ChangeFeed`; `Board.update`
drains it and adjusts the counts, the running set and the failures, so a redraw or a log pass
costs what changed since the last one, not a walk over every task. Without a feed (a `Display`
built by hand) `update` rescans the tasks.
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Dict, List, Optional, Sequence

from ..TaskStatus import TaskStatus, TERMINAL_STATES

RUNNING, FAILED = TaskStatus.RUNNING, TaskStatus.FAILED


class Board:
    """Counts per state, running tasks, failures in order, tasks ended since `take_ended()`."""

    def __init__(self, tasks: Sequence, feed=None):
        self.tasks = tasks
        self.feed = feed
        self._lock = threading.Lock()
        self.known: List[TaskStatus] = []
        self.counts: Counter = Counter()
        self.running: Dict[int, None] = {}     # an ordered set of task indices
        self.failed: List[int] = []
        self.ended: List[int] = []
        self._rescan()

    def _rescan(self) -> None:
        self.known = [t._status for t in self.tasks]
        self.counts = Counter(self.known)
        self.running = {i: None for i, s in enumerate(self.known) if s is RUNNING}
        self.failed = [i for i, s in enumerate(self.known) if s is FAILED]

    def update(self) -> None:
        with self._lock:
            if self.feed is None:
                self._rescan()
                return
            changed = self.feed.drain()
            if len(changed) > len(self.tasks):
                self._catch_up()
                return
            tasks, known, counts = self.tasks, self.known, self.counts
            for i in changed:
                new, old = tasks[i]._status, known[i]
                if new is old:
                    continue          # a second change of the same task, or a Slurm state
                known[i] = new
                counts[old] -= 1
                counts[new] += 1
                if old is RUNNING:
                    self.running.pop(i, None)
                if new is RUNNING:
                    self.running[i] = None
                elif new is FAILED:
                    self.failed.append(i)
                if new in TERMINAL_STATES:
                    self.ended.append(i)

    def _catch_up(self) -> None:
        """More changes than tasks (a run that ended between two passes, as a quiet short one does):
        compare every task once, in comprehensions, instead of following each change."""
        old, new = self.known, [t._status for t in self.tasks]
        diff = [i for i, a, b in zip(range(len(new)), old, new) if a is not b]
        self.known, self.counts = new, Counter(new)
        self.running = {i: None for i in self.running if new[i] is RUNNING}
        self.running.update((i, None) for i in diff if new[i] is RUNNING)
        self.failed += [i for i in diff if new[i] is FAILED]
        self.ended += [i for i in diff if new[i] in TERMINAL_STATES]

    def take_ended(self) -> List[int]:
        """Tasks that ended since the last call (only with a feed)."""
        with self._lock:
            ended, self.ended = self.ended, []
        return ended

    def running_tasks(self) -> list:
        return [self.tasks[i] for i in list(self.running)]

    def failed_tasks(self) -> list:
        return [self.tasks[i] for i in self.failed]

    def ended_count(self) -> int:
        return sum(self.counts.get(s, 0) for s in TERMINAL_STATES)

    def left(self) -> int:
        return len(self.tasks) - self.ended_count()

    def eta(self, elapsed: float) -> Optional[float]:
        """Time left, from the throughput of the tasks that ran so far (None until one ended)."""
        left = self.left()
        if not left:
            return 0.0
        ran = self.counts.get(TaskStatus.FINISHED, 0) + self.counts.get(FAILED, 0)
        return elapsed * left / ran if ran else None
