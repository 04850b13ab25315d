"""What the worker reports to its dispatcher: starts and results, batched into one `WorkerReport`
per turn of its loop.

A start waits up to START_REPORT_DELAY for its result, so that a short task costs one message to
the dispatcher and one wake-up of the pipeline, not two; a start whose result goes in the same
report is not sent at all.
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence, Tuple

from depio.runtime import protocol as P
from depio.runtime.protocol import TaskResult, TaskSpec

START_REPORT_DELAY = 0.01   # a start rides with its task's result if that comes this soon (seconds)


class Reports:
    """Starts and results not reported yet."""

    def __init__(self) -> None:
        self.started: List[Tuple[int, float]] = []   # (job id, time) not reported yet
        self.first_unreported_start: Optional[float] = None   # time.monotonic() of started[0]
        self.done: List[Tuple[int, TaskResult]] = []

    def start(self, jid: int, when: float) -> None:
        if not self.started:
            self.first_unreported_start = time.monotonic()
        self.started.append((jid, when))

    def starts_due(self) -> bool:
        return bool(self.started) and time.monotonic() - self.first_unreported_start >= START_REPORT_DELAY

    def next_due(self) -> Optional[float]:
        """When (time.monotonic) the oldest unreported start must go, if there is one."""
        return self.first_unreported_start + START_REPORT_DELAY if self.started else None

    def take(self, credits: int, returned: Sequence[Tuple[int, str]]) -> P.WorkerReport:
        """The report of everything pending, with `credits` new credits and followers handed back."""
        started = self.started
        if started and self.done:
            finished = {jid for jid, _ in self.done}
            started = [item for item in started if item[0] not in finished]
        report = P.WorkerReport(tuple(started), tuple(self.done), credits, tuple(returned))
        self.started, self.done = [], []
        self.first_unreported_start = None
        return report

    def clear(self) -> None:
        self.started.clear()
        self.first_unreported_start = None
        self.done.clear()


def failure(spec: TaskSpec, started: float, kind: str, etype: str, message: str, summary: str,
            worker_name: str) -> TaskResult:
    """The result of a task that ended without telling its result (timed out, its process died)."""
    return TaskResult(spec.key, spec.attempt, started, time.time(), "", "",
                      {"kind": kind, "type": etype, "message": message, "traceback": "", "summary": summary},
                      None, worker_name)
