"""Sharing workers between pipelines, and what a lost worker costs the tasks it held.

Fair share counts slots held, not tasks handed out: a free slot goes to the client (pipeline) that
holds the fewest jobs now, so a pipeline of 30 ms tasks that arrives while another holds every slot
with 8 s tasks gets the next slot that frees, and keeps one. Prefetch (a task queued on a worker
behind its running ones) only ever takes a client's task onto a worker already running that
client's tasks, and none at all while another client waits with nothing running: a long task
prefetched there would keep the waiting client from the slot it is owed.

A worker that dies is charged to the tasks its slots had taken: those whose start it reported, and,
for each slot beyond those, the oldest task it held whose start it had not reported yet (it may have
killed the worker before the report went out). They use their pipeline's loss budget, so a task
that kills every worker it touches fails after that budget, with a message naming it. The tasks
queued in the worker behind them go again free.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

from . import protocol as P
from .protocol import TaskSpec

# The Assignment, ClientInfo and WorkerInfo of `depio.runtime.assignment` (named in annotations only:
# that module imports this one)


class Batch:
    """Jobs for one worker in one `RunTasks`: the tasks, the functions it lacks, who follows whom,
    and where each pipeline's tasks begin (`places`: index, pipeline id, its working directory and
    import path the first time this worker hears of that pipeline), for pools only."""
    __slots__ = ("worker", "tasks", "functions", "after", "client", "places")

    def __init__(self, worker: "WorkerInfo") -> None:
        self.worker = worker
        self.tasks: List[Tuple[int, TaskSpec]] = []
        self.functions: Dict[bytes, bytes] = {}
        self.after: List[Tuple[int, int]] = []
        self.client: Optional["ClientInfo"] = None
        self.places: List[tuple] = []

    def enter(self, c: "ClientInfo") -> None:
        """The next tasks are client `c`'s (its working directory goes along once per worker)."""
        self.client = c
        if c.context is not None:
            contexts = self.worker.contexts
            first = c.client_id not in contexts
            contexts.add(c.client_id)
            self.places.append((len(self.tasks), c.client_id) + (c.context if first else ("", ())))

    def message(self) -> P.RunTasks:
        return P.RunTasks(tuple(self.tasks), self.functions, tuple(self.after), tuple(self.places))


def take(a: "Assignment", batch: Batch, n: int, prefetch: bool) -> None:
    """Up to `n` queued tasks for the batch's worker: each to the client holding the fewest jobs
    (followers go along without using credits). `prefetch`: the worker's slots are busy (see the
    module docstring for when it may take more)."""
    w = batch.worker
    rr = a._rr
    clients = a.clients
    if prefetch and len(clients) > 1:
        if any(not c.jobs for c in map(clients.get, rr) if c is not None and c.queue):
            return              # a client waits with nothing running: the next free slot is its
        jobs = a.jobs
        here = {jobs[j].client.identity for j in w.jobs if j in jobs}
    else:
        here = None
    while n > 0 and rr:
        if len(rr) == 1:
            c = clients.get(rr[0])
            if c is None or not c.queue:
                rr.popleft()
                continue
            if here is not None and c.identity not in here:
                return
            k = min(n, len(c.queue))
        else:
            held = []
            for ident in list(rr):
                c = clients.get(ident)
                if c is None or not c.queue:
                    rr.remove(ident)
                elif here is None or ident in here:
                    held.append((len(c.jobs), len(held), c))
            if not held:
                return
            held.sort(key=_HELD)
            least, _, c = held[0]
            nxt = held[1][0] if len(held) > 1 else least + n
            k = min(n, len(c.queue), max(1, nxt - least))
            rr.remove(c.identity)
            rr.append(c.identity)       # ties go round-robin
        queue = c.queue
        for _ in range(k):
            a._place(c, batch, queue.popleft())
        w.credits -= k
        n -= k
        if not queue and c.identity in rr:
            rr.remove(c.identity)


def _HELD(t: tuple) -> tuple:
    return t[0], t[1]


def charge_lost(a: "Assignment", w: "WorkerInfo", reason: str) -> None:
    """Hand each job of a lost worker back to its client as lost, charging the ones its slots had
    taken (see the module docstring)."""
    jids = sorted(w.jobs)
    jobs = a.jobs
    unreported = w.slots - sum(1 for j in jids if j in jobs and jobs[j].started)
    for jid in jids:
        job = jobs.pop(jid, None)
        if job is None:
            continue
        job.client.forget_job(jid, job.spec.key)
        started, why = job.started, reason
        if not started and unreported > 0 and job.spec.after is None:
            unreported -= 1
            started = True
            why = (f"{reason}; task {job.spec.name!r} (attempt {job.spec.attempt}) had been handed to one of its "
                   f"slots, its start not reported yet: it counts as lost while running")
        a.report(job.client).lost.append(P.TaskLost(job.spec.key, job.spec.attempt, why, started))
    w.jobs.clear()


def failed(spec: TaskSpec, why: str, error_type: str) -> P.TaskResult:
    """The result of a task the dispatcher ends without running it, saying why."""
    now = time.time()
    return P.TaskResult(spec.key, spec.attempt, now, now, "", "",
                        {"kind": "TaskRaisedExceptionException", "type": error_type, "message": why, "traceback": "",
                         "summary": why}, None, "dispatcher")


def fail_jobs(a: "Assignment", w: "WorkerInfo", jids: List[int], reason: Callable[[TaskSpec], str]) -> None:
    """End these jobs of worker `w` as failed, without running them (e.g. too big to send)."""
    for jid in jids:
        job = a.jobs.pop(jid, None)
        w.jobs.discard(jid)
        if job is None:
            continue
        job.client.forget_job(jid, job.spec.key)
        a.report(job.client).done.append(failed(job.spec, reason(job.spec), "MessageTooBig"))
