"""Size limits on messages: what a peer can make another hold, and what a send does about them.

Every socket refuses frames over `max_message()` bytes (ZMQ_MAXMSGSIZE: libzmq drops the connection
of a peer that sends one, before holding it), so a sender without the key cannot make a pool hold
gigabytes. The default (64 MiB) fits real task payloads; `DEPIO_MAX_MESSAGE` (bytes, or with K, M or
G) changes it, and a dispatcher's welcome tells its peers its own. Legitimate messages are never
dropped for it: a batch over the limit goes in parts (`encode_parts`), and one task that alone is
too big fails with a reason that names it and the limit (`MessageTooBig`).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import zmq

from . import protocol as P

DEFAULT_MAX_MESSAGE = 64 << 20
MAX_MESSAGE_ENV = "DEPIO_MAX_MESSAGE"
STRANGER_MAX = 1 << 20      # a peer without a session (not hello'd yet) sends only small hellos
ROUTER_RCVHWM = 1000        # messages held per peer before libzmq stops reading it (TCP backpressure, no drop)


def parse_size(text: str) -> int:
    """`67108864`, `64M`, `1G`, ... in bytes."""
    text = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def max_message() -> int:
    """This process's limit on one message (bytes): $DEPIO_MAX_MESSAGE, else 64 MiB."""
    raw = os.environ.get(MAX_MESSAGE_ENV, "").strip()
    return max(1 << 16, parse_size(raw)) if raw else DEFAULT_MAX_MESSAGE


def limit_socket(sock: zmq.Socket, limit: int) -> None:
    """Frames over `limit` (plus the meta and header) drop their sender's connection in libzmq."""
    sock.setsockopt(zmq.MAXMSGSIZE, limit + 4096)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.4g} MiB"


class MessageTooBig(Exception):
    """A message that cannot be split further is over the limit; `msg` is it, `size` its body's."""

    def __init__(self, msg: object, size: int, limit: int) -> None:
        super().__init__(f"a {type(msg).__name__} of {mib(size)} is over the message size limit of {mib(limit)} "
                         f"(${MAX_MESSAGE_ENV})")
        self.msg, self.size, self.limit = msg, size, limit


def task_too_big(name: str, size: int, limit: int) -> str:
    """The reason a task fails when it alone does not fit in a message."""
    return (f"task {name!r} is too big to send: {mib(size)} (function and arguments) is over the message size "
            f"limit of {mib(limit)}; set ${MAX_MESSAGE_ENV} on the pool and its pipelines, or pass the data "
            f"through a file")


def split(msg: object) -> Optional[Tuple[object, object]]:
    """Two messages that together say what `msg` says, or None when it cannot be split. Each part
    carries the functions its tasks need (another part may be one that cannot go); followers keep a
    RunTasks whole."""
    if isinstance(msg, P.RunTasks) and len(msg.tasks) > 1 and not msg.after:
        h = len(msg.tasks) // 2
        parts = msg.tasks[:h], msg.tasks[h:]
        return tuple(P.RunTasks(t, {d: b for d, b in msg.functions.items() if d in {s.func_digest for _, s in t}},
                                (), _places(msg.places, h, i)) for i, t in enumerate(parts))
    if isinstance(msg, P.Submit) and len(msg.tasks) > 1:
        h = len(msg.tasks) // 2
        first, second = msg.tasks[:h], msg.tasks[h:]
        need1 = {s.func_digest for s in first}
        need2 = {s.func_digest for s in second}      # again: the first part may be one that cannot go
        return (P.Submit(first, {d: b for d, b in msg.functions.items() if d in need1}),
                P.Submit(second, {d: b for d, b in msg.functions.items() if d in need2}))
    if isinstance(msg, (P.ClientReport, P.WorkerReport)):
        parts = [getattr(msg, f) for f in msg.__slots__ if isinstance(getattr(msg, f), tuple)]
        if sum(map(len, parts)) > 1:
            first, second = {}, {}
            for f in msg.__slots__:
                v = getattr(msg, f)
                if isinstance(v, tuple):
                    h = (len(v) + 1) // 2
                    first[f], second[f] = v[:h], v[h:]
                else:
                    first[f], second[f] = v, type(v)()
            return type(msg)(**first), type(msg)(**second)
    return None


def _places(places: tuple, h: int, part: int) -> tuple:
    """A RunTasks's `places` for its first (`part` 0) or second half, split at task `h`; each half
    names the working directory of its pipelines (the other half may be one that cannot go)."""
    if not places or part == 0:
        return tuple(p for p in places if p[0] < h)
    known = {p[1]: tuple(p[2:]) for p in places if p[2]}
    before = [p for p in places if p[0] <= h]
    out = ([(0, before[-1][1])] if before else []) + [(p[0] - h, p[1]) for p in places if p[0] > h]
    return tuple(q + known.get(q[1], ("", ())) for q in out)


def encode_parts(msg: object, key: bytes, meta: Callable[[], bytes], limit: int,
                 too_big: Optional[Callable[[MessageTooBig], None]] = None) -> List[list]:
    """The frame sets to send for `msg`: one, or (over `limit`) several that each fit. A part that
    cannot be split and does not fit goes to `too_big` (and the rest is sent), or raises MessageTooBig."""
    frames = P.encode(msg, key, meta())
    size = len(frames[2])
    if size <= limit:
        return [frames]
    halves = split(msg)
    if halves is None:
        if too_big is None:
            raise MessageTooBig(msg, size, limit)
        too_big(MessageTooBig(msg, size, limit))
        return []
    return encode_parts(halves[0], key, meta, limit, too_big) + encode_parts(halves[1], key, meta, limit, too_big)
