"""Per-task mode (`SubmitItExecutor`): one Slurm job per task attempt, results over ZeroMQ."""
from __future__ import annotations

import atexit
import dataclasses
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import zmq

from ..runtime import protocol as P
from ..runtime.backends import Backend
from ..executor_base import AbstractTaskExecutor
from .states import _RETRYABLE, _base_state, _terminal
from .query import QUERY_INTERVAL, SlurmQuery, scancel, wait_gone
from .addresses import _remove, bind_address, default_host, write_key_file
from .submission import DEFAULT_PARAMS, _Params, _job_stderr_tail, _python_path_setup, _slurm_executor, sbatch_parameters
from .job import run_task_job

log = logging.getLogger("depio.slurm")


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
            self._tell(lost=(P.TaskLost(a.spec.key, a.spec.attempt, msg, a.started is not None),))
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
