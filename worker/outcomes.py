"""What a slot's results mean to the worker, and what a slot's death or its task's timeout mean: the
result reported (or not, for a job cancelled meanwhile), the job's followers released or handed
back, the task's length counted for the credits, the next task's start reported.

Handing the slots tasks and replacing one that must go is `SlotSet`'s (and the worker's, which queues
again what the slot had not started); this is only the bookkeeping of the jobs that ended.
"""
from __future__ import annotations

import time
from typing import Deque, List, Optional, Tuple

from depio.runtime.protocol import TaskResult, TaskSpec

from .credits import Credits
from .followers import Followers
from .reports import Reports, failure
from .slots import Slot


class SlotOutcomes:
    """Turns what became of a slot's tasks into reports, followers' fates and task lengths."""

    def __init__(self, followers: Followers, reports: Reports, credits: Credits, worker_name: str) -> None:
        self.followers = followers
        self.reports = reports
        self.credits = credits
        self.worker_name = worker_name

    def results(self, slot: Slot, results: List[Tuple[int, Optional[TaskResult]]],
                queue: Deque[Tuple[int, TaskSpec]]) -> None:
        """The slot sent `results` (None: a conditional task skipped, its predecessor having failed).
        A succeeded job's followers go to the front of `queue`."""
        followers, done = self.followers, self.reports.done
        for jid, result in results:
            if not slot.assigned or slot.assigned[0][0] != jid:
                continue
            slot.assigned.popleft()
            if slot.conditional:
                slot.conditional.discard(jid)
            if result is None:            # a conditional task whose predecessor did not succeed
                slot.last_ok = False
                if jid in slot.ignored:
                    slot.ignored.discard(jid)
                else:
                    followers.give_back(jid, "its predecessor did not succeed")
                continue
            slot.last_ok = ok = result.error is None
            if jid in slot.ignored:
                slot.ignored.discard(jid)
            else:
                done.append((jid, result))
                followers.ended(jid, ok, queue)
            self.credits.record(result.ended - result.started)
        now = time.time()
        slot.head_started = now
        if slot.assigned:
            head = slot.assigned[0][0]
            if slot.last_ok or head not in slot.conditional:    # not one the slot is about to skip
                self.reports.start(head, now)

    def crashed(self, slot: Slot) -> str:
        """The slot's process ended (already joined): its running task, if any, failed with it.
        Returns how the process ended."""
        code = slot.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if slot.assigned:
            jid, spec = slot.assigned[0]
            msg = f"the task's process ended abruptly ({how}) on worker {self.worker_name}"
            self._failed(jid, failure(spec, slot.head_started, "WorkerCrash", "ProcessDied", msg, msg,
                                      self.worker_name))
        return how

    def timed_out(self, slot: Slot) -> None:
        """The slot's running task is past its timeout: it failed."""
        jid, spec = slot.assigned[0]
        msg = f"timed out after {spec.timeout:g} s"
        self._failed(jid, failure(spec, slot.head_started, "TimeoutError", "TimeoutError",
                                  f"Task {spec.name}: {msg}", msg, self.worker_name))

    def _failed(self, jid: int, result: TaskResult) -> None:
        self.reports.done.append((jid, result))
        self.followers.ended(jid, False)
