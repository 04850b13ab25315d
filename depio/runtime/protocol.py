"""The wire protocol between pipelines (clients), the dispatcher and workers.

Every message is a small frozen dataclass (`depio.runtime.message`). On the wire: four ZeroMQ frames,

    [b"depio/<version>", meta, body, mac]

`meta` binds the message to its connection and numbers it (`depio.runtime.session`: replays are
refused), `body` is the message pickled as a plain tuple `(tag, field, ...)` (see `to_wire`), `mac` a
keyed BLAKE2b of the first three frames (see `sign`). `decode` checks version and signature *before*
unpickling, which is code execution: a peer without the key can make the dispatcher only count and
drop. Task payloads travel as opaque bytes (cloudpickle) only workers and their pipeline unpickle.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import platform
import sys
from dataclasses import field, fields
from typing import Dict, List, Optional, Tuple

import cloudpickle
import zmq

# the keys have a module of their own; callers reach them as `protocol.X` too
from .keys import (KEY_ENV, MAKE_KEY_HINT, KeyRequiredError, check_key_file, is_loopback,  # noqa: F401
                   key_for_bind, key_from_hex, load_key, new_key)
from .message import FIELDS_OF as _FIELDS_OF, Message, message
from .session import NO_SESSION

PROTOCOL_VERSION = 5      # 2: tuples (`to_wire`); 3: TaskLost.started; 4: followers; 5: sessions (replays)
HEADER = b"depio/%d" % PROTOCOL_VERSION
HEADER_PREFIX = b"depio/"
REFUSED_HEADER = b"depio/refused"   # an unsigned, plain-text refusal any version can read
MAC_SIZE = 32


def runtime_signature() -> Dict[str, str]:
    """What must match between a worker and a pipeline for pickles to travel between them."""
    return {
        "protocol": str(PROTOCOL_VERSION),
        "python": "%d.%d" % sys.version_info[:2],
        "cloudpickle": cloudpickle.__version__.split(".")[0],
    }


# ---------------------------------------------------------------- task payloads

@message
class TaskSpec(Message):
    """One attempt of one task, as a worker needs it."""
    key: int                      # the task's index in its pipeline
    attempt: int                  # 1, 2, ...: a late result of an older attempt is ignored
    name: str
    func_digest: bytes            # the function travels once per worker, then by digest
    args: bytes                   # pickled (args, kwargs)
    products: Tuple[str, ...] = ()
    dependencies: Tuple[str, ...] = ()
    timeout: Optional[float] = None
    after: Optional[int] = None   # a follower: runs where task `after` (key) runs, once it succeeded
    shape: Optional[tuple] = None  # what it asks for (`resources.shape_of`); None: nothing special


@message
class TaskResult(Message):
    """How an attempt ended. `error` is None on success, else a dict with
    kind (the depio exception name), type, message, traceback and summary."""
    key: int
    attempt: int
    started: float
    ended: float
    stdout: str = ""
    stderr: str = ""
    error: Optional[Dict[str, str]] = None
    value: Optional[bytes] = None
    worker: str = ""


# ---------------------------------------------------------------- worker <-> dispatcher

@message
class Register(Message):
    """A worker's hello: who it is, what each of its slots holds, and its runtime."""
    worker_id: str
    host: str
    pid: int
    slots: int
    runtime: Dict[str, str] = field(default_factory=runtime_signature)
    slurm_job_id: str = ""
    offer: Dict[str, object] = field(default_factory=dict)   # what each slot holds (`resources.Offer`)


@message
class Welcome(Message):
    """The dispatcher took the worker: the heartbeat it expects, and its size limit."""
    heartbeat_interval: float
    liveness: int
    max_message: int = 0          # the dispatcher's size limit on one message (bytes)


@message
class Refused(Message):
    """The dispatcher will not take this peer, and why (another key, runtime or protocol)."""
    reason: str


@message
class RequestWork(Message):
    """The worker can take `credits` more tasks (an absolute number, not an increment)."""
    credits: int


@message
class RunTasks(Message):
    """Tasks for a worker, with the functions it has not seen yet."""
    tasks: Tuple[Tuple[int, TaskSpec], ...] = field(metadata={"wire": ("jobs", "TaskSpec")})   # (job id, spec)
    functions: Dict[bytes, bytes] = field(default_factory=dict)
    # (job id, job id of its predecessor): followers, held until that job succeeds on this worker
    after: Tuple[Tuple[int, int], ...] = ()
    # a pool's: (index in tasks, pipeline id, cwd, import path) where a pipeline's tasks begin (cwd "": known)
    places: Tuple[Tuple[int, int, str, Tuple[str, ...]], ...] = ()


@message
class WorkerReport(Message):
    """What a worker has to say: tasks started and done, credits, followers given back."""
    started: Tuple[Tuple[int, float], ...] = ()      # (job id, time)
    done: Tuple[Tuple[int, TaskResult], ...] = field(default=(), metadata={"wire": ("jobs", "TaskResult")})
    credits: int = 0                                 # more tasks it can take (as RequestWork)
    returned: Tuple[Tuple[int, str], ...] = ()       # (job id, why): followers given back, never started


@message
class CancelJobs(Message):
    """Stop these jobs on the worker, queued or running."""
    jids: Tuple[int, ...]
    reason: str = "cancelled"


@message
class Heartbeat(Message):
    """Still here (either way), when nothing else was sent for a heartbeat interval."""


@message
class Shutdown(Message):
    """The dispatcher stops: the worker or pipeline goes."""
    reason: str = ""


@message
class Goodbye(Message):
    """The worker leaves, and why."""
    reason: str = ""


@message
class Reregister(Message):
    """The dispatcher does not know this worker (it restarted, or declared the worker lost)."""
    reason: str = ""


# ---------------------------------------------------------------- client (pipeline) <-> dispatcher

@message
class ClientHello(Message):
    """A pipeline's hello to a dispatcher: who it is, where its tasks run, its runtime."""
    name: str
    host: str = field(default_factory=platform.node)
    pid: int = field(default_factory=os.getpid)
    runtime: Dict[str, str] = field(default_factory=runtime_signature)
    cwd: str = ""                 # where its tasks run, and their import path (once per pipeline, not per task)
    path: Tuple[str, ...] = ()


@message
class ClientWelcome(Message):
    """The dispatcher took the pipeline: its id, heartbeat and size limit."""
    client_id: int
    heartbeat_interval: float
    liveness: int
    max_message: int = 0          # the dispatcher's size limit on one message (bytes)


@message
class Submit(Message):
    """A pipeline's tasks to run, with the functions the dispatcher has not seen yet."""
    tasks: Tuple[TaskSpec, ...] = field(metadata={"wire": ("items", "TaskSpec")})
    functions: Dict[bytes, bytes] = field(default_factory=dict)


@message
class CancelTasks(Message):
    """A pipeline drops these tasks (queued and running)."""
    keys: Optional[Tuple[int, ...]] = None           # None: everything of this client
    reason: str = "cancelled"


@message
class TaskLost(Message):
    """An attempt that ended with no result: its worker was lost, or it was cancelled."""
    key: int
    attempt: int
    reason: str
    started: bool = True     # False: the attempt was not seen to start (prefetched, or queued in Slurm)


@message
class TaskReturned(Message):
    """A follower handed back unstarted: its predecessor failed, was cancelled or lost, or had ended
    before the follower reached the dispatcher. Not a fault of the task; its scheduler re-decides it."""
    key: int
    attempt: int
    reason: str


@message
class ClientReport(Message):
    """What a pipeline hears of its tasks: started, done, lost, handed back."""
    started: Tuple[Tuple[int, int, float, str], ...] = ()   # (key, attempt, time, worker)
    done: Tuple[TaskResult, ...] = field(default=(), metadata={"wire": ("items", "TaskResult")})
    lost: Tuple[TaskLost, ...] = field(default=(), metadata={"wire": ("items", "TaskLost")})
    returned: Tuple[TaskReturned, ...] = field(default=(), metadata={"wire": ("items", "TaskReturned")})


@message
class WorkersChanged(Message):
    """The dispatcher's worker count changed; a pipeline without any worker left can fail fast."""
    workers: int
    slots: int
    reason: str = ""


@message
class ClientBye(Message):
    """The pipeline leaves, and why."""
    reason: str = ""


# ---------------------------------------------------------------- administration of a pool

@message
class StatusRequest(Message):
    """Ask a dispatcher for its workers and clients (`depio pool status`); no hello needed."""


@message
class StatusReply(Message):
    """The dispatcher's workers and clients (`depio pool status`)."""
    snapshot: Dict[str, object]


@message
class StopRequest(Message):
    """Ask a pool to stop (`depio pool stop`); only a key holder can, as for every message."""
    reason: str = ""


MESSAGE_TYPES = (TaskSpec, TaskResult, Register, Welcome, Refused, RequestWork, RunTasks, WorkerReport,
                 CancelJobs, Heartbeat, Shutdown, Goodbye, Reregister, ClientHello, ClientWelcome, Submit,
                 CancelTasks, TaskLost, ClientReport, WorkersChanged, ClientBye, StatusRequest, StatusReply,
                 StopRequest, TaskReturned)
_MESSAGES = frozenset(t for t in MESSAGE_TYPES if t not in (TaskSpec, TaskResult, TaskLost, TaskReturned))


# ---------------------------------------------------------------- wire form: tuples
# A class reference costs a pickle more than the rest of a small message, so a message travels as
# `(tag, field, ...)` (tag: its place in MESSAGE_TYPES), nested specs and results as tuples ("wire").

_TAG = {cls: i for i, cls in enumerate(MESSAGE_TYPES)}
_NESTED: Dict[type, List[Tuple[int, str, type]]] = {
    cls: [(i, f.metadata["wire"][0], globals()[f.metadata["wire"][1]])
          for i, f in enumerate(fields(cls)) if "wire" in f.metadata]
    for cls in MESSAGE_TYPES}


def as_tuple(obj: object) -> tuple:
    """A TaskSpec, TaskResult or TaskLost as the plain tuple of its fields (see `from_tuple`)."""
    return _FIELDS_OF[type(obj)](obj)


def to_wire(msg: object) -> tuple:
    """`(tag, field, ...)`, nested specs/results/losses as tuples too."""
    cls = type(msg)
    values = _FIELDS_OF[cls](msg)
    nested = _NESTED[cls]
    if nested:
        values = list(values)
        for i, how, inner in nested:
            get = _FIELDS_OF[inner]
            if how == "jobs":
                values[i] = tuple([(jid, get(x)) for jid, x in values[i]])
            else:
                values[i] = tuple([get(x) for x in values[i]])
    return (_TAG[cls], *values)


def from_wire(wire: object) -> object:
    """The message `to_wire` made. Raises ProtocolError on anything else."""
    if type(wire) is not tuple or not wire or type(wire[0]) is not int or not 0 <= wire[0] < len(MESSAGE_TYPES):
        raise ProtocolError("unknown", f"not a depio message: {type(wire).__name__}")
    cls = MESSAGE_TYPES[wire[0]]
    if cls not in _MESSAGES:
        raise ProtocolError("unknown", f"message type {cls.__name__}")
    try:
        nested = _NESTED[cls]
        if not nested:
            return cls(*wire[1:])
        values = list(wire[1:])
        for i, how, inner in nested:
            if how == "jobs":
                values[i] = tuple([(jid, inner(*x)) for jid, x in values[i]])
            else:
                values[i] = tuple([inner(*x) for x in values[i]])
        return cls(*values)
    except (TypeError, ValueError, IndexError) as e:
        raise ProtocolError("malformed", f"{cls.__name__}: {e}") from None


# ---------------------------------------------------------------- framing

class ProtocolError(Exception):
    """A frame set that is not a valid signed depio message; `kind` says what was wrong."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def sign(key: bytes, data: bytes) -> bytes:
    """The message authentication code: keyed BLAKE2b, a MAC by design (RFC 7693). Not HMAC-SHA256:
    OpenSSL's HMAC costs 5-20 us a call where threads share the process, BLAKE2b under 2."""
    if len(key) > 64:          # BLAKE2b takes keys up to 64 bytes
        key = hashlib.sha256(key).digest()
    return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()


# pyzmq's `send_multipart`/`recv_multipart` check each frame's type and combine enum flags in Python:
# half of the cost of a small message. Its Cython base class does the same sends with plain ints.
_send, _recv, _get = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get
_SNDMORE, _RCVMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.RCVMORE), int(zmq.NOBLOCK)
_COPY_BELOW = 65536     # bigger frames (function blobs) go without a copy, as pyzmq's own threshold


def send_frames(sock: zmq.Socket, frames: List[bytes]) -> None:
    """`sock.send_multipart(frames, copy=False)` for bytes frames, at a lower cost."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        _send(sock, f, _SNDMORE if i < last else 0, len(f) < _COPY_BELOW)


def recv_frames(sock: zmq.Socket) -> List[bytes]:
    """`sock.recv_multipart(zmq.NOBLOCK)` at a lower cost (raises zmq.Again when nothing waits)."""
    parts = [_recv(sock, _NOBLOCK)]
    while _get(sock, _RCVMORE):
        parts.append(_recv(sock, _NOBLOCK))
    return parts


def encode(msg: object, key: bytes, meta: bytes = NO_SESSION) -> list:
    body = pickle.dumps(to_wire(msg), protocol=5)
    return [HEADER, meta, body, sign(key, HEADER + meta + body)]


def decode(frames: list, key: bytes, accept_refusal: bool = False) -> object:
    """Check version and signature, then unpickle. Raises ProtocolError. See `decode_meta`."""
    return decode_meta(frames, key, accept_refusal)[0]


def decode_meta(frames: list, key: bytes, accept_refusal: bool = False) -> Tuple[object, bytes]:
    """The message and its meta frame (connection and number, checked by `depio.runtime.session`).

    `accept_refusal`: also take the plain-text, unsigned refusal (a worker or pipeline needs to read why
    a dispatcher of another version or key turned it away). The dispatcher never accepts one: an unsigned
    message must not count as a sign of life or do anything else there."""
    if len(frames) not in (3, 4):     # 3: a peer of protocol version 4 or older (its header says so)
        if accept_refusal and len(frames) == 2 and bytes(frames[0]) == REFUSED_HEADER:
            return Refused(bytes(frames[1])[:4096].decode("utf-8", "replace")), b""
        raise ProtocolError("malformed", f"{len(frames)} frames")
    header, body, mac = bytes(frames[0]), bytes(frames[-2]), bytes(frames[-1])
    meta = bytes(frames[1]) if len(frames) == 4 else b""
    if header != HEADER:
        if header.startswith(HEADER_PREFIX):
            raise ProtocolError("version", f"peer speaks {header.decode('ascii', 'replace')}, "
                                           f"this side {HEADER.decode()}")
        raise ProtocolError("malformed", "not a depio message")
    if len(mac) != MAC_SIZE or not hmac.compare_digest(mac, sign(key, header + meta + body)):
        raise ProtocolError("signature", "bad or missing signature (wrong key?)")
    try:
        wire = pickle.loads(body)
    except Exception as e:   # signed but unreadable: a bug on the other side, not an attack
        raise ProtocolError("malformed", f"cannot unpickle body: {e}") from None
    return from_wire(wire), meta


def refusal(reason: str) -> list:
    """A plain-text refusal frame set, readable by a peer of any protocol version."""
    return [REFUSED_HEADER, reason.encode("utf-8")]
