"""Backends: where the scheduler's ready tasks go, and how their results come back.

Every backend takes `submit(specs, functions)` and `cancel(keys, reason)` from the scheduler actor
and tells the actor `ClientReport`s. `wait(done, timeout)` is what the pipeline's main thread does
while the run goes on (the in-process backend runs tasks there, so that debuggers work).

- `DispatcherBackend`: ZeroMQ, a dispatcher (in-process or a pool) and workers. Tasks that ask for
  resources (`depio.runtime.resources`) carry their shape, so the dispatcher routes them to workers
  that fit; one that no worker of its launcher could ever fit fails the run before anything runs.
- `InlineBackend`: one task at a time in the main thread (SequentialExecutor).
- `FuturesBackend`: a user's `concurrent.futures.Executor` (upstream's `internal_executor`).
"""
from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
import queue
import threading
import time
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import pykka

from . import protocol as P
from .inbox import DispatchingInbox
from .events import BackendFailed
from .resources import request_of, shape_of

log = logging.getLogger("depio.backends")


class Backend(ABC):
    """What the scheduler and the pipeline expect of a backend."""

    # Whether `submit` takes followers (`TaskSpec.after`): tasks that must start only once their
    # predecessor succeeded, where it ran. Backends that cannot hold a task back get none.
    runs_followers = False
    note = ""       # one line the view shows while it holds (e.g. a pool that has no worker yet)

    def notice(self, line: str) -> None:
        """Something the person running the pipeline must read (a Slurm partition replaced, jobs of
        a dead run cancelled): unlike `note` it stays, in the view and in the final summary. Any
        thread may call it; the run's main thread takes the lines (`take_notices`)."""
        self.__dict__.setdefault("_notices", deque()).append(line)

    def take_notices(self) -> List[str]:
        """The notices since the last call, oldest first."""
        q = self.__dict__.get("_notices")
        return [q.popleft() for _ in range(len(q))] if q else []      # one taker: the main thread

    def bind(self, scheduler, graph) -> None:
        self.scheduler = scheduler
        self.graph = graph

    @abstractmethod
    def submit(self, specs: Sequence[P.TaskSpec], functions: Dict[bytes, bytes]) -> None:
        """Run these attempts; `functions` holds the function blobs not sent before."""

    @abstractmethod
    def cancel(self, keys: Optional[Sequence[int]], reason: str) -> None:
        """Drop queued and kill running attempts of these tasks (None: all)."""

    def warm_up(self) -> None:
        """A task will be submitted soon: start what takes long to start (workers), so that it starts
        while the scheduler still decides about the other tasks."""

    def wait(self, done: threading.Event, timeout: float) -> bool:
        return done.wait(timeout)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return type(self).__name__


# ---------------------------------------------------------------- ZeroMQ: dispatcher + workers

class DispatcherBackend(Backend):
    """Starts an in-process dispatcher and local workers on first use, or joins a pool's dispatcher."""

    runs_followers = True      # its dispatcher and workers hold a follower until its predecessor succeeds

    def __init__(self, launcher=None, address: Optional[str] = None, key: Optional[bytes] = None,
                 bind: str = "tcp://127.0.0.1:*", heartbeat: float = 1.0, liveness: int = 3, name: str = "pipeline",
                 key_file: Optional[str] = None):
        self.launcher = launcher
        self.pool_address = address
        if address is None:      # our own dispatcher: off loopback only with a configured key
            self.key = P.key_for_bind(bind, key=key, key_file=key_file)
        else:
            self.key = key or P.load_key(key_file)
            if self.key is None:
                raise P.KeyRequiredError(f"no key for the dispatcher at {address}: {P.MAKE_KEY_HINT}")
        self.bind_address = bind
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.name = name
        self.dispatcher = None
        self.client = None
        self._started = False
        self._closing = False
        self._lock = threading.Lock()
        self.shapes: List[Optional[tuple]] = []      # by task key: its resource shape (None: nothing special)
        self.shaped = False
        self.held: Dict[int, List[P.TaskSpec]] = {}  # followers kept here until their predecessor succeeded
        self.held_keys: set = set()

    def bind(self, scheduler, graph) -> None:
        super().bind(scheduler, graph)
        requests = [request_of(t) for t in graph.tasks]
        self.shapes = [shape_of(r) for r in requests]
        self.shaped = any(s is not None for s in self.shapes)
        too_big = getattr(self.launcher, "too_big", None)
        if self.shaped and too_big is not None:
            problems = [f"task {t.name} {why}" for t, r, s in zip(graph.tasks, requests, self.shapes)
                        if s is not None and (why := too_big(r))]
            if problems:
                self._lost("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))

    def _shape(self, specs: Sequence[P.TaskSpec]) -> List[P.TaskSpec]:
        """Specs with their resource shape. A follower goes along with its predecessor only if both
        ask for nothing special; otherwise it waits here until the predecessor succeeded, then goes
        on its own (a GPU task must not follow a CPU task onto a CPU worker)."""
        shapes, out, held = self.shapes, [], self.held_keys
        for s in specs:
            shape = shapes[s.key]
            if s.after is not None and (shape is not None or shapes[s.after] is not None or s.after in held):
                self.held.setdefault(s.after, []).append(s)     # (behind a held one: held too)
                held.add(s.key)
            else:
                out.append(s if shape is None or s.shape is not None else dataclasses.replace(s, shape=shape))
        return out

    def _release(self, msg: P.ClientReport) -> Optional[P.ClientReport]:
        """Followers held here: on their way when their predecessor succeeded, handed back otherwise."""
        go: List[P.TaskSpec] = []
        back: List[P.TaskReturned] = []
        ended = [(r.key, r.error is None) for r in msg.done] + [(x.key, False) for x in msg.lost + msg.returned]
        for key, ok in ended:
            for f in self.held.pop(key, ()):
                self.held_keys.discard(f.key)
                if ok:
                    go.append(dataclasses.replace(f, after=None))
                else:
                    back.append(P.TaskReturned(f.key, f.attempt, "its predecessor did not succeed"))
        if go:
            self.submit(go, {})
        if back:
            return dataclasses.replace(msg, returned=msg.returned + tuple(back))
        return msg

    def _drop_held(self, keys: Optional[Sequence[int]]) -> None:
        """Cancelled: held followers of these tasks go; those of a cancelled predecessor go back."""
        if keys is None:
            self.held, self.held_keys = {}, set()
            return
        gone, back = set(keys), []
        for k in list(self.held):
            left = [f for f in self.held[k] if f.key not in gone]
            self.held_keys.difference_update(f.key for f in self.held[k] if f.key in gone)
            if k in gone:
                del self.held[k]
                back += left
            else:
                self.held[k] = left
        if back:
            self.held_keys.difference_update(f.key for f in back)
            self.scheduler.tell(P.ClientReport(returned=tuple(
                P.TaskReturned(f.key, f.attempt, "its predecessor was cancelled") for f in back)))

    def _start(self) -> None:
        # called in the scheduler actor's thread: that thread runs the dispatcher (or the connection
        # to a pool) too, while it waits for messages
        inbox = getattr(self.scheduler, "actor_inbox", None)
        driven = isinstance(inbox, DispatchingInbox) and threading.get_ident() == inbox.owner
        if self.pool_address is None:
            self._start_dispatcher(inbox if driven else None)
        else:
            from .client import DispatcherClient
            self.client = DispatcherClient(self.pool_address, self.key, self.name, self._deliver, self._lost,
                                           heartbeat=self.heartbeat, liveness=self.liveness)
            if driven:
                self.client.start(threaded=False, wake_pipe=inbox.wake_pipe)
                inbox.attach(self.client)
            else:
                self.client.start()
            if self.launcher is not None:
                self._launch(self.pool_address)
        self._started = True

    def _start_dispatcher(self, inbox: Optional[DispatchingInbox]) -> None:
        """Our own dispatcher. Its worker socket is bound and the workers started first: a worker's
        interpreter takes ~0.1 s to start, during which this thread imports and builds the rest."""
        import zmq
        from .wire import bind_router
        socket = bind_router(zmq.Context.instance(), self.bind_address)
        try:
            if self.launcher is not None:
                self._launch(socket.getsockopt(zmq.LAST_ENDPOINT).decode())
            from .dispatcher import Dispatcher
            self.dispatcher = Dispatcher(self.key, self.bind_address, heartbeat=self.heartbeat,
                                         liveness=self.liveness, remote_clients=False, worker_socket=socket)
        except BaseException:
            socket.close(linger=0)
            raise
        if inbox is not None:
            self.dispatcher.start(threaded=False, wake_pipe=inbox.wake_pipe)
            inbox.attach(self.dispatcher)
        else:
            self.dispatcher.start()
        self.client = self.dispatcher.attach_local(self.name, self._deliver)

    def _launch(self, address: str) -> None:
        self.launcher.on_all_gone = self._lost
        self.launcher.start(address, self.key)

    def _deliver(self, msg: object) -> None:
        """What the dispatcher sends this pipeline (from its thread, or the pool client's): reports
        go to the scheduler; everything is shown to `observe` first."""
        try:
            self.observe(msg)
        except Exception:
            log.exception("observing a dispatcher message failed")
        if isinstance(msg, P.ClientReport):
            if self.held:
                msg = self._release(msg)
            if not self._closing:
                try:
                    self.scheduler.tell(msg)
                except pykka.ActorDeadError:
                    pass
        elif isinstance(msg, P.Shutdown):
            self._lost(f"the dispatcher shut down: {msg.reason}")
        elif isinstance(msg, P.WorkersChanged) and self.pool_address is not None:
            self.note = "" if msg.workers else "the pool has no worker yet: tasks wait for one"

    def observe(self, msg: object) -> None:
        """A hook for backends that follow the run (the Slurm pilot launcher); nothing here."""

    def _lost(self, reason: str) -> None:
        if self._closing:
            return
        try:
            self.scheduler.tell(BackendFailed(reason))
        except pykka.ActorDeadError:
            pass

    def warm_up(self) -> None:
        if not self._started:
            self._start()

    def submit(self, specs, functions) -> None:
        if not self._started:
            self._start()
        if self.shaped:
            specs = self._shape(specs)
        self.client.send(P.Submit(tuple(specs), dict(functions)))

    def cancel(self, keys, reason) -> None:
        if self.held:
            self._drop_held(keys)
        if self.client is not None:
            self.client.send(P.CancelTasks(None if keys is None else tuple(keys), reason))

    def close(self) -> None:
        self._closing = True
        if self.client is not None:
            self.client.close()
        told = None
        hold = getattr(self.launcher, "hold", None)     # workers leaving on the Shutdown are not to replace
        if hold is not None:
            hold()
        if self.dispatcher is not None:
            told = {w.pid for w in self.dispatcher.workers}    # snapshot: these get the Shutdown
            self.dispatcher.stop("pipeline finished")
        if self.launcher is not None:
            self.launcher.stop(told=told)

    @property
    def worker_address(self) -> str:
        return self.dispatcher.worker_address if self.dispatcher else (self.pool_address or "")


# ---------------------------------------------------------------- in this process, one at a time

class InlineBackend(Backend):
    """Runs each task in the pipeline's main thread, output echoed to the terminal."""

    def __init__(self, echo: bool = True):
        self.echo = echo
        self.queue: "queue.Queue" = queue.Queue()
        self.cancelled: Optional[str] = None
        self.functions: Dict[bytes, object] = {}

    def submit(self, specs, functions) -> None:
        for spec in specs:
            self.queue.put(spec)

    def cancel(self, keys, reason) -> None:
        self.cancelled = reason
        self.queue.put(None)   # wake the main thread

    def wait(self, done: threading.Event, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done.is_set():
            try:
                spec = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if spec is None or self.cancelled:
                continue
            self._run(spec)
        return done.is_set()

    def _run(self, spec: P.TaskSpec) -> None:
        from .execution import execute_inline
        task = self.graph.tasks[spec.key]
        self.scheduler.tell(P.ClientReport(started=((spec.key, spec.attempt, time.time(), "main thread"),)))
        outcome = execute_inline(task.func, task.func_args, task.func_kwargs, spec.name, spec.products,
                                 spec.dependencies, echo=self.echo, key=spec.key, attempt=spec.attempt)
        task._result = outcome.value
        self.scheduler.tell(P.ClientReport(done=(outcome.result,)))


# ---------------------------------------------------------------- a user's concurrent.futures executor

def _run_in_process(spec: P.TaskSpec, function_blob: bytes) -> P.TaskResult:
    """Module level so a ProcessPoolExecutor can pickle it; runs a spec with fd-level capture."""
    from .execution import run_spec as _run
    from .execution import FdCapture
    global _capture
    try:
        _capture
    except NameError:
        _capture = FdCapture()
    return _run(spec, {}, {spec.func_digest: function_blob}, _capture, "internal_executor")


class FuturesBackend(Backend):
    """Hands tasks to a `concurrent.futures.Executor` the user gave (threads or processes)."""

    def __init__(self, executor: Executor):
        self.executor = executor
        self.threads = isinstance(executor, ThreadPoolExecutor)
        self.futures: Dict[int, object] = {}
        self.lock = threading.Lock()
        self.functions: Dict[bytes, bytes] = {}

    def submit(self, specs, functions) -> None:
        self.functions.update(functions)
        for spec in specs:
            if self.threads:
                fut = self.executor.submit(self._run_thread, spec)
            else:
                fut = self.executor.submit(_run_in_process, spec, self.functions[spec.func_digest])
            with self.lock:
                self.futures[spec.key] = fut
            fut.add_done_callback(lambda f, spec=spec: self._done(spec, f))

    def _run_thread(self, spec: P.TaskSpec) -> P.TaskResult:
        from .execution import execute_inline
        task = self.graph.tasks[spec.key]
        self.scheduler.tell(P.ClientReport(started=((spec.key, spec.attempt, time.time(), "internal_executor"),)))
        outcome = execute_inline(task.func, task.func_args, task.func_kwargs, spec.name, spec.products,
                                 spec.dependencies, key=spec.key, attempt=spec.attempt)
        task._result = outcome.value
        return outcome.result

    def _done(self, spec: P.TaskSpec, fut) -> None:
        with self.lock:
            self.futures.pop(spec.key, None)
        if fut.cancelled():
            return
        err = fut.exception()
        if err is not None:
            msg = f"the executor could not run the task: {type(err).__name__}: {err}"
            result = P.TaskResult(spec.key, spec.attempt, time.time(), time.time(), "", "",
                                  {"kind": "WorkerCrash", "type": type(err).__name__, "message": msg,
                                   "traceback": "", "summary": msg})
        else:
            result = fut.result()
        self.scheduler.tell(P.ClientReport(done=(result,)))

    def cancel(self, keys, reason) -> None:
        with self.lock:
            futures = list(self.futures.values())
        for f in futures:
            f.cancel()
