"""The worker's connection to its dispatcher: one ZeroMQ DEALER socket, registering (and registering
again), heartbeats and the dispatcher's liveness.

The connection owns its ZeroMQ context and makes it only in `open()`; `terminate()` ends it and its
I/O threads, so that the worker can fork a new slot forker on a reconnect (see `forker`).
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Iterator, Optional

import zmq

from depio.runtime import protocol as P
from depio.runtime.liveness import Liveness

log = logging.getLogger("depio.worker")

# plain ints: pyzmq's flag enums cost a Python-level call on every `&` of the event loop
_POLLIN, _EVENTS = int(zmq.POLLIN), int(zmq.EVENTS)


class DispatcherConnection:
    """A DEALER socket that registers with the dispatcher at `address` and signs what it sends with
    `key`. `liveness` tracks heartbeats both ways; `broken` says why the dispatcher cannot be talked
    to at all (a wrong key or protocol version), once it is known."""

    def __init__(self, address: str, key: bytes, heartbeat: float, liveness: int,
                 reconnect: Optional[float] = None) -> None:
        self.address = address
        self.key = key
        self.reconnect = reconnect
        self.liveness = Liveness(heartbeat, liveness)
        self.ctx: Optional[zmq.Context] = None
        self.sock: Optional[zmq.Socket] = None
        self.registered = False
        self.silent_since: Optional[float] = None     # when the dispatcher was first found silent
        self.broken: Optional[str] = None

    def open(self, hello: P.Register) -> None:
        """A fresh socket (a fresh identity: the dispatcher sees a new worker) that sends `hello`."""
        if self.sock is not None:
            self.sock.close(linger=0)
        if self.ctx is None:
            self.ctx = zmq.Context()
        self.sock = sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"w-{uuid.uuid4().hex}".encode())
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.address.startswith("tcp://[") or "::" in self.address:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(self.address)
        self.registered = False
        self.liveness.heard(time.monotonic())
        self.send(hello)

    def send(self, msg: object) -> None:
        P.send_frames(self.sock, P.encode(msg, self.key))
        self.liveness.sent(time.monotonic())

    def messages(self) -> Iterator[object]:
        """The messages waiting on the socket, decoded. Ends early when the socket is replaced
        meanwhile (what the old one still holds is for the old identity) or the dispatcher turns out
        to speak another key or version (`broken`)."""
        sock = self.sock
        while self.sock is sock and sock.getsockopt(_EVENTS) & _POLLIN:     # cheaper than a zmq.Again
            frames = P.recv_frames(sock)
            self.liveness.heard(time.monotonic())
            try:
                msg = P.decode(frames, self.key, accept_refusal=True)
            except P.ProtocolError as e:
                log.error("dropped a message from the dispatcher: %s", e)
                if e.kind in ("signature", "version"):
                    self.broken = f"cannot talk to the dispatcher at {self.address}: {e}"
                    return
                continue
            yield msg

    def welcomed(self, msg: P.Welcome) -> None:
        self.registered = True
        self.silent_since = None
        self.liveness.interval, self.liveness.liveness = msg.heartbeat_interval, msg.liveness

    def check_suspended(self, overslept: float) -> None:
        """A poll that returned far later than asked means this process was stopped (SIGSTOP, a frozen VM)
        or starved, not that the dispatcher went silent: give it a fresh window to answer. If it
        declared us lost meanwhile, it says so (Reregister) on our next message (a heartbeat is due)."""
        live = self.liveness
        if overslept > live.interval * live.liveness:
            log.warning("this worker was suspended for %.1f s; checking back with the dispatcher", overslept)
            live.heard(time.monotonic())

    def give_up(self, now: float) -> Optional[str]:
        """The dispatcher has been silent for `liveness` intervals (it died, or the network is gone):
        None to register again (with `reconnect`, until `reconnect` seconds of silence in all, however
        many reconnects), otherwise why the worker gives up."""
        if self.silent_since is None:
            self.silent_since = self.liveness.last_heard
        waited = now - self.silent_since
        if self.may_reconnect(waited):
            log.warning("dispatcher at %s silent for %.1f s: stopping this worker's tasks and registering again",
                        self.address, self.liveness.silence(now))
            return None
        return f"the dispatcher at {self.address} is gone (silent for {waited:.1f} s)"

    def may_reconnect(self, waited: float = 0.0) -> bool:
        return self.reconnect is not None and self.reconnect > 0 and waited < self.reconnect

    def goodbye(self, reason: str, dispatcher_gone: bool) -> None:
        """Close the socket, saying Goodbye first if the dispatcher is there to read it."""
        if self.sock is None:
            return
        linger = 0
        try:
            if self.registered and not dispatcher_gone:
                self.send(P.Goodbye(reason))
                linger = 500
        except zmq.ZMQError:
            pass
        self.sock.close(linger=linger)

    def terminate(self) -> None:
        """Close the socket (dropping what it still holds) and end the context: once this returns,
        this process runs no ZeroMQ thread. A socket closed with a linger is given that long."""
        if self.sock is not None and not self.sock.closed:
            self.sock.close(linger=0)
        if self.ctx is not None:
            try:
                self.ctx.term()
            except zmq.ZMQError:
                pass
            self.ctx = None
