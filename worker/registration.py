"""The worker's standing with its dispatcher: registering, what the dispatcher's answers and orders
about that mean (Welcome, Refused, Reregister, Shutdown), and what its silence means.

Registering afresh makes this a new worker to the dispatcher, which has given the old one's jobs
back to their pipelines, so the worker drops its own (`forget_jobs`: running tasks are stopped). That
happens after the old ZeroMQ context has ended and before the new one is made, so that the new slots'
forker is forked from a process running no ZeroMQ thread. The transport (socket, liveness, backoff)
is `DispatcherConnection`'s.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Tuple

from depio.runtime import protocol as P
from depio.runtime.protocol import TaskResult

from .connection import DispatcherConnection

log = logging.getLogger("depio.worker")

Stop = Tuple[str, int]      # why the worker stops, and its exit code


class Registration:
    """Registers through `conn` with `hello()` (called each time: a Slurm job's worker sets its offer
    after the worker is made). `dispatcher_gone`: it shut down, so nobody would read a Goodbye."""

    def __init__(self, conn: DispatcherConnection, hello: Callable[[], P.Register],
                 forget_jobs: Callable[[], None], nslots: int) -> None:
        self.conn = conn
        self.hello = hello
        self.forget_jobs = forget_jobs
        self.nslots = nslots
        self.dispatcher_gone = False

    def connect(self) -> None:
        self.conn.open(self.hello())

    def reconnect(self) -> None:
        """Register afresh, as a new worker (see the module docstring)."""
        self.conn.terminate()
        self.forget_jobs()
        self.connect()

    def on_message(self, msg: object, unreported: List[Tuple[int, TaskResult]]) -> Optional[Stop]:
        """React to a message about the registration (others are not this one's and are ignored);
        `unreported`: results not sent yet, which a Reregister's dispatcher still wants to see.
        Returns why to stop, if the worker must."""
        conn = self.conn
        if isinstance(msg, P.Welcome):
            conn.welcomed(msg)
            log.info("registered with %s (%d slots)", conn.address, self.nslots)
        elif isinstance(msg, P.Refused):
            log.error("refused by the dispatcher at %s: %s", conn.address, msg.reason)
            return f"refused by the dispatcher at {conn.address}: {msg.reason}", 3
        elif isinstance(msg, P.Shutdown):
            if conn.may_reconnect():     # a pool restarting: wait for it at the same address
                log.warning("dispatcher at %s shut down (%s): waiting to register again", conn.address, msg.reason)
                conn.silent_since = time.monotonic()
                self.reconnect()
            else:
                self.dispatcher_gone = True
                return msg.reason or "dispatcher asked to shut down", 0
        elif isinstance(msg, P.Reregister):
            log.warning("dispatcher asked to register again: %s", msg.reason)
            if unreported:     # results of jobs it gave up on: it counts and drops them
                conn.send(P.WorkerReport((), tuple(unreported)))
            self.reconnect()
        return None

    def on_silence(self, now: float) -> Optional[Stop]:
        """No word from the dispatcher for `liveness` intervals (or no answer to the hello): its view of
        our tasks is lost with it, so stop them; then register again (with --reconnect, within its
        budget: `DispatcherConnection.give_up`) or return why to stop."""
        gone = self.conn.give_up(now)
        if gone is None:
            self.reconnect()
            return None
        return gone, 2

    def goodbye(self, reason: str) -> None:
        self.conn.goodbye(reason, self.dispatcher_gone)
