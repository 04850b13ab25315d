"""`depio.runtime.assignment.Assignment`: queues, fair share, credits, followers and the in-flight
jobs, driven as plain Python (no sockets, no threads)."""
from __future__ import annotations

from typing import Optional

from depio.runtime import protocol as P
from depio.runtime.assignment import Assignment, WorkerInfo

FN = b"f" * 32


def spec(key: int, after: Optional[int] = None, attempt: int = 1) -> P.TaskSpec:
    return P.TaskSpec(key, attempt, f"t{key}", FN, b"", after=after)


def client(a: Assignment, name: str):
    c = a.add_client(name.encode(), name, "host", 1)
    c.functions[FN] = b"code"
    return c


def worker(a: Assignment, name: str, slots: int = 1, credits: int = 0) -> WorkerInfo:
    w = WorkerInfo(name.encode(), name, "host", 2, slots, credits=credits)
    a.workers.add(w)
    return w


def jobs_of(a: Assignment, w: WorkerInfo):
    return sorted((a.jobs[j].client.name, a.jobs[j].spec.key) for j in w.jobs)


def result(key: int, attempt: int = 1) -> P.TaskResult:
    return P.TaskResult(key, attempt, 0.0, 1.0)


def test_credits_are_shared_round_robin_between_clients():
    a = Assignment()
    c1, c2 = client(a, "one"), client(a, "two")
    a.queue(c1, tuple(spec(k) for k in range(10)))
    a.queue(c2, tuple(spec(k) for k in range(10)))
    w = worker(a, "w", slots=4, credits=2)
    (target, run), = a.assign()
    assert target is w and [(a.jobs[jid].client.name, s.key) for jid, s in run.tasks] == [("one", 0), ("two", 0)]
    assert run.functions == {FN: b"code"}       # the function goes once per worker
    a.on_report(w, P.WorkerReport(credits=2))
    (_, again), = a.assign()
    assert again.functions == {}
    assert [(a.jobs[jid].client.name, s.key) for jid, s in again.tasks] == [("one", 1), ("two", 1)]
    a.on_report(w, P.WorkerReport(credits=3))     # more credits than clients: neither goes without
    (_, third), = a.assign()
    assert {a.jobs[jid].client.name for jid, _ in third.tasks} == {"one", "two"} and len(third.tasks) == 3


def test_credits_are_respected_and_idle_workers_first():
    a = Assignment()
    c = client(a, "one")
    busy = worker(a, "busy", slots=1, credits=1)
    a.queue(c, (spec(0),))
    a.assign()
    assert jobs_of(a, busy) == [("one", 0)] and busy.credits == 0
    busy.credits = 1                   # it may prefetch one
    idle = worker(a, "idle", slots=1, credits=1)
    a.queue(c, (spec(1),))
    a.assign()
    assert jobs_of(a, idle) == [("one", 1)]            # into a free slot, not prefetched
    a.queue(c, (spec(2), spec(3)))
    a.assign()
    assert len(a.jobs) == 3 and list(c.queue) == [spec(3)]      # no credit left for the fourth
    assert busy.credits == 0 and idle.credits == 0


def test_a_follower_goes_to_the_worker_holding_its_predecessor():
    a = Assignment()
    c = client(a, "one")
    w1, w2 = worker(a, "w1"), worker(a, "w2")
    a.queue(c, (spec(0), spec(1, after=0)))          # together: the follower waits for its predecessor
    assert not a.assign()                        # no credits yet
    w2.credits = 1
    (target, run), = a.assign()
    assert target is w2 and [s.key for _, s in run.tasks] == [0, 1]
    (head, _), (tail, _) = run.tasks
    assert run.after == ((tail, head),) and w2.credits == 0      # the follower used no credit
    # a later follower behind the placed follower goes straight to that worker, without credits
    (target, run), = a.queue(c, (spec(2, after=1),))
    assert target is w2 and run.after == ((run.tasks[0][0], tail),)
    assert jobs_of(a, w1) == []


def test_a_follower_whose_predecessor_is_gone_is_returned():
    a = Assignment()
    c = client(a, "one")
    w = worker(a, "w", credits=1)
    a.queue(c, (spec(0), spec(1, after=0)))
    (_, run), = a.assign()
    (head, _), (tail, _) = run.tasks
    a.on_report(w, P.WorkerReport(done=((head, result(0)), (tail, result(1)))))
    assert a.queue(c, (spec(2, after=1),)) == []     # its predecessor ended
    (report,) = a.take_reports()
    assert [r.key for r in report.done] == [0, 1]
    assert [r.key for r in report.returned] == [2]
    assert a.tasks_done == 2 and not a.jobs and not c.follower_jobs


def test_a_follower_waiting_for_a_cancelled_predecessor_is_returned():
    a = Assignment()
    c = client(a, "one")
    a.queue(c, (spec(0), spec(1, after=0), spec(2, after=1)))
    assert a.cancel(c, {0}, "no longer needed") == []
    (report,) = a.take_reports()
    assert sorted(r.key for r in report.returned) == [1, 2]
    assert not c.queue and not c.followers and not c.waiting


def test_losing_a_worker_hands_its_jobs_back_started_or_not():
    a = Assignment()
    c = client(a, "one")
    w = worker(a, "w", slots=1, credits=2)           # one running, one prefetched
    a.queue(c, (spec(0), spec(1)))
    (_, run), = a.assign()
    (running, _), (prefetched, _) = run.tasks
    a.on_report(w, P.WorkerReport(started=((running, 5.0),)))
    a.take_reports()
    a.lose_worker(w, "worker w lost")
    (report,) = a.take_reports()
    assert [(lost.key, lost.started, lost.reason) for lost in report.lost] == \
        [(0, True, "worker w lost"), (1, False, "worker w lost")]
    assert not a.jobs and not c.jobs and len(a.workers) == 0
    # its late result is counted, not reported
    a.on_report(w, P.WorkerReport(done=((running, result(0)),)))
    assert a.late_results == 1 and not a.take_reports()


def test_cancelling_tells_the_workers_and_a_dropped_client_hears_nothing():
    a = Assignment()
    c = client(a, "one")
    w = worker(a, "w", slots=2, credits=2)
    a.queue(c, (spec(0), spec(1), spec(2)))
    a.assign()
    (target, msg), = a.cancel(c, {1}, "stop it")
    assert target is w and len(msg.jids) == 1 and msg.reason == "stop it"
    assert sorted(j.spec.key for j in a.jobs.values()) == [0] and [s.key for s in c.queue] == [2]
    (target, msg), = a.drop_client(c, "left")
    assert len(msg.jids) == 1 and not a.jobs and c.identity not in a.clients
    a.on_report(w, P.WorkerReport(done=((msg.jids[0], result(0)),)))
    assert not a.take_reports() and a.late_results == 1


def test_a_free_slot_goes_to_the_client_holding_the_fewest_and_no_prefetch_while_one_waits_idle():
    a = Assignment()
    long_, short = client(a, "long"), client(a, "short")
    w1, w2 = worker(a, "w1", credits=1), worker(a, "w2", credits=1)
    a.queue(long_, tuple(spec(k) for k in range(4)))
    a.assign()                                   # both slots: long's
    a.queue(short, tuple(spec(k) for k in range(100)))
    a.on_report(w1, P.WorkerReport(credits=2))   # a prefetch credit: short waits with nothing running
    assert not [m for _, m in a.assign() if m.tasks]
    jid, = w1.jobs
    a.on_report(w1, P.WorkerReport(done=((jid, result(0)),)))    # long's first ends: short's turn
    (target, run), = a.assign()
    assert target is w1 and {a.jobs[j].client.name for j, _ in run.tasks} == {"short"}


def test_a_lost_worker_is_charged_to_its_oldest_unreported_task_per_slot():
    a = Assignment()
    c = client(a, "one")
    w = worker(a, "w", slots=1, credits=3)
    a.queue(c, tuple(spec(k) for k in range(3)))
    a.assign()
    a.lose_worker(w, "worker w lost")
    lost = {x.key: x for x in a.take_reports()[0].message().lost}
    assert lost[0].started and "task 't0'" in lost[0].reason        # the one in its slot
    assert not lost[1].started and not lost[2].started                # queued behind it: free
