"""The worker's slots as a set: starting them (as `slot_context` decides), handing them tasks,
replacing one that must go, reaping those on their way out, and stopping them all.

What a slot's results mean (reports, followers, credits) is `outcomes`'; this is only the
processes and the tasks handed to them.
"""
from __future__ import annotations

import signal
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

import zmq

from depio.runtime.protocol import TaskSpec
from depio.runtime.offers import gpu_ids, split_gpus

from .slots import Slot, SlotStarter, slot_context, stop_slots

_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)

Item = Tuple[int, TaskSpec]


class SlotSet:
    """`live[i]` is slot i (the same list for the worker's lifetime). `changed`: the set of sockets
    to poll, or what to poll them for, changed since the last `poller()`."""

    def __init__(self, worker_name: str, kill_grace: float) -> None:
        self.worker_name = worker_name
        self.kill_grace = kill_grace
        self.starter: Optional[SlotStarter] = None
        self.live: List[Slot] = []
        self.dying: List[Tuple[Slot, float]] = []    # SIGTERM sent, SIGKILL at the deadline (monotonic)
        self.gpus: List[List[str]] = []      # by slot index: the GPUs its tasks see (CUDA_VISIBLE_DEVICES)
        self.changed = True
        self.context_of: Optional[Callable[[int], Optional[tuple]]] = None   # a pool's: job id -> pipeline

    def start(self, n: int, connect: Callable[[], None]) -> None:
        """Start `n` slots, and call `connect()` (which opens the ZeroMQ connection) as soon as it may:
        right after the forker exists when slots come from one (the slots then start while the
        dispatcher reads the hello), after the slots when they are forked from this process. Call it
        after this process has set its signal handlers (the slots inherit them)."""
        self.starter = slot_context(first=n)
        self.gpus = split_gpus(gpu_ids(), n)        # each slot sees only its own GPUs
        if not self.starter.forks_here:
            connect()
        self.live[:] = [self._new(i) for i in range(n)]
        self.changed = True
        if self.starter.forks_here:
            connect()

    def renew_starter(self) -> None:
        """A new starter for the slots started from now on (a new forker: call it while this process
        runs no ZeroMQ thread). The slots running now live on."""
        self.starter.retire()
        self.starter = slot_context()

    def replace(self, slot: Slot, graceful: bool) -> None:
        """Start a fresh slot in `slot`'s place at once. The old one: `graceful`, SIGTERM now and
        SIGKILL after the grace period (in `reap`, so the loop never waits); otherwise SIGKILL now."""
        if graceful:
            slot.signal(signal.SIGTERM)
            self.dying.append((slot, time.monotonic() + self.kill_grace))
        else:
            slot.kill()
        self.live[slot.index] = self._new(slot.index)
        self.changed = True

    def _new(self, i: int) -> Slot:
        """Slot `i`, told first which GPUs are its own (a task must not take another slot's GPU)."""
        slot = Slot(self.starter, i, self.worker_name)
        if i < len(self.gpus) and self.gpus[i]:
            slot.set_env({"CUDA_VISIBLE_DEVICES": ",".join(self.gpus[i])})
        return slot

    def reap(self) -> None:
        self.dying = [(slot, deadline) for slot, deadline in self.dying if not slot.finish_stop(deadline)]

    def fill(self, queue: Deque[Item], depth: int, functions: Dict[bytes, bytes],
             started: Callable[[int, float], None], died: Callable[[Slot], None]) -> None:
        """Hand queued tasks to the least loaded slots, up to `depth` each; a busy slot gets no new
        function (a big pickle must not wait on it). `started(jid, time)` for a task that starts now."""
        for slot in sorted(self.live, key=lambda s: len(s.assigned)):
            room = depth - len(slot.assigned)
            if room <= 0 or not queue:
                continue
            batch = []
            context_of = self.context_of        # a pool's worker: a batch is of one pipeline
            context = context_of(queue[0][0]) if context_of else None
            while queue and len(batch) < room:
                if slot.assigned and queue[0][1].func_digest not in slot.functions:
                    break
                if context_of and context_of(queue[0][0]) != context:
                    break
                batch.append(queue.popleft())
            if batch and context != slot.context:
                try:
                    slot.set_context(context)
                except OSError:
                    queue.extendleft(reversed(batch))
                    died(slot)
                    continue
            if batch:
                if not slot.assigned:
                    started(batch[0][0], time.time())
                self.give(slot, batch, functions, died)

    def give(self, slot: Slot, batch: List[Item], functions: Dict[bytes, bytes], died: Callable[[Slot], None],
             conditional: bool = False) -> None:
        try:
            slot.give(batch, functions, conditional)
        except OSError:
            died(slot)
            return
        if slot.outbuf:
            self.changed = True    # poll it for writability

    def writable(self, slot: Slot, died: Callable[[Slot], None]) -> None:
        try:
            slot.write_pending()
        except OSError:
            died(slot)
            return
        if not slot.outbuf:
            self.changed = True    # stop polling it for writability

    def poller(self, *fds: object) -> Tuple[zmq.Poller, Dict[int, Slot]]:
        """A poller for `fds` (readable) and the slots (readable, and writable while they have input
        waiting), with the slots by file descriptor."""
        poller, by_fd = zmq.Poller(), {}
        for fd in fds:
            poller.register(fd, _POLLIN)
        for slot in self.live:
            poller.register(slot.fileno(), _POLLIN | (_POLLOUT if slot.outbuf else 0))
            by_fd[slot.fileno()] = slot
        self.changed = False
        return poller, by_fd

    def timed_out(self, now: float) -> List[Slot]:
        """Slots whose running task is past its timeout at `now` (time.time)."""
        out = []
        for slot in self.live:
            deadline = slot.deadline()
            if deadline is not None and now >= deadline:
                out.append(slot)
        return out

    def next_wakeup(self, now: float) -> Optional[float]:
        """The earliest time (monotonic, `now` being the present) a task times out or a dying slot
        must be looked at, if any."""
        deadlines = [d for d in (s.deadline() for s in self.live) if d is not None]
        wake = now + (min(deadlines) - time.time()) if deadlines else None
        if self.dying:       # reap promptly, SIGKILL on time
            soon = min([now + 0.1] + [d for _, d in self.dying])
            wake = soon if wake is None else min(wake, soon)
        return wake

    def stop_all(self) -> None:
        """Stop every slot (busy ones: SIGTERM, SIGKILL after the grace period); start no more."""
        stop_slots(list(self.live) + [slot for slot, _ in self.dying], grace=self.kill_grace)
        self.dying = []
        if self.starter is not None:
            self.starter.retire()
