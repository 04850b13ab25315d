"""Per-task mode's launcher: one Slurm job per task attempt, pinned to it, served by the dispatcher.

The backend (`tasks.SlurmTaskBackend`) queues each attempt in the pipeline's own dispatcher, pinned
to a token, and hands it here; this launcher's thread submits the jobs, paced (`pacing`): attempts
that become ready together with the same parameters go out as one job array (split below the
cluster's MaxArraySize), at most one sbatch per second. A job's worker registers with the token as
its pin and gets exactly that task from the dispatcher (keys, liveness and limits are the
dispatcher's), then leaves.

Slurm is asked about jobs only when something went wrong (a job's worker was lost or its task's
process died: was it Slurm's doing, CANCELLED, TIMEOUT, OUT_OF_MEMORY?) and, at most once per
`query_interval`, about jobs that never started. What it learns goes to the scheduler as
`SlurmState` (the scheduler actor alone writes tasks) or as the attempt's end.
"""
from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..runtime import protocol as P
from ..runtime.events import SlurmState
from .addresses import _remove, write_key_file
from .cluster import Cluster
from .job import run_task_job
from .orphans import cancel_orphans, job_mark, with_mark
from .pacing import Pacer, short_reason, transient
from .query import QUERY_INTERVAL, SlurmQuery, scancel, wait_gone
from .states import _RETRYABLE, _base_state, _terminal
from .submission import _job_stderr_tail, _Params, _python_path_setup, _slurm_executor

log = logging.getLogger("depio.slurm")


class _Attempt:
    def __init__(self, spec: P.TaskSpec, name: str, params: Dict[str, Any]):
        self.key, self.attempt, self.name, self.params = spec.key, spec.attempt, name, params
        self.group = repr(sorted(params.items(), key=lambda kv: kv[0]))
        self.token = f"task{spec.key}-a{spec.attempt}-{uuid.uuid4().hex[:8]}"
        self.ready_at = time.monotonic()
        self.job = None
        self.job_id = ""
        self.started: Optional[float] = None
        self.finished = False        # its result arrived: the worker leaves by itself
        self.over = False            # reported to the scheduler (or cancelled)
        self.lost_reason: Optional[str] = None
        self.lost_checks = 0
        self.crash: Optional[P.TaskResult] = None

    @property
    def label(self) -> str:
        return f"Slurm job {self.job_id}"


class SlurmTaskLauncher:
    """See the module docstring. Launcher interface as `LocalLauncher`: start(address, key), stop(),
    alive(), on_all_gone; the backend adds want/started/finished/lost/cancel."""

    def __init__(self, folder: Path, internal_executor=None, heartbeat: float = 1.0, liveness: int = 5,
                 query_interval: float = QUERY_INTERVAL, recheck_interval: float = 2.0,
                 cluster: Optional[Cluster] = None):
        self.folder = Path(folder)
        self.internal_executor = internal_executor
        self.heartbeat, self.liveness = heartbeat, liveness
        self.query_interval, self.recheck_interval = query_interval, recheck_interval
        self.cluster = cluster or Cluster()
        self.query = SlurmQuery()
        self.pacer = Pacer()
        self.sbatch_calls = 0
        self.on_all_gone: Optional[Callable[[str], None]] = None
        self.tell: Callable[[object], None] = lambda msg: None      # to the scheduler (set by the backend)
        self.notice: Callable[[str], None] = lambda line: None
        self.lock = threading.RLock()
        self.by_key: Dict[Tuple[int, int], _Attempt] = {}
        self.ready: List[_Attempt] = []
        self.io: "queue.Queue" = queue.Queue()
        self.key_file: Optional[Path] = None
        self.mark = ""
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._last_query = 0.0

    # ------------------------------------------------------------ launcher interface
    def start(self, address: str, key: bytes) -> None:
        self.address = address
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key_file = write_key_file(self.folder, key)
        self.mark = job_mark(self.folder)
        self.executor = _slurm_executor(self.folder, self.internal_executor)
        self._thread = threading.Thread(target=self._loop, name="depio-slurm-tasks", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        log.info("per-task Slurm jobs connect back to %s", address)

    def alive(self) -> List[str]:
        with self.lock:
            return [a.job_id for a in self.by_key.values() if a.job_id and not a.over]

    def stop(self, grace: float = 3.0, told: Optional[Set[int]] = None) -> None:
        self._stopping = True
        if self._thread is not None:
            self.io.put(("stop", None))
            self._thread.join(90)
        _remove(self.key_file)

    def _atexit(self) -> None:
        """If the interpreter exits without `stop()`: still cancel this run's jobs."""
        if not self._stopping:
            with self.lock:
                ids = [a.job_id for a in self.by_key.values() if a.job_id and not a.finished]
            scancel(ids)
            _remove(self.key_file)

    # ------------------------------------------------------------ from the backend (dispatcher's thread)
    def want(self, attempts: List[_Attempt]) -> None:
        with self.lock:
            for a in attempts:
                self.by_key[(a.key, a.attempt)] = a
                self.ready.append(a)
        self.io.put(("poke", None))

    def attempt(self, key: int, attempt: int) -> Optional[_Attempt]:
        return self.by_key.get((key, attempt))

    def started(self, a: _Attempt, when: float) -> None:
        a.started = when
        self.io.put(("poke", None))          # one job less waiting in Slurm: gather less

    def lost(self, a: _Attempt, reason: str, crash: Optional[P.TaskResult] = None) -> None:
        """The job's worker was lost (or its task's process died): ask Slurm why, then report."""
        with self.lock:
            if a.over or a.lost_reason is not None:
                return
            a.lost_reason, a.crash = reason, crash
        self.io.put(("check", None))

    def cancel(self, keys: Optional[Set[int]]) -> None:
        ids = []
        with self.lock:
            for a in self.by_key.values():
                if a.over or (keys is not None and a.key not in keys):
                    continue
                a.over = True
                if a.job_id and not a.finished:
                    ids.append(a.job_id)
            self.ready = [a for a in self.ready if not a.over]
        if ids:
            self.io.put(("scancel", ids))

    # ------------------------------------------------------------ the launcher's thread
    def _loop(self) -> None:
        try:
            line = cancel_orphans(self.folder, self.query)
            if line:
                self.notice(line)
        except Exception:
            log.exception("looking for jobs of an earlier run failed")
        check_at: Optional[float] = None
        while True:
            now = time.monotonic()
            wakes = [w for w in (self._submit_due(), self._periodic_due(), check_at) if w is not None]
            timeout = max(0.0, min(wakes) - now) if wakes else None
            try:
                kind, arg = self.io.get(timeout=timeout)
            except queue.Empty:
                kind, arg = "tick", None
            try:
                if kind == "stop":
                    self._cancel_all()
                    return
                if kind == "scancel":
                    scancel(arg)
                elif kind == "check":
                    check_at = check_at or (time.monotonic() + 0.5)   # let Slurm record the end first
                now = time.monotonic()
                due = self._submit_due()
                if due is not None and now >= due:
                    self._submit_next()
                if check_at is not None and now >= check_at:
                    check_at = time.monotonic() + self.recheck_interval if self._check(lost_only=True) else None
                periodic = self._periodic_due()
                if periodic is not None and now >= periodic:
                    self._check(lost_only=False)
            except Exception:
                log.exception("Slurm I/O failed")

    def _submit_due(self) -> Optional[float]:
        with self.lock:
            self.ready = [a for a in self.ready if not a.over]
            if not self.ready:
                return None
            waiting = sum(1 for a in self.by_key.values() if a.job_id and a.started is None and not a.over)
            return self.pacer.due(min(a.ready_at for a in self.ready), len(self.ready), waiting)

    def _periodic_due(self) -> Optional[float]:
        """When the next look at jobs that never started is due (None: nothing to look at)."""
        with self.lock:
            waiting = any(a.job_id and a.started is None and not a.over for a in self.by_key.values())
        return self._last_query + self.query_interval if waiting else None

    def _submit_next(self) -> None:
        """One sbatch: the oldest ready attempt's group (same parameters), up to MaxArraySize."""
        limit = self.cluster.max_array_size()
        with self.lock:
            group = self.ready[0].group
            batch = [a for a in self.ready if a.group == group][:limit]
            taken = set(map(id, batch))
            self.ready = [a for a in self.ready if id(a) not in taken]
        params = with_mark(dict(batch[0].params), self.mark)
        params["setup"] = list(params.get("setup") or []) + _python_path_setup()
        params.setdefault("job_name", batch[0].name if len(batch) == 1 else "depio")
        args = (self.address, str(self.key_file))
        try:
            with _Params(self.executor, params) as ex:
                self.sbatch_calls += 1
                if len(batch) == 1:
                    jobs = [ex.submit(run_task_job, *args, batch[0].token, self.heartbeat, self.liveness)]
                else:
                    with ex.batch():
                        jobs = [ex.submit(run_task_job, *args, a.token, self.heartbeat, self.liveness) for a in batch]
        except Exception as e:
            self._submit_failed(batch, f"{type(e).__name__}: {str(e).strip()[-2000:]}")
            return
        self.pacer.sent(ok=True)
        cancelled = []
        with self.lock:
            for a, job in zip(batch, jobs):
                a.job, a.job_id = job, str(job.job_id)
                if a.over:
                    cancelled.append(a.job_id)
                elif a.started is None:
                    self.tell(SlurmState(a.key, "PENDING", a.job_id))
        scancel(cancelled)
        self._last_query = self._last_query or time.monotonic()

    def _submit_failed(self, batch: List[_Attempt], message: str) -> None:
        reason = short_reason(message)
        if transient(message):
            self.pacer.sent(ok=False)
            log.warning("sbatch failed (%s); again in %.0f s", reason, self.pacer.backoff)
            with self.lock:
                self.ready = batch + self.ready
                for a in batch:
                    self.tell(SlurmState(a.key, f"SUBMIT RETRY: {reason}"))
            return
        self.pacer.sent(ok=True)
        log.error("sbatch failed: %s", message)
        with self.lock:
            for a in batch:
                if not a.over:
                    a.over = True
                    self.tell(SlurmState(a.key, "SUBMIT FAILED"))
                    self._fail(a, "SlurmSubmitError", f"sbatch failed: {message}")

    # ------------------------------------------------------------ asking Slurm
    def _check(self, lost_only: bool) -> bool:
        """One batched query for attempts whose worker was lost (and, periodically, jobs never
        started). Returns True when a lost job is still running in Slurm (look again soon)."""
        with self.lock:
            lost = [a for a in self.by_key.values() if not a.over and a.lost_reason is not None]
            quiet = [] if lost_only else [a for a in self.by_key.values()
                                          if not a.over and a.started is None and a.job_id and a.lost_reason is None]
            ids = [a.job_id for a in lost + quiet if a.job_id]
        if not ids:
            for a in lost:        # never submitted: nothing to ask
                self._slurm_ended(a, "UNKNOWN", "")
            return False
        self._last_query = time.monotonic()
        st = self.query.states(ids)
        again = False
        with self.lock:
            for a in quiet:
                if a.over or a.started is not None:
                    continue
                state, reason = st.get(a.job_id, ("", ""))
                if state:
                    self.tell(SlurmState(a.key, state + (f" ({reason})" if reason and reason != "None" else "")))
                if _terminal(state):
                    self._slurm_ended(a, state, reason)
            for a in lost:
                if a.over:
                    continue
                state, reason = st.get(a.job_id, ("", ""))
                if state:
                    self.tell(SlurmState(a.key, state))
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
        if a.crash is not None and base in ("RUNNING", "COMPLETING", "COMPLETED", "UNKNOWN", ""):
            self.tell(P.ClientReport(done=(a.crash,)))          # an ordinary crash of the task's process
        elif base in _RETRYABLE or base in ("COMPLETED", "RUNNING", "COMPLETING", "UNKNOWN", ""):
            self.tell(P.ClientReport(lost=(P.TaskLost(a.key, a.attempt, msg, a.started is not None),)))
        else:
            self._fail(a, "SlurmJobFailed", msg, _job_stderr_tail(a.job) if a.job is not None else "")

    def _fail(self, a: _Attempt, kind: str, message: str, stderr: str = "") -> None:
        now = time.time()
        self.tell(P.ClientReport(done=(P.TaskResult(a.key, a.attempt, a.started or now, now, "", stderr,
                                                    {"kind": kind, "type": kind, "message": message,
                                                     "traceback": "", "summary": message}, None, a.label),)))

    def _cancel_all(self) -> None:
        """The end of the run: cancel the jobs whose task has not ended (those that ended leave by
        themselves), and wait until Slurm lists none of this run's jobs as pending or running."""
        with self.lock:
            ids = [a.job_id for a in self.by_key.values() if a.job_id and not a.finished]
            every = [a.job_id for a in self.by_key.values() if a.job_id]
        scancel(ids)
        left = wait_gone(self.query, every, 20.0) if every else []
        if left:
            log.error("Slurm jobs still listed after scancel: %s", ", ".join(left))
