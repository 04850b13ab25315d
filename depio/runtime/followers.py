"""Followers: a task in flight takes along the first dependent that waits for it alone.

With a backend that runs them (`Backend.runs_followers`), the follower goes to the same worker and
starts there the moment its predecessor succeeds, without a round trip through the scheduler. How
many chain behind each other follows the tasks' length (`ahead`): up to FOLLOW_AHEAD for tasks of a
few milliseconds, where a round trip would cost more than the task, and one for long tasks, so that
a pause or a cancel leaves little in the workers' hands. A follower's build-mode decision is taken
when it is handed out, as if its predecessor had run (which it must, for the follower to start); so
a product that appears while the predecessor runs does not make it skip. A task in IF_CHANGED is never
made a follower: its decision needs what its predecessor writes (the same bytes again do not make it
run), so it is decided when the predecessor has ended, like any released task.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from ..BuildMode import BuildMode
from ..TaskStatus import TaskStatus
from .decide import decide

FOLLOW_AHEAD = 32     # followers handed out along a chain at most (tasks of a few ms); refilled at half

WAITING, PENDING = TaskStatus.WAITING, TaskStatus.PENDING
DECIDED_ON_INPUTS = BuildMode.IF_CHANGED     # decided once the inputs are written, so never a follower


class Followers:
    """The chains handed out: who follows whom, and how far ahead to hand out. Scheduler thread only."""

    def __init__(self, n: int, tasks: Sequence, dependents: Sequence[Sequence[int]], status: List[TaskStatus],
                 unmet: List[int]):
        self.tasks, self.dependents, self.status, self.unmet = tasks, dependents, status, unmet
        self.after: List[int] = [-1] * n           # j -> the task it was handed out to follow (-1: none)
        self.follower: Dict[int, int] = {}         # i -> the task handed out to follow it
        self.to_extend: List[Tuple[int, int]] = []   # (chain tail, followers to add) at the next submit
        self.avg_duration: Optional[float] = None    # of the tasks that ran, moving average (seconds)

    def ran_for(self, seconds: float) -> None:
        avg = self.avg_duration
        self.avg_duration = seconds if avg is None else avg + 0.2 * (seconds - avg)

    def ahead(self) -> int:
        """How many followers to keep handed out along a chain: enough that tasks of a few ms never
        wait for a round trip; one for tasks of a tenth of a second or more (a round trip is then
        lost in the task's own time, and a pause leaves one link to run)."""
        d = self.avg_duration
        if d is None:
            return 4               # nothing ran yet: a few, until the tasks' length is known
        return FOLLOW_AHEAD if d < 0.002 else 4 if d < 0.1 else 1

    def next_follower(self, i: int) -> Optional[int]:
        """The first dependent of `i` that waits for `i` alone and would run once `i` has run."""
        status, unmet = self.status, self.unmet
        for j in self.dependents[i]:
            if status[j] is WAITING and unmet[j] == 1 and self.tasks[j].buildmode is not DECIDED_ON_INPUTS:
                d = decide(self.tasks[j], True)
                if d.run:       # (an error is decided and reported the usual way once `i` is done)
                    self.tasks[j].reason = d.reason
                    return j
        return None

    def link(self, i: int, j: int) -> None:
        self.after[j] = i
        self.follower[i] = j

    def unlink(self, j: int) -> None:
        self.after[j] = -1

    def forget(self, i: int) -> None:
        self.follower.pop(i, None)

    def chain_ran(self, i: int) -> None:
        """Task `i` succeeded: its follower is now a task like any other. If fewer than half of the
        followers wanted are left behind it, ask for more at the end of the chain."""
        j = self.follower.pop(i, None)
        if j is None or self.after[j] != i:
            return
        self.after[j] = -1
        depth, tail = 0, j
        while True:
            k = self.follower.get(tail)
            if k is None or self.after[k] != tail or self.status[k] is not PENDING:
                break
            tail, depth = k, depth + 1
        ahead = self.ahead()
        if depth < max(1, ahead // 2):
            self.to_extend.append((tail, ahead - depth))
