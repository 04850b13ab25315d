"""Which worker runs which task: the dispatcher's bookkeeping, without sockets.

Clients (pipelines) queue tasks; workers ask for work with credits, idle slots first, each to the
client holding the fewest slots (`depio.runtime.fairshare`). Each task handed out is a `Job` in
the in-flight table until its worker reports it done or returned, or the worker is lost.

Followers (`TaskSpec.after`): a pipeline may hand out a task whose one unfinished dependency is in
flight, together with that dependency or behind another follower. It goes, without using a credit,
to the worker that has (or gets) that dependency, which starts it the moment the dependency
succeeds: a chain of tasks then runs without a round trip to the pipeline per link. Only followers
are tracked by key, so independent tasks pay nothing for this. A follower whose dependency is not
found here (it ended, or was not handed out that way) goes back to its client (`TaskReturned`),
which decides again.

Nothing here sends: methods return the messages for the dispatcher to send, and what each client
is to hear collects in its `Report` for the turn.
"""
from __future__ import annotations

import operator
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from . import protocol as P
from .liveness import Liveness
from .protocol import TaskSpec
from .fairshare import Batch, charge_lost, take
from .routing import Routing

_AFTER = operator.attrgetter("after")
_is_none = partial(operator.is_, None)


@dataclass(eq=False)
class WorkerInfo:
    identity: bytes
    name: str
    host: str
    pid: int
    slots: int
    slurm_job_id: str = ""
    peer: Optional[Liveness] = None     # heartbeats to and from it
    offer: Optional[object] = None      # what each slot holds (`resources.Offer`; None: it did not say)
    credits: int = 0
    since: float = field(default_factory=time.time)
    jobs: Set[int] = field(default_factory=set)
    functions: Set[bytes] = field(default_factory=set)
    done: int = 0
    contexts: Set[int] = field(default_factory=set)     # pipelines whose working directory it has


@dataclass(eq=False)
class ClientInfo:
    identity: bytes
    client_id: int
    name: str
    host: str
    pid: int
    peer: Optional[Liveness] = None     # None: a client in this process, which cannot go silent alone
    deliver: Optional[Callable[[object], None]] = None   # a client in this process: no socket, no pickles
    queue: Deque[TaskSpec] = field(default_factory=deque)
    functions: Dict[bytes, bytes] = field(default_factory=dict)
    jobs: Set[int] = field(default_factory=set)
    since: float = field(default_factory=time.time)
    done: int = 0
    # followers only (a task without one costs nothing here): those waiting for their predecessor
    # to be placed, by its key; their keys; and the job ids of those placed on workers, by key
    followers: Dict[int, List[TaskSpec]] = field(default_factory=dict)
    waiting: Set[int] = field(default_factory=set)
    follower_jobs: Dict[int, int] = field(default_factory=dict)
    context: Optional[Tuple[str, Tuple[str, ...]]] = None    # a pool's client: working directory, import path

    def forget_job(self, jid: int, key: int) -> None:
        """Job `jid` (of task `key`) is over or given up on."""
        self.jobs.discard(jid)
        if self.follower_jobs and self.follower_jobs.get(key) == jid:
            del self.follower_jobs[key]


@dataclass(eq=False)
class Job:
    """One attempt of a task in flight on a worker."""
    client: ClientInfo
    worker: WorkerInfo
    spec: TaskSpec
    started: bool = False


@dataclass(eq=False, slots=True)
class Report:
    """What one client hears at the end of this turn (becomes a `ClientReport`)."""
    client: ClientInfo
    started: List[Tuple[int, int, float, str]] = field(default_factory=list)   # key, attempt, time, worker
    done: List[P.TaskResult] = field(default_factory=list)
    lost: List[P.TaskLost] = field(default_factory=list)
    returned: List[P.TaskReturned] = field(default_factory=list)

    def message(self) -> P.ClientReport:
        return P.ClientReport(tuple(self.started), tuple(self.done), tuple(self.lost), tuple(self.returned))


class WorkerRegistry:
    """Workers by identity, and which of them may take work now."""

    def __init__(self) -> None:
        self.by_identity: Dict[bytes, WorkerInfo] = {}

    def add(self, w: WorkerInfo) -> None:
        self.by_identity[w.identity] = w

    def remove(self, identity: bytes) -> Optional[WorkerInfo]:
        return self.by_identity.pop(identity, None)

    def get(self, identity: bytes) -> Optional[WorkerInfo]:
        return self.by_identity.get(identity)

    def with_credit(self) -> List[WorkerInfo]:
        return [w for w in self.by_identity.values() if w.credits > 0]

    def __len__(self) -> int:
        return len(self.by_identity)

    def __iter__(self) -> Iterator[WorkerInfo]:
        return iter(list(self.by_identity.values()))

    @property
    def slots(self) -> int:
        return sum(w.slots for w in self.by_identity.values())


class Assignment:
    """Per-client queues, fair share of the workers' credits, follower placement and the in-flight
    job table. `workers`, `clients` and `jobs` are read by the dispatcher's status and by tests."""

    def __init__(self) -> None:
        self.workers = WorkerRegistry()
        self.clients: Dict[bytes, ClientInfo] = {}
        self.jobs: Dict[int, Job] = {}
        self.reports: Dict[int, Report] = {}     # this turn's, by client id
        self.tasks_done = 0
        self.late_results = 0       # results of attempts given up on (worker declared lost, job cancelled)
        self._next_jid = 1
        self._next_client = 1
        self._rr: Deque[bytes] = deque()     # clients with queued work, in round-robin order
        self.routing = Routing(self, Batch)  # tasks that ask for special resources (GPUs, ...)

    def status(self) -> Dict[str, object]:
        """Workers and clients for `depio pool status` (read without locks: approximate)."""
        return {
            "workers": [{"name": w.name, "host": w.host, "pid": w.pid, "slots": w.slots, "busy": len(w.jobs),
                         "done": w.done, "since": w.since, "slurm_job_id": w.slurm_job_id}
                        for w in self.workers],
            "clients": [{"name": c.name, "host": c.host, "pid": c.pid, "queued": len(c.queue),
                         "running": len(c.jobs), "done": c.done, "since": c.since}
                        for c in list(self.clients.values())],
        }

    # ------------------------------------------------------------ reports
    def report(self, c: ClientInfo) -> Report:
        """This turn's report to client `c`."""
        r = self.reports.get(c.client_id)
        if r is None:
            r = self.reports[c.client_id] = Report(c)
        return r

    def take_reports(self) -> Sequence[Report]:
        """This turn's reports to the clients that are still here; the next turn starts empty."""
        if not self.reports:
            return ()
        reports = [r for r in self.reports.values() if r.client.identity in self.clients]
        self.reports = {}
        return reports

    # ------------------------------------------------------------ workers
    def on_report(self, w: WorkerInfo, msg: P.WorkerReport) -> None:
        """A worker's credits, and its jobs started, done and returned."""
        w.credits += msg.credits
        for jid, t in msg.started:
            job = self.jobs.get(jid)
            if job is not None and job.worker is w:
                job.started = True
                self.report(job.client).started.append((job.spec.key, job.spec.attempt, t, w.name))
        for jid, result in msg.done:
            job = self._end_job(w, jid)
            if job is None:
                self.late_results += 1
                continue      # cancelled, or the worker was declared lost and the task re-sent
            c = job.client
            w.done += 1
            self.tasks_done += 1
            c.done += 1
            self.report(c).done.append(result)
        for jid, reason in msg.returned:
            job = self._end_job(w, jid)
            if job is not None:
                self.report(job.client).returned.append(P.TaskReturned(job.spec.key, job.spec.attempt, reason))

    def _end_job(self, w: WorkerInfo, jid: int) -> Optional[Job]:
        """Forget job `jid` of worker `w`; None if it is not (or no longer) that worker's."""
        job = self.jobs.pop(jid, None)
        w.jobs.discard(jid)
        if job is None or job.worker is not w:
            return None
        job.client.forget_job(jid, job.spec.key)
        return job

    def lose_worker(self, w: WorkerInfo, reason: str) -> None:
        """Forget the worker and hand each of its jobs back to its client as lost (charged to those
        its slots had taken: `fairshare.charge_lost`)."""
        self.workers.remove(w.identity)
        charge_lost(self, w, reason)

    # ------------------------------------------------------------ clients
    def queue(self, c: ClientInfo, specs: Tuple[TaskSpec, ...]) -> List[Tuple[WorkerInfo, P.RunTasks]]:
        """Queue a client's tasks. A follower waits here for a predecessor that is queued (in this
        batch) or waiting itself, goes at once to the worker that has a predecessor placed as a
        follower (the `RunTasks` returned), and goes back otherwise: a pipeline hands a follower out
        together with its predecessor, or behind another follower."""
        specs = self.routing.hold(c, specs)      # those with a resource shape wait there
        was_empty = not c.queue
        queue = c.queue
        direct: Dict[bytes, Batch] = {}
        if all(map(_is_none, map(_AFTER, specs))):      # no follower: in C, as before followers
            queue.extend(specs)
        else:
            queued: Set[int] = set()        # keys queued by this batch
            for spec in specs:
                pred = spec.after
                if pred is None:
                    queue.append(spec)
                    queued.add(spec.key)
                elif pred in queued or pred in c.waiting:
                    c.followers.setdefault(pred, []).append(spec)
                    c.waiting.add(spec.key)
                elif pred in c.follower_jobs:
                    jid = c.follower_jobs[pred]
                    w = self.jobs[jid].worker
                    batch = direct.get(w.identity)
                    if batch is None:
                        batch = direct[w.identity] = Batch(w)
                    self._place(c, batch, spec, jid)
                else:
                    self.report(c).returned.append(P.TaskReturned(
                        spec.key, spec.attempt, "its predecessor was not found queued or placed for it here "
                                                "(it may have ended)"))
        if was_empty and queue:
            self._rr.append(c.identity)
        return [(b.worker, b.message()) for b in direct.values()]

    def cancel(self, c: ClientInfo, keys: Optional[Set[int]], reason: str) -> List[Tuple[WorkerInfo, P.CancelJobs]]:
        """Forget the client's tasks `keys` (None: all): queued here, or jobs on workers (the
        `CancelJobs` returned tell them). A follower waiting here for a cancelled task goes back to
        the client."""
        self.routing.cancel(c, keys)
        if keys is None:
            c.queue.clear()
            c.followers.clear()
            c.waiting.clear()
        else:
            c.queue = deque(s for s in c.queue if s.key not in keys)
            c.waiting.difference_update(keys)
            for pred in [k for k in c.followers if k in keys]:
                self._return_followers(c, pred, "its predecessor was cancelled", keys)
            for pred, waiting in list(c.followers.items()):
                c.followers[pred] = [s for s in waiting if s.key not in keys]
        per_worker: Dict[bytes, List[int]] = {}
        for jid in list(c.jobs):
            job = self.jobs[jid]
            if keys is None or job.spec.key in keys:
                del self.jobs[jid]
                c.forget_job(jid, job.spec.key)
                job.worker.jobs.discard(jid)
                per_worker.setdefault(job.worker.identity, []).append(jid)
        return [(w, P.CancelJobs(tuple(jids), reason)) for identity, jids in per_worker.items()
                if (w := self.workers.get(identity)) is not None]

    def add_client(self, identity: bytes, name: str, host: str, pid: int, peer: Optional[Liveness] = None,
                   deliver: Optional[Callable[[object], None]] = None) -> ClientInfo:
        c = self.clients[identity] = ClientInfo(identity, self._next_client, name, host, pid, peer, deliver)
        self._next_client += 1
        return c

    def drop_client(self, c: ClientInfo, reason: str) -> List[Tuple[WorkerInfo, P.CancelJobs]]:
        """The client left or was lost: its tasks are cancelled everywhere."""
        cancels = self.cancel(c, None, reason)
        self.clients.pop(c.identity, None)
        return cancels

    def _return_followers(self, c: ClientInfo, pred: int, reason: str, cancelled: Set[int]) -> None:
        """Followers waiting here for `pred` (and theirs) go back to the client, except cancelled ones."""
        stack = [pred]
        while stack:
            for f in c.followers.pop(stack.pop(), ()):
                c.waiting.discard(f.key)
                if f.key not in cancelled:
                    self.report(c).returned.append(P.TaskReturned(f.key, f.attempt, reason))
                stack.append(f.key)

    # ------------------------------------------------------------ assignment
    def assign(self) -> Sequence[Tuple[WorkerInfo, P.RunTasks]]:
        """Hand queued tasks to workers with credits. First only into free slots (idle workers
        first), then as prefetch: a worker whose slots are all busy must not take a task that an idle
        worker could start now."""
        batches: Dict[bytes, Batch] = self.routing.assign()    # tasks with a resource shape go first
        if not self._rr:
            return [(b.worker, b.message()) for b in batches.values()]
        for prefetch in (False, True):
            for w in sorted(self.workers.with_credit(), key=lambda w: len(w.jobs) - w.slots):
                n = w.credits if prefetch else min(w.credits, w.slots - len(w.jobs))
                if n > 0:
                    batch = batches.get(w.identity)
                    if batch is None:
                        batch = batches[w.identity] = Batch(w)
                    take(self, batch, n, prefetch)
                if not self._rr:
                    break
            if not self._rr:
                break
        return [(b.worker, b.message()) for b in batches.values() if b.tasks]

    def _place(self, c: ClientInfo, batch: Batch, spec: TaskSpec, pred_jid: Optional[int] = None) -> None:
        """Make `spec` a job of the batch's worker, and the followers waiting for it too."""
        jid = self._new_job(c, batch, spec)
        if pred_jid is not None:
            batch.after.append((jid, pred_jid))
            c.follower_jobs[spec.key] = jid
        waiting = c.followers.pop(spec.key, None) if c.followers else None
        if not waiting:
            return
        todo = [(jid, waiting)]        # not recursive: a client may send a chain of any length
        while todo:
            pred, waiting = todo.pop()
            c.waiting.difference_update(f.key for f in waiting)
            for f in waiting:
                fjid = self._new_job(c, batch, f)
                batch.after.append((fjid, pred))
                c.follower_jobs[f.key] = fjid
                more = c.followers.pop(f.key, None)
                if more:
                    todo.append((fjid, more))

    def _new_job(self, c: ClientInfo, batch: Batch, spec: TaskSpec) -> int:
        jid = self._next_jid
        self._next_jid += 1
        if batch.client is not c:
            batch.enter(c)
        w = batch.worker
        self.jobs[jid] = Job(c, w, spec)
        c.jobs.add(jid)
        w.jobs.add(jid)
        if spec.func_digest not in w.functions:
            batch.functions[spec.func_digest] = c.functions[spec.func_digest]
            w.functions.add(spec.func_digest)
        batch.tasks.append((jid, spec))
        return jid
