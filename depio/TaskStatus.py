"""Task states as the table shows them; the terminal sets decide a run's exit code."""
from enum import Enum


class TaskStatus(Enum):
    WAITING = 0
    PENDING = 1
    RUNNING = 2
    FINISHED = 3
    SKIPPED = 4
    FAILED = 5
    DEPFAILED = 6
    CANCELED = 7
    HOLD = 8
    UNKNOWN = 9

    # members are singletons compared by identity: hash them so too, in C (Enum's own __hash__ is
    # Python code, and the runtime hashes a status several times per task, in counters and sets)
    __hash__ = object.__hash__


TERMINAL_STATES = frozenset({TaskStatus.FINISHED, TaskStatus.SKIPPED, TaskStatus.FAILED,
                             TaskStatus.DEPFAILED, TaskStatus.CANCELED})
SUCCESSFUL_TERMINAL_STATES = frozenset({TaskStatus.FINISHED, TaskStatus.SKIPPED})
FAILED_TERMINAL_STATES = frozenset({TaskStatus.FAILED, TaskStatus.DEPFAILED, TaskStatus.CANCELED})
