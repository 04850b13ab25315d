"""The wire protocol between pipelines (clients), the dispatcher and workers.

Every message is a small frozen dataclass. On the wire it is three ZeroMQ frames:

    [b"depio/<version>", body, mac]

`body` is the pickled message and `mac` an HMAC-SHA256 over the first two frames with the shared
key. `decode` checks the version and the signature *before* unpickling, because unpickling is code
execution: a peer without the key can make the dispatcher do nothing but count and drop.
Task payloads (functions, arguments, return values) travel inside messages as opaque bytes
(cloudpickle) that only workers and the owning pipeline unpickle.
"""
from __future__ import annotations

import hmac
import os
import pickle
import platform
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import cloudpickle

PROTOCOL_VERSION = 1
HEADER = b"depio/%d" % PROTOCOL_VERSION
HEADER_PREFIX = b"depio/"
REFUSED_HEADER = b"depio/refused"   # an unsigned, plain-text refusal any version can read
KEY_ENV = "DEPIO_KEY"               # hex key handed to workers through the environment
MAC_SIZE = 32


def runtime_signature() -> Dict[str, str]:
    """What must match between a worker and a pipeline for pickles to travel between them."""
    return {
        "protocol": str(PROTOCOL_VERSION),
        "python": "%d.%d" % sys.version_info[:2],
        "cloudpickle": cloudpickle.__version__.split(".")[0],
    }


def new_key() -> bytes:
    return os.urandom(32)


# ---------------------------------------------------------------- task payloads

@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One attempt of one task, as a worker needs it."""
    key: int                      # the task's index in its pipeline
    attempt: int                  # 1, 2, ...: a late result of an older attempt is ignored
    name: str
    func_digest: bytes            # the function travels once per worker, then by digest
    args: bytes                   # pickled (args, kwargs)
    products: Tuple[str, ...] = ()
    dependencies: Tuple[str, ...] = ()
    timeout: Optional[float] = None


@dataclass(frozen=True, slots=True)
class TaskResult:
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

@dataclass(frozen=True, slots=True)
class Register:
    worker_id: str
    host: str
    pid: int
    slots: int
    runtime: Dict[str, str] = field(default_factory=runtime_signature)
    slurm_job_id: str = ""


@dataclass(frozen=True, slots=True)
class Welcome:
    heartbeat_interval: float
    liveness: int


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


@dataclass(frozen=True, slots=True)
class RequestWork:
    """The worker can take `credits` more tasks (an absolute number, not an increment)."""
    credits: int


@dataclass(frozen=True, slots=True)
class RunTasks:
    tasks: Tuple[Tuple[int, TaskSpec], ...]          # (job id, spec)
    functions: Dict[bytes, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerReport:
    started: Tuple[Tuple[int, float], ...] = ()      # (job id, time)
    done: Tuple[Tuple[int, TaskResult], ...] = ()    # (job id, result)


@dataclass(frozen=True, slots=True)
class CancelJobs:
    jids: Tuple[int, ...]
    reason: str = "cancelled"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Shutdown:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Goodbye:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Reregister:
    """The dispatcher does not know this worker (it restarted, or declared the worker lost)."""
    reason: str = ""


# ---------------------------------------------------------------- client (pipeline) <-> dispatcher

@dataclass(frozen=True, slots=True)
class ClientHello:
    name: str
    host: str = field(default_factory=platform.node)
    pid: int = field(default_factory=os.getpid)
    runtime: Dict[str, str] = field(default_factory=runtime_signature)


@dataclass(frozen=True, slots=True)
class ClientWelcome:
    client_id: int
    heartbeat_interval: float
    liveness: int


@dataclass(frozen=True, slots=True)
class Submit:
    tasks: Tuple[TaskSpec, ...]
    functions: Dict[bytes, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CancelTasks:
    keys: Optional[Tuple[int, ...]] = None           # None: everything of this client
    reason: str = "cancelled"


@dataclass(frozen=True, slots=True)
class TaskLost:
    key: int
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class ClientReport:
    started: Tuple[Tuple[int, int, float, str], ...] = ()   # (key, attempt, time, worker)
    done: Tuple[TaskResult, ...] = ()
    lost: Tuple[TaskLost, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkersChanged:
    """The dispatcher's worker count changed; a pipeline without any worker left can fail fast."""
    workers: int
    slots: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ClientBye:
    reason: str = ""


MESSAGE_TYPES = (TaskSpec, TaskResult, Register, Welcome, Refused, RequestWork, RunTasks, WorkerReport,
                 CancelJobs, Heartbeat, Shutdown, Goodbye, Reregister, ClientHello, ClientWelcome, Submit,
                 CancelTasks, TaskLost, ClientReport, WorkersChanged, ClientBye)
_MESSAGES = frozenset(t for t in MESSAGE_TYPES if t not in (TaskSpec, TaskResult, TaskLost))


# ---------------------------------------------------------------- framing

class ProtocolError(Exception):
    """A frame set that is not a valid signed depio message; `kind` says what was wrong."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def encode(msg: object, key: bytes) -> list:
    body = pickle.dumps(msg, protocol=5)
    return [HEADER, body, hmac.digest(key, HEADER + body, "sha256")]


def decode(frames: list, key: bytes) -> object:
    """Check version and signature, then unpickle. Raises ProtocolError."""
    if len(frames) != 3:
        if len(frames) == 2 and frames[0] == REFUSED_HEADER:
            return Refused(bytes(frames[1]).decode("utf-8", "replace"))
        raise ProtocolError("malformed", f"{len(frames)} frames")
    header, body, mac = (bytes(f) for f in frames)
    if header != HEADER:
        if header.startswith(HEADER_PREFIX):
            raise ProtocolError("version", f"peer speaks {header.decode('ascii', 'replace')}, "
                                           f"this side {HEADER.decode()}")
        raise ProtocolError("malformed", "not a depio message")
    if len(mac) != MAC_SIZE or not hmac.compare_digest(mac, hmac.digest(key, header + body, "sha256")):
        raise ProtocolError("signature", "bad or missing HMAC (wrong key?)")
    try:
        msg = pickle.loads(body)
    except Exception as e:   # signed but unreadable: a bug on the other side, not an attack
        raise ProtocolError("malformed", f"cannot unpickle body: {e}") from None
    if type(msg) not in _MESSAGES:
        raise ProtocolError("unknown", f"message type {type(msg).__name__}")
    return msg


def refusal(reason: str) -> list:
    """A plain-text refusal frame set, readable by a peer of any protocol version."""
    return [REFUSED_HEADER, reason.encode("utf-8")]


def key_from_hex(text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("the depio key must be hex (as written by `depio key`)") from None
    if len(key) < 16:
        raise ValueError("the depio key is too short: use at least 16 bytes (32 hex digits)")
    return key
