"""The dispatcher's client side: the pipelines it serves, remote (over a pool's client socket) or
in its own process (`LocalClient`, whose messages come through the dispatcher's local inbox).

A remote client says hello first (`ClientHello`, admitted by `Wire.admit`); then it submits and
cancels tasks, hears a `ClientReport` per turn with something in it, and heartbeats both ways. An
admin (`depio pool status` / `stop`) needs no hello. A client that leaves, goes silent, or sends what
cannot be taken is dropped: its tasks are cancelled everywhere. The clients themselves live in the
`Assignment`; the worker side, the sockets and the loop in `depio.runtime.dispatcher`.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import zmq

from . import protocol as P
from .assignment import Assignment, ClientInfo, Report, WorkerInfo
from .guards import refuse
from .liveness import Liveness
from .wire import Wire

log = logging.getLogger("depio.dispatcher")

SendWorkers = Callable[[Sequence[Tuple[WorkerInfo, object]]], None]


class ClientDesk:
    """Where the dispatcher meets its clients. `send_workers` passes on what a client's message
    means for the workers (`RunTasks`, `CancelJobs`); `snapshot` answers an admin's status request."""

    def __init__(self, wire: Wire, assignment: Assignment, send_workers: SendWorkers,
                 snapshot: Callable[[], Dict[str, object]], heartbeat: float, liveness: int) -> None:
        self.wire = wire
        self.assignment = assignment
        self.clients: Dict[bytes, ClientInfo] = assignment.clients
        self.workers = assignment.workers
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.sock: Optional[zmq.Socket] = None    # the client socket, once bound (None: local clients only)
        self.on_stop_request: Optional[Callable[[str], None]] = None   # a pool lets admins stop it
        self._send_workers = send_workers
        self._snapshot = snapshot

    # ------------------------------------------------------------ messages in
    def on_message(self, identity: bytes, msg: object) -> None:
        """A message from a client (remote, or local through the dispatcher's inbox)."""
        c = self.clients.get(identity)
        if isinstance(msg, (P.StatusRequest, P.StopRequest)):
            self._on_admin(identity, msg)
            return
        if isinstance(msg, P.ClientHello):
            self._hello(identity, c, msg)
            return
        if c is None:
            self.wire.send(self.sock, identity, P.Refused("unknown client: say hello first"))
            return
        if c.peer is not None:
            c.peer.heard(time.monotonic())
        if isinstance(msg, P.Submit):
            c.functions.update(msg.functions)
            self.wire.check_submit(msg, c.functions)
            self._send_workers(self.assignment.queue(c, msg.tasks))
        elif isinstance(msg, P.CancelTasks):
            self._send_workers(self.assignment.cancel(c, None if msg.keys is None else set(msg.keys), msg.reason))
        elif isinstance(msg, P.ClientBye):
            self.drop(c, f"client {c.name} left: {msg.reason}")

    def on_error(self, identity: bytes, msg: object, err: Exception) -> None:
        """A client's signed message that cannot be taken: it is refused and let go."""
        reason = refuse(self.wire, self.sock, identity, msg, err)
        c = self.clients.get(identity)
        if c is not None:
            self.drop(c, f"client {c.name} (pid {c.pid}) {reason}")

    def attach_local(self, identity: bytes, name: str, deliver: Callable[[object], None]) -> None:
        """A pipeline of this process: no hello, no heartbeats; it hears through `deliver`."""
        c = self.assignment.add_client(identity, name, platform.node(), os.getpid(), deliver=deliver)
        self.send(c, P.WorkersChanged(len(self.workers), self.workers.slots, "attached"))

    def _hello(self, identity: bytes, c: Optional[ClientInfo], msg: P.ClientHello) -> None:
        if c is None:
            if not self.wire.admit(self.sock, identity, msg.runtime,
                                   f"pipeline {msg.name} (host {msg.host}, pid {msg.pid})"):
                return
            c = self.assignment.add_client(identity, msg.name, msg.host, msg.pid,
                                           peer=Liveness(self.heartbeat, self.liveness))
            if msg.cwd:
                c.context = (str(msg.cwd), tuple(map(str, msg.path)))
            log.info("client %s (pid %d) connected", c.name, c.pid)
        self.send(c, P.ClientWelcome(c.client_id, self.heartbeat, self.liveness, self.wire.max_message))
        self.send(c, P.WorkersChanged(len(self.workers), self.workers.slots, "hello"))

    def _on_admin(self, identity: bytes, msg: object) -> None:
        if isinstance(msg, P.StatusRequest):
            reply: object = P.StatusReply(self._snapshot())
        elif self.on_stop_request is None:
            reply = P.Refused("this dispatcher belongs to a pipeline; it stops with its run")
        else:
            self.on_stop_request(msg.reason or "stop requested")
            reply = P.StatusReply(self._snapshot())
        self.wire.send(self.sock, identity, reply)

    # ------------------------------------------------------------ messages out
    def send(self, c: ClientInfo, msg: object) -> None:
        """A local client hears through its `deliver`, a remote one over the client socket."""
        if c.deliver is not None:
            c.deliver(msg)
        elif self.wire.send(self.sock, c.identity, msg):
            c.peer.sent(time.monotonic())

    def send_reports(self, reports: Iterable[Report]) -> None:
        """This turn's `ClientReport`s."""
        for report in reports:
            self.send(report.client, report.message())

    def broadcast(self, msg: object) -> None:
        """Every client hears `msg` (workers changed, the dispatcher stops)."""
        for c in list(self.clients.values()):
            self.send(c, msg)

    # ------------------------------------------------------------ letting go
    def drop(self, c: ClientInfo, reason: str) -> None:
        """The client left, was lost or refused: its tasks are cancelled everywhere."""
        self._send_workers(self.assignment.drop_client(c, reason))
        if c.peer is not None:
            self.wire.sessions.forget(c.identity)
        log.info(reason)

    def let_go_waiting(self, reason: str) -> None:
        """Remote clients with tasks queued or waiting hear `reason` and are dropped (a pool that has
        had no worker for too long, see `guards.NoWorkerWatch`)."""
        for c in list(self.clients.values()):
            if c.peer is not None and (c.queue or c.waiting):
                self.send(c, P.Refused(reason))
                self.drop(c, f"client {c.name} (pid {c.pid}) let go: {reason}")

    def check_liveness(self, now: float) -> None:
        """Drop remote clients gone silent, heartbeat the others when due."""
        for c in list(self.clients.values()):
            if c.peer is None:
                continue          # in this process: it cannot go silent without the dispatcher
            if c.peer.expired(now):
                self.drop(c, f"client {c.name} (pid {c.pid}) lost: no heartbeat for {c.peer.silence(now):.1f} s")
            elif c.peer.heartbeat_due(now):
                self.send(c, P.Heartbeat())
