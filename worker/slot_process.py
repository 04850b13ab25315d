"""What runs inside a slot process: read batches of tasks from the worker, run them one after
another, send their `TaskResult`s back in batches over the socketpair.

A task handed over as *conditional* (the next link of a chain) runs only if the task the slot
handled just before it succeeded; otherwise it is skipped and reported as `None`.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from depio.runtime.protocol import TaskSpec, as_tuple

FLUSH_AFTER = 0.002     # a slot never holds a finished result longer than this (seconds)


def preload() -> None:
    """Import what a slot runs tasks with. The fork server calls it as it starts, so that its slots
    have it at once, while the worker process (which runs no task) never imports it."""
    import depio.runtime.execution  # noqa: F401


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to signal this process when its parent dies (no orphans if the worker is killed)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def own_process_group(pid: int = 0) -> None:
    """Make the slot the leader of its own process group, so that killing the group on timeout or
    cancellation also ends what the task started (a `subprocess`, a shell pipeline). Done by both the
    slot and the process that forked it, whichever runs first (the usual fork race)."""
    try:
        os.setpgid(pid, pid if pid else 0)
    except OSError:
        pass


def frame(msg: object) -> bytes:
    """Length-prefixed pickle. Specs and results cross as plain tuples (`as_tuple`): a class
    reference in a pickle costs more than the rest of a small one."""
    body = pickle.dumps(msg, protocol=5)
    return len(body).to_bytes(4, "little") + body


class ResultSender:
    """A slot's results go back in batches, but none waits longer than FLUSH_AFTER, also when the
    task after it runs for an hour: the worker learns that a task started only when the one before
    it ended, and a start it never learns of makes a killed worker's task run again for free."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._pending = threading.Condition(self._lock)
        self._done: List[Tuple[int, Optional[tuple]]] = []
        self._since = 0.0
        self._armed = False        # the flusher is in a timed wait: it looks again within FLUSH_AFTER
        threading.Thread(target=self._flush_late, name="depio-slot-results", daemon=True).start()

    def add(self, jid: int, result: Optional[tuple], last: bool) -> None:
        """Queue one result; `last`: the batch ends here, so send now."""
        with self._lock:
            if not self._done:
                self._since = time.monotonic()
            self._done.append((jid, result))
            if last or time.monotonic() - self._since >= FLUSH_AFTER:
                self._send()
            elif not self._armed:
                # wake the flusher only when it sleeps for good: waking it for every batch of short
                # tasks cost each one a thread switch (a third of a noop task's time)
                self._armed = True
                self._pending.notify()

    def _send(self) -> None:
        self._sock.sendall(frame(("done", self._done)))
        self._done = []

    def _flush_late(self) -> None:
        # a task that holds the GIL in C delays this until it lets go; nothing else does
        with self._lock:
            while True:
                if not self._done:
                    self._armed = False
                    self._pending.wait()
                    continue
                left = self._since + FLUSH_AFTER - time.monotonic()
                if left > 0:
                    self._armed = True
                    self._pending.wait(left)
                    continue
                try:
                    self._send()
                except OSError:       # the worker is gone: the slot ends on its next read
                    return


def slot_main(sock: socket.socket, worker_name: str, parent_pid: int) -> None:
    """The slot's life: serve the worker's batches until it says stop or goes away."""
    signal.set_wakeup_fd(-1)           # forked: the parent's wake-up pipe is not ours to write
    from depio.runtime.execution import FdCapture, run_spec   # (preloaded by a fork server)
    die_with_parent()
    if os.getppid() != parent_pid:     # the parent died before prctl took effect
        os._exit(1)
    own_process_group()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the worker's business
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock.setblocking(True)
    reader = sock.makefile("rb")
    results = ResultSender(sock)
    capture = FdCapture()
    functions: Dict[bytes, object] = {}
    blobs: Dict[bytes, bytes] = {}
    previous_ok = False        # did the task this slot handled last succeed? (for conditional ones)
    context = None             # (cwd, import path) of a pool's pipeline; None: the worker's own
    while True:
        head = reader.read(4)
        if len(head) < 4:
            return
        msg = pickle.loads(reader.read(int.from_bytes(head, "little")))
        kind = msg[0]
        if kind == "fn":
            blobs[msg[1]] = msg[2]
        elif kind == "run":
            batch = msg[1]
            last = len(batch) - 1
            for k, (jid, spec, conditional) in enumerate(batch):
                if conditional and not previous_ok:
                    results.add(jid, None, k == last)     # its predecessor did not succeed: not run
                else:
                    result = run_spec(TaskSpec(*spec), functions, blobs, capture, worker_name, context)
                    previous_ok = result.error is None
                    results.add(jid, as_tuple(result), k == last)
        elif kind == "env":          # the slot's own GPUs: before any task it runs
            os.environ.update(msg[1])
        elif kind == "ctx":          # the pipeline whose tasks follow: its working directory and import path
            context = msg[1]
        elif kind == "stop":
            return
