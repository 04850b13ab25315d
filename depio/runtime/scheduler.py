"""The scheduler actor: owns every task's state for one pipeline run.

It reacts to messages only (results, starts, losses, cancellation); there is no polling loop. Each
state change is one named transition method, in the spirit of Dask's scheduler:

    WAITING --release--> (SKIPPED | ready) --submit--> PENDING --start--> RUNNING
    RUNNING --finish--> FINISHED | --fail--> FAILED (+ DEPFAILED downstream) | --retry--> PENDING
    any non-terminal --cancel--> CANCELED

Releasing dependents costs O(out-degree): each task counts its unfinished dependencies.

Followers: with a backend that runs them (`Backend.runs_followers`), a task in flight takes along
the first dependent that waits for it alone and would run: it goes to the same worker and starts
there the moment its predecessor succeeds, without a round trip through this actor. How many chain
behind each other follows the tasks' length (`_ahead`): up to FOLLOW_AHEAD for tasks of a few
milliseconds, where a round trip would cost more than the task, and one for long tasks, so that a
pause or a cancel leaves little in the workers' hands. A follower's build-mode decision is taken
when it is handed out, as if its predecessor had run (which it must, for the follower to start);
so a product that appears while the predecessor runs does not make it skip. A follower handed back
unstarted (`TaskReturned`) or lost returns to WAITING, and to ready once nothing it needs is
unfinished.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

import pykka

from . import protocol as P
from ..BuildMode import BuildMode
from .events import BackendFailed
from .execution import restore_source_lines
from .graph import Graph
from .inbox import DispatchingInbox
from ..TaskStatus import TaskStatus, TERMINAL_STATES

log = logging.getLogger("depio.scheduler")

FOLLOW_AHEAD = 32     # followers handed out along a chain at most (tasks of a few ms); refilled at half

WAITING, PENDING, RUNNING = TaskStatus.WAITING, TaskStatus.PENDING, TaskStatus.RUNNING
FINISHED, SKIPPED, FAILED = TaskStatus.FINISHED, TaskStatus.SKIPPED, TaskStatus.FAILED
DEPFAILED, CANCELED = TaskStatus.DEPFAILED, TaskStatus.CANCELED


# messages the scheduler takes besides the protocol's ClientReport
@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class Cancel:
    reason: str


@dataclass(frozen=True)
class Pause:
    paused: bool


@dataclass
class Limits:
    max_in_flight: Optional[int] = None   # tasks handed to the backend and not yet ended
    max_pending: Optional[int] = None     # of those, not yet started
    lost_retries: int = 1                 # re-dispatches after a worker loss, per task
    lost_before_start: int = 5            # losses of a task not seen to start, before it fails anyway


class SchedulerActor(pykka.ThreadingActor):
    """See the module docstring. `done` is set when every task is terminal."""

    @staticmethod
    def _create_actor_inbox() -> DispatchingInbox:
        return DispatchingInbox()    # the pipeline's own dispatcher runs in this actor's thread

    def __init__(self, graph: Graph, backend, done: threading.Event, limits: Optional[Limits] = None):
        super().__init__()
        self.g = graph
        self.tasks = graph.tasks
        self.backend = backend
        self.done = done
        self.limits = limits or Limits()
        n = len(graph)
        self.status: List[TaskStatus] = [WAITING] * n
        self.unmet: List[int] = [len(d) for d in graph.deps]
        self.ran: List[bool] = [False] * n
        self.attempt: List[int] = [0] * n
        self.failures: List[int] = [0] * n
        self.losses: List[int] = [0] * n             # lost while running (against lost_retries)
        self.unstarted_losses: List[int] = [0] * n   # lost before it was seen to start
        self.ready: Deque[int] = deque()
        self.in_flight = 0
        self.pending = 0
        self.remaining = n
        self.paused = False
        self.cancelled: Optional[str] = None
        self.sent_functions: set = set()
        self.warmed_up = False
        self.follows = getattr(backend, "runs_followers", False)
        self.after: List[int] = [-1] * n           # j -> the task it was handed out to follow (-1: none)
        self.follower: Dict[int, int] = {}         # i -> the task handed out to follow it
        self.to_extend: List[Tuple[int, int]] = []   # (chain tail, followers to add) for _submit_ready
        self.avg_duration: Optional[float] = None    # of the tasks that ran, moving average (seconds)

    # ------------------------------------------------------------ message entry
    def on_receive(self, msg):
        if isinstance(msg, P.ClientReport):
            for key, attempt, t, worker in msg.started:
                self.t_start(key, attempt, t, worker)
            for result in msg.done:
                self.t_result(result)
            for lost in msg.lost:
                self.t_lost(lost)
            for returned in msg.returned:
                self.t_returned(returned)
        elif isinstance(msg, Start):
            self.t_begin()
        elif isinstance(msg, Cancel):
            self.t_cancel_all(msg.reason)
        elif isinstance(msg, Pause):
            self.paused = msg.paused
        elif isinstance(msg, BackendFailed):
            self.t_cancel_all(msg.reason, status=FAILED)
        self._submit_ready()
        self._check_done()

    def on_failure(self, exception_type, exception_value, traceback):
        log.error("scheduler failed: %s", exception_value)
        self.done.set()

    # ------------------------------------------------------------ transitions
    def _set(self, i: int, s: TaskStatus) -> None:
        self.status[i] = s
        self.tasks[i]._status = s

    def t_begin(self) -> None:
        """Release every task without task dependencies."""
        self._release_all([i for i, n in enumerate(self.unmet) if n == 0])

    def _release_all(self, start: List[int]) -> None:
        """Decide each released task: skip it (and release its dependents in turn) or make it ready.
        A worklist, not recursion: a chain of 100,000 up-to-date tasks must not overflow the stack."""
        work = deque(start)
        breathe = self.actor_inbox.breathe
        while work:
            i = work.popleft()
            breathe()       # deciding stats files, maybe on a slow file system: heartbeats go on
            if self.status[i] is not WAITING:
                continue
            t = self.tasks[i]
            upstream_ran = any(self.ran[j] for j in self.g.deps[i])
            try:
                reason = t.run_reason(upstream_ran)
            except Exception as e:
                self._terminal(i, FAILED, f"cannot decide whether to run: {e}")
                self._depfail_downstream(i)
                continue
            if reason is None:
                t.reason = ("up to date" if t.products and t.buildmode is not BuildMode.NEVER
                            else f"build mode {t.buildmode.name}")
                self._terminal(i, SKIPPED)
                for j in self.g.dependents[i]:
                    self.unmet[j] -= 1
                    if self.unmet[j] == 0:
                        work.append(j)
            else:
                t.reason = reason
                self.ready.append(i)
                if not self.warmed_up:     # the first runnable task: workers boot while the rest is decided
                    self.warmed_up = True
                    self.backend.warm_up()

    def _submit_ready(self) -> None:
        if self.paused or self.cancelled or not (self.ready or self.to_extend):
            return
        specs, functions = [], {}
        breathe = self.actor_inbox.breathe
        room = self._room
        limited = self.limits.max_in_flight is not None or self.limits.max_pending is not None
        dependents = self.g.dependents if self.follows else None
        ready = self.ready
        k = 0
        while ready and (not limited or room()):
            if not k & 63:
                breathe()
            k += 1
            i = ready.popleft()
            specs.append(self._spec(i, functions))
            self._set(i, PENDING)
            self.in_flight += 1
            self.pending += 1
            if dependents is not None and dependents[i]:
                self._follow(i, self._ahead(), specs, functions)
        extend, self.to_extend = self.to_extend, []
        for tail, budget in extend:
            self._follow(tail, budget, specs, functions)
        if specs:
            self.backend.submit(specs, functions)

    def _room(self) -> bool:
        """Whether the limits let one more task go to the backend."""
        lim = self.limits
        return ((lim.max_in_flight is None or self.in_flight < lim.max_in_flight) and
                (lim.max_pending is None or self.pending < lim.max_pending))

    def _spec(self, i: int, functions: Dict[bytes, bytes], after: Optional[int] = None) -> P.TaskSpec:
        g, t = self.g, self.tasks[i]
        self.attempt[i] += 1
        t.attempts += 1
        d = g.func_digest[i]
        if d not in self.sent_functions:
            self.sent_functions.add(d)
            functions[d] = g.functions[d]
        return P.TaskSpec(i, self.attempt[i], t.label, d, g.payloads[i], tuple(map(str, t.products)),
                          tuple(map(str, t.path_dependencies or ())), t.timeout, after)

    # ------------------------------------------------------------ followers
    def _follow(self, i: int, budget: int, specs: List[P.TaskSpec], functions: Dict[bytes, bytes]) -> None:
        """Hand out up to `budget` followers in a chain behind task `i` (in flight), within the limits."""
        while budget > 0 and self._room():
            j = self._next_follower(i)
            if j is None:
                return
            specs.append(self._spec(j, functions, after=i))
            self._set(j, PENDING)
            self.in_flight += 1
            self.pending += 1
            self.after[j] = i
            self.follower[i] = j
            i = j
            budget -= 1

    def _next_follower(self, i: int) -> Optional[int]:
        """The first dependent of `i` that waits for `i` alone and would run once `i` has run."""
        status, unmet = self.status, self.unmet
        for j in self.g.dependents[i]:
            if status[j] is WAITING and unmet[j] == 1:
                t = self.tasks[j]
                try:
                    reason = t.run_reason(True)
                except Exception:
                    continue             # decided (and reported) the usual way once `i` is done
                if reason is not None:
                    t.reason = reason
                    return j
        return None

    def _ahead(self) -> int:
        """How many followers to keep handed out along a chain: enough that tasks of a few ms never
        wait for a round trip through this actor; one for tasks of a tenth of a second or more (a
        round trip is then lost in the task's own time, and a pause leaves one link to run)."""
        d = self.avg_duration
        if d is None:
            return 4               # nothing ran yet: a few, until the tasks' length is known
        return FOLLOW_AHEAD if d < 0.002 else 4 if d < 0.1 else 1

    def _chain_ran(self, i: int) -> None:
        """Task `i` succeeded: its follower is now a task like any other. If fewer than half of the
        followers wanted (`_ahead`) are left behind it, hand out more at the end of the chain."""
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
        ahead = self._ahead()
        if depth < max(1, ahead // 2):
            self.to_extend.append((tail, ahead - depth))

    def t_start(self, key: int, attempt: int, when: float, worker: str) -> None:
        if self.attempt[key] != attempt or self.status[key] is not PENDING:
            return
        self.pending -= 1
        t = self.tasks[key]
        t.start_time, t.worker = when, worker
        self._set(key, RUNNING)

    def t_result(self, r: P.TaskResult) -> None:
        i = r.key
        if self.attempt[i] != r.attempt or self.status[i] not in (PENDING, RUNNING):
            return            # a late result of an attempt given up on: first result wins
        if self.status[i] is PENDING:
            self.pending -= 1
        self.in_flight -= 1
        t = self.tasks[i]
        t.start_time, t.end_time = r.started, r.ended
        d, avg = r.ended - r.started, self.avg_duration
        self.avg_duration = d if avg is None else avg + 0.2 * (d - avg)
        t._stdout, t._stderr = r.stdout, r.stderr
        if r.worker:
            t.worker = r.worker
        if r.error is None:
            t.error = None
            if r.value is not None:
                t._result_blob = r.value
            self.ran[i] = True
            self._terminal(i, FINISHED)
            self._release_dependents(i)
            if self.follower:
                self._chain_ran(i)
            return
        self.follower.pop(i, None)
        self.failures[i] += 1
        if r.error.get("kind") != "DependencyNotMetException" and self.failures[i] <= t.retries:
            log.info("task %s failed (%s), retry %d of %d", t.label, r.error.get("summary"), self.failures[i],
                     t.retries)
            self._retry(i)
            return
        t.error = r.error
        if r.error.get("traceback"):
            t.error = dict(r.error, traceback=restore_source_lines(r.error["traceback"], t.func))
        self._terminal(i, FAILED, r.error.get("summary") or r.error.get("message", "failed"))
        self._depfail_downstream(i)

    def t_lost(self, lost: P.TaskLost) -> None:
        """A worker (or Slurm job) was lost with this attempt. If it had started, that costs one of the
        task's `lost_retries`. If it had not (a prefetched task, or a job still queued in Slurm) the
        task did nothing wrong and just goes again; a cap (`lost_before_start`) stops a task that
        takes its worker down faster than its start is reported."""
        i = lost.key
        if self.attempt[i] != lost.attempt or self.status[i] not in (PENDING, RUNNING):
            return
        if self.status[i] is PENDING:
            self.pending -= 1
        self.in_flight -= 1
        if lost.started:
            self.losses[i] += 1
        else:
            self.unstarted_losses[i] += 1
        if self.losses[i] <= self.limits.lost_retries and \
                self.unstarted_losses[i] <= self.limits.lost_before_start and not self.cancelled:
            if lost.started:
                log.warning("task %s lost (%s): dispatching it again", self.tasks[i].label, lost.reason)
            else:
                log.info("task %s had not started when it was lost (%s): dispatching it again",
                         self.tasks[i].label, lost.reason)
            self._retry(i)
            return
        reason = lost.reason
        if self.unstarted_losses[i] > self.limits.lost_before_start:
            reason += f" (lost {self.unstarted_losses[i]} times before it was seen to start)"
        t = self.tasks[i]
        t.error = {"kind": "WorkerLost", "type": "WorkerLost", "message": reason, "traceback": "",
                   "summary": reason}
        self._terminal(i, FAILED, reason)
        self._depfail_downstream(i)

    def t_returned(self, r: P.TaskReturned) -> None:
        """A follower came back unstarted (see the module docstring): not a failure of the task."""
        i = r.key
        s = self.status[i]
        if self.attempt[i] != r.attempt or (s is not PENDING and s is not RUNNING):
            return
        log.debug("follower %s handed back: %s", self.tasks[i].label, r.reason)
        if s is PENDING:
            self.pending -= 1
        self.in_flight -= 1
        self.tasks[i].attempts -= 1      # it never ran
        self._retry(i)

    def _retry(self, i: int) -> None:
        """Again: at once, or (a follower whose predecessor has not succeeded) once released."""
        self.after[i] = -1
        self._set(i, WAITING)
        if self.unmet[i] == 0:
            self.ready.appendleft(i)

    def _release_dependents(self, i: int) -> None:
        released = []
        for j in self.g.dependents[i]:
            self.unmet[j] -= 1
            if self.unmet[j] == 0:
                released.append(j)
        if released:
            self._release_all(released)

    def _depfail_downstream(self, i: int) -> None:
        failed = self.tasks[i].label
        work = deque(self.g.dependents[i])
        while work:
            j = work.popleft()
            s = self.status[j]
            if s in TERMINAL_STATES:
                continue
            if s is PENDING or s is RUNNING:     # a follower, handed out: its worker gives it back
                self.in_flight -= 1
                if s is PENDING:
                    self.pending -= 1
            self._terminal(j, DEPFAILED, f"dependency {failed} failed")
            work.extend(self.g.dependents[j])

    def _terminal(self, i: int, s: TaskStatus, reason: Optional[str] = None) -> None:
        if self.status[i] in TERMINAL_STATES:
            return
        self._set(i, s)
        t = self.tasks[i]
        if reason is not None:
            t.reason = reason
        if t.end_time is None and s in (FAILED, CANCELED, DEPFAILED):
            t.end_time = time.time() if t.start_time is not None else None
        self.remaining -= 1

    def t_cancel_all(self, reason: str, status: TaskStatus = CANCELED) -> None:
        """Everything not yet terminal ends now (queued, pending and running tasks alike)."""
        if self.cancelled is None:
            self.cancelled = reason
        self.ready.clear()
        in_backend = False
        for i, s in enumerate(self.status):
            if s in TERMINAL_STATES:
                continue
            if s in (PENDING, RUNNING):
                in_backend = True
            self._terminal(i, status, reason)
        self.in_flight = self.pending = 0
        if in_backend:
            self.backend.cancel(None, reason)

    def _check_done(self) -> None:
        if self.remaining == 0 and not self.done.is_set():
            self.done.set()
