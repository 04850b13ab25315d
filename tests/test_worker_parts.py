"""The worker's parts on their own: credits, followers, reports, what slots' results mean, a pool's
placement, the connection's liveness decisions, the registration, and running one task spec
(`run_spec`)."""
from __future__ import annotations

import dataclasses
import pickle
import signal
import time
from collections import deque
from types import SimpleNamespace

import cloudpickle

from depio.runtime import protocol as P
from depio.runtime.execution import FdCapture, run_spec
from depio.runtime.protocol import TaskSpec
from worker.connection import DispatcherConnection
from worker.credits import Credits
from worker.followers import Followers
from worker.outcomes import SlotOutcomes
from worker.placement import Placement
from worker.registration import Registration
from worker.reports import START_REPORT_DELAY, Reports, failure


def spec(key: int, digest: bytes = b"f", *args) -> TaskSpec:
    return TaskSpec(key, 1, f"t{key}", digest, pickle.dumps((args, {})))


# ---------------------------------------------------------------- credits

def test_long_tasks_get_no_prefetch_and_short_ones_a_deep_one():
    c = Credits(2)
    assert c.capacity() == 2 and c.depth() == 1          # unknown length: no prefetch
    c.record(0.0001)                                      # the first sample counts fully
    assert abs(c.avg_duration - 0.0001) < 1e-12
    assert c.capacity() == 2 * 65 and c.depth() == 16
    for _ in range(50):
        c.record(5.0)
    assert c.capacity() == 2 and c.depth() == 1


def test_credits_are_granted_in_chunks_unless_the_worker_is_idle():
    c = Credits(4)
    c.record(0.0001)
    cap = c.capacity()
    assert c.want(cap, 0) == cap                          # idle: everything at once
    c.open = cap - 1
    assert c.want(cap, 0) == 0                            # one more credit is not worth a message
    c.received(cap)
    assert c.open == 0
    assert c.want(cap, cap) == 0


# ---------------------------------------------------------------- followers

def test_a_follower_waits_for_its_predecessor_and_follows_it_to_the_front_of_the_queue():
    f, queue = Followers(), deque()
    f.active.update([1, 2, 3])
    f.take([(1, spec(1)), (2, spec(2)), (3, spec(3))], {2: 1}, queue)
    assert [j for j, _ in queue] == [1, 3] and [j for j, _ in f.held[1]] == [2]
    queue.popleft()
    f.ended(1, True, queue)
    assert [j for j, _ in queue] == [2, 3] and not f.held


def test_a_failed_predecessor_hands_its_followers_back_along_the_chain():
    f, queue = Followers(), deque()
    f.active.update([1, 2, 3])
    f.take([(1, spec(1)), (2, spec(2)), (3, spec(3))], {2: 1, 3: 2}, queue)
    f.ended(1, False, queue)
    assert [j for j, _ in f.take_returned()] == [2, 3]
    assert f.returned == [] and not f.held and f.outcomes[3] is False


def test_a_follower_of_an_unknown_or_failed_job_goes_back_at_once():
    f, queue = Followers(), deque()
    f.outcomes[7] = False
    f.outcomes[8] = True
    f.take([(1, spec(1)), (2, spec(2)), (3, spec(3))], {1: 99, 2: 7, 3: 8}, queue)
    assert [j for j, _ in queue] == [3]                   # its predecessor succeeded already
    assert dict(f.take_returned()) == {1: "its predecessor is not on this worker",
                                       2: "its predecessor failed here"}


def test_cancelling_a_predecessor_hands_back_its_followers():
    f, queue = Followers(), deque()
    f.active.update([1, 2, 3])
    f.take([(1, spec(1)), (2, spec(2)), (3, spec(3))], {2: 1, 3: 1}, queue)
    f.cancel({1, 3})
    assert f.take_returned() == [(2, "its predecessor was cancelled")]
    assert not f.held and 1 not in f.active


# ---------------------------------------------------------------- reports

def test_a_start_waits_for_its_result_and_is_dropped_when_the_result_comes():
    r = Reports()
    r.start(1, 10.0)
    r.start(2, 11.0)
    assert not r.starts_due()
    assert r.next_due() <= time.monotonic() + START_REPORT_DELAY
    r.done.append((1, failure(spec(1), 10.0, "TimeoutError", "TimeoutError", "m", "s", "w")))
    report = r.take(3, [(5, "why")])
    assert isinstance(report, P.WorkerReport)
    assert [j for j, _ in report.started] == [2] and [j for j, _ in report.done] == [1]
    assert report.credits == 3 and report.returned == ((5, "why"),)
    assert r.started == [] and r.done == [] and r.next_due() is None


# ---------------------------------------------------------------- what slots' results mean

def fake_slot(*jids: int, conditional=(), ignored=(), exitcode=None) -> SimpleNamespace:
    return SimpleNamespace(assigned=deque((j, spec(j)) for j in jids), conditional=set(conditional),
                           ignored=set(ignored), last_ok=False, head_started=0.0,
                           process=SimpleNamespace(exitcode=exitcode))


def outcomes() -> SlotOutcomes:
    return SlotOutcomes(Followers(), Reports(), Credits(1), "w")


def ok(jid: int, seconds: float = 0.5) -> P.TaskResult:
    return P.TaskResult(jid, 1, 100.0, 100.0 + seconds)


def test_a_result_is_reported_releases_its_followers_and_the_next_task_starts():
    o, queue = outcomes(), deque()
    o.followers.active.update([1, 2, 3])
    o.followers.take([(3, spec(3))], {3: 1}, queue)
    slot = fake_slot(1, 2)
    o.results(slot, [(1, ok(1, 2.0))], queue)
    assert [j for j, _ in o.reports.done] == [1] and [j for j, _ in queue] == [3]
    assert slot.last_ok and [j for j, _ in slot.assigned] == [2]
    assert [j for j, _ in o.reports.started] == [2] and o.credits.avg_duration == 2.0


def test_a_cancelled_jobs_result_is_not_reported_and_a_skipped_follower_goes_back():
    o = outcomes()
    slot = fake_slot(1, 2, conditional=[2], ignored=[1])
    failed = dataclasses.replace(ok(1), error={"kind": "TaskError"})
    o.results(slot, [(1, failed)], deque())
    assert o.reports.done == [] and slot.ignored == set()
    assert o.reports.started == []          # the follower is about to be skipped: no start
    o.results(slot, [(2, None)], deque())
    assert o.followers.take_returned() == [(2, "its predecessor did not succeed")]
    assert not slot.assigned and not slot.conditional


def test_a_dead_slot_or_a_timeout_fails_the_running_task_and_hands_back_its_followers():
    o, queue = outcomes(), deque()
    o.followers.active.update([1, 2, 3])
    o.followers.take([(2, spec(2))], {2: 1}, queue)
    assert o.crashed(fake_slot(1, exitcode=-signal.SIGKILL)) == f"killed by signal {int(signal.SIGKILL)}"
    assert o.followers.take_returned() == [(2, "its predecessor did not succeed")]
    assert o.crashed(fake_slot(exitcode=1)) == "exit code 1"      # idle: nothing to report
    slot = fake_slot()
    slot.assigned.append((3, dataclasses.replace(spec(3), timeout=2.0)))
    o.timed_out(slot)
    assert [(j, r.error["kind"]) for j, r in o.reports.done] == [(1, "WorkerCrash"), (3, "TimeoutError")]
    assert "timed out after 2 s" in o.reports.done[1][1].error["message"]


# ---------------------------------------------------------------- a pool's placement

def test_each_job_gets_its_pipelines_context_which_is_sent_only_once():
    p = Placement()
    tasks = [(1, spec(1)), (2, spec(2)), (3, spec(3))]
    p.place(tasks, [(0, 7, "/a", ("x",)), (2, 8, "/b", ())])
    assert p.of == {1: ("/a", ("x",)), 2: ("/a", ("x",)), 3: ("/b", ())}
    p.clear()
    p.place([(4, spec(4))], [(0, 7, "", ())])           # known: not sent again
    assert p.of == {4: ("/a", ("x",))}


# ---------------------------------------------------------------- the connection's decisions

def test_a_silent_dispatcher_is_given_up_unless_reconnecting_and_within_the_budget():
    c = DispatcherConnection("tcp://127.0.0.1:1", b"k" * 32, heartbeat=1.0, liveness=3)
    now = c.liveness.last_heard + 4
    assert c.liveness.expired(now)
    assert "is gone" in c.give_up(now)
    r = DispatcherConnection("tcp://127.0.0.1:1", b"k" * 32, heartbeat=1.0, liveness=3, reconnect=10)
    start = r.liveness.last_heard
    assert r.give_up(start + 4) is None
    r.liveness.heard(start + 5)                          # a reconnect: the wait still counts from the start
    assert r.give_up(start + 9) is None
    assert "is gone" in r.give_up(start + 11)


def test_an_oversleep_gives_the_dispatcher_a_fresh_window():
    c = DispatcherConnection("tcp://127.0.0.1:1", b"k" * 32, heartbeat=1.0, liveness=3)
    c.liveness.heard(time.monotonic() - 100)
    c.check_suspended(1.0)
    assert c.liveness.expired(time.monotonic())
    c.check_suspended(50.0)
    assert not c.liveness.expired(time.monotonic())


def test_terminate_leaves_no_context_and_open_makes_a_new_one():
    c = DispatcherConnection("tcp://127.0.0.1:1", b"k" * 32, heartbeat=1.0, liveness=3)
    c.open(P.Register("w", "h", 1, 1))
    first = c.ctx
    c.terminate()
    assert c.ctx is None and first.closed
    c.open(P.Register("w", "h", 1, 1))
    assert c.ctx is not None and c.ctx is not first
    c.terminate()


# ---------------------------------------------------------------- the registration

class RecordingConnection:
    """What `Registration` asks of the connection, in order."""
    address = "tcp://127.0.0.1:1"

    def __init__(self, reconnect: bool = False) -> None:
        self.calls, self.reconnect, self.silent_since = [], reconnect, None

    def open(self, hello): self.calls.append(("open", hello))
    def terminate(self): self.calls.append(("terminate",))
    def send(self, msg): self.calls.append(("send", msg))
    def may_reconnect(self, waited: float = 0.0): return self.reconnect
    def goodbye(self, reason, dispatcher_gone): self.calls.append(("goodbye", reason, dispatcher_gone))


def registration(conn: RecordingConnection) -> Registration:
    return Registration(conn, lambda: "hello", lambda: conn.calls.append(("forget",)), 1)


def test_a_reregister_sends_the_unreported_results_then_forgets_the_jobs_between_two_contexts():
    conn = RecordingConnection()
    result = ok(1)
    assert registration(conn).on_message(P.Reregister("lost"), [(1, result)]) is None
    assert conn.calls == [("send", P.WorkerReport((), ((1, result),))), ("terminate",), ("forget",),
                          ("open", "hello")]


def test_a_shutdown_stops_without_a_goodbye_unless_reconnecting_and_a_refusal_exits_3():
    conn = RecordingConnection()
    r = registration(conn)
    assert r.on_message(P.Refused("no"), []) == (f"refused by the dispatcher at {conn.address}: no", 3)
    assert r.on_message(P.Shutdown("pool stopped"), []) == ("pool stopped", 0)
    r.goodbye("pool stopped")
    assert conn.calls == [("goodbye", "pool stopped", True)]
    waiting = RecordingConnection(reconnect=True)
    assert registration(waiting).on_message(P.Shutdown("restart"), []) is None
    assert waiting.calls == [("terminate",), ("forget",), ("open", "hello")] and waiting.silent_since


# ---------------------------------------------------------------- running one spec

def add(a, b):
    import os
    os.write(1, b"adding\n")        # fd level: what a slot captures (pytest replaces sys.stdout)
    return a + b


def test_run_spec_runs_the_function_captures_output_and_pickles_the_value():
    functions, blobs = {}, {b"add": cloudpickle.dumps(add)}
    result = run_spec(spec(1, b"add", 2, 3), functions, blobs, FdCapture(), "w")
    assert result.error is None and pickle.loads(result.value) == 5
    assert result.stdout == "adding\n" and result.worker == "w"
    assert b"add" in functions and not blobs                # unpickled once, then cached


def test_run_spec_reports_a_function_it_cannot_load():
    result = run_spec(spec(1, b"nope"), {}, {b"nope": b"not a pickle"}, FdCapture(), "w")
    assert result.error["kind"] == "TaskRaisedExceptionException"
    assert "cannot load the task on worker w" in result.error["message"]
