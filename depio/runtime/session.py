"""Replay protection: every message is bound to its connection and numbered.

A key holder's messages could otherwise be captured and sent again: a `depio pool stop` after the
pool's restart, a `Submit` twice. So each signed message carries (inside what the MAC covers) a
40-byte *meta* frame: the peer's nonce, the dispatcher's nonce and a counter:

    peer nonce (16) | dispatcher nonce (16) | counter (8, little-endian)

A worker, pipeline or admin picks a fresh nonce per connection and sends its hello (`Register`,
`ClientHello`, `StatusRequest`) with a zero dispatcher nonce; the dispatcher answers with a fresh
nonce of its own, which binds every later message of that connection, both ways. Each direction
counts up from 1; a message whose nonces are not the connection's, or whose counter does not grow,
is refused and counted ("replay"). A hello replayed from an earlier connection opens a session that
nobody can continue (the dispatcher's nonce is new, and the replayer cannot sign): at most a worker
without credits or a client without tasks, dropped after `liveness` heartbeats. A `StopRequest` is
taken only within a session, so a captured stop stops nothing. A message of a connection the dispatcher does not know (it restarted, or forgot a lost
peer) is answered once with a notice bound to that connection and counter 0 (`Reregister` to a
worker, `Shutdown` to a pipeline), the one kind of message a peer takes with counter 0.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

NONCE_SIZE = 16
META_SIZE = 2 * NONCE_SIZE + 8
ZERO_NONCE = bytes(NONCE_SIZE)
NO_SESSION = bytes(META_SIZE)
MAX_SESSIONS = 100_000      # sessions kept by a dispatcher; the oldest go first beyond that


def split_meta(meta: bytes) -> Tuple[bytes, bytes, int]:
    return meta[:NONCE_SIZE], meta[NONCE_SIZE:2 * NONCE_SIZE], int.from_bytes(meta[2 * NONCE_SIZE:], "little")


class PeerSession:
    """A worker's, pipeline's or admin's side of one connection."""

    __slots__ = ("mine", "theirs", "sent", "received")

    def __init__(self) -> None:
        self.mine = os.urandom(NONCE_SIZE)
        self.theirs = ZERO_NONCE       # the dispatcher's, from its first answer
        self.sent = 0
        self.received = 0

    def meta(self) -> bytes:
        self.sent += 1
        return self.mine + self.theirs + self.sent.to_bytes(8, "little")

    def check(self, meta: bytes, notice: bool) -> Optional[str]:
        """Why a message with this meta is not of this connection (None: it is, and is counted).
        `notice`: a session-unknown notice, the one kind taken with counter 0."""
        if len(meta) != META_SIZE:
            return "no connection binding"
        mine, theirs, count = split_meta(meta)
        if mine != self.mine or theirs == ZERO_NONCE:
            return "not of this connection (replayed from another?)"
        if self.theirs == ZERO_NONCE:
            self.theirs = theirs
        elif theirs != self.theirs:
            return "not of this connection (replayed from another?)"
        if count == 0 and notice:
            return None
        if count <= self.received:
            return f"message {count} repeated or out of order (last {self.received})"
        self.received = count
        return None


class DispatcherSessions:
    """The dispatcher's side: per peer identity, [peer nonce, dispatcher nonce, received, sent]."""

    def __init__(self) -> None:
        self.by_identity: Dict[bytes, list] = {}

    def check(self, identity: bytes, meta: bytes, hello: bool) -> Optional[str]:
        """None if the message is the next of its connection (or a hello opening one); else why not.
        A message of an unknown connection says "unknown connection" (see `notice_meta`)."""
        if len(meta) != META_SIZE:
            return "no connection binding"
        s = self.by_identity.get(identity)
        theirs, mine, count = split_meta(meta)
        if s is None:
            if mine != ZERO_NONCE:
                return "unknown connection"
            if not hello or count == 0 or theirs == ZERO_NONCE:
                return "no session: a connection starts with a hello"
            if len(self.by_identity) >= MAX_SESSIONS:
                del self.by_identity[next(iter(self.by_identity))]
            self.by_identity[identity] = [theirs, os.urandom(NONCE_SIZE), count, 0]
            return None
        if theirs != s[0] or mine != s[1]:
            return "not of this connection (replayed from another?)"
        if count <= s[2]:
            return f"message {count} repeated or out of order (last {s[2]})"
        s[2] = count
        return None

    def meta(self, identity: bytes) -> bytes:
        s = self.by_identity.get(identity)
        if s is None:
            return NO_SESSION
        s[3] += 1
        return s[0] + s[1] + s[3].to_bytes(8, "little")

    def forget(self, identity: bytes) -> None:
        self.by_identity.pop(identity, None)

    @staticmethod
    def notice_meta(meta: bytes) -> bytes:
        """The meta of a session-unknown notice: the sender's connection, counter 0."""
        return meta[:2 * NONCE_SIZE] + bytes(8)
