"""A pipeline's connection to a dispatcher (in-process, or a pool at an address).

One I/O thread owns the DEALER socket. Other threads (the scheduler actor) hand it messages through
an inproc PUSH/PULL pair; what arrives from the dispatcher goes to `on_message`. The thread sends
heartbeats and declares the dispatcher gone after `liveness` silent intervals.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Callable, Optional

import zmq

from . import protocol as P

log = logging.getLogger("depio.client")


class DispatcherClient:
    def __init__(self, address: str, key: bytes, name: str, on_message: Callable[[object], None],
                 on_lost: Callable[[str], None], context: Optional[zmq.Context] = None,
                 heartbeat: float = 1.0, liveness: int = 3, connect_timeout: float = 10.0):
        self.address = address
        self.key = key
        self.name = name
        self.on_message = on_message
        self.on_lost = on_lost
        self.ctx = context or zmq.Context.instance()
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.connect_timeout = connect_timeout
        self._outbox_address = f"inproc://depio-outbox-{uuid.uuid4().hex}"
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.bind(self._outbox_address)
        self._local = threading.local()
        self._pushes: list = []
        self._lock = threading.Lock()
        self.welcome: Optional[P.ClientWelcome] = None
        self._welcomed = threading.Event()
        self._refused: Optional[str] = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="depio-client", daemon=True)

    def start(self) -> "DispatcherClient":
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
        """Thread-safe: queue a message for the dispatcher. Once the I/O thread has ended (the dispatcher
        was lost, `on_lost` said so) messages are dropped: waiting for a reader that is gone would hang
        the caller, e.g. a pipeline cleaning up after its dispatcher died."""
        if not self._thread.is_alive() and self._thread.ident is not None:
            log.debug("dispatcher connection closed: dropped %s", type(msg).__name__)
            return
        push = getattr(self._local, "push", None)
        if push is None:
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDHWM, 0)
            push.setsockopt(zmq.SNDTIMEO, 1000)    # a last guard against a reader that vanished meanwhile
            push.connect(self._outbox_address)
            self._local.push = push
            with self._lock:
                self._pushes.append(push)
        try:
            push.send_multipart(P.encode(msg, self.key), copy=False)
        except zmq.Again:
            log.warning("dispatcher connection closed: dropped %s", type(msg).__name__)

    def close(self, timeout: float = 2.0) -> None:
        self._stop = True
        if self._thread.is_alive():
            try:
                self.send(P.ClientBye("pipeline finished"))
            except zmq.ZMQError:
                pass
            self._thread.join(timeout)
        with self._lock:
            for push in self._pushes:
                push.close(linger=0)
            self._pushes.clear()

    def _loop(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"c-{uuid.uuid4().hex}".encode())
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if "[" in self.address or "::" in self.address:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        last_sent = last_heard = time.monotonic()
        sock.send_multipart(P.encode(P.ClientHello(self.name), self.key))
        lost_reason = None
        try:
            while True:
                events = dict(poller.poll(self.heartbeat * 1000 / 2))
                now = time.monotonic()
                if self._pull in events:
                    while True:
                        try:
                            frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        sock.send_multipart(frames, copy=False)
                        last_sent = now
                        if self._stop and self._is_bye(frames):
                            return
                if sock in events:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        last_heard = now
                        try:
                            msg = P.decode(frames, self.key, accept_refusal=True)
                        except P.ProtocolError as e:
                            log.error("dropped a message from the dispatcher at %s: %s", self.address, e)
                            if e.kind in ("signature", "version"):
                                self._refused = str(e)
                                self._welcomed.set()
                            continue
                        if isinstance(msg, P.ClientWelcome):
                            self.welcome = msg
                            self.heartbeat, self.liveness = msg.heartbeat_interval, msg.liveness
                            self._welcomed.set()
                        elif isinstance(msg, P.Refused):
                            self._refused = msg.reason
                            self._welcomed.set()
                            lost_reason = f"refused by the dispatcher: {msg.reason}"
                            return
                        elif isinstance(msg, P.Shutdown):
                            lost_reason = f"the dispatcher at {self.address} shut down: {msg.reason}"
                            return
                        elif not isinstance(msg, P.Heartbeat):
                            self.on_message(msg)
                if self._stop and not events:
                    return
                if now - last_sent >= self.heartbeat:
                    sock.send_multipart(P.encode(P.Heartbeat(), self.key))
                    last_sent = now
                limit = self.heartbeat * self.liveness if self.welcome else self.connect_timeout
                if now - last_heard > limit:
                    lost_reason = (f"the dispatcher at {self.address} went silent ({now - last_heard:.1f} s "
                                   f"without a heartbeat)")
                    return
        finally:
            sock.close()
            self._pull.close(linger=0)
            if lost_reason and not self._stop:
                self.on_lost(lost_reason)

    def _is_bye(self, frames) -> bool:
        try:
            return isinstance(P.decode([bytes(f) for f in frames], self.key), P.ClientBye)
        except P.ProtocolError:
            return False
