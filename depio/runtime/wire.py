"""The dispatcher's sockets: binding, signed messages in and out, bad messages and refusals.

Two ROUTER sockets: workers connect to one and, in a pool, pipelines (clients) to the other. What
arrives is checked (version, signature) before it is unpickled; a bad message is counted and
dropped, and a peer that speaks another protocol version or signs with another key hears why once,
in plain text. A peer that cannot be reached any more (ROUTER_MANDATORY: EHOSTUNREACH) is noted in
the debug log: its liveness, not the send, decides that it is gone.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable, Deque, Dict, Mapping, Optional, Set, Tuple

import zmq

from . import protocol as P

log = logging.getLogger("depio.dispatcher")

# plain ints: pyzmq's flag enums cost a Python-level call on every `&` of the loop
_POLLIN, _EVENTS = int(zmq.POLLIN), int(zmq.EVENTS)
_MAX_PEERS_NOTED = 10000    # so that a flood of identities cannot grow these sets without bound


def runtime_mismatch(runtime: Mapping[str, str]) -> str:
    """What differs between a peer's `runtime_signature()` and ours ("" if nothing): pickles travel
    between them only if nothing does."""
    mine = P.runtime_signature()
    return ", ".join(f"{k} {runtime.get(k)} (dispatcher: {v})" for k, v in mine.items() if runtime.get(k) != v)


def bind_router(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if address.startswith("tcp://") and ("[" in address or "::" in address):
        sock.setsockopt(zmq.IPV6, 1)
    sock.bind(address)
    return sock


class Wire:
    """The sockets, signed messages to and from peers of one key, counts of what was dropped and
    refused. `bind` opens the worker socket and, given a client address, the client socket."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.workers: Optional[zmq.Socket] = None
        self.clients: Optional[zmq.Socket] = None
        self.worker_address = self.client_address = ""
        self.bad_messages: Dict[str, int] = {}
        self.refusals: Deque[str] = deque(maxlen=100)   # why peers were refused, latest last
        self._bad_peers: Set[Tuple[str, bytes]] = set()
        self._refused_peers: Set[Tuple[str, bytes]] = set()

    def bind(self, ctx: zmq.Context, worker_address: str, client_address: Optional[str], wake_fd: int) -> zmq.Poller:
        """Bind the sockets; a poller for them and the wake-up pipe's read end `wake_fd`."""
        poller = zmq.Poller()
        self.workers = bind_router(ctx, worker_address)
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

    def send(self, sock: zmq.Socket, identity: bytes, msg: object) -> bool:
        """Send `msg` to peer `identity`; False (noted in the debug log) if the socket refuses, i.e.
        the peer has disconnected."""
        try:
            P.send_frames(sock, [identity] + P.encode(msg, self.key))
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

    def drain(self, sock: zmq.Socket, kind: str, handler: Callable[[bytes, object], None]) -> None:
        """Hand what arrived on `sock` (the `kind` socket) to `handler(identity, msg)`."""
        for _ in range(1000):     # bounded, so that a flooded socket delays neither the other one nor assignment
            if not sock.getsockopt(_EVENTS) & _POLLIN:    # cheaper than a zmq.Again raised
                return
            frames = P.recv_frames(sock)
            if len(frames) < 2:
                self._bad(kind, b"", P.ProtocolError("malformed", "no identity frame"))
                continue
            identity = frames[0]
            try:
                msg = P.decode(frames[1:], self.key)
            except P.ProtocolError as e:
                self._bad(kind, identity, e)
                self._refuse_once(sock, kind, identity, e)
                continue
            handler(identity, msg)

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
