"""The scheduler actor's transitions, driven by hand through a recording backend (no processes)."""
import queue
import threading
import time
from pathlib import Path
from typing import Annotated

import pytest

from depio import protocol as P
from depio.BuildMode import BuildMode
from depio.Pipeline import Pipeline
from depio.Task import Dependency, Product, Task
from depio.TaskStatus import TaskStatus as S
from depio.backends import Backend
from depio.graph import pickle_payloads
from depio.scheduler import BackendFailed, Cancel, Limits, SchedulerActor, Start

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
        time.sleep(0.05)
        return self.submitted.empty()


def noop(x=0):
    pass


def make(ptasks, limits=None):
    p = Pipeline(None, False, quiet=True)
    for t in ptasks:
        p.add_task(t)
    g = p._solve_order()
    pickle_payloads(g)
    backend = RecordingBackend()
    done = threading.Event()
    actor = SchedulerActor.start(g, backend, done, limits or Limits())
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
    time.sleep(0.05)
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
