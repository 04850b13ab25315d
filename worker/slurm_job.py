"""The worker inside a Slurm job: `python -m worker.slurm_job --connect ADDR --key-file FILE ...`.

depio's Slurm executors submit a small function (depio/slurm/job.py) that starts this module as a
process of its own: depio never imports the worker package, the worker imports depio. The job's
stdout and stderr are the submitit job's files (inherited), and Slurm's signals (scancel's SIGTERM,
`--signal=USR2@N` before the walltime) reach this process directly, as every process of the job step.

A per-task job is a one-slot worker pinned to its task attempt (`--pin TOKEN`): its offer names the
pin, so the dispatcher gives it that task and no other, and it leaves once the task's result is
sent. A pilot streams tasks until idle, told to leave, or near its walltime (`--walltime`). Both
offer what their job holds (`depio.runtime.offers.slurm_offer`: CPUs, GPUs, memory, partition).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from typing import List, Optional

from depio.runtime import protocol as P
from depio.runtime.offers import slurm_offer

from .main import Worker, install_stop_signals, read_key

log = logging.getLogger("depio.slurm")


def slurm_job_id() -> str:
    """The id as submitit and squeue show it: 123, or 123_4 for an array task."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and index:
        return f"{array}_{index}"
    return os.environ.get("SLURM_JOB_ID", "")


class SlurmJobWorker(Worker):
    """A worker in a Slurm job. Knows its walltime (`deadline`, epoch seconds): asks for no task
    once less than `margin` s (plus the usual task length) is left, holds back a task whose
    `timeout` is longer than the time left and leaves (the dispatcher re-dispatches it), and
    leaves `margin` s before the limit. A slot killed by SIGTERM means Slurm is ending the job:
    the task is not reported as crashed but left behind (a lost worker), so it runs again."""

    def __init__(self, *args, deadline: Optional[float] = None, margin: float = 60.0, pin: str = "",
                 constraint: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline
        self.margin = margin
        self.pin = pin
        self.constraint = constraint
        walltime_min = 0.0 if deadline is None else max(0.0, (deadline - time.time()) / 60)
        self.offer = dict(slurm_offer(self.nslots, walltime_min, constraint).as_dict(), pin=pin)
        self.got_task = False
        self.draining: Optional[str] = None
        self.blocked: List[tuple] = []

    def _on_message(self, msg: object) -> None:
        if isinstance(msg, P.RunTasks) and msg.tasks:
            self.got_task = True
        super()._on_message(msg)

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def drain(self, why: str) -> None:
        if self.draining is None:
            self.draining = why
            log.warning("draining: %s", why)

    def _capacity(self) -> int:
        if self.pin and self.got_task:
            return 0                     # a per-task job: its one task, nothing more
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
        if self.pin and self.got_task and not self._held() and not self.reports.done:
            self.stopping = "its task is done"
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


def run_job(address: str, key_file: str, name: Optional[str], slots: int, heartbeat: float, liveness: int,
            idle_timeout: Optional[float], walltime_s: Optional[float], margin: float,
            warning_s: Optional[float] = None, pin: str = "", constraint: str = "") -> int:
    """A worker that connects back, until it is told to leave, idle, or near its walltime.
    `warning_s`: the job's `--signal=USR2@warning_s`. Slurm may send that signal up to 60 s early
    (sbatch(1): "due to the resolution of event handling"), so it only tells that the limit is at
    most `warning_s + 60` s away: the worker's deadline is pulled in to that if its own clock said
    later (a slow job start), otherwise it keeps working by its clock."""
    key = read_key(key_file)
    os.environ.pop(P.KEY_ENV, None)
    jid = slurm_job_id()
    deadline = None if not walltime_s else time.time() + walltime_s
    w = SlurmJobWorker(address, key, slots=slots, name=(name or f"pilot-{jid}@{socket.gethostname()}"),
                       heartbeat=heartbeat, liveness=liveness, idle_timeout=idle_timeout, slurm_job_id=jid,
                       deadline=deadline, margin=margin, pin=pin, constraint=constraint)
    install_stop_signals(w)                             # scancel: leave cleanly
    if walltime_s and warning_s is not None:
        def warned(signum, frame) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker.slurm_job",
                                description="The worker of a depio Slurm job (started by the job itself).")
    p.add_argument("--connect", required=True, metavar="ADDR", help="the pipeline's (or pool's) address")
    p.add_argument("--key-file", required=True, help="file with the hex key (mode 600)")
    p.add_argument("--name", default=None, help="the worker's name [pilot-JOBID@host]")
    p.add_argument("--pin", default="", help="a per-task job: the one task attempt it was started for")
    p.add_argument("--constraint", default="", help="the job's --constraint (offered to tasks that ask for it)")
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--liveness", type=int, default=5)
    p.add_argument("--idle-timeout", type=float, default=None)
    p.add_argument("--walltime", type=float, default=None, help="seconds of walltime from the job's start")
    p.add_argument("--margin", type=float, default=60.0, help="leave this many seconds before the walltime")
    p.add_argument("--warning", type=float, default=None, help="the job's --signal=USR2@SECONDS")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="depio-worker %(levelname)s %(message)s")
    return run_job(args.connect, args.key_file, args.name, args.slots, args.heartbeat, args.liveness,
                   args.idle_timeout, args.walltime, args.margin, args.warning, args.pin, args.constraint)


if __name__ == "__main__":
    sys.exit(main())
