"""The dispatcher: hands ready tasks of its clients (pipelines) to workers over ZeroMQ.

In a `depio pool` it runs in a thread of its own; in a pipeline's process the scheduler actor's
thread runs its loop (`turn()`) while the actor waits for messages (see `depio.runtime.inbox`). It owns a
ROUTER socket that workers connect to and, in a pool, one for clients (a pipeline's own dispatcher
has one client, in its process, which talks to it through a deque and a wake-up pipe). It never
unpickles a task's payload; it only routes `TaskSpec`s to workers that asked for work (credits)
and results back to the client that sent the task. A fair round-robin over clients with queued
work shares the slots.

Liveness follows the ZeroMQ guide's Paranoid Pirate: both sides send a heartbeat when they have
been silent for an interval; a peer silent for `liveness` intervals is gone. A lost worker's tasks
go back to their client as `TaskLost` (the client's scheduler decides whether to retry).

Followers (`TaskSpec.after`): a pipeline may hand out a task whose one unfinished dependency is in
flight, together with that dependency or behind another follower. It goes, without using a credit,
to the worker that has (or gets) that dependency, which starts it the moment the dependency
succeeds: a chain of tasks then runs without a round trip to the pipeline per link. Only followers
are tracked by key, so independent tasks pay nothing for this. A follower whose dependency is not
found here (it ended, or was not handed out that way) goes back to its client (`TaskReturned`),
which decides again.
"""
from __future__ import annotations

import logging
import operator
import os
import platform
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

import zmq

from . import protocol as P
from .inbox import DrivenLoop, drain_pipe
from .protocol import TaskSpec

log = logging.getLogger("depio.dispatcher")

# plain ints: pyzmq's flag enums cost a Python-level call on every `&` of the loop
_POLLIN, _EVENTS = int(zmq.POLLIN), int(zmq.EVENTS)
_AFTER = operator.attrgetter("after")
_is_none = partial(operator.is_, None)


@dataclass
class WorkerInfo:
    identity: bytes
    name: str
    host: str
    pid: int
    slots: int
    slurm_job_id: str = ""
    credits: int = 0
    busy: int = 0
    since: float = field(default_factory=time.time)
    last_heard: float = field(default_factory=time.monotonic)
    last_sent: float = field(default_factory=time.monotonic)
    jobs: Set[int] = field(default_factory=set)
    functions: Set[bytes] = field(default_factory=set)
    done: int = 0


@dataclass
class ClientInfo:
    identity: bytes
    client_id: int
    name: str
    host: str
    pid: int
    queue: Deque[TaskSpec] = field(default_factory=deque)
    functions: Dict[bytes, bytes] = field(default_factory=dict)
    jobs: Set[int] = field(default_factory=set)
    since: float = field(default_factory=time.time)
    last_heard: float = field(default_factory=time.monotonic)
    last_sent: float = field(default_factory=time.monotonic)
    done: int = 0
    deliver: Optional[Callable[[object], None]] = None   # a client in this process: no socket, no pickles
    # followers only (a task without one costs nothing here): those waiting for their predecessor
    # to be placed, by its key; their keys; and the job ids of those placed on workers, by key
    followers: Dict[int, List[TaskSpec]] = field(default_factory=dict)
    waiting: Set[int] = field(default_factory=set)
    follower_jobs: Dict[int, int] = field(default_factory=dict)

    def forget_job(self, jid: int, key: int) -> None:
        """Job `jid` (of task `key`) is over or given up on."""
        self.jobs.discard(jid)
        if self.follower_jobs and self.follower_jobs.get(key) == jid:
            del self.follower_jobs[key]


class LocalClient:
    """A pipeline in the dispatcher's own process. Messages to the dispatcher go through a deque and
    a wake-up byte on a pipe (thread-safe, nothing pickled; no byte from the thread that runs the
    loop); messages from it are handed to `deliver`. No socket and no pickle on a pipeline's hops."""

    def __init__(self, dispatcher: "Dispatcher", identity: bytes):
        self._dispatcher = dispatcher
        self.identity = identity

    def send(self, msg: object) -> None:
        self._dispatcher._local_inbox.append((self.identity, msg))
        self._dispatcher._wake()

    def close(self) -> None:
        self.send(P.ClientBye("pipeline finished"))


@dataclass
class Job:
    """One attempt of a task in flight on a worker."""
    client: ClientInfo
    worker: WorkerInfo
    spec: TaskSpec
    started: bool = False


class WorkerRegistry:
    """Workers by identity, and which of them may take work now."""

    def __init__(self) -> None:
        self.by_identity: Dict[bytes, WorkerInfo] = {}

    def add(self, w: WorkerInfo) -> None:
        self.by_identity[w.identity] = w

    def remove(self, identity: bytes) -> Optional[WorkerInfo]:
        return self.by_identity.pop(identity, None)

    def get(self, identity: bytes) -> Optional[WorkerInfo]:
        return self.by_identity.get(identity)

    def with_credit(self) -> List[WorkerInfo]:
        return [w for w in self.by_identity.values() if w.credits > 0]

    def __len__(self) -> int:
        return len(self.by_identity)

    def __iter__(self):
        return iter(list(self.by_identity.values()))

    @property
    def slots(self) -> int:
        return sum(w.slots for w in self.by_identity.values())


class Dispatcher(DrivenLoop):
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
        self.workers = WorkerRegistry()
        self.clients: Dict[bytes, ClientInfo] = {}
        self.jobs: Dict[int, Job] = {}
        self._next_jid = 1
        self._next_client = 1
        self._rr: Deque[bytes] = deque()     # clients in round-robin order
        self.bad_messages: Dict[str, int] = {}
        self._bad_peers: Set[Tuple[str, bytes]] = set()
        self._refused_peers: Set[Tuple[str, bytes]] = set()
        self.refusals: Deque[str] = deque(maxlen=100)   # why peers were refused, latest last
        self.workers_lost = 0
        self.late_results = 0       # results of attempts given up on (worker declared lost, job cancelled)
        self._worker_address_requested = worker_address
        # `remote_clients=False` (a pipeline's own dispatcher: its one client is in this process): no
        # client socket at all, one socket less to look at on every turn of the loop
        self.remote_clients = remote_clients
        self.client_address = (client_address or f"inproc://depio-clients-{uuid.uuid4().hex}") if remote_clients else ""
        self._stop_reason: Optional[str] = None
        self._next_liveness_check = 0.0
        self.worker_address = ""
        self._ready = threading.Event()
        self._wake_r = self._wake_w = -1
        self._own_pipe = True
        self._error: Optional[BaseException] = None
        self.tasks_done = 0
        self._reports: Dict[int, Tuple[ClientInfo, list, list, list]] = {}
        self.on_stop_request: Optional[Callable[[str], None]] = None   # a pool lets admins stop it
        self.on_workers_changed: Optional[Callable[[], None]] = None   # a pool's Slurm pilots follow it
        self._local_inbox: Deque[Tuple[bytes, object]] = deque()

    # ------------------------------------------------------------ life cycle
    def start(self, threaded: bool = True, wake_pipe: Optional[Tuple[int, int]] = None) -> "Dispatcher":
        """Bind, and run the loop in a thread of its own; or, `threaded=False`, let the caller's thread
        drive it with `turn()` (the scheduler actor's inbox does, see `depio.runtime.inbox`). `wake_pipe`: a
        pipe (read end, write end) to share with that caller, whose poll it then wakes too."""
        self._wsock = self._router(self._worker_address_requested)
        self.worker_address = self._wsock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._csock = None
        if self.remote_clients:
            self._csock = self._router(self.client_address)
            self.client_address = self._csock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._own_pipe = wake_pipe is None
        self._wake_r, self._wake_w = os.pipe() if wake_pipe is None else wake_pipe
        os.set_blocking(self._wake_r, False)
        self._poller = zmq.Poller()
        self._poller.register(self._wsock, zmq.POLLIN)
        if self._csock is not None:
            self._poller.register(self._csock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        if threaded:
            self._thread = threading.Thread(target=self._run, name=f"depio-{self.name}", daemon=True)
            self._thread.start()
        self._ready.set()
        return self

    def _router(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if address.startswith("tcp://") and ("[" in address or "::" in address):
            sock.setsockopt(zmq.IPV6, 1)
        sock.bind(address)
        return sock

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, reason: str = "dispatcher stopping", timeout: float = 5.0) -> None:
        """Tell workers and remote clients, close the sockets. Safe from any thread; a loop driven by
        another thread that has ended meanwhile is closed here."""
        if self.worker_address == "" or self._stopped.is_set():
            return
        self._local_inbox.append((b"", ("stop", reason)))
        self._wake()
        self._await_stop(timeout, lambda: self._close(reason))
        if self._own_pipe:
            try:
                os.close(self._wake_w)
            except OSError:
                pass

    # ------------------------------------------------------------ sending
    def _send_worker(self, w: WorkerInfo, msg: object) -> None:
        try:
            P.send_frames(self._wsock, [w.identity] + P.encode(msg, self.key))
            w.last_sent = time.monotonic()
        except zmq.ZMQError as e:   # EHOSTUNREACH: the worker disconnected
            log.debug("cannot send to worker %s: %s", w.name, e)

    def _send_client(self, c: ClientInfo, msg: object) -> None:
        if c.deliver is not None:
            c.deliver(msg)
            return
        try:
            self._csock.send_multipart([c.identity] + P.encode(msg, self.key), copy=False)
            c.last_sent = time.monotonic()
        except zmq.ZMQError as e:
            log.debug("cannot send to client %s: %s", c.name, e)

    def _bad(self, sock: str, identity: bytes, err: P.ProtocolError) -> None:
        """Count and drop; log only the first bad message of each peer, so a flood cannot flood the log."""
        self.bad_messages[err.kind] = self.bad_messages.get(err.kind, 0) + 1
        if (sock, identity) not in self._bad_peers and len(self._bad_peers) < 10000:
            self._bad_peers.add((sock, identity))
            log.warning("dropped a bad message on the %s socket from peer %s: %s", sock, identity.hex()[:16], err)

    def _refuse_once(self, sock: zmq.Socket, kind: str, identity: bytes, err: P.ProtocolError) -> None:
        """Tell a peer that speaks another protocol version, or signs with another key, why nothing it
        sends is accepted: in plain text (it cannot read our pickles, we cannot trust its), once per
        peer, so that a rogue flooding bad frames gets one short answer and no amplification."""
        if err.kind not in ("version", "signature"):
            return
        peer = (kind, identity)
        if peer in self._refused_peers or len(self._refused_peers) >= 10000:
            return
        self._refused_peers.add(peer)
        if err.kind == "version":
            reason = f"protocol mismatch: {err}"
        else:
            reason = (f"signature check failed: the {kind} and the dispatcher do not share the same key "
                      f"(${P.KEY_ENV} or --key-file)")
        self.refusals.append(f"{kind} peer {identity.hex()[:16]}: {reason}")
        log.error("refused a %s (peer %s): %s", kind, identity.hex()[:16], reason)
        try:
            sock.send_multipart([identity] + P.refusal(reason), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------ the loop
    def _turn(self, block: bool) -> bool:
        """One turn: wait for messages (at most half a heartbeat; not at all when `block` is false or
        local messages are queued), handle them, assign work, check liveness, send the clients'
        reports."""
        try:
            wait = self.heartbeat * 500 if block and not self._local_inbox else 0
            events = dict(self._poller.poll(wait))
            if self._wsock in events:
                self._drain(self._wsock, "worker", self._on_worker_message)
            if self._csock is not None and self._csock in events:
                self._drain(self._csock, "client", self._on_client_message)
            if self._wake_r in events:
                drain_pipe(self._wake_r)
            if self._local_inbox:
                self._drain_local()
            if self._stop_reason is not None:
                self._close(self._stop_reason)
                return False
            self._assign()
            self._check_liveness()
            self._flush_reports()
            return True
        except Exception as e:   # a bug here must not hang the pipeline: tell the clients
            log.exception("dispatcher failed")
            self._error = e
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
            self._wsock.close(linger=200)
            if self._csock is not None:
                self._csock.close(linger=200)
            if self._own_pipe:
                os.close(self._wake_r)
            self._stopped.set()

    # ------------------------------------------------------------ clients in this process
    def attach_local(self, name: str, deliver: Callable[[object], None]) -> LocalClient:
        """Register a pipeline of this process as a client (before or after `start`)."""
        identity = f"local-{uuid.uuid4().hex}".encode()
        self._local_inbox.append((identity, ("attach", name, deliver)))
        self._wake()
        return LocalClient(self, identity)

    def _wake(self) -> None:
        """Wake the loop's poll; not needed from the thread that drives it (it looks at the local
        inbox before it polls)."""
        if threading.get_ident() == self._driver_id:
            return
        try:
            os.write(self._wake_w, b"!")
        except OSError:      # stopped: nothing will read it
            pass

    def _drain_local(self) -> None:
        while self._local_inbox:
            identity, msg = self._local_inbox.popleft()
            if isinstance(msg, tuple) and msg[0] == "stop":
                self._stop_reason = msg[1]
                return
            if isinstance(msg, tuple):
                _, name, deliver = msg
                c = ClientInfo(identity, self._next_client, name, platform.node(), os.getpid(), deliver=deliver)
                self._next_client += 1
                self.clients[identity] = c
                self._send_client(c, P.WorkersChanged(len(self.workers), self.workers.slots, "attached"))
            elif identity in self.clients:
                self._on_client_message(identity, msg)

    def _drain(self, sock: zmq.Socket, kind: str, handler) -> None:
        for _ in range(1000):     # bounded, so that a flooded socket delays neither the other one nor assignment
            if not sock.getsockopt(_EVENTS) & _POLLIN:    # cheaper than a zmq.Again raised
                return
            frames = P.recv_frames(sock)
            if len(frames) < 2:
                self._bad(kind, b"", P.ProtocolError("malformed", "no identity frame"))
                continue
            identity = frames[0]
            try:
                msg = P.decode(frames[1:], self.key)
            except P.ProtocolError as e:
                self._bad(kind, identity, e)
                self._refuse_once(sock, kind, identity, e)
                continue
            handler(identity, msg)

    # ------------------------------------------------------------ workers
    def _on_worker_message(self, identity: bytes, msg: object) -> None:
        w = self.workers.get(identity)
        if isinstance(msg, P.Register):
            self._register(identity, msg)
            return
        if w is None:
            if isinstance(msg, P.WorkerReport) and msg.done:
                self.late_results += len(msg.done)
                log.info("ignored %d late result(s) from unknown worker %s", len(msg.done), identity.hex()[:16])
            if not isinstance(msg, P.Goodbye):
                try:
                    self._wsock.send_multipart([identity] + P.encode(
                        P.Reregister("this dispatcher does not know the worker (restarted, or it was "
                                     "declared lost)"), self.key))
                except zmq.ZMQError:
                    pass
            return
        w.last_heard = time.monotonic()
        if isinstance(msg, P.WorkerReport):
            self._on_report(w, msg)
        elif isinstance(msg, P.RequestWork):
            w.credits += msg.credits
        elif isinstance(msg, P.Goodbye):
            self._lose_worker(w, f"worker {w.name} (host {w.host}, pid {w.pid}) left: {msg.reason}")
        # Heartbeat: last_heard is all it does

    def _register(self, identity: bytes, msg: P.Register) -> None:
        mine = P.runtime_signature()
        if msg.runtime != mine:
            diff = ", ".join(f"{k} {msg.runtime.get(k)} (dispatcher: {v})" for k, v in mine.items()
                             if msg.runtime.get(k) != v)
            reason = f"worker {msg.worker_id} (host {msg.host}, pid {msg.pid}) refused: runtime differs: {diff}"
            log.error(reason)
            self.refusals.append(reason)
            try:
                self._wsock.send_multipart([identity] + P.encode(P.Refused(reason), self.key))
            except zmq.ZMQError:
                pass
            return
        if identity in self.workers.by_identity:
            return
        w = WorkerInfo(identity, msg.worker_id, msg.host, msg.pid, msg.slots, msg.slurm_job_id)
        self.workers.add(w)
        self._send_worker(w, P.Welcome(self.heartbeat, self.liveness))
        log.info("worker %s registered (%d slots)", w.name, w.slots)
        self._broadcast_workers(f"worker {w.name} joined")

    def _on_report(self, w: WorkerInfo, msg: P.WorkerReport) -> None:
        w.credits += msg.credits
        for jid, t in msg.started:
            job = self.jobs.get(jid)
            if job is not None and job.worker is w:
                job.started = True
                self._report(job.client)[1].append((job.spec.key, job.spec.attempt, t, w.name))
        for jid, result in msg.done:
            job = self._end_job(w, jid)
            if job is None:
                self.late_results += 1
                continue      # cancelled, or the worker was declared lost and the task re-sent
            c = job.client
            w.done += 1
            self.tasks_done += 1
            c.done += 1
            self._report(c)[2].append(result)
        for jid, reason in msg.returned:
            job = self._end_job(w, jid)
            if job is not None:
                self._report(job.client)[4].append(P.TaskReturned(job.spec.key, job.spec.attempt, reason))

    def _end_job(self, w: WorkerInfo, jid: int) -> Optional[Job]:
        """Forget job `jid` of worker `w`; None if it is not (or no longer) that worker's."""
        job = self.jobs.pop(jid, None)
        w.jobs.discard(jid)
        if job is None or job.worker is not w:
            return None
        job.client.forget_job(jid, job.spec.key)
        return job

    def _lose_worker(self, w: WorkerInfo, reason: str) -> None:
        """Forget the worker and hand each of its jobs back to its client as lost. Should the worker
        come back (it was only stopped or cut off), it is told to re-register and its late results
        are dropped here, and by attempt id in the scheduler."""
        self.workers.remove(w.identity)
        self.workers_lost += 1
        for jid in sorted(w.jobs):
            job = self.jobs.pop(jid, None)
            if job is None:
                continue
            job.client.forget_job(jid, job.spec.key)
            self._report(job.client)[3].append(P.TaskLost(job.spec.key, job.spec.attempt, reason, job.started))
        w.jobs.clear()
        log.warning(reason)
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
            if c is None:
                if msg.runtime != P.runtime_signature():
                    reason = (f"pipeline {msg.name} (host {msg.host}, pid {msg.pid}) refused: runtime differs "
                              f"({msg.runtime} vs {P.runtime_signature()})")
                    log.error(reason)
                    self.refusals.append(reason)
                    try:
                        self._csock.send_multipart([identity] + P.encode(P.Refused(reason), self.key))
                    except zmq.ZMQError:
                        pass
                    return
                c = ClientInfo(identity, self._next_client, msg.name, msg.host, msg.pid)
                self._next_client += 1
                self.clients[identity] = c
                log.info("client %s (pid %d) connected", c.name, c.pid)
            self._send_client(c, P.ClientWelcome(c.client_id, self.heartbeat, self.liveness))
            self._send_client(c, P.WorkersChanged(len(self.workers), self.workers.slots, "hello"))
            return
        if c is None:
            try:
                self._csock.send_multipart([identity] + P.encode(P.Refused("unknown client: say hello first"),
                                                                 self.key))
            except zmq.ZMQError:
                pass
            return
        c.last_heard = time.monotonic()
        if isinstance(msg, P.Submit):
            c.functions.update(msg.functions)
            self._queue(c, msg.tasks)
        elif isinstance(msg, P.CancelTasks):
            self._cancel(c, None if msg.keys is None else set(msg.keys), msg.reason)
        elif isinstance(msg, P.ClientBye):
            self._drop_client(c, f"client {c.name} left: {msg.reason}")

    def _on_admin(self, identity: bytes, msg: object) -> None:
        if isinstance(msg, P.StatusRequest):
            reply: object = P.StatusReply(self.snapshot())
        elif self.on_stop_request is None:
            reply = P.Refused("this dispatcher belongs to a pipeline; it stops with its run")
        else:
            self.on_stop_request(msg.reason or "stop requested")
            reply = P.StatusReply(self.snapshot())
        try:
            self._csock.send_multipart([identity] + P.encode(reply, self.key))
        except zmq.ZMQError:
            pass

    def _cancel(self, c: ClientInfo, keys: Optional[set], reason: str) -> None:
        """Forget the client's tasks `keys` (None: all): queued here, or jobs on workers (which are told).
        A follower waiting here for a cancelled task goes back to the client."""
        if keys is None:
            c.queue.clear()
            c.followers.clear()
            c.waiting.clear()
        else:
            c.queue = deque(s for s in c.queue if s.key not in keys)
            c.waiting.difference_update(keys)
            for pred in [k for k in c.followers if k in keys]:
                self._return_followers(c, pred, "its predecessor was cancelled", keys)
            for pred, waiting in list(c.followers.items()):
                c.followers[pred] = [s for s in waiting if s.key not in keys]
        per_worker: Dict[bytes, List[int]] = {}
        for jid in list(c.jobs):
            job = self.jobs[jid]
            if keys is None or job.spec.key in keys:
                del self.jobs[jid]
                c.forget_job(jid, job.spec.key)
                job.worker.jobs.discard(jid)
                per_worker.setdefault(job.worker.identity, []).append(jid)
        for identity, jids in per_worker.items():
            w = self.workers.get(identity)
            if w is not None:
                self._send_worker(w, P.CancelJobs(tuple(jids), reason))

    def _queue(self, c: ClientInfo, specs: Tuple[TaskSpec, ...]) -> None:
        """Queue a client's tasks. A follower waits here for a predecessor that is queued (in this
        batch) or waiting itself, goes at once to the worker that has a predecessor placed as a
        follower, and goes back otherwise: a pipeline hands a follower out together with its
        predecessor, or behind another follower."""
        was_empty = not c.queue
        queue = c.queue
        if all(map(_is_none, map(_AFTER, specs))):      # no follower: in C, as before followers
            queue.extend(specs)
        else:
            direct: Dict[bytes, Tuple[WorkerInfo, List[Tuple[int, TaskSpec]], Dict[bytes, bytes],
                                      List[Tuple[int, int]]]] = {}
            queued: Set[int] = set()        # keys queued by this batch
            for spec in specs:
                pred = spec.after
                if pred is None:
                    queue.append(spec)
                    queued.add(spec.key)
                elif pred in queued or pred in c.waiting:
                    c.followers.setdefault(pred, []).append(spec)
                    c.waiting.add(spec.key)
                elif pred in c.follower_jobs:
                    jid = c.follower_jobs[pred]
                    w = self.jobs[jid].worker
                    _, batch, functions, after = direct.setdefault(w.identity, (w, [], {}, []))
                    self._place(c, w, spec, batch, functions, after, jid)
                else:
                    self._report(c)[4].append(P.TaskReturned(
                        spec.key, spec.attempt, "its predecessor was not found queued or placed for it here "
                                                "(it may have ended)"))
            for w, batch, functions, after in direct.values():
                self._send_worker(w, P.RunTasks(tuple(batch), functions, tuple(after)))
        if was_empty and queue:
            self._rr.append(c.identity)

    def _return_followers(self, c: ClientInfo, pred: int, reason: str, cancelled: Set[int]) -> None:
        """Followers waiting here for `pred` (and theirs) go back to the client, except cancelled ones."""
        stack = [pred]
        while stack:
            for f in c.followers.pop(stack.pop(), ()):
                c.waiting.discard(f.key)
                if f.key not in cancelled:
                    self._report(c)[4].append(P.TaskReturned(f.key, f.attempt, reason))
                stack.append(f.key)

    def _drop_client(self, c: ClientInfo, reason: str) -> None:
        self._cancel(c, None, reason)
        self.clients.pop(c.identity, None)
        log.info(reason)

    def _report(self, c: ClientInfo):
        """This turn's report to client `c`: (client, started, done, lost, returned)."""
        entry = self._reports.get(c.client_id)
        if entry is None:
            entry = self._reports[c.client_id] = (c, [], [], [], [])
        return entry

    def _flush_reports(self) -> None:
        for c, started, done, lost, returned in self._reports.values():
            if c.identity in self.clients:
                self._send_client(c, P.ClientReport(tuple(started), tuple(done), tuple(lost), tuple(returned)))
        self._reports = {}

    # ------------------------------------------------------------ assignment
    def _assign(self) -> None:
        """Hand queued tasks to workers with credits. First only into free slots (idle workers
        first), then as prefetch: a worker whose slots are all busy must not take a task that an idle
        worker could start now."""
        if not self._rr:
            return
        batches: Dict[bytes, Tuple[WorkerInfo, List[Tuple[int, TaskSpec]], Dict[bytes, bytes], List[Tuple[int, int]]]] = {}
        for prefetch in (False, True):
            for w in sorted(self.workers.with_credit(), key=lambda w: len(w.jobs) - w.slots):
                n = w.credits if prefetch else min(w.credits, w.slots - len(w.jobs))
                if n > 0:
                    _, batch, functions, after = batches.setdefault(w.identity, (w, [], {}, []))
                    self._take(w, n, batch, functions, after)
                if not self._rr:
                    break
            if not self._rr:
                break
        for w, batch, functions, after in batches.values():
            if batch:
                self._send_worker(w, P.RunTasks(tuple(batch), functions, tuple(after)))

    def _place(self, c: ClientInfo, w: WorkerInfo, spec: TaskSpec, batch: List[Tuple[int, TaskSpec]],
               functions: Dict[bytes, bytes], after: List[Tuple[int, int]], pred_jid: Optional[int] = None) -> None:
        """Make `spec` a job of worker `w` (in `batch`), and the followers waiting for it too."""
        jid = self._new_job(c, w, spec, batch, functions)
        if pred_jid is not None:
            after.append((jid, pred_jid))
            c.follower_jobs[spec.key] = jid
        waiting = c.followers.pop(spec.key, None) if c.followers else None
        if not waiting:
            return
        todo = [(jid, waiting)]        # not recursive: a client may send a chain of any length
        while todo:
            pred, waiting = todo.pop()
            c.waiting.difference_update(f.key for f in waiting)
            for f in waiting:
                fjid = self._new_job(c, w, f, batch, functions)
                after.append((fjid, pred))
                c.follower_jobs[f.key] = fjid
                more = c.followers.pop(f.key, None)
                if more:
                    todo.append((fjid, more))

    def _new_job(self, c: ClientInfo, w: WorkerInfo, spec: TaskSpec, batch: List[Tuple[int, TaskSpec]],
                 functions: Dict[bytes, bytes]) -> int:
        jid = self._next_jid
        self._next_jid += 1
        self.jobs[jid] = Job(c, w, spec)
        c.jobs.add(jid)
        w.jobs.add(jid)
        if spec.func_digest not in w.functions:
            functions[spec.func_digest] = c.functions[spec.func_digest]
            w.functions.add(spec.func_digest)
        batch.append((jid, spec))
        return jid

    def _take(self, w: WorkerInfo, n: int, batch: List[Tuple[int, TaskSpec]], functions: Dict[bytes, bytes],
              after: List[Tuple[int, int]]) -> None:
        """Up to `n` tasks for worker `w`, round-robin over the clients with queued work (their
        followers go along without using credits)."""
        while n > 0 and self._rr:
            identity = self._rr[0]
            c = self.clients.get(identity)
            if c is None or not c.queue:
                self._rr.popleft()
                continue
            # one client's turn: a share of the credits, then the next client
            share = n if len(self._rr) == 1 else max(1, n // len(self._rr))
            queue = c.queue
            k = min(share, len(queue))
            for _ in range(k):
                self._place(c, w, queue.popleft(), batch, functions, after)
            w.credits -= k
            n -= k
            self._rr.rotate(-1)
            if not c.queue:
                self._rr.remove(identity)

    # ------------------------------------------------------------ liveness
    def _check_liveness(self) -> None:
        """At most a few times per heartbeat interval, not on every turn of a busy loop."""
        now = time.monotonic()
        if now < self._next_liveness_check:
            return
        self._next_liveness_check = now + self.heartbeat / 4
        limit = self.heartbeat * self.liveness
        for w in self.workers:
            if now - w.last_heard > limit:
                self._lose_worker(w, f"worker {w.name} (host {w.host}, pid {w.pid}) lost: no heartbeat for "
                                     f"{now - w.last_heard:.1f} s (at {time.strftime('%H:%M:%S')})")
            elif now - w.last_sent >= self.heartbeat:
                self._send_worker(w, P.Heartbeat())
        for c in list(self.clients.values()):
            if c.deliver is not None:
                continue          # in this process: it cannot go silent without the dispatcher
            if now - c.last_heard > limit:
                self._drop_client(c, f"client {c.name} (pid {c.pid}) lost: no heartbeat for "
                                     f"{now - c.last_heard:.1f} s")
            elif now - c.last_sent >= self.heartbeat:
                self._send_client(c, P.Heartbeat())

    # ------------------------------------------------------------ status
    def snapshot(self) -> Dict[str, object]:
        """A point-in-time view for `depio pool status` (read without locks: approximate)."""
        return {
            "workers": [{"name": w.name, "host": w.host, "pid": w.pid, "slots": w.slots, "busy": len(w.jobs),
                         "done": w.done, "since": w.since, "slurm_job_id": w.slurm_job_id}
                        for w in self.workers],
            "clients": [{"name": c.name, "host": c.host, "pid": c.pid, "queued": len(c.queue),
                         "running": len(c.jobs), "done": c.done, "since": c.since}
                        for c in list(self.clients.values())],
            "bad_messages": dict(self.bad_messages),
            "workers_lost": self.workers_lost,
            "late_results": self.late_results,
            "refusals": list(self.refusals),
        }
