"""The dispatcher: hands ready tasks of its clients (pipelines) to workers over ZeroMQ.

In a `depio pool` it runs in a thread of its own; in a pipeline's process the scheduler actor's
thread runs its loop (`turn()`) while the actor waits for messages (see `depio.runtime.inbox`). It
never unpickles a task's payload; it only routes `TaskSpec`s to workers that asked for work
(credits) and results back to the client that sent the task. Its parts, one concern each:

- `depio.runtime.wire`: the ROUTER sockets (workers connect to one and, in a pool, clients to the
  other), signed messages, bad messages and refusals. A pipeline's own dispatcher has one client,
  in its process, which talks to it through a deque and a wake-up pipe (`LocalClient`).
- `depio.runtime.liveness`: one `Liveness` per worker and per remote client (Paranoid Pirate). A
  lost worker's tasks go back to their client as `TaskLost` (its scheduler decides about a retry).
- `depio.runtime.assignment`: queues, fair share, credits, followers and the in-flight jobs.
- `depio.runtime.clients`: the client side (`ClientDesk`): hello, submit and cancel, admin requests,
  reports, heartbeats and goodbyes. The worker side is here, next to the loop that feeds it work.
- `depio.runtime.guards`: a peer's message that cannot be taken (`refuse`); a pool left without
  workers (`NoWorkerWatch`).

A message a peer sends that cannot be taken (signed, but malformed: a `Submit` naming a function
never sent) is that peer's error: it is refused and dropped, everyone else is served on. A bug in
the loop stops the dispatcher: the clients hear why (`Shutdown`), and `failure` keeps the exception
with its traceback (`LoopFailure`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from typing import Callable, Deque, Dict, Optional, Sequence, Tuple

import zmq

from . import limits
from . import protocol as P
from .assignment import Assignment, ClientInfo, Job, WorkerInfo, WorkerRegistry
from .fairshare import fail_jobs
from .clients import ClientDesk
from .guards import NoWorkerWatch, check_int, refuse
from .inbox import DrivenLoop, LoopFailure, drain_pipe
from .liveness import Liveness
from .local_client import AttachLocal, LocalClient, StopLoop
from .resources import Offer
from .wire import Wire

__all__ = ["Dispatcher", "LocalClient", "LoopFailure", "WorkerInfo", "ClientInfo", "Job", "WorkerRegistry"]

log = logging.getLogger("depio.dispatcher")


class Dispatcher(DrivenLoop):
    """See the module docstring. `start()` binds and runs the loop in a thread; `stop()` ends it."""

    def __init__(self, key: bytes, worker_address: str = "tcp://127.0.0.1:*",
                 client_address: Optional[str] = None, heartbeat: float = 1.0, liveness: int = 3,
                 context: Optional[zmq.Context] = None, name: str = "dispatcher", remote_clients: bool = True,
                 worker_socket: Optional[zmq.Socket] = None):
        super().__init__()
        self.key = key
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.ctx = context or zmq.Context.instance()
        self.name = name
        self.assignment = Assignment()
        self.workers: WorkerRegistry = self.assignment.workers
        self.clients: Dict[bytes, ClientInfo] = self.assignment.clients
        self.jobs: Dict[int, Job] = self.assignment.jobs
        self.wire = Wire(key)
        self.bad_messages = self.wire.bad_messages
        self.refusals = self.wire.refusals
        self.workers_lost = 0
        self._worker_address_requested = worker_address
        self._worker_socket = worker_socket      # bound by the caller (`wire.bind_router`), who started workers on it
        # `remote_clients=False` (a pipeline's own dispatcher: its one client is in this process): no
        # client socket at all, one socket less to look at on every turn of the loop
        self.remote_clients = remote_clients
        self.client_address = (client_address or f"inproc://depio-clients-{uuid.uuid4().hex}") if remote_clients else ""
        self.worker_address = ""
        self._stop_reason: Optional[str] = None
        self._next_liveness_check = 0.0
        self._ready = threading.Event()     # bound: the addresses are known
        self._wake_r = self._wake_w = -1
        self._own_pipe = True
        self.on_workers_changed: Optional[Callable[[], None]] = None   # a pool's Slurm pilots follow it
        self.client_desk = ClientDesk(self.wire, self.assignment, self._send_workers, self.snapshot, heartbeat, liveness)
        self.no_workers = NoWorkerWatch()
        self._local_inbox: Deque[Tuple[bytes, object]] = deque()
        self._told_to_reregister: Dict[bytes, None] = {}     # lost workers' identities (insertion order)

    @property
    def tasks_done(self) -> int:
        return self.assignment.tasks_done

    @property
    def late_results(self) -> int:
        """Results of attempts given up on (worker declared lost, job cancelled)."""
        return self.assignment.late_results

    # ------------------------------------------------------------ a pool's hooks (`depio.pool.service`)
    @property
    def on_stop_request(self) -> Optional[Callable[[str], None]]:
        """Called with the reason when an admin asks to stop (None: refused, a pipeline's own)."""
        return self.client_desk.on_stop_request

    @on_stop_request.setter
    def on_stop_request(self, hook: Optional[Callable[[str], None]]) -> None:
        self.client_desk.on_stop_request = hook

    @property
    def no_worker_limit(self) -> Optional[float]:
        """How long clients with queued tasks wait while no worker is registered or coming (None: for ever)."""
        return self.no_workers.limit

    @no_worker_limit.setter
    def no_worker_limit(self, seconds: Optional[float]) -> None:
        self.no_workers.limit = seconds

    @property
    def workers_coming(self) -> Callable[[], str]:
        """Says which workers are on their way (starting, pilots queued), "" for none."""
        return self.no_workers.workers_coming

    @workers_coming.setter
    def workers_coming(self, which: Callable[[], str]) -> None:
        self.no_workers.workers_coming = which

    # ------------------------------------------------------------ life cycle
    def start(self, threaded: bool = True, wake_pipe: Optional[Tuple[int, int]] = None) -> "Dispatcher":
        """Bind, and run the loop in a thread of its own; or, `threaded=False`, let the caller's thread
        drive it with `turn()` (the scheduler actor's inbox does, see `depio.runtime.inbox`). `wake_pipe`: a
        pipe (read end, write end) to share with that caller, whose poll it then wakes too."""
        self._own_pipe = wake_pipe is None
        self._wake_r, self._wake_w = os.pipe() if wake_pipe is None else wake_pipe
        os.set_blocking(self._wake_r, False)
        self._poller = self.wire.bind(self.ctx, self._worker_address_requested,
                                      self.client_address if self.remote_clients else None, self._wake_r,
                                      self._worker_socket)
        self._wsock, self._csock = self.wire.workers, self.wire.clients
        self.client_desk.sock = self._csock
        self.worker_address = self.wire.worker_address
        self.client_address = self.wire.client_address
        if threaded:
            self._thread = threading.Thread(target=self._run, name=f"depio-{self.name}", daemon=True)
            self._thread.start()
        self._ready.set()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, reason: str = "dispatcher stopping", timeout: float = 5.0) -> None:
        """Tell workers and remote clients, close the sockets. Safe from any thread; a loop driven by
        another thread that has ended meanwhile is closed here."""
        if self.worker_address == "" or self._stopped.is_set():
            return
        self._post(b"", StopLoop(reason))
        self._await_stop(timeout, lambda: self._close(reason))
        if self._own_pipe:
            try:
                os.close(self._wake_w)
            except OSError:
                pass

    def attach_local(self, name: str, deliver: Callable[[object], None]) -> LocalClient:
        """Register a pipeline of this process as a client (before or after `start`)."""
        identity = f"local-{uuid.uuid4().hex}".encode()
        self._post(identity, AttachLocal(name, deliver))
        return LocalClient(self._post, identity)

    def _post(self, identity: bytes, msg: object) -> None:
        """A message from this process; wakes the poll, unless from the loop's own thread (it looks first)."""
        self._local_inbox.append((identity, msg))
        if threading.get_ident() == self._driver_id:
            return
        try:
            os.write(self._wake_w, b"!")
        except OSError:      # stopped: nothing will read it
            pass

    # ------------------------------------------------------------ the loop
    def _turn(self, block: bool) -> bool:
        """One turn: wait for messages (at most half a heartbeat; not at all when `block` is false or
        local messages are queued), handle them, assign work, check liveness, send the reports."""
        try:
            wait = self.heartbeat * 500 if block and not self._local_inbox else 0
            events = dict(self._poller.poll(wait))
            if self._wsock in events:
                self.wire.drain(self._wsock, "worker", self._on_worker_message, self._worker_error)
            if self._csock is not None and self._csock in events:
                self.wire.drain(self._csock, "client", self.client_desk.on_message, self.client_desk.on_error)
            if self._wake_r in events:
                drain_pipe(self._wake_r)
            if self._local_inbox:
                self._drain_local()
            if self._stop_reason is not None:
                self._close(self._stop_reason)
                return False
            self._send_workers(self.assignment.assign())
            self._check_liveness()
            self.client_desk.send_reports(self.assignment.take_reports())
            return True
        except Exception as e:   # a bug: stop, and let the clients (and whoever reads `failure`) know
            log.exception("dispatcher failed")
            self._record_failure(e)
            self._close(f"dispatcher failed: {e!r}")
            return False

    def _close(self, reason: str) -> None:
        """The end: workers and remote clients hear why, the sockets close."""
        if self._stopped.is_set():
            return
        try:
            for w in self.workers:
                self._send_worker(w, P.Shutdown(reason))
            self.client_desk.broadcast(P.Shutdown(reason))
        finally:
            self.wire.close()
            if self._own_pipe:
                os.close(self._wake_r)
            self._stopped.set()

    def _drain_local(self) -> None:
        desk = self.client_desk
        while self._local_inbox:
            identity, msg = self._local_inbox.popleft()
            if isinstance(msg, StopLoop):
                self._stop_reason = msg.reason
                return
            if isinstance(msg, AttachLocal):
                desk.attach_local(identity, msg.name, msg.deliver)
            elif identity in self.clients:
                desk.on_message(identity, msg)

    # ------------------------------------------------------------ sending
    def _send_worker(self, w: WorkerInfo, msg: object) -> None:
        if self.wire.send(self._wsock, w.identity, msg, lambda e: self._too_big(w, e)):
            w.peer.sent(time.monotonic())

    def _too_big(self, w: WorkerInfo, e: limits.MessageTooBig) -> None:
        """A part of a message to `w` that alone does not fit: its tasks fail, saying so."""
        if isinstance(e.msg, P.RunTasks):
            w.credits += len(e.msg.tasks) - len(e.msg.after)
            fail_jobs(self.assignment, w, [jid for jid, _ in e.msg.tasks],
                      lambda spec: limits.task_too_big(spec.name, e.size, e.limit))
        else:
            log.error("not sent to worker %s: %s", w.name, e)

    def _send_workers(self, messages: Sequence[Tuple[WorkerInfo, object]]) -> None:
        for w, msg in messages:
            self._send_worker(w, msg)

    # ------------------------------------------------------------ workers
    def _on_worker_message(self, identity: bytes, msg: object) -> None:
        w = self.workers.get(identity)
        if isinstance(msg, P.Register):
            self._register(identity, msg)
            return
        if w is None:
            if isinstance(msg, P.WorkerReport) and msg.done:
                self.assignment.late_results += len(msg.done)
                log.info("ignored %d late result(s) from unknown worker %s", len(msg.done), identity.hex()[:16])
            # its session stays until it says goodbye (bounded, as every session is): what it sent before
            # it read our Reregister (a heartbeat queued while it was stopped, then results) is still its own
            if isinstance(msg, P.Goodbye):
                self.wire.sessions.forget(identity)
            elif identity not in self._told_to_reregister:
                if len(self._told_to_reregister) >= 10000:
                    del self._told_to_reregister[next(iter(self._told_to_reregister))]
                self._told_to_reregister[identity] = None
                self.wire.send(self._wsock, identity, P.Reregister(
                    "this dispatcher does not know the worker (restarted, or it was declared lost)"))
            return
        w.peer.heard(time.monotonic())
        if isinstance(msg, P.WorkerReport):
            check_int(msg.credits, "credits")
            self.assignment.on_report(w, msg)
        elif isinstance(msg, P.RequestWork):
            check_int(msg.credits, "credits")
            w.credits += msg.credits
        elif isinstance(msg, P.Goodbye):
            self._lose_worker(w, f"worker {w.name} (host {w.host}, pid {w.pid}) left: {msg.reason}")
        # Heartbeat: being heard is all it does

    def _worker_error(self, identity: bytes, msg: object, err: Exception) -> None:
        """A worker's signed message that cannot be taken: it is refused, and lost."""
        reason = refuse(self.wire, self._wsock, identity, msg, err)
        w = self.workers.get(identity)
        if w is not None:
            self._lose_worker(w, f"worker {w.name} (host {w.host}, pid {w.pid}) {reason}")

    def _register(self, identity: bytes, msg: P.Register) -> None:
        if not self.wire.admit(self._wsock, identity, msg.runtime,
                               f"worker {msg.worker_id} (host {msg.host}, pid {msg.pid})"):
            return
        if identity in self.workers.by_identity:
            return
        check_int(msg.slots, "slots")
        w = WorkerInfo(identity, msg.worker_id, msg.host, msg.pid, msg.slots, msg.slurm_job_id,
                       peer=Liveness(self.heartbeat, self.liveness), offer=Offer.from_dict(msg.offer))
        self.workers.add(w)
        self._send_worker(w, P.Welcome(self.heartbeat, self.liveness, self.wire.max_message))
        log.info("worker %s registered (%d slots)", w.name, w.slots)
        self._broadcast_workers(f"worker {w.name} joined")

    def _lose_worker(self, w: WorkerInfo, reason: str) -> None:
        """Forget the worker; its jobs go back to their clients as lost. Should the worker come back
        (it was only stopped or cut off), it is told to re-register and its late results are dropped
        here, and by attempt id in the scheduler."""
        (log.warning if w.jobs else log.info)(reason)    # leaving with nothing in hand (a job done, idle) is no news
        self.assignment.lose_worker(w, reason)
        self.workers_lost += 1
        self._broadcast_workers(reason)

    def _broadcast_workers(self, reason: str) -> None:
        if self.on_workers_changed is not None:
            try:
                self.on_workers_changed()
            except Exception:
                log.exception("a worker-change hook failed")
        self.client_desk.broadcast(P.WorkersChanged(len(self.workers), self.workers.slots, reason))

    # ------------------------------------------------------------ liveness
    def _check_liveness(self) -> None:
        """At most a few times per heartbeat interval, not on every turn of a busy loop."""
        now = time.monotonic()
        if now < self._next_liveness_check:
            return
        self._next_liveness_check = now + self.heartbeat / 4
        starved = self.no_workers.overdue(now, len(self.workers), self.worker_address)
        if starved is not None:
            self.client_desk.let_go_waiting(starved)
        for w in self.workers:
            if w.peer.expired(now):
                self._lose_worker(w, f"worker {w.name} (host {w.host}, pid {w.pid}) lost: no heartbeat for "
                                     f"{w.peer.silence(now):.1f} s (at {time.strftime('%H:%M:%S')})")
            elif w.peer.heartbeat_due(now):
                self._send_worker(w, P.Heartbeat())
        self.client_desk.check_liveness(now)

    # ------------------------------------------------------------ status
    def snapshot(self) -> Dict[str, object]:
        """A point-in-time view for `depio pool status` (read without locks: approximate)."""
        return {**self.assignment.status(), "bad_messages": dict(self.bad_messages),
                "workers_lost": self.workers_lost, "late_results": self.late_results,
                "refusals": list(self.refusals)}

