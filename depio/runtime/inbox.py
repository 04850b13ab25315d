"""The scheduler actor's inbox, which can also drive the pipeline's dispatcher (or pool connection).

A pipeline run on its own workers used to have two threads on every hop: the dispatcher's (ZeroMQ)
and the scheduler actor's, with a queue hand-off one way and a pipe wake-up the other. Here the
actor's own thread runs the dispatcher's loop while its inbox is empty: a result from a worker is
decoded, handed to the scheduler and answered with the next task without any thread switch. A run on
a pool gets the same for its connection (`DispatcherClient`). pykka
lets an actor class choose its inbox; this one keeps pykka's contract (`put` from any thread,
`get` blocks in the actor's thread, `empty`).

Long work in the actor (deciding about 100,000 tasks) must not starve the dispatcher's heartbeats:
the scheduler calls `breathe()` in its long loops, which runs a non-blocking turn when one is due.
A single step that blocks (a `stat` on a file system that hangs for seconds) cannot breathe: a small
keep-alive thread then runs non-blocking turns itself, so that workers register, results come in
and heartbeats go out while it waits. What arrives for the actor waits in this inbox.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
import select
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Optional, Tuple


def drain_pipe(fd: int) -> None:
    """Read a non-blocking wake-up pipe empty."""
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


@dataclass(frozen=True, slots=True)
class LoopFailure:
    """The bug that stopped a loop, with its formatted traceback, for whoever reports the run's end."""
    error: BaseException
    traceback: str


class DrivenLoop(ABC):
    """What `Dispatcher` and `DispatcherClient` share: a thread of their own runs `turn()`, or the
    scheduler actor's thread does (through `DispatchingInbox`), and a keep-alive thread may run a turn
    in between (`turn_aside`). A subclass implements `_turn(block)`; a bug in it that stops the loop is
    kept in `failure`."""

    heartbeat: float

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self._lock = threading.Lock()       # held by a turn; `turn_aside` only tries it
        self._thread: Optional[threading.Thread] = None     # its own thread, if it has one
        self._driver: Optional[threading.Thread] = None     # the thread that runs `turn()`
        self._driver_id = 0
        self.failure: Optional[LoopFailure] = None

    def _record_failure(self, error: BaseException) -> None:
        """From the `except` clause that catches a bug in `_turn`."""
        self.failure = LoopFailure(error, traceback.format_exc())

    @property
    def stopped(self) -> threading.Event:
        return self._stopped

    def _run(self) -> None:
        while self.turn():
            pass

    def turn(self, block: bool = True) -> bool:
        """One turn of the loop (see the subclass's `_turn`); False once it has stopped."""
        if self._stopped.is_set():
            return False
        if self._driver_id != threading.get_ident():
            self._driver, self._driver_id = threading.current_thread(), threading.get_ident()
        with self._lock:
            return self._turn(block)

    def turn_aside(self) -> None:
        """From another thread, while the one that runs `turn()` is busy elsewhere: one non-blocking
        turn, unless one is running. It does not become the loop's driver."""
        if not self._lock.acquire(blocking=False):
            return                  # a turn is running: it keeps the loop going itself
        try:
            if not self._stopped.is_set():
                self._turn(False)
        finally:
            self._lock.release()

    def _await_stop(self, timeout: float, close: Callable[[], None]) -> None:
        """After asking the loop to stop: join its own thread, or wait for `stopped` while the thread
        that drives it lives. If it has not stopped and nobody drives it any more, its sockets are
        free: `close` here."""
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
            return
        driver = self._driver
        deadline = time.monotonic() + timeout
        # the event wakes us as the loop stops; the slice of a heartbeat only bounds how long a
        # driver that ends without stopping the loop goes unnoticed (a live driver turns within one)
        while driver is not None and driver is not threading.current_thread() and driver.is_alive():
            left = deadline - time.monotonic()
            if left <= 0 or self._stopped.wait(min(left, self.heartbeat)):
                break
        if not self._stopped.is_set() and not (driver is not None and driver.is_alive()):
            with self._lock:
                close()

    @abstractmethod
    def _turn(self, block: bool) -> bool:
        """One turn of the subclass's loop; False once it has stopped."""


class DispatchingInbox:
    """pykka's `ActorInbox`, plus `attach(loop)`: a `Dispatcher` or `DispatcherClient` started with
    `threaded=False` (it has `turn(block)` and `heartbeat`). Before one is attached, and after it
    stopped, `get` waits on a pipe like a plain queue."""

    def __init__(self) -> None:
        self._queue: Deque[Any] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)    # a full pipe already wakes the reader
        self._owner = 0              # the actor's thread (the one that calls get)
        self._dispatcher = None
        self._next_breath = 0.0
        self._last_turn = 0.0

    @property
    def owner(self) -> int:
        """The thread id of the actor (0 until it first waits for a message)."""
        return self._owner

    @property
    def wake_pipe(self) -> Tuple[int, int]:
        """For the dispatcher: its poll wakes on what other threads put here, and the other way round."""
        return self._wake_r, self._wake_w

    def attach(self, loop) -> None:
        """From the actor's thread: from now on `get` runs this loop while it waits. The loop has
        `turn(block)`, `heartbeat`, `stopped` (an Event) and `turn_aside()`."""
        self._dispatcher = loop
        self._last_turn = time.monotonic()
        threading.Thread(target=self._keep_alive, args=(loop,), name="depio-keepalive", daemon=True).start()

    def _keep_alive(self, loop) -> None:
        # `loop.heartbeat` is read each time: a pool's welcome sets the interval after the attach
        while not loop.stopped.wait(loop.heartbeat / 4):
            if time.monotonic() - self._last_turn >= loop.heartbeat / 4:     # the actor is busy elsewhere
                loop.turn_aside()

    # ------------------------------------------------------------ pykka's ActorInbox
    def put(self, envelope: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        self._queue.append(envelope)
        if threading.get_ident() != self._owner:
            try:
                os.write(self._wake_w, b"!")
            except (BlockingIOError, OSError):   # full (the reader will wake) or closed (actor gone)
                pass

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        self._owner = threading.get_ident()
        while not self._queue:
            d = self._dispatcher
            if d is not None:
                if d.turn():
                    self._last_turn = now = time.monotonic()
                    self._next_breath = now + d.heartbeat / 4
                else:
                    self._dispatcher = None    # stopped; what its last turn put here comes first
                continue
            select.select([self._wake_r], [], [], None)
            drain_pipe(self._wake_r)
        return self._queue.popleft()

    def empty(self) -> bool:
        return not self._queue

    # ------------------------------------------------------------ for the actor's long loops
    def breathe(self) -> None:
        """Let the dispatcher send and take heartbeats (and results) if it has not for a while. What it
        receives waits in this inbox: nothing re-enters the actor."""
        d = self._dispatcher
        if d is None or threading.get_ident() != self._owner:
            return
        now = time.monotonic()
        if now >= self._next_breath:
            self._next_breath = now + d.heartbeat / 4
            d.turn(block=False)
            self._last_turn = time.monotonic()

    def __del__(self) -> None:
        # not earlier: a late `tell` (pykka checks liveness first, racily) may still write the pipe,
        # and a closed descriptor's number can be reused by another file
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
