"""The dispatcher's sockets: binding, signed messages in and out, bad messages and refusals.

Two ROUTER sockets: workers connect to one and, in a pool, pipelines (clients) to the other. What
arrives is checked (version, signature) before it is unpickled; a bad message is counted and
dropped, and a peer that speaks another protocol version or signs with another key hears why once,
in plain text. Each message must be the next of its connection (`depio.runtime.session`): a replay
is counted and dropped like a bad signature. Sizes are bounded (`depio.runtime.limits`): a peer
without a session may send only small frames, so what a stranger sends costs no MAC over megabytes
and is never held. A message that a handler cannot take (a malformed one, signed: a bug or a rogue key
holder) is that peer's error: the handler's `on_error` refuses the peer, everyone else is served on.
A peer that cannot be reached any more (ROUTER_MANDATORY: EHOSTUNREACH) is noted in the debug log:
its liveness, not the send, decides that it is gone.
"""
from __future__ import annotations

import logging
from collections import deque
from operator import attrgetter
from typing import Callable, Deque, Dict, Mapping, Optional, Set, Tuple

import zmq

from . import limits
from . import protocol as P
from .session import DispatcherSessions

log = logging.getLogger("depio.dispatcher")

# plain ints: pyzmq's flag enums cost a Python-level call on every `&` of the loop
_POLLIN, _EVENTS = int(zmq.POLLIN), int(zmq.EVENTS)
_MAX_PEERS_NOTED = 10000    # so that a flood of identities cannot grow these sets without bound
_DIGEST, _KEY = attrgetter("func_digest"), attrgetter("key")
HELLOS = (P.Register, P.ClientHello, P.StatusRequest)     # the messages that open a session


def runtime_mismatch(runtime: Mapping[str, str]) -> str:
    """What differs between a peer's `runtime_signature()` and ours ("" if nothing): pickles travel
    between them only if nothing does."""
    mine = P.runtime_signature()
    return ", ".join(f"{k} {runtime.get(k)} (dispatcher: {v})" for k, v in mine.items() if runtime.get(k) != v)


def bind_router(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)      # outbound: never dropped (a ROUTER at its mark drops)
    sock.setsockopt(zmq.RCVHWM, limits.ROUTER_RCVHWM)    # inbound: backpressure on that peer, never a drop
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    limits.limit_socket(sock, limits.max_message())
    if address.startswith("tcp://") and ("[" in address or "::" in address):
        sock.setsockopt(zmq.IPV6, 1)
    sock.bind(address)
    return sock


class Wire:
    """The sockets, signed messages to and from peers of one key, counts of what was dropped and
    refused. `bind` opens the worker socket and, given a client address, the client socket."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.max_message = limits.max_message()
        self.sessions = DispatcherSessions()
        self.workers: Optional[zmq.Socket] = None
        self.clients: Optional[zmq.Socket] = None
        self.worker_address = self.client_address = ""
        self.bad_messages: Dict[str, int] = {}
        self.refusals: Deque[str] = deque(maxlen=100)   # why peers were refused, latest last
        self._bad_peers: Set[Tuple[str, bytes]] = set()
        self._refused_peers: Set[Tuple[str, bytes]] = set()

    def bind(self, ctx: zmq.Context, worker_address: str, client_address: Optional[str], wake_fd: int,
             worker_socket: Optional[zmq.Socket] = None) -> zmq.Poller:
        """Bind the sockets (the worker socket only if not given, bound, as `worker_socket`); a poller
        for them and the wake-up pipe's read end `wake_fd`."""
        poller = zmq.Poller()
        self.workers = worker_socket if worker_socket is not None else bind_router(ctx, worker_address)
        self.worker_address = self.workers.getsockopt(zmq.LAST_ENDPOINT).decode()
        poller.register(self.workers, zmq.POLLIN)
        if client_address is not None:
            self.clients = bind_router(ctx, client_address)
            self.client_address = self.clients.getsockopt(zmq.LAST_ENDPOINT).decode()
            poller.register(self.clients, zmq.POLLIN)
        poller.register(wake_fd, zmq.POLLIN)
        return poller

    def close(self) -> None:
        self.workers.close(linger=200)
        if self.clients is not None:
            self.clients.close(linger=200)

    def send(self, sock: zmq.Socket, identity: bytes, msg: object,
             too_big: Optional[Callable[[limits.MessageTooBig], None]] = None) -> bool:
        """Send `msg` to peer `identity` (in parts if it is over the size limit); False (noted in the
        debug log) if the socket refuses, i.e. the peer has disconnected. A part that cannot be split
        and does not fit goes to `too_big`, or raises limits.MessageTooBig."""
        parts = limits.encode_parts(msg, self.key, lambda: self.sessions.meta(identity), self.max_message, too_big)
        try:
            for frames in parts:
                P.send_frames(sock, [identity] + frames)
            return True
        except zmq.ZMQError as e:
            log.debug("cannot send %s to peer %s: %s", type(msg).__name__, identity.hex()[:16], e)
            return False

    def admit(self, sock: zmq.Socket, identity: bytes, runtime: Mapping[str, str], who: str) -> bool:
        """Whether a peer saying hello (a worker's `Register`, a client's `ClientHello`) may stay: its
        runtime must match ours. A peer refused hears why, and the status keeps it."""
        diff = runtime_mismatch(runtime)
        if not diff:
            return True
        reason = f"{who} refused: runtime differs: {diff}"
        log.error(reason)
        self.refusals.append(reason)
        self.send(sock, identity, P.Refused(reason))
        return False

    def drain(self, sock: zmq.Socket, kind: str, handler: Callable[[bytes, object], None],
              on_error: Callable[[bytes, object, Exception], None]) -> None:
        """Hand what arrived on `sock` (the `kind` socket) to `handler(identity, msg)`; a handler that
        raises hands the peer to `on_error(identity, msg, error)`."""
        known = self.sessions.by_identity
        for _ in range(1000):     # bounded, so that a flooded socket delays neither the other one nor assignment
            if not sock.getsockopt(_EVENTS) & _POLLIN:    # cheaper than a zmq.Again raised
                return
            frames = P.recv_frames(sock)
            if len(frames) < 2:
                self._bad(kind, b"", P.ProtocolError("malformed", "no identity frame"))
                continue
            identity = frames[0]
            if identity not in known and sum(map(len, frames)) > limits.STRANGER_MAX:
                self._bad(kind, identity, P.ProtocolError("oversized", "a big message from a peer without a session"))
                continue
            try:
                msg, meta = P.decode_meta(frames[1:], self.key)
            except P.ProtocolError as e:
                self._bad(kind, identity, e)
                self._refuse_once(sock, kind, identity, e)
                continue
            why = self.sessions.check(identity, meta, type(msg) in HELLOS)
            if why is not None:
                self._bad(kind, identity, P.ProtocolError("replay", why))
                if why == "unknown connection":
                    self._notice_once(sock, kind, identity, meta)
                continue
            try:
                handler(identity, msg)
            except Exception as e:      # that peer's error, not the dispatcher's
                on_error(identity, msg, e)

    def check_submit(self, msg: P.Submit, functions: Mapping[bytes, bytes]) -> None:
        """Raise ValueError for a `Submit` the dispatcher cannot take: a task naming a function never
        sent, or not keyed by an int (C-speed checks, not a loop in Python per task)."""
        missing = set(map(_DIGEST, msg.tasks)).difference(functions)
        if missing:
            raise ValueError(f"{len(missing)} function digest(s) never sent, e.g. {next(iter(missing))!r:.40}")
        if not set(map(type, map(_KEY, msg.tasks))) <= {int}:
            raise ValueError("task keys must be ints")

    def _notice_once(self, sock: zmq.Socket, kind: str, identity: bytes, meta: bytes) -> None:
        """A signed message of a connection we do not know (we restarted, or forgot a lost peer): tell
        it once, bound to that connection, to start again."""
        peer = (kind, identity)
        if peer in self._refused_peers or len(self._refused_peers) >= _MAX_PEERS_NOTED:
            return
        self._refused_peers.add(peer)
        why = "this dispatcher does not know the connection (it restarted, or declared the peer lost)"
        msg = P.Reregister(why) if kind == "worker" else P.Shutdown(why)
        try:
            P.send_frames(sock, [identity] + P.encode(msg, self.key, DispatcherSessions.notice_meta(meta)))
        except zmq.ZMQError as e:
            log.debug("cannot send the notice to peer %s: %s", identity.hex()[:16], e)

    def _bad(self, kind: str, identity: bytes, err: P.ProtocolError) -> None:
        """Count and drop; log only the first bad message of each peer, so a flood cannot flood the log."""
        self.bad_messages[err.kind] = self.bad_messages.get(err.kind, 0) + 1
        if (kind, identity) not in self._bad_peers and len(self._bad_peers) < _MAX_PEERS_NOTED:
            self._bad_peers.add((kind, identity))
            log.warning("dropped a bad message on the %s socket from peer %s: %s", kind, identity.hex()[:16], err)

    def _refuse_once(self, sock: zmq.Socket, kind: str, identity: bytes, err: P.ProtocolError) -> None:
        """Tell a peer that speaks another protocol version, or signs with another key, why nothing it
        sends is accepted: in plain text (it cannot read our pickles, we cannot trust its), once per
        peer, so that a rogue flooding bad frames gets one short answer and no amplification."""
        if err.kind not in ("version", "signature"):
            return
        peer = (kind, identity)
        if peer in self._refused_peers or len(self._refused_peers) >= _MAX_PEERS_NOTED:
            return
        self._refused_peers.add(peer)
        if err.kind == "version":
            reason = f"protocol mismatch: {err}"
        else:
            reason = (f"signature check failed: the {kind} and the dispatcher do not share the same key "
                      f"(${P.KEY_ENV} or --key-file)")
        self.refusals.append(f"{kind} peer {identity.hex()[:16]}: {reason}")
        log.error("refused a %s (peer %s): %s", kind, identity.hex()[:16], reason)
        try:
            sock.send_multipart([identity] + P.refusal(reason), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("cannot send the refusal to peer %s: %s", identity.hex()[:16], e)
