"""The scheduler actor: owns every task's state for one pipeline run.

It reacts to messages only (results, starts, losses, cancellation); there is no polling loop. Every
state change goes through the transition table of `transitions.TaskStates` (its docstring has the
state diagram); this thread is the only writer of a task's run state, and other threads send it
messages (`SlurmState`, `Cancel`, ...) instead of writing. A task is "ready" while WAITING in the
`ready` queue: released (nothing it needs is unfinished) and decided to run (`decide.decide`).

Releasing dependents costs O(out-degree): each task counts its unfinished dependencies.

Followers (see `followers.py`): a task handed out to follow another is PENDING with it. A follower
handed back unstarted (`TaskReturned`) or lost returns to WAITING, and to ready once nothing it
needs is unfinished.

A crash of a handler fails the run (`on_failure`): every task not yet terminal is cancelled with
the reason, the backend is told to cancel, and the traceback goes to `crash` for the summary.
"""
from __future__ import annotations

import logging
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional

import pykka

from . import protocol as P
from .decide import decide
from .events import BackendFailed, SlurmState
from .execution import restore_source_lines
from .followers import FOLLOW_AHEAD, Followers
from .graph import Graph
from .inbox import DispatchingInbox
from .transitions import ChangeFeed, TaskStates
from ..TaskStatus import TaskStatus, TERMINAL_STATES

log = logging.getLogger("depio.scheduler")

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
    """See the module docstring. `done` is set when every task is terminal (or the actor crashed);
    `feed` receives each task whose state changed; `crash` receives the traceback of a crash."""

    @staticmethod
    def _create_actor_inbox() -> DispatchingInbox:
        return DispatchingInbox()    # the pipeline's own dispatcher runs in this actor's thread

    def __init__(self, graph: Graph, backend, done: threading.Event, limits: Optional[Limits] = None,
                 feed: Optional[ChangeFeed] = None, crash: Optional[List[str]] = None):
        super().__init__()
        self.g = graph
        self.tasks = graph.tasks
        self.backend = backend
        self.done = done
        self.limits = limits or Limits()
        self.crash = crash if crash is not None else []
        n = len(graph)
        self.st = TaskStates(self.tasks, feed)
        self.status = self.st.status
        self.move = self.st.move
        self.unmet: List[int] = [len(d) for d in graph.deps]
        self.ran: List[bool] = [False] * n
        self.attempt: List[int] = [0] * n
        self.failures: List[int] = [0] * n
        self.losses: List[int] = [0] * n             # lost while running (against lost_retries)
        self.unstarted_losses: List[int] = [0] * n   # lost before it was seen to start
        self.ready: Deque[int] = deque()
        self.released = False
        self.paused = False
        self.cancelled: Optional[str] = None
        self.sent_functions: set = set()
        self.warmed_up = False
        self.follows = getattr(backend, "runs_followers", False)
        self.fl = Followers(n, self.tasks, graph.dependents, self.status, self.unmet)

    # counters as the tests and the pipeline read them (kept by the transitions only)
    in_flight = property(lambda self: self.st.in_flight)
    pending = property(lambda self: self.st.pending)
    remaining = property(lambda self: self.st.remaining)

    def validate(self) -> None:
        """Raise `InconsistentState` (an AssertionError) naming the task when the counters or a task's
        state do not fit the others; for tests, between events."""
        self.st.validate(self.g.deps, self.unmet, self.fl.after, self.ready, self.released)

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
        elif isinstance(msg, SlurmState):
            self.t_slurm(msg)
        elif isinstance(msg, Cancel):
            self.t_cancel_all(msg.reason)
        elif isinstance(msg, Pause):
            self.paused = msg.paused
        elif isinstance(msg, BackendFailed):
            self.t_cancel_all(msg.reason, status=FAILED)
        self._submit_ready()
        if self.st.remaining == 0 and not self.done.is_set():
            self.done.set()

    def on_failure(self, exception_type, exception_value, tb) -> None:
        """A handler raised: the run cannot go on. End every task with the reason (directly: the
        transitions may be what failed), cancel what the backend holds, keep the traceback."""
        text = "".join(traceback.format_exception(exception_type, exception_value, tb))
        log.debug("the scheduler failed:\n%s", text)   # the run's summary shows it
        self.crash.append(f"the scheduler failed:\n{text}")
        reason = f"the scheduler failed: {exception_type.__name__}: {exception_value}"
        try:
            if self.st.abandon(reason):
                self.backend.cancel(None, reason)
        finally:
            self.done.set()

    # ------------------------------------------------------------ releasing and submitting
    def t_begin(self) -> None:
        """Release every task without task dependencies."""
        self.released = True
        self._release_all([i for i, n in enumerate(self.unmet) if n == 0])

    def _release_all(self, start: List[int]) -> None:
        """Decide each released task: skip it (and release its dependents in turn) or make it ready.
        A worklist, not recursion: a chain of 100,000 up-to-date tasks must not overflow the stack."""
        work = deque(start)
        breathe = self.actor_inbox.breathe
        status, ran, deps, move = self.status, self.ran, self.g.deps, self.move
        while work:
            i = work.popleft()
            breathe()       # deciding stats files, maybe on a slow file system: heartbeats go on
            if status[i] is not WAITING:
                continue
            d = decide(self.tasks[i], any(ran[j] for j in deps[i]))
            if d.run:
                self.tasks[i].reason = d.reason
                self.ready.append(i)
                if not self.warmed_up:     # the first runnable task: workers boot while the rest is decided
                    self.warmed_up = True
                    self.backend.warm_up()
            elif d.error:
                move(i, FAILED, d.reason)
                self._depfail_downstream(i)
            else:
                move(i, SKIPPED, d.reason)
                for j in self.g.dependents[i]:
                    self.unmet[j] -= 1
                    if self.unmet[j] == 0:
                        work.append(j)

    def _submit_ready(self) -> None:
        fl = self.fl
        if self.paused or self.cancelled or not (self.ready or fl.to_extend):
            return
        specs, functions = [], {}
        breathe = self.actor_inbox.breathe
        room, move, spec = self._room, self.move, self._spec
        limited = self.limits.max_in_flight is not None or self.limits.max_pending is not None
        dependents = self.g.dependents if self.follows else None
        ready = self.ready
        k = 0
        while ready and (not limited or room()):
            if not k & 63:
                breathe()
            k += 1
            i = ready.popleft()
            specs.append(spec(i, functions))
            move(i, PENDING)
            if dependents is not None and dependents[i]:
                self._follow(i, fl.ahead(), specs, functions)
        extend, fl.to_extend = fl.to_extend, []
        for tail, budget in extend:
            self._follow(tail, budget, specs, functions)
        if specs:
            self.backend.submit(specs, functions)

    def _room(self) -> bool:
        """Whether the limits let one more task go to the backend."""
        lim, st = self.limits, self.st
        return ((lim.max_in_flight is None or st.in_flight < lim.max_in_flight) and
                (lim.max_pending is None or st.pending < lim.max_pending))

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

    def _follow(self, i: int, budget: int, specs: List[P.TaskSpec], functions: Dict[bytes, bytes]) -> None:
        """Hand out up to `budget` followers in a chain behind task `i` (in flight), within the limits."""
        fl = self.fl
        while budget > 0 and self._room():
            j = fl.next_follower(i)
            if j is None:
                return
            specs.append(self._spec(j, functions, after=i))
            self.move(j, PENDING)
            fl.link(i, j)
            i = j
            budget -= 1

    # ------------------------------------------------------------ what the backend reports
    def t_start(self, key: int, attempt: int, when: float, worker: str) -> None:
        if self.attempt[key] != attempt or self.status[key] is not PENDING:
            return
        t = self.tasks[key]
        t.start_time, t.worker = when, worker
        self.move(key, RUNNING)

    def t_result(self, r: P.TaskResult) -> None:
        i = r.key
        if self.attempt[i] != r.attempt or self.status[i] not in (PENDING, RUNNING):
            return            # a late result of an attempt given up on: first result wins
        t = self.tasks[i]
        t.start_time, t.end_time = r.started, r.ended
        self.fl.ran_for(r.ended - r.started)
        t._stdout, t._stderr = r.stdout, r.stderr
        if r.worker:
            t.worker = r.worker
        if r.error is None:
            t.error = None
            if r.value is not None:
                t._result_blob = r.value
            self.ran[i] = True
            self.move(i, FINISHED)
            self._release_dependents(i)
            if self.fl.follower:
                self.fl.chain_ran(i)
            return
        self.fl.forget(i)
        self.failures[i] += 1
        if r.error.get("kind") != "DependencyNotMetException" and self.failures[i] <= t.retries:
            log.info("task %s failed (%s), retry %d of %d", t.label, r.error.get("summary"), self.failures[i],
                     t.retries)
            self._retry(i)
            return
        t.error = r.error
        if r.error.get("traceback"):
            t.error = dict(r.error, traceback=restore_source_lines(r.error["traceback"], t.func))
        self.move(i, FAILED, r.error.get("summary") or r.error.get("message", "failed"))
        self._depfail_downstream(i)

    def t_lost(self, lost: P.TaskLost) -> None:
        """A worker (or Slurm job) was lost with this attempt. If it had started, that costs one of the
        task's `lost_retries`. If it had not (a prefetched task, or a job still queued in Slurm) the
        task did nothing wrong and just goes again; a cap (`lost_before_start`) stops a task that
        takes its worker down faster than its start is reported."""
        i = lost.key
        if self.attempt[i] != lost.attempt or self.status[i] not in (PENDING, RUNNING):
            return
        if lost.started:
            self.losses[i] += 1
        else:
            self.unstarted_losses[i] += 1
        lim = self.limits
        if self.losses[i] <= lim.lost_retries and self.unstarted_losses[i] <= lim.lost_before_start \
                and not self.cancelled:
            log.log(logging.WARNING if lost.started else logging.INFO, "task %s lost (%s%s): dispatching it again",
                    self.tasks[i].label, lost.reason, "" if lost.started else ", before it started")
            self._retry(i)
            return
        reason = lost.reason
        if self.unstarted_losses[i] > lim.lost_before_start:
            reason += f" (lost {self.unstarted_losses[i]} times before it was seen to start)"
        self.tasks[i].error = {"kind": "WorkerLost", "type": "WorkerLost", "message": reason, "traceback": "",
                               "summary": reason}
        self.move(i, FAILED, reason)
        self._depfail_downstream(i)

    def t_returned(self, r: P.TaskReturned) -> None:
        """A follower came back unstarted (see the module docstring): not a failure of the task."""
        i = r.key
        s = self.status[i]
        if self.attempt[i] != r.attempt or (s is not PENDING and s is not RUNNING):
            return
        log.debug("follower %s handed back: %s", self.tasks[i].label, r.reason)
        self.tasks[i].attempts -= 1      # it never ran
        self._retry(i)

    def t_slurm(self, m: SlurmState) -> None:
        t = self.tasks[m.key]
        t._slurmstate, t._slurmid = m.state, t._slurmid if m.slurmid is None else m.slurmid
        self.st.feed.append(m.key)

    def _retry(self, i: int) -> None:
        """Again: at once, or (a follower whose predecessor has not succeeded) once released."""
        self.fl.unlink(i)
        self.move(i, WAITING)
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
        """Everything downstream of failed task `i` that has not ended (handed-out followers too:
        their worker gives them back) is DEPFAILED."""
        reason = f"dependency {self.tasks[i].label} failed"
        work = deque(self.g.dependents[i])
        while work:
            j = work.popleft()
            if self.status[j] in TERMINAL_STATES:
                continue
            self.move(j, DEPFAILED, reason)
            work.extend(self.g.dependents[j])

    def t_cancel_all(self, reason: str, status: TaskStatus = CANCELED) -> None:
        """Everything not yet terminal ends now (queued, pending and running tasks alike)."""
        if self.cancelled is None:
            self.cancelled = reason
        self.ready.clear()
        in_backend = self.st.in_flight > 0
        for i, s in enumerate(self.status):
            if s not in TERMINAL_STATES:
                self.move(i, status, reason)
        if in_backend:
            self.backend.cancel(None, reason)


__all__ = ["SchedulerActor", "Limits", "Start", "Cancel", "Pause", "BackendFailed", "SlurmState", "FOLLOW_AHEAD"]
