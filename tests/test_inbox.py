"""The scheduler actor's inbox runs the pipeline's dispatcher in the actor's thread: messages from
other threads still wake it, the dispatcher still stops cleanly, and long scheduler work does not
starve the heartbeats."""
from __future__ import annotations

import linecache
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for
from depio import ParallelExecutor, Pipeline, Task
from depio.runtime.dispatcher import Dispatcher
from depio.runtime.inbox import DispatchingInbox
from depio.TaskStatus import TaskStatus


def _getter(inbox: DispatchingInbox, got: list, n: int, before=None) -> threading.Thread:
    def run():
        if before is not None:
            before()
        for _ in range(n):
            got.append(inbox.get())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _blocked_in_select(t: threading.Thread) -> bool:
    """Whether thread `t` is inside `DispatchingInbox.get`, at its `select.select(...)` line."""
    f = sys._current_frames().get(t.ident)
    return f is not None and f.f_code is DispatchingInbox.get.__code__ \
        and "select.select(" in linecache.getline(f.f_code.co_filename, f.f_lineno)


@pytest.mark.timeout(20)
def test_a_put_from_another_thread_wakes_a_waiting_get():
    inbox = DispatchingInbox()
    got: list = []
    t = _getter(inbox, got, 2)
    wait_for(lambda: _blocked_in_select(t), 5, what="the getter thread to block in the inbox's select")
    assert got == [] and inbox.empty()
    inbox.put("a")
    inbox.put("b")
    t.join(5)
    assert got == ["a", "b"] and not t.is_alive()


@pytest.mark.timeout(20)
def test_the_owner_thread_drives_the_dispatcher_and_falls_back_after_it_stops():
    inbox = DispatchingInbox()
    d = Dispatcher(os.urandom(32), remote_clients=False, heartbeat=0.2)
    started = threading.Event()

    def attach():
        d.start(threaded=False, wake_pipe=inbox.wake_pipe)
        inbox.attach(d)
        started.set()

    got: list = []
    t = _getter(inbox, got, 2, before=attach)
    assert started.wait(5)
    assert d.worker_address.startswith("tcp://127.0.0.1:") and d._thread is None    # no thread of its own
    inbox.put("while dispatching")
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == ["while dispatching"]
    d.stop("test over", timeout=5)          # from this thread: the owner's turn closes it
    assert d._wsock.closed
    inbox.put("after the stop")              # now a plain queue
    t.join(5)
    assert got == ["while dispatching", "after the stop"] and not t.is_alive()


@pytest.mark.timeout(20)
def test_a_stop_after_the_driving_thread_ended_closes_in_the_caller():
    inbox = DispatchingInbox()
    d = Dispatcher(os.urandom(32), remote_clients=False)
    t = threading.Thread(target=lambda: (d.start(threaded=False, wake_pipe=inbox.wake_pipe), d.turn(block=False)))
    t.start()
    t.join(5)
    d.stop("driver gone", timeout=5)
    assert d._wsock.closed


def _write(path: Path) -> None:
    path.write_text("x")


@pytest.mark.timeout(90)
def test_heartbeats_go_on_while_the_scheduler_decides_for_seconds(workdir, monkeypatch):
    """Deciding about the 40 dependents of the first task takes 2 s in one scheduler message (a slow
    file system, simulated), more than three times the workers' liveness window (0.6 s). Without the
    dispatcher breathing inside that loop the workers would hear nothing, give the run up, and the
    tasks would fail or run twice."""
    original = Task.run_reason

    def slow_run_reason(self, upstream_ran=None):
        if self.name.startswith("late"):
            time.sleep(0.05)
        return original(self, upstream_ran)

    monkeypatch.setattr(Task, "run_reason", slow_run_reason)
    p = Pipeline(ParallelExecutor(workers=2, heartbeat=0.2, liveness=3), quiet=True)
    first = p.add_task(Task("first", _write, [Path("first.txt")], produces=[Path("first.txt")]))
    late = [p.add_task(Task(f"late{i}", _write, [Path(f"late{i}.txt")], produces=[Path(f"late{i}.txt")],
                            depends_on=[first]))
            for i in range(40)]
    t0 = time.monotonic()
    assert p.run() == 0
    assert time.monotonic() - t0 >= 2.0
    for t in [first] + late:
        assert t._status is TaskStatus.FINISHED and t.attempts == 1, (t.name, t._status, t.reason)
    assert all(Path(f"late{i}.txt").exists() for i in range(40))


@pytest.mark.timeout(20)
def test_what_the_last_turn_delivers_reaches_the_actor():
    """A stopping dispatcher tells its pipeline `Shutdown` in its last turn (a pool connection that
    ends likewise tells the scheduler why): the inbox must hand that on, not go to sleep on it."""
    inbox = DispatchingInbox()
    d = Dispatcher(os.urandom(32), remote_clients=False)
    got: list = []

    def attach():
        d.start(threaded=False, wake_pipe=inbox.wake_pipe)
        d.attach_local("test", lambda msg: inbox.put(type(msg).__name__))
        inbox.attach(d)

    t = _getter(inbox, got, 2, before=attach)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == ["WorkersChanged"]
    d.stop("test over", timeout=5)
    t.join(5)
    assert got == ["WorkersChanged", "Shutdown"] and not t.is_alive()


def _hang_deciding(monkeypatch, name: str, seconds: float = 2.0) -> None:
    """Deciding whether task `name` runs blocks (a file system that hangs in a stat, simulated)."""
    original = Task.run_reason

    def hanging_run_reason(self, upstream_ran=None):
        if self.name == name:
            time.sleep(seconds)
        return original(self, upstream_ran)

    monkeypatch.setattr(Task, "run_reason", hanging_run_reason)


@pytest.mark.timeout(90)
def test_heartbeats_go_on_while_the_scheduler_blocks_in_one_call(workdir, monkeypatch):
    """One decision blocks for 2 s while the workers are registered and busy: the scheduler cannot
    breathe inside it, so the keep-alive thread keeps the heartbeats going. Without it the workers
    (liveness window 0.6 s) would give the run up. (`late` waits for two tasks, so it is decided
    after both ended, not handed out early as a follower.)"""
    _hang_deciding(monkeypatch, "late")
    p = Pipeline(ParallelExecutor(workers=2, heartbeat=0.2, liveness=3), quiet=True)
    first = p.add_task(Task("first", _write, [Path("first.txt")], produces=[Path("first.txt")]))
    second = p.add_task(Task("second", _write, [Path("second.txt")], produces=[Path("second.txt")]))
    late = p.add_task(Task("late", _write, [Path("late.txt")], produces=[Path("late.txt")],
                           depends_on=[first, second]))
    t0 = time.monotonic()
    assert p.run() == 0
    assert time.monotonic() - t0 >= 2.0
    for t in (first, second, late):
        assert t._status is TaskStatus.FINISHED and t.attempts == 1, (t.name, t._status, t.reason)


@pytest.mark.timeout(90)
def test_workers_that_register_while_the_scheduler_blocks_are_welcomed(workdir, monkeypatch):
    """The first runnable task starts the workers; deciding about the next one then blocks for 2 s.
    The workers register meanwhile: the keep-alive thread's turns must welcome them (heartbeats alone
    go only to workers the dispatcher knows), or they give up after their 0.6 s liveness window."""
    _hang_deciding(monkeypatch, "slow")
    p = Pipeline(ParallelExecutor(workers=2, heartbeat=0.2, liveness=3), quiet=True)
    first = p.add_task(Task("first", _write, [Path("first.txt")], produces=[Path("first.txt")]))
    slow = p.add_task(Task("slow", _write, [Path("slow.txt")], produces=[Path("slow.txt")]))
    assert p.run() == 0
    for t in (first, slow):
        assert t._status is TaskStatus.FINISHED and t.attempts == 1, (t.name, t._status, t.reason)
