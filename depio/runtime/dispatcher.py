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

A message a peer sends that cannot be taken (signed, but malformed: a `Submit` naming a function
never sent) is that peer's error: it is refused and dropped, everyone else is served on. A bug in
the loop stops the dispatcher: the clients hear why (`Shutdown`), and `failure` keeps the exception
with its traceback (`LoopFailure`).
"""
from __future__ import annotations

import logging
import os
import platform
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
from .guards import PeerGuards, check_int
from .inbox import DrivenLoop, LoopFailure, drain_pipe
from .liveness import Liveness
from .local_client import AttachLocal, LocalClient, StopLoop
from .resources import Offer
from .wire import Wire

__all__ = ["Dispatcher", "LocalClient", "LoopFailure", "WorkerInfo", "ClientInfo", "Job", "WorkerRegistry"]

log = logging.getLogger("depio.dispatcher")


class Dispatcher(PeerGuards, DrivenLoop):
    """See the module docstring. `start()` binds and runs the loop in a thread; `stop()` ends it."""

    def __init__(self, key: bytes, worker_address: str = "tcp://127.0.0.1:*",
                 client_address: Optional[str] = None, heartbeat: float = 1.0, liveness: int = 3,
                 context: Optional[zmq.Context] = None, name: str = "dispatcher", remote_clients: bool = True):
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
        self.on_stop_request: Optional[Callable[[str], None]] = None   # a pool lets admins stop it
        self.on_workers_changed: Optional[Callable[[], None]] = None   # a pool's Slurm pilots follow it
        # a pool: how long clients with queued tasks wait while no worker is registered and none is on
        # its way (`workers_coming()` says which are, "" for none) before they are told and let go
        self.no_worker_limit: Optional[float] = None
        self.workers_coming: Callable[[], str] = lambda: ""
        self._starved_since: Optional[float] = None
        self._local_inbox: Deque[Tuple[bytes, object]] = deque()

    @property
    def tasks_done(self) -> int:
        return self.assignment.tasks_done

    @property
    def late_results(self) -> int:
        """Results of attempts given up on (worker declared lost, job cancelled)."""
        return self.assignment.late_results

    # ------------------------------------------------------------ life cycle
    def start(self, threaded: bool = True, wake_pipe: Optional[Tuple[int, int]] = None) -> "Dispatcher":
        """Bind, and run the loop in a thread of its own; or, `threaded=False`, let the caller's thread
        drive it with `turn()` (the scheduler actor's inbox does, see `depio.runtime.inbox`). `wake_pipe`: a
        pipe (read end, write end) to share with that caller, whose poll it then wakes too."""
        self._own_pipe = wake_pipe is None
        self._wake_r, self._wake_w = os.pipe() if wake_pipe is None else wake_pipe
        os.set_blocking(self._wake_r, False)
        self._poller = self.wire.bind(self.ctx, self._worker_address_requested,
                                      self.client_address if self.remote_clients else None, self._wake_r)
        self._wsock, self._csock = self.wire.workers, self.wire.clients
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
                self.wire.drain(self._csock, "client", self._on_client_message, self._client_error)
            if self._wake_r in events:
                drain_pipe(self._wake_r)
            if self._local_inbox:
                self._drain_local()
            if self._stop_reason is not None:
                self._close(self._stop_reason)
                return False
            self._send_workers(self.assignment.assign())
            self._check_liveness()
            for report in self.assignment.take_reports():
                self._send_client(report.client, report.message())
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
            for c in list(self.clients.values()):
                self._send_client(c, P.Shutdown(reason))
        finally:
            self.wire.close()
            if self._own_pipe:
                os.close(self._wake_r)
            self._stopped.set()

    def _drain_local(self) -> None:
        while self._local_inbox:
            identity, msg = self._local_inbox.popleft()
            if isinstance(msg, StopLoop):
                self._stop_reason = msg.reason
                return
            if isinstance(msg, AttachLocal):
                c = self.assignment.add_client(identity, msg.name, platform.node(), os.getpid(), deliver=msg.deliver)
                self._send_client(c, P.WorkersChanged(len(self.workers), self.workers.slots, "attached"))
            elif identity in self.clients:
                self._on_client_message(identity, msg)

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

    def _send_client(self, c: ClientInfo, msg: object) -> None:
        if c.deliver is not None:
            c.deliver(msg)
        elif self.wire.send(self._csock, c.identity, msg):
            c.peer.sent(time.monotonic())

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
            if not isinstance(msg, P.Goodbye):
                self.wire.send(self._wsock, identity, P.Reregister(
                    "this dispatcher does not know the worker (restarted, or it was declared lost)"))
            self.wire.sessions.forget(identity)     # kept while lost, so that its late results are seen
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
        msg = P.WorkersChanged(len(self.workers), self.workers.slots, reason)
        for c in list(self.clients.values()):
            self._send_client(c, msg)

    # ------------------------------------------------------------ clients
    def _on_client_message(self, identity: bytes, msg: object) -> None:
        c = self.clients.get(identity)
        if isinstance(msg, (P.StatusRequest, P.StopRequest)):
            self._on_admin(identity, msg)
            return
        if isinstance(msg, P.ClientHello):
            self._hello(identity, c, msg)
            return
        if c is None:
            self.wire.send(self._csock, identity, P.Refused("unknown client: say hello first"))
            return
        if c.peer is not None:
            c.peer.heard(time.monotonic())
        if isinstance(msg, P.Submit):
            c.functions.update(msg.functions)
            self.wire.check_submit(msg, c.functions)
            self._send_workers(self.assignment.queue(c, msg.tasks))
        elif isinstance(msg, P.CancelTasks):
            self._send_workers(self.assignment.cancel(c, None if msg.keys is None else set(msg.keys), msg.reason))
        elif isinstance(msg, P.ClientBye):
            self._drop_client(c, f"client {c.name} left: {msg.reason}")

    def _hello(self, identity: bytes, c: Optional[ClientInfo], msg: P.ClientHello) -> None:
        if c is None:
            if not self.wire.admit(self._csock, identity, msg.runtime,
                                   f"pipeline {msg.name} (host {msg.host}, pid {msg.pid})"):
                return
            c = self.assignment.add_client(identity, msg.name, msg.host, msg.pid,
                                           peer=Liveness(self.heartbeat, self.liveness))
            if msg.cwd:
                c.context = (str(msg.cwd), tuple(map(str, msg.path)))
            log.info("client %s (pid %d) connected", c.name, c.pid)
        self._send_client(c, P.ClientWelcome(c.client_id, self.heartbeat, self.liveness, self.wire.max_message))
        self._send_client(c, P.WorkersChanged(len(self.workers), self.workers.slots, "hello"))

    def _on_admin(self, identity: bytes, msg: object) -> None:
        if isinstance(msg, P.StatusRequest):
            reply: object = P.StatusReply(self.snapshot())
        elif self.on_stop_request is None:
            reply = P.Refused("this dispatcher belongs to a pipeline; it stops with its run")
        else:
            self.on_stop_request(msg.reason or "stop requested")
            reply = P.StatusReply(self.snapshot())
        self.wire.send(self._csock, identity, reply)

    def _drop_client(self, c: ClientInfo, reason: str) -> None:
        self._send_workers(self.assignment.drop_client(c, reason))
        if c.peer is not None:
            self.wire.sessions.forget(c.identity)
        log.info(reason)

    # ------------------------------------------------------------ liveness
    def _check_liveness(self) -> None:
        """At most a few times per heartbeat interval, not on every turn of a busy loop."""
        now = time.monotonic()
        if now < self._next_liveness_check:
            return
        self._next_liveness_check = now + self.heartbeat / 4
        if self.no_worker_limit is not None:
            self._check_starved(now)
        for w in self.workers:
            if w.peer.expired(now):
                self._lose_worker(w, f"worker {w.name} (host {w.host}, pid {w.pid}) lost: no heartbeat for "
                                     f"{w.peer.silence(now):.1f} s (at {time.strftime('%H:%M:%S')})")
            elif w.peer.heartbeat_due(now):
                self._send_worker(w, P.Heartbeat())
        for c in list(self.clients.values()):
            if c.peer is None:
                continue          # in this process: it cannot go silent without the dispatcher
            if c.peer.expired(now):
                self._drop_client(c, f"client {c.name} (pid {c.pid}) lost: no heartbeat for "
                                     f"{c.peer.silence(now):.1f} s")
            elif c.peer.heartbeat_due(now):
                self._send_client(c, P.Heartbeat())

    # ------------------------------------------------------------ status
    def snapshot(self) -> Dict[str, object]:
        """A point-in-time view for `depio pool status` (read without locks: approximate)."""
        return {**self.assignment.status(), "bad_messages": dict(self.bad_messages),
                "workers_lost": self.workers_lost, "late_results": self.late_results,
                "refusals": list(self.refusals)}

