"""Followers held on the worker, and what became of the jobs it ran.

A follower (`RunTasks.after`) is a task whose one unfinished dependency runs on this worker: it is
held here and, once that job is the last one handed to a slot, handed to the same slot as a
conditional task, which the slot runs right after it if it succeeded (so a chain goes from link to
link inside the slot). If the job fails, is cancelled or is unknown here, the follower is handed
back unstarted (`WorkerReport.returned`) and its pipeline decides again.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

from depio.runtime.protocol import TaskSpec

from .slots import Slot

OUTCOMES_KEPT = 65536       # how many ended jobs a late follower can still find (job id -> succeeded)
CHAIN_IN_SLOT = 16          # conditional followers a slot holds at most, behind the task they follow

Item = Tuple[int, TaskSpec]


class Followers:
    """Jobs received and not ended (`active`), followers held for them, ended jobs' outcomes, and the
    followers handed back but not reported yet (`returned`)."""

    def __init__(self) -> None:
        self.active: Set[int] = set()                # jobs received and not ended: queued, held or in a slot
        self.held: Dict[int, List[Item]] = {}        # job id -> followers waiting for it to succeed
        self.outcomes: "OrderedDict[int, bool]" = OrderedDict()   # ended jobs, oldest first: succeeded?
        self.returned: List[Tuple[int, str]] = []

    def take(self, tasks: Iterable[Item], after: Dict[int, int], queue: Deque[Item]) -> None:
        """Queue the tasks; hold each follower until its predecessor succeeds (or hand it back)."""
        for item in tasks:
            pred = after.get(item[0])
            if pred is None:
                queue.append(item)
            elif pred in self.active:
                self.held.setdefault(pred, []).append(item)
            elif self.outcomes.get(pred):
                queue.append(item)       # the predecessor succeeded before its follower arrived
            else:
                self.give_back(item[0], "its predecessor failed here" if pred in self.outcomes
                               else "its predecessor is not on this worker")

    def ended(self, jid: int, ok: bool, queue: Optional[Deque[Item]] = None) -> None:
        """Job `jid` is over here: release its followers to the front of `queue`, or hand them back."""
        self.active.discard(jid)
        outcomes = self.outcomes
        outcomes[jid] = ok
        if len(outcomes) > OUTCOMES_KEPT:
            outcomes.popitem(last=False)     # not a dict: deleting its first key again and again is O(n)
        if self.held:
            followers = self.held.pop(jid, None)
            if followers:
                if ok:
                    queue.extendleft(reversed(followers))
                else:
                    for fjid, _ in followers:
                        self.give_back(fjid, "its predecessor did not succeed")

    def give_back(self, jid: int, reason: str) -> None:
        self.returned.append((jid, reason))
        self.ended(jid, False)       # and whatever waits for it

    def take_returned(self) -> List[Tuple[int, str]]:
        returned, self.returned = self.returned, []
        return returned

    def cancel(self, jids: Set[int]) -> None:
        """Forget cancelled jobs; hand back what followed them."""
        for pred in list(self.held):
            kept = [item for item in self.held[pred] if item[0] not in jids]
            if kept:
                self.held[pred] = kept
            else:
                del self.held[pred]
        for jid in jids:
            if jid in self.active:
                self.active.discard(jid)
                self.outcomes[jid] = False
                for fjid, _ in self.held.pop(jid, ()):
                    self.give_back(fjid, "its predecessor was cancelled")

    def clear(self) -> None:
        self.active.clear()
        self.held.clear()
        self.returned.clear()

    def sort_out(self, slot: Slot, cancelled: frozenset, why: str) -> List[Item]:
        """The slot is going with its running task, which does not succeed: of the tasks behind it,
        return those to queue again. A conditional follower right behind the running task (or behind
        one that will not run here: cancelled) goes back to its pipeline; one behind a task that goes
        back to the queue is held for that task again."""
        requeue = []
        prev_jid, prev_fails = (slot.assigned[0][0] if slot.assigned else 0), True
        for item in list(slot.assigned)[1:]:
            jid = item[0]
            if jid in cancelled or jid in slot.ignored:
                prev_jid, prev_fails = jid, True
            elif jid in slot.conditional:
                if prev_fails:
                    self.give_back(jid, why)
                else:
                    self.held.setdefault(prev_jid, []).append(item)
                prev_jid = jid
            else:
                requeue.append(item)
                prev_jid, prev_fails = jid, False
        return requeue

    def chain_into(self, slot: Slot, functions: Dict[bytes, bytes], may_chain: Callable[[TaskSpec], bool]) -> None:
        """Hand the slot the follower held for its last task, as a conditional task, and so on along
        the chain (at most CHAIN_IN_SLOT): each then starts in the slot right after its predecessor.
        Raises OSError if the slot is gone."""
        held = self.held
        while slot.assigned and len(slot.conditional) < CHAIN_IN_SLOT and not slot.closed:
            tail = slot.assigned[-1][0]
            followers = held.get(tail)
            if not followers or tail in slot.ignored:
                return
            jid, spec = followers[0]
            if spec.func_digest not in slot.functions or not may_chain(spec):
                return      # it waits for its predecessor's success, then goes the usual way
            del followers[0]
            if not followers:
                del held[tail]
            slot.give([(jid, spec)], functions, conditional=True)
