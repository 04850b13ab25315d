"""Sparing the controller: when to call sbatch, and what to do when it fails.

Sites rate-limit RPCs to slurmctld and ask users to stay far below: a pipeline submits at most one
sbatch per `MIN_INTERVAL` seconds, and tasks that become ready one by one (as capacity frees up)
are gathered for a moment and go out together as one job array:

- while some of this run's jobs still wait in Slurm, more gathering costs nothing (the cluster has
  work of ours queued): wait until `BATCH` tasks are ready, or `MAX_GATHER` seconds passed;
- when none waits (the cluster may idle), gather only `SHORT_GATHER` seconds.

A failed sbatch is either transient (the controller is busy, a submit limit is reached): the tasks
wait and are submitted again after a growing pause, showing why; or permanent (no such partition,
an invalid option): the tasks fail with sbatch's message.
"""
from __future__ import annotations

import re
import time
from typing import Optional

MIN_INTERVAL = 1.0       # seconds between two sbatch calls of one pipeline
SHORT_GATHER = 0.3       # when no job of ours waits in Slurm
MAX_GATHER = 15.0        # when some do: at most this long (they keep the cluster busy meanwhile), ...
BATCH = 10               # ... or until this many tasks are ready
MAX_BACKOFF = 60.0

_TRANSIENT = re.compile(r"socket timed out|timed out|resource temporarily unavailable|try again|"
                        r"AssocMaxSubmitJobLimit|QOSMaxSubmitJobPerUser|MaxSubmitJobs|AssocGrpSubmitJobsLimit|"
                        r"QOSGrpSubmitJobsLimit|job submit limit|slurm_receive_msg|Unable to contact slurm controller|"
                        r"Zero Bytes were transmitted|Connection refused|Job submit/allocate failed: "
                        r"Slurm temporarily unable", re.I)


def transient(message: str) -> bool:
    """Whether an sbatch failure may go away by itself (retry), rather than be the request's fault."""
    return bool(_TRANSIENT.search(message or ""))


def short_reason(message: str) -> str:
    """The line of sbatch's output that says what went wrong."""
    lines = [x.strip() for x in (message or "").splitlines() if x.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or transient(line):
            return line[-200:]
    return (lines[-1] if lines else message or "")[-200:]


class Pacer:
    """When the next sbatch may go: at most one per MIN_INTERVAL, and a backoff after a transient
    failure (doubling up to MAX_BACKOFF; reset by a success)."""

    def __init__(self, min_interval: float = MIN_INTERVAL) -> None:
        self.min_interval = min_interval
        self.last = float("-inf")
        self.backoff = 0.0
        self.retry_at = 0.0
        self.failures = 0

    def sent(self, ok: bool, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        self.last = now
        if ok:
            self.backoff, self.retry_at, self.failures = 0.0, 0.0, 0
        else:
            self.failures += 1
            self.backoff = min(MAX_BACKOFF, max(2.0, self.backoff * 2))
            self.retry_at = now + self.backoff

    def due(self, first_ready: float, ready: int, waiting_in_slurm: int) -> float:
        """When to submit `ready` tasks, the first of them ready since `first_ready` (monotonic)."""
        gather = SHORT_GATHER if waiting_in_slurm == 0 or ready >= BATCH else MAX_GATHER
        if ready >= BATCH:
            gather = 0.0
        return max(first_ready + gather, self.last + self.min_interval, self.retry_at)
