"""What keeps a dispatcher serving whatever its peers do: a peer's malformed message, a pool left
without workers.

A signed message that a handler cannot take (a `Submit` naming a function never sent, credits that
are not a count) is that peer's error: it is counted, the peer hears why (`Refused`) and is let go,
and everyone else is served on. A pool that has had no worker, and none on its way, for
`no_worker_limit` seconds lets its waiting pipelines go with the reason, instead of leaving them to
wait for ever.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import zmq

from . import protocol as P
from .wire import Wire

log = logging.getLogger("depio.dispatcher")


def check_int(value: object, what: str) -> None:
    """A count from a peer: a whole number >= 0, or the peer's message is refused."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0, not {value!r}")


def refuse(wire: Wire, sock: zmq.Socket, identity: bytes, msg: object, err: Exception) -> str:
    """A signed message the dispatcher cannot take: count it, tell the peer why, and return the
    reason (the caller lets the peer go with it)."""
    reason = f"refused: its {type(msg).__name__} cannot be taken: {type(err).__name__}: {err}"
    wire.bad_messages["rejected"] = wire.bad_messages.get("rejected", 0) + 1
    wire.refusals.append(f"peer {identity.hex()[:16]} {reason}")
    log.error("peer %s %s", identity.hex()[:16], reason, exc_info=not isinstance(err, (ValueError, TypeError)))
    wire.send(sock, identity, P.Refused(reason))
    return reason


class NoWorkerWatch:
    """A pool without any worker, and none on its way, for `limit` s: its clients with tasks
    queued are better told and let go (their tasks fail with the reason) than left waiting for
    ever. Workers on their way (starting, pilot jobs queued in Slurm) are no such case."""

    def __init__(self) -> None:
        self.limit: Optional[float] = None      # None: wait for ever (a pipeline's own dispatcher)
        self.workers_coming: Callable[[], str] = lambda: ""   # which are on their way, "" for none
        self._since: Optional[float] = None

    def overdue(self, now: float, workers: int, worker_address: str) -> Optional[str]:
        """Why the waiting clients are let go now; None while `workers` are registered or coming,
        or the limit is not reached."""
        if self.limit is None:
            return None
        if workers or self.workers_coming():
            self._since = None
            return None
        if self._since is None:
            self._since = now
        if now - self._since < self.limit:
            return None
        return (f"the pool has had no worker for {now - self._since:.0f} s and none is starting "
                f"(limit {self.limit:g} s): start some (depio-worker --connect "
                f"{worker_address} ...) or restart the pool")
