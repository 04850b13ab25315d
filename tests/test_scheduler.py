"""The scheduler actor's transitions, driven by hand through a recording backend (no processes)."""
import queue
import threading
import time
from pathlib import Path
from typing import Annotated

import pytest

from depio.runtime import protocol as P
from depio.BuildMode import BuildMode
from depio.Pipeline import Pipeline
from depio.Task import Dependency, Product, Task
from depio.TaskStatus import TaskStatus as S
from depio.runtime.backends import Backend
from depio.runtime.graph import pickle_payloads
from depio.runtime.scheduler import BackendFailed, Cancel, Limits, SchedulerActor, Start

pytestmark = pytest.mark.timeout(30)


class RecordingBackend(Backend):
    """Stands in for workers: records what the scheduler hands out; the test plays the results."""

    def __init__(self):
        self.submitted: "queue.Queue[P.TaskSpec]" = queue.Queue()
        self.cancelled = []

    def submit(self, specs, functions):
        for s in specs:
            self.submitted.put(s)

    def cancel(self, keys, reason):
        self.cancelled.append((keys, reason))

    def take(self, n=1):
        return [self.submitted.get(timeout=5) for _ in range(n)]

    def nothing_more(self):
        """Nothing more submitted once the actor handled all it was told so far (pykka handles one
        message at a time, in order: a query is answered after every message told before it)."""
        self.actor.proxy().in_flight.get(timeout=5)
        return self.submitted.empty()


def noop(x=0):
    pass


def make(ptasks, limits=None, backend_class=RecordingBackend):
    p = Pipeline(None, False, quiet=True)
    for t in ptasks:
        p.add_task(t)
    g = p._solve_order()
    pickle_payloads(g)
    backend = backend_class()
    done = threading.Event()
    actor = SchedulerActor.start(g, backend, done, limits or Limits())
    backend.actor = actor
    return p, g, backend, done, actor


def ok(spec):
    return P.ClientReport(done=(P.TaskResult(spec.key, spec.attempt, time.time(), time.time()),))


def bad(spec, kind="TaskRaisedExceptionException"):
    err = {"kind": kind, "type": "ValueError", "message": "boom", "traceback": "tb", "summary": "ValueError: boom"}
    return P.ClientReport(done=(P.TaskResult(spec.key, spec.attempt, time.time(), time.time(), error=err),))


@pytest.fixture
def cleanup():
    actors = []
    yield actors.append
    for a in actors:
        a.stop()


def test_chain_releases_one_after_another(cleanup):
    a = Task("a", noop, [1]); b = Task("b", noop, [2], depends_on=[a]); c = Task("c", noop, [3], depends_on=[b])
    p, g, be, done, actor = make([a, b, c]); cleanup(actor)
    actor.tell(Start())
    (s,) = be.take()
    assert s.key == 0 and be.nothing_more()
    assert a.status[0] is S.PENDING and b.status[0] is S.WAITING
    actor.tell(P.ClientReport(started=((0, 1, time.time(), "w"),)))
    actor.tell(ok(s))
    (s,) = be.take()
    assert s.key == 1
    actor.tell(ok(s))
    (s,) = be.take()
    actor.tell(ok(s))
    assert done.wait(5)
    assert [t.status[0] for t in (a, b, c)] == [S.FINISHED] * 3


def test_failure_depfails_downstream_and_independent_branch_runs(cleanup):
    a = Task("a", noop, [1]); b = Task("b", noop, [2], depends_on=[a]); c = Task("c", noop, [3], depends_on=[b])
    d = Task("d", noop, [4])
    p, g, be, done, actor = make([a, b, c, d]); cleanup(actor)
    actor.tell(Start())
    specs = {s.key: s for s in be.take(2)}
    actor.tell(bad(specs[0]))
    actor.tell(ok(specs[3]))
    assert done.wait(5)
    assert a.status[0] is S.FAILED and a.error["type"] == "ValueError"
    assert b.status[0] is S.DEPFAILED and c.status[0] is S.DEPFAILED and "a (#1)" in c.reason
    assert d.status[0] is S.FINISHED


def test_retries_then_success(cleanup):
    a = Task("a", noop, [1], retries=2)
    p, g, be, done, actor = make([a]); cleanup(actor)
    actor.tell(Start())
    (s1,) = be.take()
    actor.tell(bad(s1))
    (s2,) = be.take()
    assert s2.attempt == 2
    actor.tell(bad(s1))            # a late duplicate of attempt 1: ignored
    actor.tell(ok(s2))
    assert done.wait(5) and a.status[0] is S.FINISHED and a.attempts == 2


def test_lost_task_is_redispatched_once_then_fails(cleanup):
    a = Task("a", noop, [1])
    p, g, be, done, actor = make([a], Limits(lost_retries=1)); cleanup(actor)
    actor.tell(Start())
    (s1,) = be.take()
    actor.tell(P.ClientReport(lost=(P.TaskLost(0, 1, "worker w1 lost"),)))
    (s2,) = be.take()
    actor.tell(P.ClientReport(lost=(P.TaskLost(0, 2, "worker w2 (host h, pid 7) lost"),)))
    assert done.wait(5)
    assert a.status[0] is S.FAILED and "pid 7" in a.reason
    actor.tell(ok(s1))             # the first attempt's late result changes nothing
    actor.proxy().in_flight.get(timeout=5)          # once the actor has handled it
    assert a.status[0] is S.FAILED


def test_up_to_date_tasks_are_skipped_before_dispatch(workdir, cleanup):
    def mk(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):
        pass
    Path("a").touch(); Path("b").touch()
    a = Task("a", mk, [Path("a")]); b = Task("b", mk, [Path("b")], {"inp": Path("a")})
    c = Task("c", mk, [Path("c")], {"inp": Path("b")})
    new = Task("new", mk, [Path("b2")], {"inp": Path("a")}, buildmode=BuildMode.IF_NEW)
    p, g, be, done, actor = make([a, b, c, new]); cleanup(actor)
    actor.tell(Start())
    keys = sorted(s.key for s in be.take(2))
    assert keys == [2, 3] and be.nothing_more()   # c and new: their products are missing
    assert a.status[0] is S.SKIPPED and b.status[0] is S.SKIPPED and a.reason == "up to date"
    assert new.reason.startswith("product missing") and c.status[0] is S.PENDING


def test_if_new_runs_when_upstream_ran(workdir, cleanup):
    def mk(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):
        pass
    Path("b").touch()
    a = Task("a", mk, [Path("a")], buildmode=BuildMode.ALWAYS)
    b = Task("b", mk, [Path("b")], {"inp": Path("a")}, buildmode=BuildMode.IF_NEW)
    c = Task("c", mk, [Path("c0")], {"inp": Path("a")}, buildmode=BuildMode.NEVER)
    Path("a").touch()
    p, g, be, done, actor = make([a, b, c]); cleanup(actor)
    actor.tell(Start())
    (s,) = be.take()
    actor.tell(ok(s))
    (s,) = be.take()
    assert s.key == 1 and b.reason == "an upstream task ran"
    actor.tell(ok(s))
    assert done.wait(5) and c.status[0] is S.SKIPPED


def test_limits_cap_in_flight_and_pending(cleanup):
    tasks = [Task(f"t{i}", noop, [i]) for i in range(10)]
    p, g, be, done, actor = make(tasks, Limits(max_in_flight=3, max_pending=2)); cleanup(actor)
    actor.tell(Start())
    first = be.take(2)
    assert be.nothing_more()                       # max_pending=2
    actor.tell(P.ClientReport(started=((first[0].key, 1, time.time(), "w"),)))
    third = be.take(1)
    assert be.nothing_more()                       # max_in_flight=3
    actor.tell(ok(first[0]))
    assert be.nothing_more()                       # 2 still pending
    actor.tell(P.ClientReport(started=((third[0].key, 1, time.time(), "w"),)))
    be.take(1)


def test_cancel_ends_everything_and_tells_backend(cleanup):
    a = Task("a", noop, [1]); b = Task("b", noop, [2], depends_on=[a])
    p, g, be, done, actor = make([a, b]); cleanup(actor)
    actor.tell(Start())
    be.take()
    actor.tell(Cancel("interrupted"))
    assert done.wait(5)
    assert a.status[0] is S.CANCELED and b.status[0] is S.CANCELED and be.cancelled


def test_backend_failure_fails_the_rest_with_reason(cleanup):
    a = Task("a", noop, [1])
    p, g, be, done, actor = make([a]); cleanup(actor)
    actor.tell(Start())
    be.take()
    actor.tell(BackendFailed("all local workers ended"))
    assert done.wait(5) and a.status[0] is S.FAILED and "workers ended" in a.reason


def test_long_skipped_chain_does_not_recurse(workdir, cleanup):
    def mk(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):
        pass
    tasks, prev = [], None
    for i in range(5000):
        Path(f"p{i}").touch()
        tasks.append(Task(f"t{i}", mk, [Path(f"p{i}")], {"inp": prev}))
        prev = Path(f"p{i}")
    p, g, be, done, actor = make(tasks); cleanup(actor)
    actor.tell(Start())
    assert done.wait(10)
    assert all(t.status[0] is S.SKIPPED for t in tasks)


def test_a_task_lost_before_it_started_does_not_use_the_loss_budget(cleanup):
    """A prefetched task held by a worker that dies never ran: it goes again even with no loss budget,
    up to `lost_before_start` times; a loss while it ran still fails it at once."""
    a = Task("a", noop, [1])
    b = Task("b", noop, [2])
    p, g, be, done, actor = make([a, b], Limits(lost_retries=0, lost_before_start=2)); cleanup(actor)
    actor.tell(Start())
    sa, sb = be.take(2)
    actor.tell(P.ClientReport(lost=(P.TaskLost(sa.key, 1, "worker w1 lost", started=False),
                                    P.TaskLost(sb.key, 1, "worker w1 lost", started=True))))
    (sa2,) = be.take()
    assert sa2.key == sa.key and sa2.attempt == 2
    actor.tell(P.ClientReport(lost=(P.TaskLost(sa.key, 2, "worker w2 lost", started=False),)))
    (sa3,) = be.take()
    actor.tell(P.ClientReport(lost=(P.TaskLost(sa.key, 3, "worker w3 (pid 9) lost", started=False),)))
    assert done.wait(5)
    assert b._status is S.FAILED and b.reason == "worker w1 lost"
    assert a._status is S.FAILED and "pid 9" in a.reason and "3 times before it was seen to start" in a.reason
    assert a.error["kind"] == "WorkerLost"


# ---------------------------------------------------------------- followers

class FollowingBackend(RecordingBackend):
    """A backend that takes followers (as the ZeroMQ dispatcher does)."""
    runs_followers = True


def make_following(ptasks, limits=None):
    return make(ptasks, limits, FollowingBackend)


def returned(spec, reason="its predecessor did not succeed"):
    return P.ClientReport(returned=(P.TaskReturned(spec.key, spec.attempt, reason),))


def chain(n, **kw):
    tasks, prev = [], None
    for i in range(n):
        prev = Task(f"t{i}", noop, [i], depends_on=[prev] if prev is not None else None, **kw)
        tasks.append(prev)
    return tasks


def counters(actor):
    proxy = actor.proxy()
    return proxy.in_flight.get(), proxy.pending.get()


def test_a_chain_goes_out_at_once_as_followers_and_runs_without_new_submits(cleanup):
    tasks = chain(3)
    p, g, be, done, actor = make_following(tasks); cleanup(actor)
    actor.tell(Start())
    s0, s1, s2 = be.take(3)
    assert (s0.key, s0.after) == (0, None) and (s1.key, s1.after) == (1, 0) and (s2.key, s2.after) == (2, 1)
    assert all(t._status is S.PENDING for t in tasks)
    for s in (s0, s1, s2):
        actor.tell(ok(s))
    assert done.wait(5) and be.nothing_more()
    assert all(t._status is S.FINISHED and t.attempts == 1 for t in tasks)
    assert counters(actor) == (0, 0)


def play_chain(actor, be, n, duration):
    """Finish a chain's tasks in order, each `duration` s long by its result. Returns the specs in the
    order handed out, and how many were out and unfinished before each result."""
    out, outstanding = [], []
    for k in range(n):
        actor.proxy().in_flight.get()        # the actor has handled all that was told before
        while not be.submitted.empty():
            out.append(be.submitted.get())
        outstanding.append(len(out) - k)
        s = out[k]
        t = time.time()
        actor.tell(P.ClientReport(done=(P.TaskResult(s.key, s.attempt, t, t + duration),)))
    return out, outstanding


def test_short_tasks_get_up_to_follow_ahead_followers_refilled_as_they_run(cleanup):
    from depio.runtime.scheduler import FOLLOW_AHEAD
    tasks = chain(3 * FOLLOW_AHEAD)
    p, g, be, done, actor = make_following(tasks); cleanup(actor)
    actor.tell(Start())
    out, outstanding = play_chain(actor, be, len(tasks), 0.0001)
    assert done.wait(5)
    assert [s.key for s in out] == list(range(len(tasks)))
    assert max(outstanding) <= 1 + FOLLOW_AHEAD and max(outstanding[1:]) > FOLLOW_AHEAD // 2
    assert all(t._status is S.FINISHED and t.attempts == 1 for t in tasks)


def test_long_tasks_get_one_follower(cleanup):
    """Once tasks are known to take a second, one link waits behind the running one, no more: a
    pause or a cancel must not leave hours of work in a worker's hands."""
    tasks = chain(12)
    p, g, be, done, actor = make_following(tasks); cleanup(actor)
    actor.tell(Start())
    out, outstanding = play_chain(actor, be, len(tasks), 1.0)
    assert done.wait(5)
    assert [s.key for s in out] == list(range(len(tasks)))
    assert outstanding[0] <= 5 and max(outstanding[6:]) <= 2, outstanding


def test_only_one_follower_per_task_and_only_one_that_would_run(workdir, cleanup):
    def mk(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):
        pass
    Path("exists").touch()
    src = Task("src", mk, [Path("src")])
    fresh = Task("fresh", mk, [Path("exists")], {"inp": Path("src")})                          # up to date
    never = Task("never", mk, [Path("n")], {"inp": Path("src")}, buildmode=BuildMode.NEVER)
    other = Task("other", noop, [9])
    two = Task("two", noop, [2], depends_on=[src, other])                                  # waits for two
    run1 = Task("run1", mk, [Path("r1")], {"inp": Path("src")})
    run2 = Task("run2", mk, [Path("r2")], {"inp": Path("src")})
    p, g, be, done, actor = make_following([src, fresh, never, other, two, run1, run2])
    cleanup(actor)
    actor.tell(Start())
    specs = {s.key: s for s in be.take(3)}
    assert be.nothing_more()
    names = {g.tasks[k].name: s for k, s in specs.items()}
    assert set(names) == {"src", "other", "run1"}, names       # one follower of src: the first that runs
    assert names["run1"].after == names["src"].key and names["other"].after is None
    assert run1.reason.startswith("product missing")


def test_a_follower_given_back_after_its_predecessor_failed_follows_the_retry(cleanup):
    a, b = chain(2, retries=1)
    p, g, be, done, actor = make_following([a, b]); cleanup(actor)
    actor.tell(Start())
    sa, sb = be.take(2)
    err = bad(sa).done
    actor.tell(P.ClientReport(done=err, returned=(P.TaskReturned(sb.key, sb.attempt, "its predecessor did not "
                                                                                   "succeed"),)))
    sa2, sb2 = be.take(2)
    assert (sa2.key, sa2.attempt, sa2.after) == (0, 2, None)
    assert (sb2.key, sb2.attempt, sb2.after) == (1, 2, 0)      # again a follower: never released alone
    actor.tell(ok(sa2))
    actor.tell(ok(sb2))
    assert done.wait(5)
    assert a.attempts == 2 and b.attempts == 1 and b._status is S.FINISHED
    assert counters(actor) == (0, 0)


def test_followers_of_a_failed_task_are_depfailed_and_their_return_changes_nothing(cleanup):
    tasks = chain(3)
    p, g, be, done, actor = make_following(tasks); cleanup(actor)
    actor.tell(Start())
    s0, s1, s2 = be.take(3)
    actor.tell(bad(s0))
    assert done.wait(5)
    assert [t._status for t in tasks] == [S.FAILED, S.DEPFAILED, S.DEPFAILED]
    assert counters(actor) == (0, 0)
    actor.tell(returned(s1))
    actor.tell(returned(s2))
    assert counters(actor) == (0, 0) and be.nothing_more()


@pytest.mark.parametrize("order", ["predecessor first", "follower first"])
def test_a_follower_lost_with_its_predecessor_waits_for_it_again(order, cleanup):
    a, b = chain(2)
    p, g, be, done, actor = make_following([a, b], Limits(lost_retries=1)); cleanup(actor)
    actor.tell(Start())
    sa, sb = be.take(2)
    losses = [P.TaskLost(sa.key, 1, "worker w lost", started=True), P.TaskLost(sb.key, 1, "worker w lost", started=False)]
    if order == "follower first":
        losses.reverse()
    actor.tell(P.ClientReport(lost=tuple(losses)))
    sa2, sb2 = be.take(2)
    assert (sa2.key, sa2.after) == (0, None) and (sb2.key, sb2.after) == (1, 0)
    assert be.nothing_more()
    actor.tell(ok(sa2))
    actor.tell(ok(sb2))
    assert done.wait(5) and a._status is S.FINISHED and b._status is S.FINISHED


def test_a_follower_that_arrived_after_its_predecessor_ended_goes_again_plainly(cleanup):
    a, b = chain(2)
    p, g, be, done, actor = make_following([a, b]); cleanup(actor)
    actor.tell(Start())
    sa, sb = be.take(2)
    actor.tell(ok(sa))
    actor.tell(returned(sb, "its predecessor had ended when it arrived"))
    (sb2,) = be.take()
    assert (sb2.key, sb2.attempt, sb2.after) == (1, 2, None)
    actor.tell(returned(sb))            # a duplicate of the old attempt: ignored
    actor.tell(ok(sb2))
    assert done.wait(5) and b._status is S.FINISHED and b.attempts == 1
    assert counters(actor) == (0, 0)


def test_followers_count_against_the_limits(cleanup):
    tasks = chain(10)
    p, g, be, done, actor = make_following(tasks, Limits(max_in_flight=2)); cleanup(actor)
    actor.tell(Start())
    s0, s1 = be.take(2)
    assert be.nothing_more() and s1.after == 0
    actor.tell(ok(s0))
    (s2,) = be.take()
    assert s2.after == 1 and be.nothing_more()


def test_a_backend_without_followers_gets_none(cleanup):
    tasks = chain(3)
    p, g, be, done, actor = make(tasks); cleanup(actor)
    actor.tell(Start())
    (s0,) = be.take()
    assert s0.after is None and be.nothing_more()


def test_a_follower_reported_started_and_then_handed_back_goes_again(cleanup):
    """Returned means never run, even if a start was reported for it meanwhile."""
    a, b = chain(2)
    p, g, be, done, actor = make_following([a, b]); cleanup(actor)
    actor.tell(Start())
    sa, sb = be.take(2)
    actor.tell(ok(sa))
    actor.tell(P.ClientReport(started=((sb.key, sb.attempt, time.time(), "w"),)))
    actor.tell(returned(sb))
    (sb2,) = be.take()
    assert (sb2.key, sb2.attempt, sb2.after) == (1, 2, None)
    actor.tell(ok(sb2))
    assert done.wait(5) and b._status is S.FINISHED
    assert counters(actor) == (0, 0)
