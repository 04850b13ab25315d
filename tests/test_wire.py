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
