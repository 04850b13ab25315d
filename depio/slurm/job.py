"""What a Slurm job runs: the worker (`worker/slurm_job.py`), started as a process of its own.

submitit pickles `run_task_job` / `run_pilot` with their arguments and calls them in the job. They
do not import the worker package (the worker depends on depio, never the other way round): they
start `python -m worker.slurm_job` with inherited stdout and stderr, so its output lands in the
submitit job's log files (where the per-task backend reads a failed job's stderr), wait for it and
return its exit code as the job's result.

Signals: Slurm signals every process of the job step (scancel's SIGTERM, `--signal=USR2@N` before the
walltime), so the worker gets them itself and handles them. This process only must not act on them:
submitit already ignores SIGTERM here ("bypass"); its SIGUSR2 handler (checkpoint and requeue, then
exit) is replaced by SIG_IGN, which would otherwise end the job under its worker.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from typing import List, Optional

WORKER_JOB_MODULE = "worker.slurm_job"      # run as a command (python -m), never imported by depio


def job_command(address: str, key_file: str, *, name: Optional[str] = None, slots: int = 1,
                heartbeat: float = 1.0, liveness: int = 5, idle_timeout: Optional[float] = None,
                walltime_s: Optional[float] = None, margin: float = 60.0,
                warning_s: Optional[float] = None, pin: str = "", constraint: str = "") -> List[str]:
    """The worker's command line (the key stays in its mode-600 file: only the path is on it)."""
    cmd = [sys.executable, "-m", WORKER_JOB_MODULE, "--connect", address, "--key-file", key_file,
           "--slots", str(slots), "--heartbeat", repr(float(heartbeat)), "--liveness", str(liveness),
           "--margin", repr(float(margin))]
    for flag, value in (("--name", name), ("--idle-timeout", idle_timeout), ("--walltime", walltime_s),
                        ("--warning", warning_s), ("--pin", pin or None), ("--constraint", constraint or None)):
        if value is not None:
            cmd += [flag, value if isinstance(value, str) else repr(float(value))]
    return cmd


def _run(cmd: List[str]) -> int:
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()                     # submitit's lines before the worker's, in the same files
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL) as proc:
        return proc.wait()


def run_task_job(address: str, key_file: str, token: str, heartbeat: float = 1.0, liveness: int = 5) -> int:
    """Per-task job: a one-slot worker pinned to `token` (one task attempt): the pipeline's dispatcher
    gives it exactly that task, and it leaves once the result is sent."""
    return _run(job_command(address, key_file, name=token, slots=1, heartbeat=heartbeat, liveness=liveness,
                            idle_timeout=120.0, margin=0.0, pin=token))


def run_pilot(address: str, key_file: str, slots: int = 1, walltime_s: Optional[float] = None,
              margin: float = 60.0, heartbeat: float = 1.0, liveness: int = 5,
              idle_timeout: Optional[float] = 60.0, warning_s: Optional[float] = None, constraint: str = "") -> int:
    """Pilot job: a worker that streams tasks until idle, told to leave, or near its walltime."""
    return _run(job_command(address, key_file, slots=slots, heartbeat=heartbeat, liveness=liveness,
                            idle_timeout=idle_timeout, walltime_s=walltime_s, margin=margin, warning_s=warning_s,
                            constraint=constraint))
