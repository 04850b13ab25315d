"""Slurm job states, and what they mean for a task."""
from __future__ import annotations


from ..TaskStatus import TaskStatus


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
