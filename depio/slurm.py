"""Slurm through submitit: per-task jobs (`SubmitItExecutor`, upstream's mode) and pilot workers
(`SlurmPilotExecutor`).

Both modes run tasks with the worker code (`worker.main.Worker`) inside Slurm jobs. The jobs connect
back over ZeroMQ to the pipeline (signed with the run's key), so a task's start and end arrive at
once over the socket; Slurm is asked about jobs only when something went wrong (a job's worker left
or fell silent) and, rate limited, about jobs that never showed up. Every question is one batched
`squeue` call (`sacct` only for ids squeue no longer knows, and only if it works): depio needs no
accounting database.

Per-task mode (`SubmitItExecutor`): every ready task becomes one Slurm job (tasks ready at the same
time with the same parameters go out as one job array: one sbatch call). The job runs a one-slot
worker named after its task attempt; a small server in the pipeline (`TaskJobServer`) hands it
exactly that attempt, relays started/done to the scheduler and tells the worker to leave. The
table shows each task's Slurm job id and raw Slurm state.

Pilot mode (`SlurmPilotExecutor`): `workers` long-lived `depio-worker`s run as one Slurm job array
and stream many tasks each from the pipeline's dispatcher (`DispatcherBackend`). They know their
walltime: they stop asking for tasks they cannot finish and leave before the limit; the launcher
submits replacements while work remains, between `min_workers` and `max_workers`.

The address: the dispatcher (or task server) binds `address=` / `$DEPIO_ADDRESS`, else the address of
the interface that routes off this host (what compute nodes reach); every message is signed with a
fresh per-run key, which reaches the jobs through a mode-0600 file in the submitit folder (never on
a command line, in a job's arguments or in the environment).

Ctrl-C, SIGTERM or a failure: `close()` cancels every Slurm job of the run (one `scancel`) and waits
until squeue no longer lists them as pending or running.
"""
from __future__ import annotations

import atexit
import dataclasses
import ipaddress
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import zmq

from . import protocol as P
from .backends import Backend, DispatcherBackend
from .Executors import AbstractTaskExecutor
from .TaskStatus import TaskStatus

log = logging.getLogger("depio.slurm")

ADDRESS_ENV = "DEPIO_ADDRESS"
TWO_DAYS_IN_MINUTES = 60 * 48
DEFAULT_PARAMS: Dict[str, Any] = {"slurm_time": TWO_DAYS_IN_MINUTES, "slurm_partition": "gpu", "slurm_mem": 32,
                                  "gpus_per_node": 0}
QUERY_INTERVAL = 30.0          # at most one periodic squeue per this many seconds per pipeline

# ---------------------------------------------------------------- Slurm states

_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}
_PENDING = {"PENDING", "READY", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED"}
_HOLD = {"HOLD", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
_FAILED = {"FAILED", "BOOT_FAIL", "DEADLINE", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "REVOKED"}
# a job Slurm lost for reasons of its own: its task is dispatched again (like a lost worker)
_RETRYABLE = {"NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "REQUEUED", "REVOKED"}


def slurm_status(state: str) -> TaskStatus:
    """Map a raw Slurm job state (as squeue/sacct print it) to a depio status, as upstream does."""
    s = (state or "").split()[0].rstrip("+").upper() if state else ""
    if s in _HOLD:
        return TaskStatus.HOLD if hasattr(TaskStatus, "HOLD") else TaskStatus.PENDING
    if s in _RUNNING:
        return TaskStatus.RUNNING
    if s in _PENDING or s.startswith("REQUEUE"):
        return TaskStatus.PENDING
    if s == "COMPLETED":
        return TaskStatus.FINISHED
    if s.startswith("CANCELLED"):
        return TaskStatus.CANCELED
    if s in _FAILED:
        return TaskStatus.FAILED
    return TaskStatus.UNKNOWN if hasattr(TaskStatus, "UNKNOWN") else TaskStatus.FAILED


def _terminal(state: str) -> bool:
    s = (state or "").split()[0].rstrip("+").upper() if state else ""
    return bool(s) and s not in _RUNNING and s not in _PENDING and s not in _HOLD and s != "UNKNOWN"


def _base_state(state: str) -> str:
    return (state or "").split()[0].rstrip("+").upper() if state else ""


# ---------------------------------------------------------------- talking to Slurm (batched)

def _expand_array(jid: str) -> List[str]:
    """'123_[0-2,5%2]' -> ['123_0', '123_1', '123_2', '123_5']; other ids as they are."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", jid)
    if not m:
        return [jid]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(f"{m.group(1)}_{i}" for i in range(int(a), int(b) + 1))
        elif part:
            out.append(f"{m.group(1)}_{part}")
    return out


class SlurmQuery:
    """Asks Slurm about many jobs in one call; counts the calls (`queries`)."""

    def __init__(self) -> None:
        self.queries = 0
        self.sacct_calls = 0
        self.lock = threading.Lock()

    def states(self, ids: Iterable[str]) -> Dict[str, Tuple[str, str]]:
        """job id -> (raw state, reason). squeue first (it knows finished jobs for MinJobAge);
        sacct only for ids squeue does not know, and only when it works."""
        ids = sorted({str(i) for i in ids if i})
        if not ids:
            return {}
        with self.lock:
            self.queries += 1
        out: Dict[str, Tuple[str, str]] = {}
        try:
            r = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"],
                               capture_output=True, text=True, timeout=60)
            for line in r.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) >= 2:
                    for jid in _expand_array(parts[0]):
                        out[jid] = (parts[1], parts[2] if len(parts) > 2 else "")
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("squeue failed: %s", e)
        # an array job's task may be listed under its raw id; ask for that too
        missing = [i for i in ids if i not in out]
        if missing and shutil.which("sacct"):
            with self.lock:
                self.sacct_calls += 1
            try:
                r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State,Reason"],
                                   capture_output=True, text=True, timeout=60)
                if r.returncode == 0:
                    for line in r.stdout.splitlines():
                        parts = line.strip().split("|")
                        if len(parts) >= 2 and parts[0] in missing:
                            out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
            except (OSError, subprocess.SubprocessError) as e:
                log.info("sacct failed (not needed): %s", e)
        return out


def scancel(ids: Iterable[str]) -> None:
    ids = sorted({str(i) for i in ids if i})
    if not ids:
        return
    try:
        subprocess.run(["scancel"] + ids, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.error("scancel %s failed: %s", " ".join(ids), e)


def wait_gone(query: SlurmQuery, ids: Iterable[str], timeout: float = 20.0) -> List[str]:
    """Wait until none of `ids` is pending or running in Slurm; returns those that still are."""
    ids = {str(i) for i in ids if i}
    deadline = time.monotonic() + timeout
    delay = 0.3
    while ids:
        st = query.states(ids)
        ids = {i for i in ids if i in st and not _terminal(st[i][0])}
        if not ids or time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(2.0, delay * 1.5)
    return sorted(ids)


# ---------------------------------------------------------------- address and key

def _interface_addresses() -> List[str]:
    """IPv4 addresses of this host's interfaces, read locally (ioctl), loopback last."""
    import fcntl
    import struct
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
        found.append(socket.inet_ntoa(packed[20:24]))
    return sorted(found, key=lambda ip: ipaddress.ip_address(ip).is_loopback)


def default_host() -> str:
    """An address compute nodes can reach: the host name's address unless it is loopback, else the
    first non-loopback interface address (looked up locally, nothing is sent), else loopback."""
    try:
        ip = socket.gethostbyname(socket.getfqdn())
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    except (OSError, ValueError):
        pass
    try:
        addresses = _interface_addresses()
    except (OSError, ImportError):
        addresses = []
    return addresses[0] if addresses else "127.0.0.1"


def bind_address(address: Optional[str] = None) -> str:
    """A ZeroMQ bind address from `address`, `$DEPIO_ADDRESS` or `default_host()`:
    "10.0.0.5" -> "tcp://10.0.0.5:*"; "tcp://host:5555" stays."""
    a = (address or os.environ.get(ADDRESS_ENV) or "").strip() or default_host()
    if "://" not in a:
        if ":" in a and not a.startswith("[") and a.count(":") == 1:
            a = f"tcp://{a}"
        elif a.count(":") > 1 and not a.startswith("["):       # bare IPv6
            a = f"tcp://[{a}]:*"
        else:
            a = f"tcp://{a}:*"
    host = a.split("://", 1)[1]
    if not re.search(r":(\d+|\*)$", host):
        a += ":*"
    return a


def write_key_file(folder: Path, key: bytes) -> Path:
    """The key in a fresh file only its owner can read (created 0600, never widened)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".depio-key-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return path


def _remove(path: Optional[Path]) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------- submitit parameters

_GENERIC = {"timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node", "name",
            "stderr_to_stdout"}


def sbatch_parameters(*layers: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Merge parameter dicts (later ones win) in upstream's AutoExecutor spelling ("slurm_partition",
    "mem_gb", ...) into `submitit.SlurmExecutor.update_parameters` keywords; anything submitit does
    not know ("slurm_reservation") becomes an extra `#SBATCH --reservation=...` line."""
    from submitit.slurm import slurm as ss
    valid = set(ss._get_default_parameters())
    equiv = ss.SlurmExecutor._equivalence_dict()
    merged: Dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    out: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}
    for k, v in merged.items():
        if k in ("slurm_additional_parameters", "additional_parameters"):
            extra.update(v or {})
            continue
        if k in _GENERIC:
            name = equiv.get(k, k)
            if k == "mem_gb":
                v = ss._convert_mem(v)
            out[name] = v
            continue
        name = k[len("slurm_"):] if k.startswith("slurm_") else k
        if name in valid:
            out[name] = v
        else:
            extra[name] = v
    if extra:
        out["additional_parameters"] = extra
    return out


def _minutes(value: Any) -> float:
    """Slurm's --time in minutes: 90, "90", "1:30:00", "2-00:00:00"."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [float(x) for x in text.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0] + parts[1] / 60
    else:
        minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    return days * 1440 + minutes


def _python_path_setup() -> List[str]:
    """Lines for the job script: the pipeline's import path, so jobs import depio and the user's modules."""
    prefixes = tuple({sys.prefix, sys.base_prefix})
    paths = [p for p in sys.path if p and not p.startswith(prefixes)]   # the job's python has its own
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in paths:
        paths.insert(0, here)
    joined = os.pathsep.join(paths).replace("'", "'\\''")
    return [f"export PYTHONPATH='{joined}'${{PYTHONPATH:+:$PYTHONPATH}}", "export PYTHONUNBUFFERED=1"]


def _slurm_executor(folder: Path, internal_executor=None):
    """A submitit executor that talks to Slurm: the user's (an AutoExecutor's Slurm executor) or a new
    `submitit.SlurmExecutor` (never AutoExecutor's guess, which depends on `srun` being on PATH)."""
    import submitit
    ex = internal_executor
    if ex is not None and isinstance(ex, submitit.AutoExecutor):
        ex = ex._executor
    if ex is None:
        ex = submitit.SlurmExecutor(folder=folder)
    return ex


class _Params:
    """Temporarily applies parameters to a submitit executor (its parameters are shared state)."""

    def __init__(self, ex, params: Dict[str, Any]):
        self.ex, self.params = ex, params

    def __enter__(self):
        self.saved = dict(self.ex.parameters)
        if self.params:
            if hasattr(self.ex, "_internal_update_parameters"):
                self.ex._internal_update_parameters(**self.params)
            else:
                self.ex.update_parameters(**self.params)
        return self.ex

    def __exit__(self, *exc):
        self.ex.parameters.clear()
        self.ex.parameters.update(self.saved)


def _job_stderr_tail(job, limit: int = 3000) -> str:
    try:
        text = Path(job.paths.stderr).read_text(errors="replace")
    except (OSError, AttributeError):
        return ""
    return text[-limit:]


# ---------------------------------------------------------------- inside the job

def _slurm_job_id() -> str:
    """The id as submitit and squeue show it: 123, or 123_4 for an array task."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and index:
        return f"{array}_{index}"
    return os.environ.get("SLURM_JOB_ID", "")


def _make_job_worker_class():
    from worker.main import Worker

    class SlurmJobWorker(Worker):
        """A worker in a Slurm job. Knows its walltime (`deadline`, epoch seconds): asks for no task
        once less than `margin` s (plus the usual task length) is left, holds back a task whose
        `timeout` is longer than the time left and leaves (the dispatcher re-dispatches it), and
        leaves `margin` s before the limit. A slot killed by SIGTERM means Slurm is ending the job:
        the task is not reported as crashed but left behind (a lost worker), so it runs again."""

        def __init__(self, *args, deadline: Optional[float] = None, margin: float = 60.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.deadline = deadline
            self.margin = margin
            self.draining: Optional[str] = None
            self.blocked: List[tuple] = []

        def time_left(self) -> float:
            return float("inf") if self.deadline is None else self.deadline - time.time()

        def drain(self, why: str) -> None:
            if self.draining is None:
                self.draining = why
                log.warning("draining: %s", why)

        def _capacity(self) -> int:
            if self.draining is None and self.time_left() - self.margin < max(2 * self.avg_duration, 1.0):
                self.drain(f"walltime nearly over ({self.time_left():.0f} s left)")
            return 0 if self.draining is not None else super()._capacity()

        def _held(self) -> int:
            return super()._held() + len(self.blocked)

        def _fill_slots(self) -> None:
            left = self.time_left() - self.margin
            if self.queue and left != float("inf"):
                keep = deque()
                for jid, spec in self.queue:
                    if spec.timeout is not None and spec.timeout > left:
                        self.blocked.append((jid, spec))
                        self.drain(f"cannot finish task {spec.name} (timeout {spec.timeout:g} s) in the "
                                   f"{max(left, 0):.0f} s of walltime left")
                    else:
                        keep.append((jid, spec))
                self.queue = keep
            super()._fill_slots()

        def _housekeeping(self) -> None:
            super()._housekeeping()
            if self.stopping is not None:
                return
            left = self.time_left()
            if left <= self.margin:
                self.stopping = f"Slurm walltime ends in {max(left, 0):.0f} s: leaving"
            elif self.draining and not self.queue and not any(s.assigned for s in self.slots):
                self.stopping = self.draining

        def _slot_died(self, slot) -> None:
            slot.process.join(1)
            if slot.process.exitcode == -signal.SIGTERM:
                self.stopping = "Slurm is ending the job (SIGTERM)"
                if slot.assigned:
                    slot.assigned.popleft()      # not reported: the dispatcher counts it lost
                self._replace_slot(slot)
                return
            super()._slot_died(slot)

    return SlurmJobWorker


def _job_main(address: str, key_file: str, name: Optional[str], slots: int, heartbeat: float, liveness: int,
              idle_timeout: Optional[float], walltime_s: Optional[float], margin: float,
              warning_s: Optional[float] = None) -> int:
    """The function a Slurm job runs (through submitit): a worker that connects back.
    `warning_s`: the job's `--signal=USR2@warning_s`. Slurm may send that signal up to 60 s early
    (sbatch(1): "due to the resolution of event handling"), so it only tells that the limit is at
    most `warning_s + 60` s away: the worker's deadline is pulled in to that if its own clock said
    later (a slow job start), otherwise it keeps working by its clock."""
    from worker.main import install_stop_signals, read_key
    key = read_key(key_file)
    os.environ.pop(P.KEY_ENV, None)
    jid = _slurm_job_id()
    cls = _make_job_worker_class()
    deadline = None if not walltime_s else time.time() + walltime_s
    w = cls(address, key, slots=slots, name=(name or f"pilot-{jid}@{socket.gethostname()}"), heartbeat=heartbeat,
            liveness=liveness, idle_timeout=idle_timeout, slurm_job_id=jid, deadline=deadline, margin=margin)
    install_stop_signals(w)                             # scancel: leave cleanly (submitit ignores SIGTERM)
    if walltime_s and warning_s is not None:
        def warned(signum, frame):
            latest = time.time() + warning_s + 60.0
            if w.deadline is None or latest < w.deadline:
                w.deadline = latest
                log.warning("Slurm signalled the end of the walltime: ending by %.0f s from now", latest - time.time())
        signal.signal(signal.SIGUSR2, warned)
    elif walltime_s:
        signal.signal(signal.SIGUSR2, lambda s, f: w.drain("Slurm signalled the end of the walltime"))
    else:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)   # per task: let Slurm end it with TIMEOUT
    return w.run()


def run_task_job(address: str, key_file: str, token: str, heartbeat: float = 1.0, liveness: int = 5) -> int:
    """Per-task job: a one-slot worker named `token`; the pipeline gives it exactly its task."""
    return _job_main(address, key_file, token, 1, heartbeat, liveness, 600.0, None, 0.0)


def run_pilot(address: str, key_file: str, slots: int = 1, walltime_s: Optional[float] = None,
              margin: float = 60.0, heartbeat: float = 1.0, liveness: int = 5,
              idle_timeout: Optional[float] = 60.0, warning_s: Optional[float] = None) -> int:
    """Pilot job: a worker that streams tasks until idle, told to leave, or near its walltime."""
    return _job_main(address, key_file, None, slots, heartbeat, liveness, idle_timeout, walltime_s, margin,
                     warning_s)


# ---------------------------------------------------------------- per-task mode

class _Attempt:
    def __init__(self, spec: P.TaskSpec, task, params: Dict[str, Any]):
        self.spec = spec
        self.task = task
        self.params = params
        self.token = f"task{spec.key}-a{spec.attempt}-{uuid.uuid4().hex[:8]}"
        self.job = None
        self.job_id = ""
        self.identity: Optional[bytes] = None
        self.host = ""
        self.sent = False
        self.started: Optional[float] = None
        self.over = False            # reported to the scheduler (or cancelled)
        self.worker_gone = False
        self.lost_reason: Optional[str] = None
        self.lost_checks = 0
        self.crash: Optional[P.TaskResult] = None
        self.last_heard = time.monotonic()
        self.last_sent = 0.0

    @property
    def worker_label(self) -> str:
        return f"Slurm job {self.job_id}" + (f" on {self.host}" if self.host else "")


class SlurmTaskBackend(Backend):
    """One Slurm job per task attempt; results over ZeroMQ (see the module docstring)."""

    def __init__(self, folder: Path, parameters: Dict[str, Any], internal_executor=None, address: Optional[str] = None,
                 heartbeat: float = 1.0, liveness: int = 5, query_interval: float = QUERY_INTERVAL,
                 recheck_interval: float = 2.0):
        self.folder = Path(folder)
        self.parameters = parameters
        self.internal_executor = internal_executor
        self.address_option = address
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.query_interval = query_interval
        self.recheck_interval = recheck_interval
        self.key = P.new_key()
        self.query = SlurmQuery()
        self.sbatch_calls = 0
        self.attempts: Dict[str, _Attempt] = {}          # token -> attempt
        self.by_identity: Dict[bytes, _Attempt] = {}
        self.functions: Dict[bytes, bytes] = {}
        self.lock = threading.RLock()
        self.commands: "queue.Queue" = queue.Queue()      # for the server thread (owns the socket)
        self.io: "queue.Queue" = queue.Queue()            # for the Slurm thread (sbatch, squeue, scancel)
        self.key_file: Optional[Path] = None
        self.address = ""
        self._started = False
        self._closing = False
        self._server: Optional[threading.Thread] = None
        self._slurm: Optional[threading.Thread] = None
        self._last_query = 0.0

    # ------------------------------------------------------------ life cycle
    def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key_file = write_key_file(self.folder, self.key)
        self.executor = _slurm_executor(self.folder, self.internal_executor)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        requested = bind_address(self.address_option)
        if "[" in requested:
            self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.bind(requested)
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        if self.address.startswith("tcp://0.0.0.0:"):
            self.address = "tcp://%s:%s" % (default_host(), self.address.rsplit(":", 1)[1])
        log.info("per-task Slurm jobs connect back to %s", self.address)
        self._server = threading.Thread(target=self._serve, name="depio-slurm-server", daemon=True)
        self._slurm = threading.Thread(target=self._slurm_loop, name="depio-slurm-io", daemon=True)
        self._server.start()
        self._slurm.start()
        atexit.register(self._atexit)
        self._started = True

    def submit(self, specs, functions) -> None:
        with self.lock:
            if self._closing:
                return
            if not self._started:
                self._start()
            self.functions.update(functions)
            new = []
            for spec in specs:
                task = self.graph.tasks[spec.key]
                a = _Attempt(spec, task, sbatch_parameters(self.parameters, getattr(task, "slurm_parameters", None)))
                task._slurmid, task._slurmstate = "", "SUBMITTING"
                self.attempts[a.token] = a
                new.append(a)
        self.io.put(("submit", new))

    def cancel(self, keys, reason) -> None:
        ids = []
        with self.lock:
            for a in self.attempts.values():
                if a.over or (keys is not None and a.spec.key not in keys):
                    continue
                a.over = True
                if a.identity is not None:
                    self.commands.put(("shutdown", a.identity, reason))
                if a.job_id and not a.worker_gone:
                    ids.append(a.job_id)
        if ids:
            self.io.put(("scancel", ids))

    def close(self) -> None:
        with self.lock:
            if not self._started or self._closing:
                self._closing = True
                return
            self._closing = True
            live = [a for a in self.attempts.values() if not a.over]
            for a in live:
                a.over = True
            for a in self.attempts.values():
                if a.identity is not None and not a.worker_gone:
                    self.commands.put(("shutdown", a.identity, "pipeline finished"))
        self.io.put(("close", None))
        if self._slurm is not None:
            self._slurm.join(60)
        self.commands.put(("stop", None, ""))
        if self._server is not None:
            self._server.join(5)
        _remove(self.key_file)

    def _atexit(self) -> None:
        """If the interpreter exits without `close()`: still cancel this run's jobs."""
        if not self._closing:
            with self.lock:
                ids = [a.job_id for a in self.attempts.values() if a.job_id and not (a.over and a.worker_gone)]
            scancel(ids)
            _remove(self.key_file)

    def describe(self) -> str:
        return f"SlurmTaskBackend({self.address or 'not started'})"

    # ------------------------------------------------------------ to the scheduler
    def _tell(self, **report) -> None:
        self.scheduler.tell(P.ClientReport(**report))

    def _fail(self, a: _Attempt, kind: str, message: str, stderr: str = "") -> None:
        now = time.time()
        self._tell(done=(P.TaskResult(a.spec.key, a.spec.attempt, a.started or now, now, "", stderr,
                                      {"kind": kind, "type": kind, "message": message, "traceback": "",
                                       "summary": message}, None, a.worker_label),))

    # ------------------------------------------------------------ server thread (the socket)
    def _send(self, identity: bytes, msg: object, a: Optional[_Attempt] = None) -> None:
        try:
            self.sock.send_multipart([identity] + P.encode(msg, self.key))
            if a is not None:
                a.last_sent = time.monotonic()
        except zmq.ZMQError as e:
            log.debug("cannot send to a job's worker: %s", e)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(min(250, self.heartbeat * 500)))
                stop = False
                while True:
                    try:
                        cmd, identity, reason = self.commands.get_nowait()
                    except queue.Empty:
                        break
                    if cmd == "stop":
                        stop = True
                    elif cmd == "shutdown":
                        self._send(identity, P.Shutdown(reason))
                if stop:
                    return
                if self.sock in events:
                    self._drain()
                self._liveness()
        except Exception:
            log.exception("the Slurm task server failed")
        finally:
            self.sock.close(linger=200)

    def _drain(self) -> None:
        for _ in range(10000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            identity = frames[0]
            try:
                msg = P.decode(frames[1:], self.key)
            except P.ProtocolError as e:
                log.warning("dropped a bad message from a job: %s", e)
                continue
            self._on_message(identity, msg)

    def _on_message(self, identity: bytes, msg: object) -> None:
        with self.lock:
            if isinstance(msg, P.Register):
                a = self.attempts.get(msg.worker_id)
                if a is None or a.over or msg.runtime != P.runtime_signature():
                    why = "runtime differs" if a is not None and msg.runtime != P.runtime_signature() else "not needed"
                    self._send(identity, P.Refused(f"task {msg.worker_id}: {why}") if why != "not needed"
                               else P.Shutdown("the task is no longer needed"))
                    if a is not None and why != "not needed" and not a.over:
                        a.over = True
                        self._fail(a, "SlurmJobFailed", f"the job's worker was refused: {why} ({msg.runtime})")
                    return
                a.identity, a.host = identity, msg.host
                a.job_id = a.job_id or msg.slurm_job_id
                a.last_heard = time.monotonic()
                self.by_identity[identity] = a
                a.task._slurmstate = "RUNNING"
                if a.job_id:
                    a.task._slurmid = a.job_id
                self._send(identity, P.Welcome(self.heartbeat, self.liveness), a)
                return
            a = self.by_identity.get(identity)
            if a is None:
                if not isinstance(msg, P.Goodbye):
                    self._send(identity, P.Shutdown("unknown worker"))
                return
            a.last_heard = time.monotonic()
            if isinstance(msg, (P.RequestWork, P.WorkerReport)) and msg.credits > 0:
                if not a.sent and not a.over:      # the worker asks for work: its one task
                    a.sent = True
                    d = a.spec.func_digest
                    self._send(identity, P.RunTasks(((1, a.spec),), {d: self.functions[d]}), a)
            if isinstance(msg, P.WorkerReport):
                for _, t in msg.started:
                    if not a.over:
                        a.started = t
                        self._tell(started=((a.spec.key, a.spec.attempt, t, a.worker_label),))
                for _, result in msg.done:
                    if a.over:
                        continue
                    result = dataclasses.replace(result, worker=a.worker_label)
                    if result.error and result.error.get("kind") == "WorkerCrash":
                        a.crash = result          # killed by Slurm (OOM, ...)? end the job, then ask
                        self._send(identity, P.Shutdown("the task's process died"), a)
                        self._lost(a, result.error.get("message", "the task's process died"))
                        continue
                    a.over = True
                    a.task._slurmstate = "COMPLETED"
                    self._tell(done=(result,))
                    self._send(identity, P.Shutdown("task done"), a)
            elif isinstance(msg, P.Goodbye):
                a.worker_gone = True
                self.by_identity.pop(identity, None)
                if not a.over:
                    self._lost(a, f"the job's worker left: {msg.reason}")

    def _lost(self, a: _Attempt, reason: str) -> None:
        if a.lost_reason is None:
            a.lost_reason = reason
            self.io.put(("check", None))

    def _liveness(self) -> None:
        now = time.monotonic()
        limit = self.heartbeat * self.liveness
        with self.lock:
            for identity, a in list(self.by_identity.items()):
                if now - a.last_heard > limit:
                    self.by_identity.pop(identity, None)
                    a.worker_gone = True
                    if not a.over:
                        self._lost(a, f"the job's worker fell silent ({now - a.last_heard:.1f} s without a heartbeat)")
                elif now - a.last_sent >= self.heartbeat:
                    self._send(identity, P.Heartbeat(), a)

    # ------------------------------------------------------------ Slurm thread (sbatch, squeue, scancel)
    def _slurm_loop(self) -> None:
        check_at: Optional[float] = None
        while True:
            timeout = None
            now = time.monotonic()
            periodic = self._periodic_due()
            if periodic is not None:
                timeout = max(0.0, periodic - now)
            if check_at is not None:
                timeout = max(0.0, check_at - now) if timeout is None else min(timeout, max(0.0, check_at - now))
            try:
                kind, arg = self.io.get(timeout=timeout)
            except queue.Empty:
                kind, arg = "tick", None
            try:
                if kind == "submit":
                    batch = list(arg)
                    while True:            # everything queued now goes out together
                        try:
                            k2, a2 = self.io.get_nowait()
                        except queue.Empty:
                            break
                        if k2 == "submit":
                            batch.extend(a2)
                        else:
                            self.io.put((k2, a2))
                            break
                    self._submit(batch)
                elif kind == "scancel":
                    scancel(arg)
                elif kind == "check":
                    check_at = check_at or (time.monotonic() + 0.5)   # let Slurm record the end first
                elif kind == "close":
                    self._cancel_all()
                    return
                if check_at is not None and time.monotonic() >= check_at:
                    check_at = None
                    if self._check(lost_only=True):
                        check_at = time.monotonic() + self.recheck_interval
                elif kind == "tick" and periodic is not None and time.monotonic() >= periodic:
                    self._check(lost_only=False)
            except Exception:
                log.exception("Slurm I/O failed")

    def _periodic_due(self) -> Optional[float]:
        """When the next periodic look at jobs that never reported is due (None: nothing to look at)."""
        with self.lock:
            waiting = any(a.job_id and a.identity is None and not a.over for a in self.attempts.values())
        return self._last_query + self.query_interval if waiting else None

    def _submit(self, attempts: List[_Attempt]) -> None:
        with self.lock:
            attempts = [a for a in attempts if not a.over]
        groups: Dict[str, List[_Attempt]] = {}
        for a in attempts:
            groups.setdefault(repr(sorted(a.params.items(), key=lambda kv: kv[0])), []).append(a)
        for group in groups.values():
            params = dict(group[0].params)
            params["setup"] = list(params.get("setup") or []) + _python_path_setup()
            params.setdefault("job_name", group[0].task.name if len(group) == 1 else "depio")
            try:
                with _Params(self.executor, params) as ex:
                    self.sbatch_calls += 1
                    if len(group) == 1:
                        jobs = [ex.submit(run_task_job, self.address, str(self.key_file), group[0].token,
                                          self.heartbeat, self.liveness)]
                    else:
                        with ex.batch():
                            jobs = [ex.submit(run_task_job, self.address, str(self.key_file), a.token,
                                              self.heartbeat, self.liveness) for a in group]
            except Exception as e:
                msg = f"sbatch failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
                log.error(msg)
                with self.lock:
                    for a in group:
                        if not a.over:
                            a.over = True
                            a.task._slurmstate = "SUBMIT FAILED"
                            self._fail(a, "SlurmSubmitError", msg)
                continue
            cancelled = []
            with self.lock:
                for a, job in zip(group, jobs):
                    a.job = job
                    a.job_id = str(job.job_id)
                    a.task._slurmid = a.job_id
                    if a.identity is None:
                        a.task._slurmstate = "PENDING"
                    if a.over:
                        cancelled.append(a.job_id)
            scancel(cancelled)
        self._last_query = self._last_query or time.monotonic()

    def _check(self, lost_only: bool) -> bool:
        """One batched query for jobs whose worker was lost (and, periodically, jobs never heard of).
        Returns True when a lost job is still running in Slurm (look again soon)."""
        with self.lock:
            lost = [a for a in self.attempts.values() if not a.over and a.lost_reason is not None]
            quiet = [] if lost_only else [a for a in self.attempts.values()
                                          if not a.over and a.identity is None and a.job_id and a.lost_reason is None]
            ids = [a.job_id for a in lost + quiet if a.job_id]
        if not ids:
            return False
        self._last_query = time.monotonic()
        st = self.query.states(ids)
        again = False
        with self.lock:
            for a in quiet:
                if a.over or a.identity is not None:
                    continue
                state, reason = st.get(a.job_id, ("", ""))
                if state:
                    a.task._slurmstate = state
                if _terminal(state):
                    self._slurm_ended(a, state, reason)
            for a in lost:
                if a.over:
                    continue
                state, reason = st.get(a.job_id, ("", ""))
                if state:
                    a.task._slurmstate = state
                a.lost_checks += 1
                if _terminal(state) and _base_state(state) != "COMPLETED":
                    self._slurm_ended(a, state, reason)
                elif a.lost_checks < 8 and not _terminal(state):
                    again = True          # Slurm has not recorded the end yet: look again soon
                else:
                    self._slurm_ended(a, state or "UNKNOWN", reason)
        return again

    def _slurm_ended(self, a: _Attempt, state: str, reason: str) -> None:
        """Report how Slurm ended an attempt's job, with its reason."""
        a.over = True
        base = _base_state(state)
        msg = f"Slurm job {a.job_id} {state}"
        if reason and reason not in ("None", "(null)"):
            msg += f" (reason: {reason})"
        if a.lost_reason:
            msg += f"; {a.lost_reason}"
        stderr = _job_stderr_tail(a.job) if a.job is not None else ""
        if a.crash is not None and base in ("RUNNING", "COMPLETING", "COMPLETED", "UNKNOWN", ""):
            self._tell(done=(a.crash,))          # an ordinary crash of the task's process
        elif base in _RETRYABLE or base in ("COMPLETED", "RUNNING", "COMPLETING", "UNKNOWN", ""):
            self._tell(lost=(P.TaskLost(a.spec.key, a.spec.attempt, msg),))
        else:
            self._fail(a, "SlurmJobFailed", msg, stderr)

    def _cancel_all(self) -> None:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:     # workers told to leave say goodbye within a moment
            with self.lock:
                leaving = any(a.identity is not None and not a.worker_gone for a in self.attempts.values())
            if not leaving:
                break
            time.sleep(0.05)
        with self.lock:
            ids = [a.job_id for a in self.attempts.values() if a.job_id and not a.worker_gone]
            every = [a.job_id for a in self.attempts.values() if a.job_id]
        scancel(ids)
        left = wait_gone(self.query, every, 20.0) if every else []     # also those still COMPLETING
        if left:
            log.error("Slurm jobs still listed after scancel: %s", ", ".join(left))


class SubmitItExecutor(AbstractTaskExecutor):
    """Slurm through submitit, one job per task (depio 0.1.x's mode), results over ZeroMQ.

    `parameters` (default: upstream's `{"slurm_time": 2880, "slurm_partition": "gpu", "slurm_mem": 32,
    "gpus_per_node": 0}`, in AutoExecutor spelling) are overridden per task by `task.slurm_parameters`
    (decorator keywords such as `slurm_gpus_per_task=1`). `$SBATCH_*` variables reach sbatch and win
    over the script's lines (e.g. `SBATCH_PARTITION=debug`, `SBATCH_RESERVATION=...`).
    `internal_executor`: a `submitit.AutoExecutor`/`SlurmExecutor` of your own (its folder and
    parameters are used). `max_jobs_queued` caps this run's unfinished jobs in Slurm,
    `max_jobs_pending` those not yet started. `address` (or `$DEPIO_ADDRESS`): where the jobs connect
    back; default: this host's outward interface."""

    def __init__(self, folder=None, internal_executor=None, parameters: Optional[Dict[str, Any]] = None,
                 max_jobs_pending: int = 45, max_jobs_queued: int = 20, address: Optional[str] = None,
                 heartbeat: float = 1.0, liveness: int = 5, retries_on_worker_loss: int = 1):
        super().__init__(max_jobs_pending, max_jobs_queued, retries_on_worker_loss)
        if folder is None and internal_executor is not None and getattr(internal_executor, "folder", None):
            folder = internal_executor.folder
        self.folder = Path(folder) if folder is not None else Path("slurm")
        self.internal_executor = internal_executor
        self.parameters = dict(DEFAULT_PARAMS if parameters is None and internal_executor is None else parameters or {})
        self.address = address
        self.heartbeat = heartbeat
        self.liveness = liveness

    def make_backend(self) -> Backend:
        return SlurmTaskBackend(self.folder, self.parameters, self.internal_executor, self.address,
                                self.heartbeat, self.liveness)

    def describe(self) -> str:
        return f"SubmitItExecutor(folder={str(self.folder)!r})"


# ---------------------------------------------------------------- pilot mode

class _Pilot:
    def __init__(self, job_id: str, job=None):
        self.job_id = job_id
        self.job = job
        self.submitted = time.monotonic()
        self.registered = False
        self.ended = False
        self.state = "PENDING"
        self.reason = ""


class SlurmPilotLauncher:
    """Starts pilot workers as Slurm jobs (a job array per submission) and keeps enough of them
    while work remains. Launcher interface as `LocalLauncher`: start(address, key), stop(),
    alive(), on_all_gone."""

    def __init__(self, workers: int, slots: int, parameters: Dict[str, Any], folder: Path,
                 min_workers: int, max_workers: int, walltime_min: float, margin: float,
                 idle_timeout: Optional[float], heartbeat: float, liveness: int, max_failures: int,
                 internal_executor=None, query_interval: float = QUERY_INTERVAL):
        self.workers = workers
        self.slots = slots
        self.parameters = parameters
        self.folder = Path(folder)
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.walltime_min = walltime_min
        self.margin = margin
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_failures = max_failures
        self.failures = 0            # pilots that ended without ever connecting
        self.broken = False          # sbatch itself failed: launch nothing more
        self.internal_executor = internal_executor
        self.query_interval = query_interval
        self.on_all_gone: Optional[Callable[[str], None]] = None
        self.backend: Optional["SlurmPilotBackend"] = None
        self.pilots: Dict[str, _Pilot] = {}
        self.query = SlurmQuery()
        self.sbatch_calls = 0
        self.submitted = 0
        self.lock = threading.RLock()
        self.io: "queue.Queue" = queue.Queue()
        self.key_file: Optional[Path] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._gone_reported = False
        self._last_query = 0.0
        self.last_error = ""

    # ------------------------------------------------------------ interface
    def start(self, address: str, key: bytes) -> None:
        self.address = address
        self.key_file = write_key_file(self.folder, key)
        self.executor = _slurm_executor(self.folder, self.internal_executor)
        self._thread = threading.Thread(target=self._loop, name="depio-slurm-pilots", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        self.io.put(("launch", max(self.min_workers, min(self.workers, self.max_workers))))

    def poke(self) -> None:
        """Something changed (tasks submitted, a worker came or went): rebalance, off this thread."""
        if self._thread is not None and not self._stopping:
            self.io.put(("rebalance", None))

    def alive(self) -> List[str]:
        with self.lock:
            return [p.job_id for p in self.pilots.values() if not p.ended]

    def stop(self, grace: float = 3.0, told: Optional[Set[int]] = None) -> None:
        """The dispatcher told the workers to leave; cancel whatever is still in Slurm and wait until
        squeue no longer lists it. (`told`, the PIDs that heard the Shutdown, matters only locally.)"""
        self._stopping = True
        if self._thread is None:
            return
        self.io.put(("stop", grace))
        self._thread.join(90)
        _remove(self.key_file)

    def _atexit(self) -> None:
        if not self._stopping:
            scancel(self.alive())
            _remove(self.key_file)

    # ------------------------------------------------------------ events from the backend
    def workers_changed(self) -> None:
        """The dispatcher's worker set changed: which pilots are registered, which are gone."""
        d = self.backend.dispatcher if self.backend is not None else None
        if d is None:
            return
        snap = None
        for _ in range(5):
            try:
                snap = d.snapshot()
                break
            except RuntimeError:     # read without a lock while it changed
                time.sleep(0.01)
        if snap is None:
            return
        now_ids = {w.get("slurm_job_id") for w in snap["workers"] if w.get("slurm_job_id")}
        with self.lock:
            for p in self.pilots.values():
                if p.ended:
                    continue
                if p.job_id in now_ids:
                    if not p.registered:
                        p.registered, p.state = True, "RUNNING"
                elif p.registered:
                    p.ended, p.state = True, "ENDED"
                    log.info("pilot job %s left", p.job_id)
        self.poke()

    # ------------------------------------------------------------ the launcher's thread
    def _loop(self) -> None:
        while True:
            due = self._periodic_due()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            try:
                kind, arg = self.io.get(timeout=timeout)
            except queue.Empty:
                kind, arg = "tick", None
            try:
                if kind == "stop":
                    self._cancel_all()
                    return
                if kind == "launch":
                    self._launch(arg)
                if due is not None and time.monotonic() >= due:
                    self._check()
                if kind in ("rebalance", "tick", "launch"):
                    self._rebalance()
            except Exception:
                log.exception("pilot launcher failed")

    def _periodic_due(self) -> Optional[float]:
        with self.lock:
            unseen = any(not p.ended and not p.registered for p in self.pilots.values())
        return self._last_query + self.query_interval if unseen else None

    def _launch(self, n: int) -> None:
        if n <= 0 or self._stopping or not self._may_launch():
            return
        params = dict(self.parameters)
        params["setup"] = list(params.get("setup") or []) + _python_path_setup()
        params.setdefault("job_name", "depio-pilot")
        walltime_s = _minutes(params.get("time", self.walltime_min)) * 60.0
        # Slurm's warning (SIGUSR2) `margin` s before the limit rather than submitit's 90 s; the pilot
        # takes it as "the limit is at most warning + 60 s away" (Slurm may send it 60 s early), not
        # as "leave now": with a short walltime the warning came at the start and pilots left at once
        params.setdefault("signal_delay_s", max(1, int(round(min(self.margin, walltime_s / 2)))))
        args = dict(address=self.address, key_file=str(self.key_file), slots=self.slots, walltime_s=walltime_s,
                    margin=self.margin, heartbeat=self.heartbeat, liveness=self.liveness,
                    idle_timeout=self.idle_timeout, warning_s=float(params["signal_delay_s"]))
        try:
            with _Params(self.executor, params) as ex:
                self.sbatch_calls += 1
                if n == 1:
                    jobs = [ex.submit(run_pilot, **args)]
                else:
                    with ex.batch():
                        jobs = [ex.submit(run_pilot, **args) for _ in range(n)]
        except Exception as e:
            self.last_error = f"sbatch failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
            log.error(self.last_error)
            self.broken = True       # do not hammer sbatch with the same error
            return
        self.submitted += n
        if not self._last_query:
            self._last_query = time.monotonic()
        with self.lock:
            for job in jobs:
                self.pilots[str(job.job_id)] = _Pilot(str(job.job_id), job)
        log.info("submitted %d pilot job(s): %s", n, ", ".join(str(j.job_id) for j in jobs))

    def _may_launch(self) -> bool:
        return not self.broken and self.failures < self.max_failures

    def _rebalance(self) -> None:
        if self._stopping or self.backend is None:
            return
        work, waiting = self.backend.work()
        with self.lock:
            alive = [p for p in self.pilots.values() if not p.ended]
            unseen = [p for p in alive if not p.registered]
        if work:
            target = max(self.min_workers, min(self.workers, self.max_workers))
            busy_slots = self.slots * (len(alive) - len(unseen))
            if waiting > busy_slots and not unseen:
                target = self.max_workers         # a backlog and nobody on the way: grow
            need = target - len(alive)
            if waiting == 0:
                need = self.min_workers - len(alive)   # nothing waits: no churn of idle pilots
            if need > 0 and self._may_launch():
                self._launch(need)
                with self.lock:
                    alive = [p for p in self.pilots.values() if not p.ended]
        if work and not alive and not self._gone_reported and self.on_all_gone is not None:
            self._gone_reported = True
            ended = [p for p in self.pilots.values() if p.state not in ("ENDED", "RUNNING")]
            why = "; ".join(f"job {p.job_id} {p.state}" + (f" ({p.reason})" if p.reason and p.reason != "None" else "")
                            for p in ended[-3:])
            self.on_all_gone(f"no Slurm pilot worker left, and no more may be started ({self.failures} pilot job(s) "
                             f"ended without connecting, limit {self.max_failures})" + (f": {self.last_error}" if self.last_error else "") + (f"; {why}" if why else ""))

    def _check(self) -> None:
        """One batched squeue (rate limited) for pilots submitted but never heard of."""
        with self.lock:
            ids = [p.job_id for p in self.pilots.values() if not p.ended and not p.registered]
        if not ids:
            return
        self._last_query = time.monotonic()
        st = self.query.states(ids)
        with self.lock:
            for jid in ids:
                p = self.pilots[jid]
                if p.registered or p.ended or jid not in st:
                    continue
                p.state, p.reason = st[jid]
                if _terminal(p.state):
                    p.ended = True
                    self.failures += 1
                    log.warning("pilot job %s ended without connecting: %s (%s)", jid, p.state, p.reason)

    def _cancel_all(self) -> None:
        with self.lock:
            ids = [p.job_id for p in self.pilots.values() if not p.ended or p.registered]
        scancel(ids)
        left = wait_gone(self.query, ids, 20.0) if ids else []
        if left:
            log.error("pilot jobs still listed after scancel: %s", ", ".join(left))


class SlurmPilotBackend(DispatcherBackend):
    """The pipeline's dispatcher, bound where compute nodes reach it, with pilot workers in Slurm."""

    def __init__(self, launcher: SlurmPilotLauncher, bind: str, heartbeat: float, liveness: int):
        super().__init__(launcher=launcher, bind=bind, heartbeat=heartbeat, liveness=liveness)
        launcher.backend = self
        self._flight: Dict[Tuple[int, int], bool] = {}     # (key, attempt) -> started
        self._flock = threading.Lock()

    def work(self) -> Tuple[bool, int]:
        """(tasks handed out and not ended?, how many of them not started)"""
        with self._flock:
            return bool(self._flight), sum(1 for s in self._flight.values() if not s)

    def submit(self, specs, functions) -> None:
        with self._flock:
            for s in specs:
                self._flight[(s.key, s.attempt)] = False
        super().submit(specs, functions)
        self.launcher.poke()

    def cancel(self, keys, reason) -> None:
        with self._flock:
            if keys is None:
                self._flight.clear()
            else:
                for k in [k for k in self._flight if k[0] in set(keys)]:
                    del self._flight[k]
        super().cancel(keys, reason)

    def observe(self, msg) -> None:
        if isinstance(msg, P.ClientReport):
            with self._flock:
                for key, attempt, _, worker in msg.started:
                    if (key, attempt) in self._flight:
                        self._flight[(key, attempt)] = True
                    m = re.match(r"pilot-([0-9_]+)@", worker or "")
                    if m and key < len(self.graph.tasks):
                        t = self.graph.tasks[key]
                        t._slurmid, t._slurmstate = m.group(1), "RUNNING"
                for r in msg.done:
                    self._flight.pop((r.key, r.attempt), None)
                    # a short task's start is not reported separately: its result names the pilot
                    m = re.match(r"pilot-([0-9_]+)@", r.worker or "")
                    if m and r.key < len(self.graph.tasks):
                        t = self.graph.tasks[r.key]
                        t._slurmid, t._slurmstate = m.group(1), t._slurmstate or "RUNNING"   # the pilot's state
                for lost in msg.lost:
                    self._flight.pop((lost.key, lost.attempt), None)
            if msg.lost or msg.done:
                self.launcher.poke()
        elif isinstance(msg, P.WorkersChanged):
            self.launcher.workers_changed()

    @property
    def slurm_queries(self) -> int:
        return self.launcher.query.queries


class SlurmPilotExecutor(AbstractTaskExecutor):
    """Pilot workers: `workers` `depio-worker`s as Slurm jobs (one job array), `slots` tasks at once
    each, streaming many tasks from the pipeline's dispatcher. Thousands of tasks cost a few sbatch
    calls; Slurm is asked about jobs at most once per 30 s.

    `walltime` (minutes; default `parameters["slurm_time"]` or 60) is each pilot's time limit; a pilot
    takes no task it cannot finish (by the task's `timeout`) and leaves `margin` seconds before the
    limit. While tasks remain, the launcher keeps `workers` pilots (at least `min_workers`, and up to
    `max_workers` when tasks wait and no pilot is on its way), replacing those that end, within
    giving up once `max_failures` pilot jobs ended without ever connecting (or sbatch failed).
    Idle pilots leave after `idle_timeout` seconds.
    `address` / `$DEPIO_ADDRESS`: where pilots connect back (default: this host's outward interface)."""

    def __init__(self, workers: int = 2, slots: int = 1, parameters: Optional[Dict[str, Any]] = None,
                 folder=None, min_workers: Optional[int] = None, max_workers: Optional[int] = None,
                 walltime: Optional[float] = None, margin: Optional[float] = None,
                 idle_timeout: Optional[float] = 60.0, address: Optional[str] = None, heartbeat: float = 1.0,
                 liveness: int = 5, max_failures: Optional[int] = None, internal_executor=None,
                 max_jobs_pending: Optional[int] = None, max_jobs_queued: Optional[int] = None,
                 retries_on_worker_loss: int = 1):
        super().__init__(max_jobs_pending, max_jobs_queued, retries_on_worker_loss)
        self.workers = max(1, int(workers))
        self.slots = max(1, int(slots))
        self.min_workers = max(1, int(min_workers)) if min_workers is not None else min(self.workers, 1)
        self.max_workers = max(self.workers, int(max_workers)) if max_workers is not None else self.workers
        self.min_workers = min(self.min_workers, self.max_workers)
        base = dict(DEFAULT_PARAMS if parameters is None else parameters)
        params = sbatch_parameters(base)
        if walltime is not None:
            params["time"] = max(1, int(-(-_minutes(walltime) // 1)))   # sbatch takes whole minutes
        self.walltime = _minutes(params.setdefault("time", 60))
        params.setdefault("cpus_per_task", self.slots)
        self.parameters = params
        self.margin = float(margin) if margin is not None else min(60.0, max(5.0, 0.05 * self.walltime * 60))
        self.folder = Path(folder) if folder is not None else Path("slurm")
        self.idle_timeout = idle_timeout
        self.address = address
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_failures = max_failures if max_failures is not None else self.max_workers + 2
        self.internal_executor = internal_executor

    def make_backend(self) -> Backend:
        launcher = SlurmPilotLauncher(self.workers, self.slots, self.parameters, self.folder, self.min_workers,
                                      self.max_workers, self.walltime, self.margin, self.idle_timeout,
                                      self.heartbeat, self.liveness, self.max_failures, self.internal_executor)
        return SlurmPilotBackend(launcher, bind_address(self.address), self.heartbeat, self.liveness)

    def describe(self) -> str:
        return f"SlurmPilotExecutor({self.workers} pilots x {self.slots} slots)"


class _PoolView:
    """What a pilot launcher asks of its backend, answered for a pool: there is always work to be
    ready for, so the launcher keeps its pilots (and replaces those that reach their walltime)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    def work(self) -> Tuple[bool, int]:
        try:
            waiting = sum(c["queued"] for c in self.dispatcher.snapshot()["clients"])
        except RuntimeError:       # read without a lock while it changed
            waiting = 0
        return True, waiting


def pool_pilots(dispatcher, key: bytes, workers: int, slots: int = 1, walltime: float = 60.0,
                parameters: Optional[Dict[str, Any]] = None, folder=None, heartbeat: float = 1.0,
                liveness: int = 5) -> SlurmPilotLauncher:
    """Start and keep `workers` pilot jobs for a `depio pool` (`depio pool start --slurm N`)."""
    params = sbatch_parameters(dict(parameters or {}))
    params["time"] = max(1, int(-(-_minutes(walltime) // 1)))      # whole minutes, as sbatch wants
    params.setdefault("cpus_per_task", slots)
    margin = min(60.0, max(5.0, 0.05 * _minutes(walltime) * 60))
    launcher = SlurmPilotLauncher(workers, slots, params, Path(folder or "slurm"), workers, workers,
                                  _minutes(walltime), margin, None, heartbeat, liveness, workers + 2)
    launcher.backend = _PoolView(dispatcher)      # type: ignore[assignment]
    dispatcher.on_workers_changed = launcher.workers_changed
    launcher.start(dispatcher.worker_address, key)
    return launcher


__all__ = ["SubmitItExecutor", "SlurmPilotExecutor", "SlurmTaskBackend", "SlurmPilotBackend", "SlurmPilotLauncher",
           "SlurmQuery", "slurm_status", "bind_address", "default_host", "sbatch_parameters", "run_task_job",
           "run_pilot", "pool_pilots", "DEFAULT_PARAMS"]
