"""Messages a backend tells the scheduler actor besides the protocol's `ClientReport`.

They live apart from the scheduler so that backends (in-process, pool, Slurm) can send them without
importing the scheduler: the scheduler reacts to backends, backends never depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class BackendFailed:
    """The backend can run nothing more (no workers left, the pool went away)."""
    reason: str


@dataclass(frozen=True)
class SlurmState:
    """A Slurm backend's thread saw a task's job change (`slurmid` None: unchanged)."""
    key: int
    state: str
    slurmid: Optional[str] = None
