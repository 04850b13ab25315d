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

from depio.runtime import limits
from depio.runtime import protocol as P
from depio.runtime.liveness import Liveness
from depio.runtime.session import PeerSession

log = logging.getLogger("depio.worker")

# plain ints: pyzmq's flag enums cost a Python-level call on every `&` of the event loop
_POLLIN, _EVENTS = int(zmq.POLLIN), int(zmq.EVENTS)
MAX_RETRY_WAIT = 30.0      # seconds between tries to register, at most


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
        self.session = PeerSession()           # this connection's nonce and counters (replays are refused)
        self.max_message = limits.max_message()
        self.replays = 0
        # not registered yet: when to try again (backoff, so that a worker waiting for a pool that is
        # down sleeps instead of polling), how many tries went unanswered, whether it said it waits
        self.retry_at = 0.0
        self.tries = 0
        self.said_waiting = False

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
        limits.limit_socket(sock, self.max_message)
        if self.address.startswith("tcp://[") or "::" in self.address:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(self.address)
        self.registered = False
        self.session = PeerSession()
        now = time.monotonic()
        self.liveness.heard(now)
        live = self.liveness
        self.retry_at = now + min(MAX_RETRY_WAIT, live.interval * live.liveness * (2 ** min(self.tries, 8)))
        self.tries += 1
        self.send(hello)

    def send(self, msg: object) -> None:
        """Send `msg` (in parts if it is over the size limit)."""
        try:
            parts = limits.encode_parts(msg, self.key, self.session.meta, self.max_message)
        except limits.MessageTooBig as e:
            log.error("not sent to the dispatcher: %s", e)
            return
        for frames in parts:
            P.send_frames(self.sock, frames)
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
                msg, meta = P.decode_meta(frames, self.key, accept_refusal=True)
            except P.ProtocolError as e:
                log.error("dropped a message from the dispatcher: %s", e)
                if e.kind in ("signature", "version"):
                    self.broken = f"cannot talk to the dispatcher at {self.address}: {e}"
                    return
                continue
            why = None if meta == b"" and type(msg) is P.Refused else \
                self.session.check(meta, type(msg) in (P.Reregister, P.Shutdown))
            if why is not None:
                self.replays += 1
                log.warning("dropped a message from the dispatcher: %s", why)
                continue
            yield msg

    def welcomed(self, msg: P.Welcome) -> None:
        self.registered = True
        self.silent_since = None
        self.tries = 0
        if self.said_waiting:
            log.warning("the dispatcher at %s answered: registered", self.address)
        self.said_waiting = False
        self.liveness.interval, self.liveness.liveness = msg.heartbeat_interval, msg.liveness
        if msg.max_message:
            self.max_message = msg.max_message

    def heartbeat(self, now: float) -> None:
        """Send a heartbeat if one is due (registered only: before that, the hello is retried)."""
        if self.registered and self.liveness.heartbeat_due(now):
            self.send(P.Heartbeat())

    def check_suspended(self, overslept: float) -> None:
        """A poll that returned far later than asked means this process was stopped (SIGSTOP, a frozen VM)
        or starved, not that the dispatcher went silent: give it a fresh window to answer. If it
        declared us lost meanwhile, it says so (Reregister) on our next message (a heartbeat is due)."""
        live = self.liveness
        if overslept > live.interval * live.liveness:
            log.warning("this worker was suspended for %.1f s; checking back with the dispatcher", overslept)
            live.heard(time.monotonic())

    def next_wakeup(self) -> float:
        """When the connection needs a look: registered, the next heartbeat or the dispatcher's expiry;
        waiting to register, the next try (a heartbeat is sent only once registered)."""
        return self.liveness.next_deadline() if self.registered else self.retry_at

    def silent(self, now: float) -> bool:
        """The dispatcher is to be given up on, or asked again: registered, it is silent too long;
        waiting to register, the try is unanswered past its backoff."""
        return self.liveness.expired(now) if self.registered else now >= self.retry_at

    def give_up(self, now: float) -> Optional[str]:
        """The dispatcher has been silent for `liveness` intervals (it died, or the network is gone):
        None to register again (with `reconnect`, until `reconnect` seconds of silence in all, however
        many reconnects), otherwise why the worker gives up."""
        if self.silent_since is None:
            self.silent_since = self.liveness.last_heard
        waited = now - self.silent_since
        if self.may_reconnect(waited):
            if self.registered:
                log.warning("dispatcher at %s silent for %.1f s: stopping this worker's tasks and registering "
                            "again", self.address, self.liveness.silence(now))
            elif not self.said_waiting:      # once, not on every try
                self.said_waiting = True
                log.warning("waiting for the dispatcher at %s to answer (trying again with a backoff of up to "
                            "%g s, for up to %g s)", self.address, MAX_RETRY_WAIT, self.reconnect)
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
