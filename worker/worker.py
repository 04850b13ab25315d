"""The worker's event loop: one thread, one ZeroMQ DEALER socket, the slot sockets.

No user code runs in this process (tasks run in slot processes), so heartbeats keep flowing
whatever a task does. Its parts: `connection` (the dispatcher's socket) and `registration` (standing
with it), `credits` (how many tasks to ask for), `followers` (chains held here), `placement` (a
pool's: whose job is which), `reports` (what goes back), `slot_set` (the slot processes, which a
`forker` starts) and `outcomes` (what their results mean).
The Worker runs the loop: it hands what arrives to its parts and keeps the slots busy.
"""
from __future__ import annotations

import logging
import os
import platform
import signal
import threading
import time
from collections import deque
from functools import partial
from typing import Deque, Dict, List, Optional, Tuple

import zmq

from depio.runtime import protocol as P
from depio.runtime.protocol import TaskSpec
from depio.runtime.offers import local_offer

from .connection import DispatcherConnection
from .credits import Credits
from .followers import Followers
from .outcomes import SlotOutcomes
from .placement import Placement
from .registration import Registration, Stop
from .reports import Reports
from .slot_set import SlotSet
from .slots import Slot

log = logging.getLogger("depio.worker")

DEFAULT_HEARTBEAT = 1.0
DEFAULT_LIVENESS = 3
DEFAULT_KILL_GRACE = 2.0    # seconds between SIGTERM and SIGKILL for a cancelled task
# plain ints: pyzmq's flag enums cost a Python-level call on every `&` of the event loop
_POLLIN, _POLLOUT, _POLLERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)


def _drain(fd: int) -> None:
    """Read the non-blocking wake-up pipe empty (not inbox's `drain_pipe`: a worker imports no inbox)."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def register_message(w: "Worker") -> P.Register:
    """The worker's hello, with what each of its slots holds (`offer`, for the dispatcher's routing): a
    Slurm job's worker sets its allocation as `w.offer`; any other offers this machine."""
    offer = getattr(w, "offer", None) or local_offer(w.nslots).as_dict()
    return P.Register(w.name, w.host, os.getpid(), w.nslots, slurm_job_id=w.slurm_job_id, offer=offer)


class Worker:
    """The worker's event loop (see the module docstring). Subclasses adapt `_capacity`, `_held`,
    `_fill_slots`, `_may_chain`, `_housekeeping` and `_slot_died` (a Slurm job's worker does)."""

    def __init__(self, address: str, key: bytes, slots: int = 1, name: Optional[str] = None,
                 heartbeat: float = DEFAULT_HEARTBEAT, liveness: int = DEFAULT_LIVENESS,
                 idle_timeout: Optional[float] = None, parent_pid: Optional[int] = None,
                 reconnect: Optional[float] = None, slurm_job_id: str = "",
                 kill_grace: float = DEFAULT_KILL_GRACE):
        self.nslots = max(1, int(slots))
        self.host = platform.node()
        self.name = name or f"{self.host}:{os.getpid()}"
        self.idle_timeout = idle_timeout
        self.parent_pid = parent_pid
        self.slurm_job_id = slurm_job_id
        self.slot_set = SlotSet(self.name, kill_grace)
        self.slots: List[Slot] = self.slot_set.live
        self.conn = DispatcherConnection(address, key, heartbeat, liveness, reconnect)
        self.registration = Registration(self.conn, partial(register_message, self), self._forget_jobs, self.nslots)
        self.credits = Credits(self.nslots)
        self.followers = Followers()
        self.reports = Reports()
        self.outcomes = SlotOutcomes(self.followers, self.reports, self.credits, self.name)
        self.queue: Deque[Tuple[int, TaskSpec]] = deque()      # received, not yet in a slot
        self.functions: Dict[bytes, bytes] = {}
        self.placement = Placement()
        self.last_busy = time.monotonic()
        self.stopping: Optional[str] = None
        self.exit_code = 0
        # a signal handler only sets `stopping`; this pipe (signal.set_wakeup_fd) wakes the loop
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    @property
    def avg_duration(self) -> float:
        return self.credits.avg_duration

    # ------------------------------------------------------------ the dispatcher
    def _forget_jobs(self) -> None:
        """About to register afresh (`Registration.reconnect`, between the old ZeroMQ context and the new
        one): the dispatcher forgot us (lost or restarted) and gave our jobs back to their pipelines,
        so stop those running (SIGTERM, SIGKILL after the grace period) and drop the rest."""
        self.slot_set.renew_starter()
        self.queue.clear()
        for slot in list(self.slots):
            if slot.assigned:
                slot.assigned.clear()
                self._replace_slot(slot, graceful=True)
        self.reports.clear()
        self.followers.clear()
        self.placement.clear()
        self.slot_set.changed = True      # the poller must watch the new socket
        self.credits.open = 0

    def _on_message(self, msg: object) -> None:
        if isinstance(msg, P.RunTasks):
            self.functions.update(msg.functions)
            if msg.places:      # a pool's: whose job is which
                self.placement.place(msg.tasks, msg.places)
                self.slot_set.context_of = self.placement.of.get
            self.followers.active.update(jid for jid, _ in msg.tasks)
            if msg.after:
                self.followers.take(msg.tasks, dict(msg.after), self.queue)
            else:
                self.queue.extend(msg.tasks)
            self.credits.received(len(msg.tasks) - len(msg.after))
            self.last_busy = time.monotonic()
        elif isinstance(msg, P.CancelJobs):
            self._cancel(set(msg.jids))
        else:
            self._stop(self.registration.on_message(msg, self.reports.done))

    def _stop(self, stop: Optional[Stop]) -> None:
        if stop is not None:
            self.stopping, self.exit_code = stop

    def _cancel(self, jids: set) -> None:
        self.followers.cancel(jids)
        self.queue = deque(item for item in self.queue if item[0] not in jids)
        for slot in list(self.slots):
            if not slot.assigned:
                continue
            if slot.assigned[0][0] in jids:     # running: kill the slot, keep the rest queued
                self._replace_slot(slot, graceful=True, cancelled=frozenset(jids),
                                   why="its predecessor was cancelled")
            else:
                # queued inside the slot: run, but do not report. A conditional follower behind such
                # a task still runs only if it succeeds, as if it had not been cancelled.
                slot.ignored.update(j for j, _ in slot.assigned if j in jids)

    # ------------------------------------------------------------ slots
    def _replace_slot(self, slot: Slot, graceful: bool = False, cancelled: frozenset = frozenset(),
                      why: str = "its predecessor did not succeed") -> None:
        """A slot must go with its running task (timed out, cancelled, or died): queue again what it
        had not started (`Followers.sort_out`) and put a fresh slot in its place (`SlotSet.replace`)."""
        self.queue.extendleft(reversed(self.followers.sort_out(slot, cancelled, why)))
        slot.assigned.clear()
        slot.conditional.clear()
        self.slot_set.replace(slot, graceful)

    def _capacity(self) -> int:
        return self.credits.capacity()

    def _held(self) -> int:
        return len(self.queue) + sum(len(s.assigned) for s in self.slots)

    def _fill_slots(self) -> None:
        """Queued tasks to the slots, as deep as the tasks are short; then each slot takes the
        followers held for its last task."""
        if self.queue:
            self.slot_set.fill(self.queue, self.credits.depth(), self.functions, self.reports.start, self._slot_died)
        if self.followers.held:
            for slot in list(self.slots):
                try:
                    self.followers.chain_into(slot, self.functions, self._may_chain)
                except OSError:
                    self._slot_died(slot)
                    continue
                if slot.outbuf:
                    self.slot_set.changed = True    # poll it for writability

    def _may_chain(self, spec: TaskSpec) -> bool:
        """Whether a follower may go into a slot ahead of its predecessor's end (a Slurm pilot near its
        walltime says no to one it could not finish)."""
        return True

    def _on_slot_readable(self, slot: Slot) -> None:
        try:
            results = slot.receive()
        except (EOFError, OSError):
            self._slot_died(slot)
            return
        if results:
            self.outcomes.results(slot, results, self.queue)

    def _slot_died(self, slot: Slot) -> None:
        slot.process.join(1)
        how = self.outcomes.crashed(slot)
        log.warning("slot %d died (%s)", slot.index, how)
        self._replace_slot(slot, why=f"its predecessor's process ended abruptly ({how})")

    def _check_timeouts(self) -> None:
        for slot in self.slot_set.timed_out(time.time()):
            self.outcomes.timed_out(slot)
            self._replace_slot(slot, why="its predecessor timed out")

    # ------------------------------------------------------------ the loop
    def _flush(self) -> None:
        """At most one report per loop turn: starts, results, followers handed back and new credits."""
        if not self.conn.registered:
            return
        want = 0 if self.stopping is not None else self.credits.want(self._capacity(), self._held())
        reports = self.reports
        if not (reports.done or want > 0 or reports.starts_due() or self.followers.returned):
            return
        self.conn.send(reports.take(want, self.followers.take_returned()))
        self.credits.open += want

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        wakes = [self.conn.next_wakeup(), self.slot_set.next_wakeup(now), self.reports.next_due()]
        return max(0.0, min(w for w in wakes if w is not None) - now)

    def run(self) -> int:
        """Serve until told to stop, the dispatcher is gone, or idle too long. Returns the exit code."""
        slot_set = self.slot_set
        try:
            # inside the try: a SIGTERM while still starting (the run it was for ended already)
            # must stop the worker as quietly as one that arrives later.
            slot_set.start(self.nslots, self.registration.connect)
            while self.stopping is None:
                if slot_set.changed:
                    poller, by_fd = slot_set.poller(self.wake_r, self.conn.sock)
                wait = self._next_wakeup()
                before = time.monotonic()
                events = dict(poller.poll(wait * 1000))
                self.conn.check_suspended(time.monotonic() - before - wait)
                # slots first: a result that is ready is taken before a message (a Reregister after a
                # suspension) can drop it, so the dispatcher sees it, late, and ignores it knowingly
                for fd, slot in list(by_fd.items()):
                    ev = events.get(fd, 0)
                    if ev and self.slots[slot.index] is slot:
                        if ev & _POLLOUT:
                            slot_set.writable(slot, self._slot_died)
                        if ev & (_POLLIN | _POLLERR) and self.slots[slot.index] is slot:
                            self._on_slot_readable(slot)
                if self.wake_r in events:
                    _drain(self.wake_r)
                if self.conn.sock in events:
                    self._drain_socket()
                self._check_timeouts()
                self._fill_slots()
                self._flush()
                self._housekeeping()
        except KeyboardInterrupt:
            self.stopping = "interrupted"
        finally:
            self._shutdown()
        return self.exit_code

    def request_stop(self, reason: str) -> None:
        """Stop at the next turn of the loop (safe to call from a signal handler)."""
        if self.stopping is None:
            self.stopping = reason

    def _drain_socket(self) -> None:
        for msg in self.conn.messages():
            self._on_message(msg)
            if self.stopping is not None:
                return
        if self.conn.broken is not None:
            self.stopping, self.exit_code = self.conn.broken, 3

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.slot_set.dying:
            self.slot_set.reap()
        if self.conn.silent(now):
            self._stop(self.registration.on_silence(now))
            return
        self.conn.heartbeat(now)
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.stopping = "the process that started this worker is gone"
        if self._held():
            self.last_busy = now
        elif self.placement.of and not self.followers.held:
            self.placement.clear()        # nothing is held: no job's pipeline is needed any more
        elif self.idle_timeout is not None and now - self.last_busy > self.idle_timeout:
            self.stopping = f"idle for {self.idle_timeout:g} s"

    def _shutdown(self) -> None:
        log.info("worker %s stopping: %s", self.name, self.stopping)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut the clean-up short
        self.slot_set.stop_all()
        self.registration.goodbye(self.stopping or "")
