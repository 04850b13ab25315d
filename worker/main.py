"""`depio-worker`: connects out to a dispatcher, runs the tasks it is given, reports back.

One thread, one ZeroMQ DEALER socket, one event loop over the socket and the slot pipes. No user
code runs in this process (tasks run in slot processes), so heartbeats keep flowing whatever a
task does. The flow of work is credit based: the worker grants the dispatcher credits for as many
tasks as it wants to hold (slots, plus a prefetch that grows for short tasks and shrinks to zero
for long ones), so short tasks stream and long ones are not hoarded.

A follower (`RunTasks.after`) is a task whose one unfinished dependency runs on this worker: it is
held here and, once that job is the last one handed to a slot, handed to the same slot as a
conditional task, which the slot runs right after it if it succeeded (so a chain goes from link to
link inside the slot). If the job fails, is cancelled or is unknown here, the follower is handed
back unstarted (`WorkerReport.returned`) and its pipeline decides again.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional, Set, Tuple

import zmq

from depio.runtime import protocol as P
from depio.runtime.inbox import drain_pipe
from depio.runtime.protocol import TaskResult, TaskSpec

from .slots import Slot, slot_context, stop_slots

log = logging.getLogger("depio.worker")

DEFAULT_HEARTBEAT = 1.0
DEFAULT_LIVENESS = 3
DEFAULT_KILL_GRACE = 2.0    # seconds between SIGTERM and SIGKILL for a cancelled task
START_REPORT_DELAY = 0.01   # a start rides with its task's result if that comes this soon (seconds)
OUTCOMES_KEPT = 65536       # how many ended jobs a late follower can still find (job id -> succeeded)
CHAIN_IN_SLOT = 16          # conditional followers a slot holds at most, behind the task they follow
# plain ints: pyzmq's flag enums cost a Python-level call on every `&` and `|` of the event loop
_POLLIN, _POLLOUT, _POLLERR, _EVENTS = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR), int(zmq.EVENTS)


class Worker:
    """The worker's event loop (see the module docstring)."""

    def __init__(self, address: str, key: bytes, slots: int = 1, name: Optional[str] = None,
                 heartbeat: float = DEFAULT_HEARTBEAT, liveness: int = DEFAULT_LIVENESS,
                 idle_timeout: Optional[float] = None, parent_pid: Optional[int] = None,
                 reconnect: Optional[float] = None, slurm_job_id: str = "",
                 kill_grace: float = DEFAULT_KILL_GRACE):
        self.address = address
        self.key = key
        self.nslots = max(1, int(slots))
        self.host = platform.node()
        self.name = name or f"{self.host}:{os.getpid()}"
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.idle_timeout = idle_timeout
        self.parent_pid = parent_pid
        self.reconnect = reconnect
        self.slurm_job_id = slurm_job_id
        self.kill_grace = kill_grace
        self.dying: List[Tuple[Slot, float]] = []    # cancelled slots: SIGTERM sent, SIGKILL at the deadline
        self.silent_since: Optional[float] = None     # when the dispatcher was first found silent
        self.ctx = zmq.Context.instance()
        self.sock: Optional[zmq.Socket] = None
        self.slot_ctx = slot_context()
        self.slots: List[Slot] = []
        self.queue: Deque[Tuple[int, TaskSpec]] = deque()      # received, not yet in a slot
        self.functions: Dict[bytes, bytes] = {}
        self.open_credits = 0
        self.avg_duration = 0.5      # seconds, moving average: decides the prefetch (unknown: no prefetch)
        self.samples = 0
        self.started: List[Tuple[int, float]] = []   # (job id, time) not reported yet
        self.first_unreported_start: Optional[float] = None   # time.monotonic() of started[0]
        self.done: List[Tuple[int, TaskResult]] = []
        self.active: Set[int] = set()                 # jobs received and not ended: queued, held or in a slot
        self.held: Dict[int, List[Tuple[int, TaskSpec]]] = {}   # job id -> followers waiting for it to succeed
        self.outcomes: "OrderedDict[int, bool]" = OrderedDict()   # ended jobs, oldest first: succeeded?
        self.returned: List[Tuple[int, str]] = []     # followers handed back, not reported yet
        self.last_sent = 0.0
        self.last_heard = 0.0
        self.last_busy = time.monotonic()
        self.registered = False
        self.dispatcher_gone = False
        self.stopping: Optional[str] = None
        self.exit_code = 0
        self.slots_changed = True
        # a signal handler only sets `stopping`; this pipe (signal.set_wakeup_fd) wakes the loop
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    # ------------------------------------------------------------ sockets
    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"w-{uuid.uuid4().hex}".encode())
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if self.address.startswith("tcp://[") or "::" in self.address:
            self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.connect(self.address)
        self.registered = False
        self.slots_changed = True
        self.open_credits = 0
        self.last_heard = time.monotonic()
        self._send(P.Register(self.name, self.host, os.getpid(), self.nslots, slurm_job_id=self.slurm_job_id))

    def _send(self, msg: object) -> None:
        P.send_frames(self.sock, P.encode(msg, self.key))
        self.last_sent = time.monotonic()

    # ------------------------------------------------------------ slots
    def _spawn_slot(self, index: int) -> Slot:
        return Slot(self.slot_ctx, index, self.name)

    def _replace_slot(self, slot: Slot, graceful: bool = False, cancelled: frozenset = frozenset(),
                      why: str = "its predecessor did not succeed") -> None:
        """A slot must go (its task timed out, was cancelled, or it died): put its not-yet-started tasks
        back and start a fresh slot at once. `graceful`: SIGTERM now, SIGKILL after the grace period
        (in `_reap_dying`, so the loop and its heartbeats never wait); otherwise SIGKILL now.

        The running task does not succeed, so a conditional follower right behind it (or behind one
        that will not run here: cancelled) goes back to its pipeline; one behind a task that goes back
        to the queue is held for that task again."""
        requeue = []
        prev_jid, prev_fails = (slot.assigned[0][0] if slot.assigned else 0), True
        for item in list(slot.assigned)[1:]:
            jid = item[0]
            if jid in cancelled or jid in slot.ignored:
                prev_jid, prev_fails = jid, True
            elif jid in slot.conditional:
                if prev_fails:
                    self._give_back(jid, why)
                else:
                    self.held.setdefault(prev_jid, []).append(item)
                prev_jid = jid
            else:
                requeue.append(item)
                prev_jid, prev_fails = jid, False
        self.queue.extendleft(reversed(requeue))
        slot.assigned.clear()
        slot.conditional.clear()
        if graceful:
            slot.signal(signal.SIGTERM)
            self.dying.append((slot, time.monotonic() + self.kill_grace))
        else:
            slot.kill()
        self.slots[slot.index] = self._spawn_slot(slot.index)
        self.slots_changed = True

    def _reap_dying(self) -> None:
        self.dying = [(slot, deadline) for slot, deadline in self.dying if not slot.finish_stop(deadline)]

    def _capacity(self) -> int:
        """Tasks this worker wants to hold: its slots, plus a prefetch that only short tasks get."""
        d = self.avg_duration
        prefetch = 0 if d > 0.2 else 1 if d > 0.01 else 8 if d > 0.001 else 64
        return self.nslots * (1 + prefetch)

    def _held(self) -> int:
        return len(self.queue) + sum(len(s.assigned) for s in self.slots)

    def _fill_slots(self) -> None:
        """Hand queued tasks to slots in batches: one task at a time for long tasks, up to 16 ahead
        for short ones. A slot that is busy gets no new function (a big pickle must not wait on it).
        Then each slot takes the followers held for its last task."""
        if self.queue:
            self._fill_from_queue()
        if self.held:
            for slot in list(self.slots):
                self._chain_into(slot)

    def _chain_into(self, slot: Slot) -> None:
        """Hand the slot the follower held for its last task, as a conditional task, and so on along
        the chain (at most CHAIN_IN_SLOT): each then starts in the slot right after its predecessor."""
        held = self.held
        while slot.assigned and len(slot.conditional) < CHAIN_IN_SLOT and not slot.closed:
            tail = slot.assigned[-1][0]
            followers = held.get(tail)
            if not followers or tail in slot.ignored:
                return
            jid, spec = followers[0]
            if spec.func_digest not in slot.functions or not self._may_chain(spec):
                return      # it waits for its predecessor's success, then goes the usual way
            del followers[0]
            if not followers:
                del held[tail]
            try:
                slot.give([(jid, spec)], self.functions, conditional=True)
            except OSError:
                self._slot_died(slot)
                return
            if slot.outbuf:
                self.slots_changed = True

    def _may_chain(self, spec: TaskSpec) -> bool:
        """Whether a follower may go into a slot ahead of its predecessor's end (a Slurm pilot near its
        walltime says no to one it could not finish)."""
        return True

    def _fill_from_queue(self) -> None:
        """Queued tasks to the least loaded slots, as deep as the tasks are short."""
        d = self.avg_duration
        depth = 1 if d > 0.01 else 4 if d > 0.001 else 16
        for slot in sorted(self.slots, key=lambda s: len(s.assigned)):
            room = depth - len(slot.assigned)
            if room <= 0 or not self.queue:
                continue
            batch = []
            while self.queue and len(batch) < room:
                if slot.assigned and self.queue[0][1].func_digest not in slot.functions:
                    break
                batch.append(self.queue.popleft())
            if not batch:
                continue
            if not slot.assigned:
                self._note_start(batch[0][0], time.time())
            try:
                slot.give(batch, self.functions)
            except OSError:
                self._slot_died(slot)
            if slot.outbuf:
                self.slots_changed = True    # poll it for writability

    # ------------------------------------------------------------ messages from the dispatcher
    def _on_message(self, msg: object) -> None:
        if isinstance(msg, P.RunTasks):
            self.functions.update(msg.functions)
            self.active.update(jid for jid, _ in msg.tasks)
            if msg.after:
                self._take_with_followers(msg.tasks, dict(msg.after))
            else:
                self.queue.extend(msg.tasks)
            self.open_credits = max(0, self.open_credits - (len(msg.tasks) - len(msg.after)))
            self.last_busy = time.monotonic()
        elif isinstance(msg, P.CancelJobs):
            self._cancel(set(msg.jids))
        elif isinstance(msg, P.Welcome):
            self.registered = True
            self.silent_since = None
            self.heartbeat, self.liveness = msg.heartbeat_interval, msg.liveness
            log.info("registered with %s (%d slots)", self.address, self.nslots)
        elif isinstance(msg, P.Refused):
            log.error("refused by the dispatcher at %s: %s", self.address, msg.reason)
            self.stopping, self.exit_code = f"refused by the dispatcher at {self.address}: {msg.reason}", 3
        elif isinstance(msg, P.Shutdown):
            if self._may_reconnect():     # a pool restarting: wait for it at the same address
                log.warning("dispatcher at %s shut down (%s): waiting to register again", self.address, msg.reason)
                self.silent_since = time.monotonic()
                self._drop_all_tasks()
                self._connect()
            else:
                self.stopping = msg.reason or "dispatcher asked to shut down"
                self.dispatcher_gone = True     # no Goodbye: nobody would read it
        elif isinstance(msg, P.Reregister):
            log.warning("dispatcher asked to register again: %s", msg.reason)
            if self.done:     # results of jobs it gave up on: it counts and drops them
                self._send(P.WorkerReport((), tuple(self.done)))
            self._drop_all_tasks()
            self._connect()

    # ------------------------------------------------------------ followers
    def _take_with_followers(self, tasks: Tuple[Tuple[int, TaskSpec], ...], after: Dict[int, int]) -> None:
        """Queue the tasks; hold each follower until its predecessor succeeds (or hand it back)."""
        for item in tasks:
            pred = after.get(item[0])
            if pred is None:
                self.queue.append(item)
            elif pred in self.active:
                self.held.setdefault(pred, []).append(item)
            elif self.outcomes.get(pred):
                self.queue.append(item)       # the predecessor succeeded before its follower arrived
            else:
                self._give_back(item[0], "its predecessor failed here" if pred in self.outcomes
                                else "its predecessor is not on this worker")

    def _ended(self, jid: int, ok: bool) -> None:
        """Job `jid` is over here: release its followers to the front of the queue, or hand them back."""
        self.active.discard(jid)
        outcomes = self.outcomes
        outcomes[jid] = ok
        if len(outcomes) > OUTCOMES_KEPT:
            outcomes.popitem(last=False)     # not a dict: deleting its first key again and again is O(n)
        if self.held:
            followers = self.held.pop(jid, None)
            if followers:
                if ok:
                    self.queue.extendleft(reversed(followers))
                else:
                    for fjid, _ in followers:
                        self._give_back(fjid, "its predecessor did not succeed")

    def _give_back(self, jid: int, reason: str) -> None:
        self.returned.append((jid, reason))
        self._ended(jid, False)       # and whatever waits for it

    def _cancel(self, jids: set) -> None:
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
                    self._give_back(fjid, "its predecessor was cancelled")
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

    def _drop_all_tasks(self) -> None:
        """The dispatcher forgot us (lost or restarted): its jobs were given back to their pipelines,
        so stop running them (SIGTERM, then SIGKILL after the grace period)."""
        self.queue.clear()
        for slot in list(self.slots):
            if slot.assigned:
                slot.assigned.clear()
                self._replace_slot(slot, graceful=True)
        self.started.clear()
        self.first_unreported_start = None
        self.done.clear()
        self.active.clear()
        self.held.clear()
        self.returned.clear()

    # ------------------------------------------------------------ results from slots
    def _on_slot_readable(self, slot: Slot) -> None:
        try:
            results = slot.receive()
        except (EOFError, OSError):
            self._slot_died(slot)
            return
        if not results:
            return
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
                    self._give_back(jid, "its predecessor did not succeed")
                continue
            slot.last_ok = ok = result.error is None
            if jid in slot.ignored:
                slot.ignored.discard(jid)
            else:
                self.done.append((jid, result))
                self._ended(jid, ok)
            self.samples += 1
            alpha = max(0.2, 1.0 / self.samples)      # the first results count fully: adapt at once
            self.avg_duration += alpha * ((result.ended - result.started) - self.avg_duration)
        now = time.time()
        slot.head_started = now
        if slot.assigned:
            head = slot.assigned[0][0]
            if slot.last_ok or head not in slot.conditional:    # not one the slot is about to skip
                self._note_start(head, now)

    def _on_slot_writable(self, slot: Slot) -> None:
        try:
            slot.write_pending()
        except OSError:
            self._slot_died(slot)
            return
        if not slot.outbuf:
            self.slots_changed = True    # stop polling it for writability

    def _slot_died(self, slot: Slot) -> None:
        slot.process.join(1)
        code = slot.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if slot.assigned:
            jid, spec = slot.assigned[0]
            msg = f"the task's process ended abruptly ({how}) on worker {self.name}"
            self.done.append((jid, TaskResult(spec.key, spec.attempt, slot.head_started, time.time(), "", "",
                                              {"kind": "WorkerCrash", "type": "ProcessDied", "message": msg,
                                               "traceback": "", "summary": msg}, None, self.name)))
            self._ended(jid, False)
        log.warning("slot %d died (%s)", slot.index, how)
        self._replace_slot(slot, why=f"its predecessor's process ended abruptly ({how})")

    def _check_timeouts(self) -> None:
        now = time.time()
        for slot in list(self.slots):
            deadline = slot.deadline()
            if deadline is not None and now >= deadline:
                jid, spec = slot.assigned[0]
                msg = f"timed out after {spec.timeout:g} s"
                self.done.append((jid, TaskResult(spec.key, spec.attempt, slot.head_started, now, "", "",
                                                  {"kind": "TimeoutError", "type": "TimeoutError",
                                                   "message": f"Task {spec.name}: {msg}", "traceback": "",
                                                   "summary": msg}, None, self.name)))
                self._ended(jid, False)
                self._replace_slot(slot, why="its predecessor timed out")

    # ------------------------------------------------------------ outgoing
    def _note_start(self, jid: int, when: float) -> None:
        if not self.started:
            self.first_unreported_start = time.monotonic()
        self.started.append((jid, when))

    def _flush(self) -> None:
        """At most one report per loop turn: starts, results and new credits together. Credits are
        granted in chunks (a quarter of the capacity, or whatever brings an idle worker work) so that
        short tasks travel in batches. A start waits up to START_REPORT_DELAY for its result, so that a
        short task costs one message to the dispatcher and one wake-up of the pipeline, not two; a
        start whose result goes in the same report is not sent at all."""
        if not self.registered:
            return
        want = 0
        if self.stopping is None:
            capacity, held = self._capacity(), self._held()
            want = capacity - held - self.open_credits
            if want < max(1, capacity // 4) and (held or self.open_credits):
                want = 0
        starts_due = bool(self.started) and \
            time.monotonic() - self.first_unreported_start >= START_REPORT_DELAY
        if not (self.done or want > 0 or starts_due or self.returned):
            return
        started = self.started
        if started and self.done:
            finished = {jid for jid, _ in self.done}
            started = [item for item in started if item[0] not in finished]
        self._send(P.WorkerReport(tuple(started), tuple(self.done), max(0, want), tuple(self.returned)))
        if want > 0:
            self.open_credits += want
        self.started, self.done, self.returned = [], [], []
        self.first_unreported_start = None

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        wake = min(self.last_sent + self.heartbeat, self.last_heard + self.heartbeat * self.liveness)
        deadlines = [d for d in (s.deadline() for s in self.slots) if d is not None]
        if deadlines:
            wake = min(wake, now + (min(deadlines) - time.time()))
        if self.dying:
            wake = min(wake, now + 0.1, min(d for _, d in self.dying))   # reap promptly, SIGKILL on time
        if self.started:
            wake = min(wake, self.first_unreported_start + START_REPORT_DELAY)
        return max(0.0, wake - now)

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        """Serve until told to stop, the dispatcher is gone, or idle too long. Returns the exit code."""
        poller, by_fd = zmq.Poller(), {}
        try:
            # inside the try: a SIGTERM while still starting (the run it was for ended already)
            # must stop the worker as quietly as one that arrives later
            self.slots = [self._spawn_slot(i) for i in range(self.nslots)]
            self._connect()
            while self.stopping is None:
                if self.slots_changed:
                    poller, by_fd = zmq.Poller(), {}
                    poller.register(self.wake_r, _POLLIN)
                    poller.register(self.sock, _POLLIN)
                    for slot in self.slots:
                        poller.register(slot.fileno(), _POLLIN | (_POLLOUT if slot.outbuf else 0))
                        by_fd[slot.fileno()] = slot
                    self.slots_changed = False
                wait = self._next_wakeup()
                before = time.monotonic()
                events = dict(poller.poll(wait * 1000))
                self._check_suspended(time.monotonic() - before - wait)
                # slots first: a result that is ready is taken before a message (a Reregister after a
                # suspension) can drop it, so the dispatcher sees it, late, and ignores it knowingly
                for fd, slot in list(by_fd.items()):
                    ev = events.get(fd, 0)
                    if ev and self.slots[slot.index] is slot:
                        if ev & _POLLOUT:
                            self._on_slot_writable(slot)
                        if ev & (_POLLIN | _POLLERR) and self.slots[slot.index] is slot:
                            self._on_slot_readable(slot)
                if self.wake_r in events:
                    drain_pipe(self.wake_r)
                if self.sock in events:
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
        while self.sock.getsockopt(_EVENTS) & _POLLIN:     # cheaper than a zmq.Again raised
            frames = P.recv_frames(self.sock)
            self.last_heard = time.monotonic()
            try:
                msg = P.decode(frames, self.key, accept_refusal=True)
            except P.ProtocolError as e:
                log.error("dropped a message from the dispatcher: %s", e)
                if e.kind in ("signature", "version"):
                    self.stopping, self.exit_code = f"cannot talk to the dispatcher at {self.address}: {e}", 3
                continue
            sock = self.sock
            self._on_message(msg)
            if self.sock is not sock or self.stopping is not None:
                return       # re-registered: what the old socket still holds is for the old identity

    def _check_suspended(self, overslept: float) -> None:
        """A poll that returned far later than asked means this process was stopped (SIGSTOP, a frozen VM)
        or starved, not that the dispatcher went silent: give it a fresh window to answer. If it
        declared us lost meanwhile, it says so (Reregister) on our next message (a heartbeat is due)."""
        if overslept > self.heartbeat * self.liveness:
            log.warning("this worker was suspended for %.1f s; checking back with the dispatcher", overslept)
            self.last_heard = time.monotonic()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.dying:
            self._reap_dying()
        if now - self.last_heard > self.heartbeat * self.liveness:
            self._dispatcher_silent(now)
            return
        if self.registered and now - self.last_sent >= self.heartbeat:
            self._send(P.Heartbeat())
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.stopping = "the process that started this worker is gone"
        if self._held():
            self.last_busy = now
        elif self.idle_timeout is not None and now - self.last_busy > self.idle_timeout:
            self.stopping = f"idle for {self.idle_timeout:g} s"

    def _dispatcher_silent(self, now: float) -> None:
        """No word from the dispatcher for `liveness` intervals: it died, or the network is gone. Its
        view of our tasks is lost with it, so stop them; then exit, or (with --reconnect) open a fresh
        connection and re-register whenever a dispatcher answers at the same address, giving up after
        `reconnect` seconds."""
        silent = now - self.last_heard
        if self.silent_since is None:
            self.silent_since = self.last_heard
        waited = now - self.silent_since
        if self._may_reconnect(waited):
            log.warning("dispatcher at %s silent for %.1f s: stopping this worker's tasks and registering again",
                        self.address, silent)
            self._drop_all_tasks()
            self._connect()
            return
        self.stopping = f"the dispatcher at {self.address} is gone (silent for {waited:.1f} s)"
        self.exit_code = 2

    def _may_reconnect(self, waited: float = 0.0) -> bool:
        return self.reconnect is not None and self.reconnect > 0 and waited < self.reconnect

    def _shutdown(self) -> None:
        log.info("worker %s stopping: %s", self.name, self.stopping)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut the clean-up short
        stop_slots(list(self.slots) + [slot for slot, _ in self.dying], grace=self.kill_grace)
        self.dying = []
        if self.sock is not None:
            linger = 0
            try:
                if self.registered and not self.dispatcher_gone:
                    self._send(P.Goodbye(self.stopping or ""))
                    linger = 500
            except zmq.ZMQError:
                pass
            self.sock.close(linger=linger)


def install_stop_signals(worker: Worker) -> None:
    """SIGTERM and SIGINT stop the worker cleanly. The handler only sets a flag and wakes the loop
    through a pipe: raising from a handler could hit the worker anywhere (in logging's locks, while
    forking a slot) and leave it half stopped."""
    def handler(signum, frame) -> None:
        worker.request_stop(f"stopped by {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.set_wakeup_fd(worker.wake_w, warn_on_full_buffer=False)


def read_key(key_file: Optional[str]) -> bytes:
    """The shared key: from --key-file (must be private to its owner) or $DEPIO_KEY."""
    key = P.load_key(key_file)
    if key is None:
        raise P.KeyRequiredError(f"no key: pass --key-file FILE or set ${P.KEY_ENV} (a local pipeline hands its "
                                 f"workers a key itself; for a pool or a remote pipeline, {P.MAKE_KEY_HINT})")
    return key


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="depio-worker",
        description="Run depio tasks for a pipeline or a pool: connects out to its dispatcher.",
        epilog="example: DEPIO_KEY=$(cat ~/.depio/pools/default.key) "
               "depio-worker --connect tcp://10.0.0.5:5555 --slots 8")
    p.add_argument("--connect", required=True, metavar="ADDR",
                   help="the dispatcher's address, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="tasks run at once [%(default)s]")
    p.add_argument("--key-file", help="file with the hex key (mode 600); default: $DEPIO_KEY")
    p.add_argument("--name", help="how this worker is shown [host:pid]")
    p.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT, help="seconds [%(default)s]")
    p.add_argument("--liveness", type=int, default=DEFAULT_LIVENESS,
                   help="heartbeats missed before the dispatcher counts as gone [%(default)s]")
    p.add_argument("--idle-timeout", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument("--reconnect", type=float, default=None, metavar="SECONDS",
                   help="when the dispatcher goes away (dies, or shuts down), keep trying to re-register "
                        "with one at the same address for up to SECONDS instead of exiting")
    p.add_argument("--kill-grace", type=float, default=DEFAULT_KILL_GRACE, metavar="SECONDS",
                   help="a cancelled task gets SIGTERM, then SIGKILL after this long [%(default)s]")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="WARNING", help="logging level [%(default)s]")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="depio-worker %(levelname)s %(message)s")
    try:
        key = read_key(args.key_file)
    except (OSError, ValueError) as e:
        print(f"depio-worker: {e}", file=sys.stderr)
        return 2
    os.environ.pop(P.KEY_ENV, None)      # not inherited by the tasks' processes
    stopped_early: List[str] = []
    signal.signal(signal.SIGTERM, lambda s, f: stopped_early.append("SIGTERM"))   # until the worker exists
    worker = Worker(args.connect, key, slots=args.slots, name=args.name, heartbeat=args.heartbeat,
                    liveness=args.liveness, idle_timeout=args.idle_timeout, parent_pid=args.parent_pid,
                    reconnect=args.reconnect, slurm_job_id=os.environ.get("SLURM_JOB_ID", ""),
                    kill_grace=args.kill_grace)
    install_stop_signals(worker)
    if stopped_early:                 # the run it was started for ended already
        return 0
    code = worker.run()
    if code:
        print(f"depio-worker: {worker.stopping}", file=sys.stderr, flush=True)
    exit_now(worker, code)
    return code   # not reached


def exit_now(worker: Worker, code: int) -> None:
    """End the process without the interpreter's teardown. Everything of the worker's is settled by
    now (slots reaped, the Goodbye delivered or its linger spent, logs flushed below), and no user
    code runs in this process; module and object finalisation would only add 20 to 30 ms to the end
    of every run, which waits for its workers to exit."""
    try:
        worker.ctx.term()          # returns once the sockets' linger has sent or dropped what was queued
    except zmq.ZMQError:
        pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
