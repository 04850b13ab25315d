"""How each task state is shown: its colour and its text in the task table."""
from __future__ import annotations

from typing import Dict

from ..TaskStatus import TaskStatus

_status_colors: Dict[TaskStatus, str] = {
    TaskStatus.WAITING: 'blue',
    TaskStatus.DEPFAILED: 'red',
    TaskStatus.PENDING: 'blue',
    TaskStatus.RUNNING: 'yellow',
    TaskStatus.FINISHED: 'green',
    TaskStatus.SKIPPED: 'green',
    TaskStatus.HOLD: 'white',
    TaskStatus.FAILED: 'red',
    TaskStatus.CANCELED: 'white',
    TaskStatus.UNKNOWN: 'white',
}

_status_texts: Dict[TaskStatus, str] = {
    TaskStatus.WAITING: 'waiting',
    TaskStatus.PENDING: 'pending',
    TaskStatus.RUNNING: 'running',
    TaskStatus.FINISHED: 'finished',
    TaskStatus.SKIPPED: 'skipped',
    TaskStatus.FAILED: 'failed',
    TaskStatus.DEPFAILED: 'dep. failed',
    TaskStatus.CANCELED: 'cancelled',
    TaskStatus.HOLD: 'hold',
    TaskStatus.UNKNOWN: 'unknown',
}
