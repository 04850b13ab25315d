"""Every task state change of a run, in one table: (from, to) -> the named transition.

A transition is the only code that moves the scheduler's counters (`pending`, `in_flight`,
`remaining`) and the only writer of a task's `_status`; `move()` raises `IllegalTransition` for a
pair the table does not name. `validate()` recomputes the counters from the states and checks each
task against its dependencies (tests call it between events).

    WAITING --(release: skip)------------------------------------------> SKIPPED
    WAITING --(release: run; submit, or handed out as a follower)------> PENDING
    PENDING --start--> RUNNING
    PENDING | RUNNING --result ok------------------------------------> FINISHED
    PENDING | RUNNING --error, or lost too often---------------------> FAILED
    PENDING | RUNNING --retry, lost (again), follower handed back----> WAITING
    WAITING --cannot decide whether to run / the backend failed------> FAILED
    WAITING | PENDING | RUNNING --an upstream task failed-------------> DEPFAILED
    WAITING | PENDING | RUNNING --cancel------------------------------> CANCELED
    (PENDING | RUNNING -> DEPFAILED: a follower whose predecessor failed.)

Every change is also appended to `feed` (task indices, thread-safe) for the main thread's view and
log writer, so that those read only what changed instead of every task on each pass.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..TaskStatus import TaskStatus, TERMINAL_STATES, SUCCESSFUL_TERMINAL_STATES

WAITING, PENDING, RUNNING = TaskStatus.WAITING, TaskStatus.PENDING, TaskStatus.RUNNING
FINISHED, SKIPPED, FAILED = TaskStatus.FINISHED, TaskStatus.SKIPPED, TaskStatus.FAILED
DEPFAILED, CANCELED = TaskStatus.DEPFAILED, TaskStatus.CANCELED
# by state value (`_value_`, a plain attribute: an Enum's hash is Python code, too slow per transition)
_CUT_SHORT = [False] * (max(s.value for s in TaskStatus) + 1)    # ended without a result: end_time is now
for _s in (FAILED, DEPFAILED, CANCELED):
    _CUT_SHORT[_s.value] = True


class IllegalTransition(AssertionError):
    """A state change the table does not name."""


class InconsistentState(AssertionError):
    """`validate()` found a counter or a task state that does not fit the others."""


class ChangeFeed:
    """Task indices whose state changed, appended by the scheduler's thread, drained by the main
    thread. No lock: under the GIL a list's append, slice copy and slice deletion are each atomic,
    and appends only extend the end, so `drain` removes exactly the prefix it copied."""

    def __init__(self) -> None:
        self._q: List[int] = []
        self.append = self._q.append

    def drain(self) -> List[int]:
        q = self._q
        n = len(q)
        out = q[:n]
        del q[:n]
        return out


class _NoFeed:
    """Nobody watches (a scheduler driven by hand): changes are not kept."""

    @staticmethod
    def append(i: int) -> None:
        return None

    @staticmethod
    def drain() -> List[int]:
        return []


class TaskStates:
    """The state of each task of one run and the counters derived from them (see the module
    docstring). Used by the scheduler actor's thread only."""

    def __init__(self, tasks: Sequence, feed: Optional[ChangeFeed] = None):
        n = len(tasks)
        self.tasks = tasks
        self.status: List[TaskStatus] = [WAITING] * n
        self.pending = 0          # handed to the backend, not seen to start
        self.in_flight = 0        # handed to the backend, not ended (pending included)
        self.remaining = n        # not terminal
        self.feed = feed if feed is not None else _NoFeed()
        pairs: Dict[Tuple[TaskStatus, TaskStatus], Callable[[int], None]] = {
            (WAITING, PENDING): self.waiting_pending,
            (PENDING, RUNNING): self.pending_running,
            (PENDING, WAITING): self.pending_waiting,
            (RUNNING, WAITING): self.running_waiting,
        }
        for end in (FINISHED, FAILED, DEPFAILED, CANCELED):
            pairs[(PENDING, end)] = self.pending_ended
            pairs[(RUNNING, end)] = self.running_ended
        for end in (SKIPPED, FAILED, DEPFAILED, CANCELED):
            pairs[(WAITING, end)] = self.waiting_ended
        self.pairs = pairs
        # the same, as table[from._value_][to._value_] (None: illegal), read on the hot path
        size = max(s.value for s in TaskStatus) + 1
        self.table: List[List[Optional[Callable[[int], None]]]] = [[None] * size for _ in range(size)]
        for (a, b), f in pairs.items():
            self.table[a.value][b.value] = f

    # ------------------------------------------------------------ the transitions
    def waiting_pending(self, i: int) -> None:
        self.in_flight += 1
        self.pending += 1

    def pending_running(self, i: int) -> None:
        self.pending -= 1

    def pending_waiting(self, i: int) -> None:
        self.pending -= 1
        self.in_flight -= 1

    def running_waiting(self, i: int) -> None:
        self.in_flight -= 1

    def pending_ended(self, i: int) -> None:
        self.pending -= 1
        self.in_flight -= 1
        self.remaining -= 1

    def running_ended(self, i: int) -> None:
        self.in_flight -= 1
        self.remaining -= 1

    def waiting_ended(self, i: int) -> None:
        self.remaining -= 1

    # ------------------------------------------------------------ applying them
    def move(self, i: int, to: TaskStatus, reason: Optional[str] = None) -> None:
        """Task `i` goes to state `to` through the table's transition (`reason`, when given, is the
        task's new reason)."""
        status = self.status
        f = self.table[status[i]._value_][to._value_]
        if f is None:
            raise IllegalTransition(f"task {self.tasks[i].label}: no transition {status[i].name} -> {to.name}")
        f(i)
        status[i] = to
        t = self.tasks[i]
        t._status = to
        if reason is not None:
            t.reason = reason
        if _CUT_SHORT[to._value_] and t.end_time is None and t.start_time is not None:
            t.end_time = time.time()
        self.feed.append(i)

    def abandon(self, reason: str) -> bool:
        """The scheduler crashed: every task not yet terminal is CANCELED with `reason`, without the
        table (it may be what failed). Whether any was in the backend's hands."""
        in_backend = False
        for i, s in enumerate(self.status):
            if s not in TERMINAL_STATES:
                in_backend = in_backend or s is PENDING or s is RUNNING
                self.status[i] = CANCELED
                t = self.tasks[i]
                t._status, t.reason = CANCELED, reason
                self.feed.append(i)
        self.pending = self.in_flight = self.remaining = 0
        return in_backend

    def validate(self, deps: Sequence[Sequence[int]], unmet: Sequence[int], after: Sequence[int],
                 ready: Sequence[int], released: bool) -> None:
        """Recompute the counters from the states, and check each task against its dependencies.
        `after[i]`: the task `i` follows (-1: none); `released`: the run has begun."""
        status, tasks = self.status, self.tasks
        pending = sum(1 for s in status if s is PENDING)
        running = sum(1 for s in status if s is RUNNING)
        remaining = sum(1 for s in status if s not in TERMINAL_STATES)
        for name, kept, real in (("pending", self.pending, pending), ("in_flight", self.in_flight, pending + running),
                                 ("remaining", self.remaining, remaining)):
            if kept != real:
                raise InconsistentState(f"counter {name} is {kept}, the states say {real}")
        queued = set(ready)
        if len(queued) != len(ready):
            raise InconsistentState("a task is queued twice in the ready queue")
        for i, s in enumerate(status):
            label = tasks[i].label
            if tasks[i]._status is not s:
                raise InconsistentState(f"task {label}: its _status {tasks[i]._status.name} is not {s.name}")
            undone = [j for j in deps[i] if status[j] not in SUCCESSFUL_TERMINAL_STATES]
            if unmet[i] != len(undone):
                raise InconsistentState(f"task {label}: {unmet[i]} unmet dependencies counted, {len(undone)} real")
            problem = _check(s, undone, status, after[i], i in queued, released)
            if problem:
                raise InconsistentState(f"task {label} ({s.name}): {problem}")


def _check(s: TaskStatus, undone: List[int], status: List[TaskStatus], after: int, queued: bool,
           released: bool) -> str:
    """What is wrong with one task in state `s` (empty: nothing)."""
    if queued and (s is not WAITING or undone):
        return "in the ready queue but not a released waiting task"
    if s is WAITING:
        if released and not undone and not queued and after == -1:
            return "released, yet neither queued nor decided"
        return ""
    if s in (PENDING, RUNNING, FINISHED):
        if s is not FINISHED and after != -1:    # a follower: only its predecessor may be unfinished
            return "" if undone == [after] or not undone else "follows a task, yet more is unfinished"
        return f"dependency #{undone[0] + 1} is {status[undone[0]].name}" if undone else ""
    if s is SKIPPED and undone:
        return f"skipped while dependency #{undone[0] + 1} is {status[undone[0]].name}"
    if s is DEPFAILED and not any(status[j] in (FAILED, DEPFAILED) for j in undone):
        return "no dependency failed"
    return ""
