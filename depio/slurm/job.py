"""Inside a Slurm job: a worker that connects back to the pipeline (or pool)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import deque
from typing import List, Optional


from ..runtime import protocol as P

log = logging.getLogger("depio.slurm")


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

        def _may_chain(self, spec) -> bool:
            # a follower goes into a slot early only if the pilot could finish it, as `_fill_slots` checks
            left = self.time_left() - self.margin
            return self.draining is None and (spec.timeout is None or spec.timeout <= left)

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
