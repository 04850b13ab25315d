"""Slot processes, as the worker sees them: where tasks actually run.

A worker runs each task in a child process (a slot) so that a task that holds the GIL, blocks in C
code, crashes the interpreter or has to be killed on timeout cannot stop the worker's heartbeats
or take the worker down. A slot runs the batches of tasks it is handed one after another and sends
their `TaskResult`s back in batches over a socketpair (what runs inside it: `slot_process`).

A task handed over as *conditional* (the next link of a chain) runs only if the task the slot
handled just before it succeeded; otherwise it is skipped and reported as `None`, and the worker
hands it back to its pipeline. A chain then goes from link to link inside the slot, without
waiting for the worker.
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Protocol, Tuple

from depio.runtime.protocol import TaskResult, TaskSpec, as_tuple

from .forker import AVAILABLE, Forker
from .slot_process import frame, own_process_group, slot_main


class SlotStarter(Protocol):
    """What starts slots (see `slot_context`). `forks_here`: slots are forked from this process, so
    it must not run ZeroMQ threads yet when they start."""

    forks_here: bool

    def start(self, channel: socket.socket, worker_name: str): ...

    def retire(self) -> None: ...


class Slot:
    """The worker's handle on one slot process and the tasks it has handed it (head = running).

    The channel is a socketpair with length-prefixed pickles. The worker's side never blocks: what
    the slot has not read yet waits in `outbuf` (the worker polls for writability), so a big
    function or argument for a slot that is busy cannot stall the worker's heartbeats."""

    def __init__(self, starter: "SlotStarter", index: int, worker_name: str):
        self.index = index
        parent, child = socket.socketpair()
        try:
            self.process = starter.start(child, worker_name)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        own_process_group(self.process.pid)     # the slot does it too: whichever runs first
        parent.setblocking(False)
        self.sock = parent
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        # reused for every read: `recv(1 MB)` would allocate (mmap) and free a megabyte each time
        self.readbuf = memoryview(bytearray(1 << 18))
        self.assigned: Deque[Tuple[int, TaskSpec]] = deque()
        self.head_started: float = 0.0
        self.functions: set = set()
        self.ignored: set = set()      # cancelled jobs still queued in the slot
        self.conditional: set = set()  # jobs that run only if the one before them succeeds
        self.last_ok = False           # whether the last result received succeeded
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send(self, msg: object) -> None:
        self.outbuf += frame(msg)
        self.write_pending()

    def write_pending(self) -> None:
        """Write what the slot's socket takes now; raises OSError if the slot is gone."""
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                return
            del self.outbuf[:n]

    def set_env(self, env: Dict[str, str]) -> None:
        """Environment for every task this slot runs (its own GPUs), set before its first task."""
        self._send(("env", env))

    context: Optional[tuple] = None     # a pool's pipeline (cwd, import path) its tasks run in; None: the worker's

    def set_context(self, context: Optional[tuple]) -> None:
        """The tasks given next run in this pipeline's working directory and import path."""
        self._send(("ctx", context))
        self.context = context

    def give(self, tasks: List[Tuple[int, TaskSpec]], functions: Dict[bytes, bytes],
             conditional: bool = False) -> None:
        """Hand a batch to the slot, preceded by any function it has not seen. `conditional`: each task
        runs only if the one before it succeeded (see the module docstring)."""
        for _, spec in tasks:
            if spec.func_digest not in self.functions:
                self._send(("fn", spec.func_digest, functions.get(spec.func_digest)))
                self.functions.add(spec.func_digest)
        if not self.assigned:
            self.head_started = time.time()
        self.assigned.extend(tasks)
        if conditional:
            self.conditional.update(jid for jid, _ in tasks)
        self._send(("run", [(jid, as_tuple(spec), conditional) for jid, spec in tasks]))

    def receive(self) -> List[Tuple[int, Optional[TaskResult]]]:
        """Everything the slot has sent so far (None: a conditional task it skipped). Raises EOFError
        when the slot is gone."""
        results: List[Tuple[int, Optional[TaskResult]]] = []
        view = self.readbuf
        while True:
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:
                break
            if not n:
                raise EOFError("slot closed its end")
            self.inbuf += view[:n]
        buf = self.inbuf
        pos = 0
        while len(buf) - pos >= 4:
            size = int.from_bytes(buf[pos:pos + 4], "little")
            if len(buf) - pos - 4 < size:
                break
            results.extend([(jid, r if r is None else TaskResult(*r))
                            for jid, r in pickle.loads(buf[pos + 4:pos + 4 + size])[1]])
            pos += 4 + size
        del buf[:pos]
        return results

    def deadline(self) -> Optional[float]:
        if not self.assigned:
            return None
        timeout = self.assigned[0][1].timeout
        return None if timeout is None else self.head_started + timeout

    def signal(self, sig: int) -> None:
        """Send `sig` to the slot and to everything its task started in the slot's process group."""
        pid = self.process.pid
        if pid is None:
            return
        try:
            os.killpg(pid, sig)     # a group id is not reused while any member lives
            return
        except (ProcessLookupError, PermissionError):
            pass                    # no group (yet, or any more): the slot alone
        if self.process.exitcode is None:   # not reaped yet, so the pid is still the slot's
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the slot (and its task's processes) and reap it."""
        self.signal(signal.SIGKILL)
        self.process.join(5)
        self.close()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def ask_to_stop(self) -> None:
        """Begin stopping without waiting: an idle slot is asked to exit, a busy one gets SIGTERM
        (its task may clean up); `finish_stop` reaps it or, past the grace period, SIGKILLs it."""
        if not self.process.is_alive():
            return
        if not self.assigned:
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(0.5)
                self.sock.sendall(bytes(self.outbuf) + frame(("stop",)))
                return
            except OSError:
                pass
        self.signal(signal.SIGTERM)

    def finish_stop(self, deadline: float) -> bool:
        """Reap the slot if it has exited; SIGKILL it once `deadline` (time.monotonic) has passed.
        True when it is gone."""
        if self.process.is_alive() and time.monotonic() < deadline:
            return False
        if self.process.is_alive():
            self.kill()
        else:
            self.process.join(0)
            self.signal(signal.SIGKILL)    # whatever the task left behind in the group
            self.close()
        return True

    def stop(self, grace: float = 2.0) -> None:
        """Ask an idle slot to exit; SIGTERM, then SIGKILL after `grace` s, one that is busy or stuck."""
        self.ask_to_stop()
        self.process.join(grace)
        self.finish_stop(0.0)


def stop_slots(slots, grace: float) -> None:
    """Stop several slots at once: all are asked first, then all are waited for against one deadline."""
    for slot in slots:
        slot.ask_to_stop()
    deadline = time.monotonic() + grace
    pending = list(slots)
    while pending:
        pending = [s for s in pending if not s.finish_stop(deadline)]
        if pending:      # until one exits (its sentinel becomes readable), or the grace period ends
            _wait_readable([s.process.sentinel for s in pending], max(0.0, min(0.1, deadline - time.monotonic())))


def _wait_readable(fds: List[int], timeout: float) -> None:
    """Until one of `fds` is readable, or `timeout` s (not multiprocessing.connection.wait: importing
    multiprocessing costs every worker ~4 ms of its start, and on Linux it needs none)."""
    poll = select.poll()
    for fd in fds:
        poll.register(fd, select.POLLIN)
    poll.poll(timeout * 1000)


class ProcessStarter:
    """Slots as `multiprocessing` processes of this one, started by `method` ("fork" or "spawn")."""

    def __init__(self, method: str) -> None:
        import multiprocessing
        self.ctx = multiprocessing.get_context(method)
        self.forks_here = method == "fork"

    def start(self, channel: socket.socket, worker_name: str) -> "multiprocessing.Process":
        process = self.ctx.Process(target=slot_main, args=(channel, worker_name, os.getpid()),
                                   name="depio-slot", daemon=True)
        process.start()
        return process

    def retire(self) -> None:
        pass


def slot_context(first: int = 0) -> SlotStarter:
    """How slots start, decided here only. On Linux (x86-64, arm64) from a fork server (`Forker`),
    so that no slot is forked from a process running ZeroMQ threads; call it while this process has
    no ZeroMQ context. Elsewhere by fork where it exists, spawn otherwise. `first`: how many slots
    are about to be started (see `Forker`)."""
    if AVAILABLE:
        return Forker(first)
    import multiprocessing
    return ProcessStarter("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
