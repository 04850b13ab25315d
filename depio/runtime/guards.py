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
import time

import zmq

from . import protocol as P

log = logging.getLogger("depio.dispatcher")


def check_int(value: object, what: str) -> None:
    """A count from a peer: a whole number >= 0, or the peer's message is refused."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0, not {value!r}")


class PeerGuards:
    """Mixed into the Dispatcher (its sockets, registries and `_lose_worker`/`_drop_client`)."""

    def _worker_error(self, identity: bytes, msg: object, err: Exception) -> None:
        reason = self._refuse(self._wsock, identity, msg, err)
        w = self.workers.get(identity)
        if w is not None:
            self._lose_worker(w, f"worker {w.name} (host {w.host}, pid {w.pid}) {reason}")

    def _client_error(self, identity: bytes, msg: object, err: Exception) -> None:
        reason = self._refuse(self._csock, identity, msg, err)
        c = self.clients.get(identity)
        if c is not None:
            self._drop_client(c, f"client {c.name} (pid {c.pid}) {reason}")

    def _refuse(self, sock: zmq.Socket, identity: bytes, msg: object, err: Exception) -> str:
        """A signed message the dispatcher cannot take: count it, tell the peer why, and let it go."""
        reason = f"refused: its {type(msg).__name__} cannot be taken: {type(err).__name__}: {err}"
        self.bad_messages["rejected"] = self.bad_messages.get("rejected", 0) + 1
        self.refusals.append(f"peer {identity.hex()[:16]} {reason}")
        log.error("peer %s %s", identity.hex()[:16], reason, exc_info=not isinstance(err, (ValueError, TypeError)))
        self.wire.send(sock, identity, P.Refused(reason))
        return reason

    def _check_starved(self, now: float) -> None:
        """A pool without any worker, and none on its way, for `no_worker_limit` s: clients with
        tasks queued hear why and are let go (their tasks fail with the reason) instead of waiting
        for ever. Workers on their way (starting, pilot jobs queued in Slurm) are no such case."""
        if len(self.workers) or self._stop_reason is not None or self.workers_coming():
            self._starved_since = None
            return
        if self._starved_since is None:
            self._starved_since = now
        if now - self._starved_since < self.no_worker_limit:
            return
        reason = (f"the pool has had no worker for {now - self._starved_since:.0f} s and none is starting "
                  f"(limit {self.no_worker_limit:g} s): start some (depio-worker --connect "
                  f"{self.worker_address} ...) or restart the pool")
        for c in list(self.clients.values()):
            if c.peer is not None and (c.queue or c.waiting):
                self._send_client(c, P.Refused(reason))
                self._drop_client(c, f"client {c.name} (pid {c.pid}) let go: {reason}")

