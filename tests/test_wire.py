"""The dispatcher's wire (`depio.runtime.wire`) and what happens when its loop hits a bug."""
from __future__ import annotations

import os

import zmq

from depio.runtime import protocol as P
from depio.runtime.dispatcher import Dispatcher
from depio.runtime.wire import Wire, bind_router, runtime_mismatch
from conftest import wait_for


def test_runtime_mismatch_names_what_differs():
    assert runtime_mismatch(P.runtime_signature()) == ""
    other = dict(P.runtime_signature(), python="3.99")
    assert runtime_mismatch(other) == f"python 3.99 (dispatcher: {P.runtime_signature()['python']})"


def test_a_send_to_a_peer_that_is_gone_is_noted_not_raised():
    ctx = zmq.Context.instance()
    sock = bind_router(ctx, "inproc://test-wire-send")
    try:
        assert Wire(os.urandom(32)).send(sock, b"nobody", P.Heartbeat()) is False
    finally:
        sock.close(linger=0)


def test_a_bug_in_the_loop_stops_the_dispatcher_and_is_kept():
    d = Dispatcher(os.urandom(32), remote_clients=False, heartbeat=0.2)
    heard = []
    d.attach_local("test", heard.append)

    def bug():
        raise RuntimeError("a bug in assignment")

    d.assignment.assign = bug
    d.start()
    wait_for(lambda: d.stopped.is_set(), 10, "the dispatcher to stop")
    assert isinstance(d.failure.error, RuntimeError)
    assert "a bug in assignment" in d.failure.traceback and "Traceback" in d.failure.traceback
    shutdown = [m for m in heard if isinstance(m, P.Shutdown)]
    assert shutdown and "a bug in assignment" in shutdown[0].reason
    d.stop("test over", timeout=2)


def test_what_a_lost_worker_sent_before_it_read_reregister_is_still_its_own():
    """A worker stopped (SIGSTOP) past its liveness is declared lost. On waking it may send a
    heartbeat queued while it was stopped and then the result its slot finished meanwhile, before it
    reads the dispatcher's Reregister: the result is a late one (counted, ignored), not a replay."""
    import time
    from worker.connection import DispatcherConnection
    key = os.urandom(32)
    d = Dispatcher(key, remote_clients=False, heartbeat=0.1, liveness=2)
    d.attach_local("test", lambda msg: None)
    d.start()
    conn = DispatcherConnection(d.worker_address, key, heartbeat=0.1, liveness=2)
    try:
        conn.open(P.Register("w", "host", 1, 1))
        wait_for(lambda: [m for m in _read(conn) if isinstance(m, P.Welcome)], 10, "the Welcome")
        conn.welcomed(P.Welcome(0.1, 2))
        wait_for(lambda: not d.snapshot()["workers"], 10, "the silent worker to be declared lost")
        result = P.TaskResult(1, 1, time.time(), time.time())
        conn.send(P.Heartbeat())
        conn.send(P.WorkerReport(done=((7, result),)))
        wait_for(lambda: d.late_results == 1, 10, "the late result to be counted")
        told = []
        wait_for(lambda: told.extend(m for m in _read(conn) if isinstance(m, P.Reregister)) or told, 10, "Reregister")
        assert d.wire.bad_messages.get("replay", 0) == 0
        conn.send(P.Heartbeat())
        time.sleep(0.3)     # (what the dispatcher does not send cannot be waited on: a bounded look)
        assert not [m for m in _read(conn) if isinstance(m, P.Reregister)], "told to register again twice"
    finally:
        conn.terminate()
        d.stop("test over")


def _read(conn) -> list:
    return list(conn.messages())
