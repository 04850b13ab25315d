"""Slot processes: where tasks actually run.

A worker runs each task in a child process (a slot) so that a task that holds the GIL, blocks in C
code, crashes the interpreter or has to be killed on timeout cannot stop the worker's heartbeats
or take the worker down. A slot runs the batches of tasks it is handed one after another and sends
their `TaskResult`s back in batches over a socketpair.

A task handed over as *conditional* (the next link of a chain) runs only if the task the slot
handled just before it succeeded; otherwise it is skipped and reported as `None`, and the worker
hands it back to its pipeline. A chain then goes from link to link inside the slot, without
waiting for the worker.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import cloudpickle

from depio.runtime.execution import FdCapture, call_task
from depio.runtime.protocol import TaskResult, TaskSpec, as_tuple

VALUE_LIMIT = 1 << 20   # return values larger than this are not sent back


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to signal this process when its parent dies (no orphans if the worker is killed)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def _own_process_group(pid: int = 0) -> None:
    """Make the slot the leader of its own process group, so that killing the group on timeout or
    cancellation also ends what the task started (a `subprocess`, a shell pipeline). Done by both the
    slot and the worker, whichever runs first (the usual fork race)."""
    try:
        os.setpgid(pid, pid if pid else 0)
    except OSError:
        pass


FLUSH_AFTER = 0.002     # a slot never holds a finished result longer than this (seconds)


def _frame(msg: object) -> bytes:
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
        threading.Thread(target=self._flush_late, name="depio-slot-results", daemon=True).start()

    def add(self, jid: int, result: Optional[tuple], last: bool) -> None:
        """Queue one result; `last`: the batch ends here, so send now."""
        with self._lock:
            if not self._done:
                self._since = time.monotonic()
                self._pending.notify()
            self._done.append((jid, result))
            if last or time.monotonic() - self._since >= FLUSH_AFTER:
                self._send()

    def _send(self) -> None:
        self._sock.sendall(_frame(("done", self._done)))
        self._done = []

    def _flush_late(self) -> None:
        # a task that holds the GIL in C delays this until it lets go; nothing else does
        with self._lock:
            while True:
                if not self._done:
                    self._pending.wait()
                    continue
                left = self._since + FLUSH_AFTER - time.monotonic()
                if left > 0:
                    self._pending.wait(left)
                    continue
                try:
                    self._send()
                except OSError:       # the worker is gone: the slot ends on its next read
                    return


def _slot_main(sock: socket.socket, worker_name: str, parent_pid: int) -> None:
    signal.set_wakeup_fd(-1)           # forked: the worker's wake-up pipe is not ours to write
    die_with_parent()
    if os.getppid() != parent_pid:     # the worker died before prctl took effect
        os._exit(1)
    _own_process_group()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the worker's business
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock.setblocking(True)
    reader = sock.makefile("rb")
    results = ResultSender(sock)
    capture = FdCapture()
    functions: Dict[bytes, object] = {}
    blobs: Dict[bytes, bytes] = {}
    previous_ok = False        # did the task this slot handled last succeed? (for conditional ones)
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
                    result = _run(TaskSpec(*spec), functions, blobs, capture, worker_name)
                    previous_ok = result.error is None
                    results.add(jid, as_tuple(result), k == last)
        elif kind == "stop":
            return


def _run(spec: TaskSpec, functions: Dict, blobs: Dict, capture: FdCapture, worker_name: str) -> TaskResult:
    started = time.time()
    try:
        func = functions.get(spec.func_digest)
        if func is None:
            func = functions[spec.func_digest] = cloudpickle.loads(blobs.pop(spec.func_digest))
        args, kwargs = pickle.loads(spec.args)
    except Exception as e:
        import traceback
        return TaskResult(spec.key, spec.attempt, started, time.time(), "", "",
                          {"kind": "TaskRaisedExceptionException", "type": type(e).__qualname__,
                           "message": f"cannot load the task on worker {worker_name}: {e}",
                           "traceback": traceback.format_exc(),
                           "summary": f"cannot load the task on worker {worker_name}: {type(e).__name__}: {e}"},
                          None, worker_name)
    with capture:
        error, value = call_task(func, args, kwargs, spec.name, spec.products, spec.dependencies)
    out, err = capture.read()
    blob = None
    if value is not None:
        try:
            blob = pickle.dumps(value, protocol=5)
        except Exception:
            try:
                blob = cloudpickle.dumps(value)
            except Exception:
                blob = None
        if blob is not None and len(blob) > VALUE_LIMIT:
            blob = None
    return TaskResult(spec.key, spec.attempt, started, time.time(), out, err, error, blob, worker_name)


class Slot:
    """The worker's handle on one slot process and the tasks it has handed it (head = running).

    The channel is a socketpair with length-prefixed pickles. The worker's side never blocks: what
    the slot has not read yet waits in `outbuf` (the worker polls for writability), so a big
    function or argument for a slot that is busy cannot stall the worker's heartbeats."""

    def __init__(self, ctx, index: int, worker_name: str):
        self.index = index
        parent, child = socket.socketpair()
        self.process = ctx.Process(target=_slot_main, args=(child, worker_name, os.getpid()),
                                   name=f"depio-slot-{index}", daemon=True)
        self.process.start()
        _own_process_group(self.process.pid)
        child.close()
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
        self.outbuf += _frame(msg)
        self.write_pending()

    def write_pending(self) -> None:
        """Write what the slot's socket takes now; raises OSError if the slot is gone."""
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                return
            del self.outbuf[:n]

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
                self.sock.sendall(bytes(self.outbuf) + _frame(("stop",)))
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
            multiprocessing.connection.wait([s.process.sentinel for s in pending],
                                            max(0.0, min(0.1, deadline - time.monotonic())))


def slot_context():
    """fork where it exists (a slot starts in milliseconds), spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")
