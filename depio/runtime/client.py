"""A pipeline's connection to a dispatcher (in-process, or a pool at an address).

One thread owns the DEALER socket: a thread of its own, or (`start(threaded=False)`) the scheduler
actor's, whose inbox runs `turn()` while it waits (see `depio.runtime.inbox`), so that a result from a pool
reaches the scheduler without a thread switch. Other threads hand it messages through a deque and a
wake-up pipe; what arrives from the dispatcher goes to `on_message`. The owner sends heartbeats and
declares the dispatcher gone after `liveness` silent intervals (`depio.runtime.liveness`); before
the dispatcher's welcome, after `connect_timeout`. A bug in the loop ends the connection: `on_lost`
hears why and `failure` keeps the exception and its traceback.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from typing import Callable, Deque, Optional, Tuple

import zmq

from . import limits
from . import protocol as P
from .inbox import DrivenLoop, drain_pipe
from .liveness import Liveness
from .session import PeerSession

log = logging.getLogger("depio.client")


def pipeline_context() -> Tuple[str, Tuple[str, ...]]:
    """This process's working directory and import path (the script's folder first), absolute."""
    cwd = os.getcwd()
    return cwd, tuple(os.path.abspath(p) if p else cwd for p in sys.path)


class DispatcherClient(DrivenLoop):
    def __init__(self, address: str, key: bytes, name: str, on_message: Callable[[object], None],
                 on_lost: Callable[[str], None], context: Optional[zmq.Context] = None,
                 heartbeat: float = 1.0, liveness: int = 3, connect_timeout: float = 10.0):
        super().__init__()
        self.address = address
        self.key = key
        self.name = name
        self.on_message = on_message
        self.on_lost = on_lost
        self.ctx = context or zmq.Context.instance()
        self.peer = Liveness(heartbeat, liveness)     # the dispatcher's welcome sets its own values
        self.connect_timeout = connect_timeout
        self.welcome: Optional[P.ClientWelcome] = None
        self._welcomed = threading.Event()
        self._refused: Optional[str] = None
        self._stop = False
        self._outbox: Deque[object] = deque()
        self._wake_r = self._wake_w = -1
        self._own_pipe = True
        self.session = PeerSession()
        self.max_message = limits.max_message()
        self.context = pipeline_context()   # its tasks see it on the pool's workers, as they would here

    @property
    def heartbeat(self) -> float:
        """The heartbeat interval (the inbox's keep-alive reads it)."""
        return self.peer.interval

    @property
    def liveness(self) -> int:
        return self.peer.liveness

    def start(self, threaded: bool = True, wake_pipe: Optional[Tuple[int, int]] = None) -> "DispatcherClient":
        """Connect and say hello; then serve the socket in a thread of its own, or, `threaded=False`,
        in whichever thread calls `turn()` (sharing that thread's `wake_pipe`, read and write end)."""
        self._own_pipe = wake_pipe is None
        self._wake_r, self._wake_w = os.pipe() if wake_pipe is None else wake_pipe
        os.set_blocking(self._wake_r, False)
        sock = self._sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"c-{uuid.uuid4().hex}".encode())
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        limits.limit_socket(sock, self.max_message)
        if "[" in self.address or "::" in self.address:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(self.address)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        now = time.monotonic()
        self.peer.heard(now)
        self.peer.sent(now)
        cwd, path = self.context
        P.send_frames(sock, P.encode(P.ClientHello(self.name, cwd=cwd, path=path), self.key, self.session.meta()))
        if threaded:
            self._thread = threading.Thread(target=self._run, name="depio-client", daemon=True)
            self._thread.start()
        return self

    def wait_welcome(self, timeout: Optional[float] = None) -> None:
        """Block until the dispatcher accepted this client; raise with the reason otherwise."""
        if not self._welcomed.wait(self.connect_timeout if timeout is None else timeout):
            raise ConnectionError(f"no answer from the dispatcher at {self.address} within "
                                  f"{self.connect_timeout:g} s (is it running, and is the key right?)")
        if self._refused:
            raise ConnectionError(f"the dispatcher at {self.address} refused this pipeline: {self._refused}")

    def send(self, msg: object) -> None:
        """Thread-safe: queue a message for the dispatcher. Once the connection has ended (the dispatcher
        was lost, `on_lost` said so) messages are dropped: waiting for a reader that is gone would hang
        the caller, e.g. a pipeline cleaning up after its dispatcher died."""
        if self._stopped.is_set():
            log.debug("dispatcher connection closed: dropped %s", type(msg).__name__)
            return
        self._outbox.append(msg)
        if threading.get_ident() != self._driver_id:
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass

    def close(self, timeout: float = 2.0) -> None:
        """Say goodbye and close. A connection driven by another thread that has ended meanwhile is
        closed here."""
        self._stop = True
        if self._wake_w >= 0 and not self._stopped.is_set():
            self.send(P.ClientBye("pipeline finished"))
            self._await_stop(timeout, self._close_here)
        if self._own_pipe and self._wake_w >= 0:
            try:
                os.close(self._wake_w)
            except OSError:
                pass
            self._wake_w = -1

    # ------------------------------------------------------------ the loop
    def _turn(self, block: bool) -> bool:
        """One turn: wait (until the next heartbeat or expiry is due; not at all when `block` is false
        or messages are queued), send what is queued, hand on what arrived, keep the heartbeat."""
        try:
            if not block or (self._outbox and self.welcome is not None):
                wait = 0.0
            else:        # before the welcome no heartbeat goes out: wait for it, or for the connect timeout
                due = self.peer.next_deadline() if self.welcome else self.peer.last_heard + self.connect_timeout
                wait = max(0.0, due - time.monotonic()) * 1000
            events = dict(self._poller.poll(wait))
            now = time.monotonic()
            if self._wake_r in events:
                drain_pipe(self._wake_r)
            if self._outbox and self._send_outbox(now):
                self._finish(None)     # our goodbye is out
                return False
            if self._sock in events:
                lost = self._receive(now)
                if lost is not None:
                    self._finish(lost)
                    return False
                if self._outbox and self._send_outbox(now):     # held until the welcome came
                    self._finish(None)
                    return False
            if self._stop and not events:
                self._finish(None)
                return False
            if self.welcome is not None and self.peer.heartbeat_due(now):   # the pool must not drop us
                P.send_frames(self._sock, P.encode(P.Heartbeat(), self.key, self.session.meta()))
                self.peer.sent(now)
            if self.peer.expired(now) if self.welcome else self.peer.silence(now) > self.connect_timeout:
                self._finish(f"the dispatcher at {self.address} went silent ({self.peer.silence(now):.1f} s "
                             f"without a heartbeat)")
                return False
            return True
        except Exception as e:      # a bug here must not hang the pipeline: it hears why
            log.exception("dispatcher connection failed")
            self._record_failure(e)
            self._finish(f"the connection to the dispatcher at {self.address} failed: {e!r}")
            return False

    def _close_here(self) -> None:
        self._send_outbox(time.monotonic())
        self._finish(None)

    def _send_outbox(self, now: float) -> bool:
        """Send what other code queued; True if that included our goodbye (after `close`). Nothing
        goes before the dispatcher's welcome: a message carries the session it opened (replays)."""
        if self.welcome is None:
            return self._stop and any(isinstance(m, P.ClientBye) for m in self._outbox)
        bye = False
        while self._outbox:
            msg = self._outbox.popleft()
            for frames in self._parts(msg):
                P.send_frames(self._sock, frames)
            self.peer.sent(now)
            bye = bye or (self._stop and isinstance(msg, P.ClientBye))
        return bye

    def _parts(self, msg: object) -> list:
        """The frame sets for `msg`: a Submit over the size limit goes in parts, and a task that alone
        does not fit fails here, with the reason (it is never sent, so never dropped unsaid)."""
        return limits.encode_parts(msg, self.key, self.session.meta, self.max_message, self._too_big)

    def _too_big(self, e: limits.MessageTooBig) -> None:
        if not isinstance(e.msg, P.Submit):
            log.error("not sent to the dispatcher: %s", e)
        else:
            for spec in e.msg.tasks:
                why = limits.task_too_big(spec.name, e.size, e.limit)
                now = time.time()
                self.on_message(P.ClientReport(done=(P.TaskResult(
                    spec.key, spec.attempt, now, now, "", "", {"kind": "TaskRaisedExceptionException",
                    "type": "MessageTooBig", "message": why, "traceback": "", "summary": why}, None, "pipeline"),)))

    def _receive(self, now: float) -> Optional[str]:
        """Hand on what arrived; the reason the connection ends, if it does."""
        while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = P.recv_frames(self._sock)
            self.peer.heard(now)
            try:
                msg, meta = P.decode_meta(frames, self.key, accept_refusal=True)
                why = None if meta == b"" and type(msg) is P.Refused else \
                    self.session.check(meta, type(msg) in (P.Reregister, P.Shutdown))
                if why is not None:
                    raise P.ProtocolError("replay", why)
            except P.ProtocolError as e:
                log.error("dropped a message from the dispatcher at %s: %s", self.address, e)
                if e.kind in ("signature", "version"):
                    self._refused = str(e)
                    self._welcomed.set()
                continue
            if isinstance(msg, P.ClientWelcome):
                self.welcome = msg
                self.peer.interval, self.peer.liveness = msg.heartbeat_interval, msg.liveness
                self.max_message = msg.max_message or self.max_message
                self._welcomed.set()
            elif isinstance(msg, P.Refused):
                self._refused = msg.reason
                self._welcomed.set()
                return f"refused by the dispatcher: {msg.reason}"
            elif isinstance(msg, P.Shutdown):
                return f"the dispatcher at {self.address} shut down: {msg.reason}"
            elif not isinstance(msg, P.Heartbeat):
                self.on_message(msg)
        return None

    def _finish(self, lost_reason: Optional[str]) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._sock.close()
        if self._own_pipe:
            os.close(self._wake_r)
        if lost_reason and not self._stop:
            self.on_lost(lost_reason)
