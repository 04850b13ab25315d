"""Heartbeats and liveness of one peer, after the ZeroMQ guide's Paranoid Pirate.

Each side sends a heartbeat when it has been silent for `interval` seconds (any message counts),
and declares the peer gone after `liveness` intervals without hearing from it (any message counts).
The dispatcher keeps one per worker and per remote client, a client one for its dispatcher, a worker
one for its dispatcher. Times are `time.monotonic()` seconds, passed in so that a caller reads the
clock once per turn and tests can use a fake clock.
"""
from __future__ import annotations

import time
from typing import Optional


class Liveness:
    """When we last heard from a peer and last sent to it. `interval` and `liveness` may be set
    after construction (a pool's welcome sets a client's)."""

    __slots__ = ("interval", "liveness", "last_heard", "last_sent")

    def __init__(self, interval: float, liveness: int, now: Optional[float] = None) -> None:
        self.interval = interval
        self.liveness = liveness
        if now is None:
            now = time.monotonic()
        self.last_heard = now
        self.last_sent = now

    def heard(self, now: float) -> None:
        """Something arrived from the peer."""
        self.last_heard = now

    def sent(self, now: float) -> None:
        """Something went to the peer: no heartbeat is due before `now + interval`."""
        self.last_sent = now

    def heartbeat_due(self, now: float) -> bool:
        return now - self.last_sent >= self.interval

    def silence(self, now: float) -> float:
        """Seconds since the peer was last heard."""
        return now - self.last_heard

    def expired(self, now: float) -> bool:
        """The peer has been silent for more than `liveness` intervals: it is gone."""
        return now - self.last_heard > self.interval * self.liveness

    def next_deadline(self) -> float:
        """The monotonic time of the next heartbeat to send or of the peer's expiry, whichever is first."""
        return min(self.last_sent + self.interval, self.last_heard + self.interval * self.liveness)
