"""The scheduler's transition table: every event keeps the counters and the states consistent
(`validate()` after each), an illegal transition names the task and both states, a crash ends the
run with its reason."""
import threading
import time

import pytest

from depio.runtime import protocol as P
from depio.Task import Task
from depio.TaskStatus import TaskStatus as S
from depio.Pipeline import Pipeline
from depio.runtime.graph import pickle_payloads
from depio.runtime.scheduler import BackendFailed, Cancel, Limits, SchedulerActor, Start
from depio.runtime.transitions import IllegalTransition, InconsistentState, TaskStates

from test_scheduler import FollowingBackend, RecordingBackend, bad, make, noop, ok, returned

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def run():
    """make() plus `step(msg)`: tell the actor and validate its state once it has handled it."""
    actors = []

    def start(tasks, limits=None, backend_class=None):
        kw = {"backend_class": backend_class} if backend_class else {}
        p, g, be, done, actor = make(tasks, limits, **kw)
        actors.append(actor)
        proxy = actor.proxy()

        def step(msg):
            actor.tell(msg)
            proxy.validate().get()
        proxy.validate().get()
        return be, done, step, proxy
    yield start
    for a in actors:
        if a.is_alive():
            a.stop()


def diamond():
    a = Task("a", noop, [1]); b = Task("b", noop, [2], depends_on=[a]); c = Task("c", noop, [3], depends_on=[a])
    d = Task("d", noop, [4], depends_on=[b, c])
    return [a, b, c, d]


def test_a_diamond_with_a_retry_and_a_lost_worker(run):
    a, b, c, d = tasks = diamond()
    tasks[1].retries = 1
    be, done, step, proxy = run(tasks)
    step(Start())
    (sa,) = be.take()
    step(P.ClientReport(started=((0, 1, time.time(), "w"),)))
    step(ok(sa))
    sb, sc = sorted(be.take(2), key=lambda s: s.key)
    step(bad(sb))                                    # b's retry
    (sb2,) = be.take()
    step(P.ClientReport(started=((sc.key, 1, time.time(), "w"),)))
    step(P.ClientReport(lost=(P.TaskLost(sc.key, 1, "worker w lost"),)))   # c goes again
    (sc2,) = be.take()
    step(ok(sb2))
    step(ok(sc2))
    (sd,) = be.take()
    step(ok(sd))
    assert done.wait(5) and all(t._status is S.FINISHED for t in tasks)
    assert (proxy.in_flight.get(), proxy.pending.get(), proxy.remaining.get()) == (0, 0, 0)


def test_failure_depfails_downstream_and_cancel_ends_the_rest(run):
    a, b, c, d = diamond()
    e = Task("e", noop, [5]); f = Task("f", noop, [6], depends_on=[e])
    be, done, step, proxy = run([a, b, c, d, e, f])
    step(Start())
    specs = {s.key: s for s in be.take(2)}
    step(ok(specs[0]))
    sb, sc = sorted(be.take(2), key=lambda s: s.key)
    step(bad(sb))
    assert d._status is S.DEPFAILED and c._status is S.PENDING
    step(Cancel("stop"))
    assert done.wait(5)
    assert [t._status for t in (c, e, f)] == [S.CANCELED] * 3 and f.reason == "stop"


def test_backend_failure_fails_every_task_left(run):
    tasks = diamond()
    be, done, step, proxy = run(tasks, Limits(max_in_flight=1))
    step(Start())
    be.take()
    step(BackendFailed("no workers left"))
    assert done.wait(5) and all(t._status is S.FAILED for t in tasks)


def test_followers_handed_back_lost_and_depfailed(run):
    tasks = [Task("t0", noop, [0])]
    for i in range(1, 5):
        tasks.append(Task(f"t{i}", noop, [i], depends_on=[tasks[-1]]))
    be, done, step, proxy = run(tasks, backend_class=FollowingBackend)
    step(Start())
    s = be.take(5)
    assert [x.after for x in s] == [None, 0, 1, 2, 3]
    step(ok(s[0]))
    step(returned(s[2]))                      # t2 back unstarted: WAITING until t1 ends
    assert tasks[2]._status is S.WAITING
    step(P.ClientReport(lost=(P.TaskLost(s[3].key, 1, "worker lost", started=False),)))
    step(ok(s[1]))
    more = be.take(2)                         # t2 again, t3 again as its follower
    assert [(x.key, x.after) for x in more] == [(2, None), (3, 2)]
    step(bad(more[0]))
    assert done.wait(5)
    assert tasks[2]._status is S.FAILED and tasks[3]._status is S.DEPFAILED and tasks[4]._status is S.DEPFAILED


def test_an_illegal_transition_names_the_task_and_both_states():
    t = Task("x", noop, [1])
    t._queue_id = 1
    st = TaskStates([t])
    st.move(0, S.SKIPPED)
    with pytest.raises(IllegalTransition, match=r"x \(#1\).*SKIPPED -> PENDING"):
        st.move(0, S.PENDING)


def test_validate_finds_a_counter_and_a_state_that_do_not_fit():
    a = Task("a", noop, [1]); b = Task("b", noop, [2])
    a._queue_id, b._queue_id = 1, 2
    st = TaskStates([a, b])
    st.move(0, S.PENDING)
    st.validate([(), (0,)], [0, 1], [-1, -1], [], True)
    st.pending = 0
    with pytest.raises(InconsistentState, match="pending"):
        st.validate([(), (0,)], [0, 1], [-1, -1], [], True)
    st.pending = 1
    st.move(1, S.PENDING)                 # b runs while a has not ended
    with pytest.raises(InconsistentState, match=r"b \(#2\)"):
        st.validate([(), (0,)], [0, 1], [-1, -1], [], True)


def test_a_crash_in_a_transition_cancels_every_task_with_the_reason(monkeypatch):
    def broken(self, i):
        raise RuntimeError("transition broke")
    monkeypatch.setattr(TaskStates, "pending_running", broken)
    tasks = diamond()
    p = Pipeline(None, False, quiet=True)
    p.add_tasks(tasks)
    g = p._solve_order()
    pickle_payloads(g)
    be, done, crash = RecordingBackend(), threading.Event(), []
    actor = SchedulerActor.start(g, be, done, Limits(), crash=crash)
    actor.tell(Start())
    be.take()
    actor.tell(P.ClientReport(started=((0, 1, time.time(), "w"),)))
    assert done.wait(5)
    assert all(t._status is S.CANCELED for t in tasks)
    assert all("the scheduler failed: RuntimeError: transition broke" in t.reason for t in tasks)
    assert be.cancelled and "transition broke" in crash[0] and "Traceback" in crash[0]
    deadline = time.time() + 5
    while actor.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert not actor.is_alive()
