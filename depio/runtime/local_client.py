"""A pipeline in its dispatcher's own process, and the messages that only travel in that process.

Messages to the dispatcher go through its local inbox (a deque) and a wake-up byte on a pipe:
thread-safe, nothing pickled, no byte from the thread that runs the loop. Messages from it are
handed to the pipeline's `deliver`. No socket and no pickle on a pipeline's hops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import protocol as P


@dataclass(frozen=True, slots=True)
class AttachLocal:
    """A pipeline of this process becomes a client (never on the wire: a callable travels in it)."""
    name: str
    deliver: Callable[[object], None]


@dataclass(frozen=True, slots=True)
class StopLoop:
    """Someone asked the dispatcher to stop."""
    reason: str


class LocalClient:
    """What `Dispatcher.attach_local` returns: `send` posts to the dispatcher's local inbox."""

    def __init__(self, post: Callable[[bytes, object], None], identity: bytes):
        self._post = post
        self.identity = identity

    def send(self, msg: object) -> None:
        self._post(self.identity, msg)

    def close(self) -> None:
        self.send(P.ClientBye("pipeline finished"))
