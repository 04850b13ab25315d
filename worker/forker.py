"""Starting slot processes without forking a process that runs ZeroMQ threads.

Forking a multi-threaded process is unsafe: a lock that a ZeroMQ I/O thread holds at that moment
stays held in the child for ever. So the worker forks its slots through a `Forker`: a small process
forked from the worker while it runs no ZeroMQ thread (at start, and after each reconnect, once the
old context has ended), with every module a slot needs already imported.

The forker forks each slot with CLONE_PARENT: the slot is the worker's child, as if the worker had
forked it (the worker reaps it, the slot dies with the worker through PR_SET_PDEATHSIG, and
`os.getppid()` in a task is the worker), and a slot starts in about a millisecond. The forker
dies with the worker too, and exits when the worker closes its socket (`retire`).
"""
from __future__ import annotations

import ctypes
import os
import platform
import select
import signal
import socket
import sys
import weakref
from typing import Optional

from .slot_process import die_with_parent, preload, slot_main

_CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
AVAILABLE = sys.platform.startswith("linux") and _SYS_CLONE is not None and hasattr(os, "pidfd_open")
_syscall = ctypes.CDLL(None, use_errno=True).syscall if AVAILABLE else None
if _syscall is not None:
    _syscall.restype = ctypes.c_long


def _fork_sibling() -> int:
    """`os.fork()`, except that the child's parent is this process's parent (clone with
    CLONE_PARENT); CPython's own before/after-fork steps run as they do for `os.fork()`."""
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _syscall(ctypes.c_long(_SYS_CLONE), ctypes.c_ulong(_CLONE_PARENT | signal.SIGCHLD),
                   ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return pid


class SlotProcess:
    """The worker's handle on a slot that a Forker started (a child of the worker): the part of
    `multiprocessing.Process` the worker uses (pid, sentinel, exitcode, is_alive, join)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sentinel = os.pidfd_open(pid)      # readable once the slot has ended
        self._exitcode: Optional[int] = None
        weakref.finalize(self, os.close, self.sentinel)

    def _ended(self, timeout: Optional[float]) -> bool:
        if self._exitcode is not None:
            return True
        if timeout != 0 and not select.select([self.sentinel], [], [], timeout)[0]:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:       # reaped elsewhere: whatever it was, it is over
            self._exitcode = -signal.SIGKILL
            return True
        if pid == 0:
            return False
        self._exitcode = os.waitstatus_to_exitcode(status)
        return True

    @property
    def exitcode(self) -> Optional[int]:
        self._ended(0)
        return self._exitcode

    def is_alive(self) -> bool:
        return not self._ended(0)

    def join(self, timeout: Optional[float] = None) -> None:
        self._ended(timeout)


class Forker:
    """The worker's handle on its fork server. Create it from the main thread while this process
    runs no other thread (PR_SET_PDEATHSIG ties the forker to the thread that forks it). Slots are
    forked from the forker, not this process, which may run ZeroMQ threads once the forker exists."""

    forks_here = False

    def __init__(self, first: int = 0) -> None:
        """`first`: the slots about to be asked for. The forker forks them before it imports what
        tasks run with (each then imports it itself, while the worker registers), later ones after."""
        ours, theirs = socket.socketpair()
        worker = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                _serve(theirs, worker, first)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._sock = ours
        self._retire = weakref.finalize(self, _retire, ours, pid)   # a forker nobody holds retires

    def start(self, channel: socket.socket, worker_name: str) -> SlotProcess:
        """Start a slot that serves `channel` (its end of the socketpair); raises OSError if it cannot."""
        socket.send_fds(self._sock, [worker_name.encode()], [channel.fileno()])
        data = b""
        while len(data) < 8:
            chunk = self._sock.recv(8 - len(data))
            if not chunk:
                raise OSError("the slot forker is gone")
            data += chunk
        pid = int.from_bytes(data, "little", signed=True)
        if pid < 0:
            raise OSError(-pid, f"cannot fork a slot: {os.strerror(-pid)}")
        return SlotProcess(pid)

    def retire(self) -> None:
        """Start no more slots: the forker exits (its slots are the worker's, and live on)."""
        self._retire()


def _retire(sock: socket.socket, pid: int) -> None:
    sock.close()
    try:
        os.waitpid(pid, 0)     # it exits as soon as it reads the end of its socket
    except ChildProcessError:
        pass


def _serve(sock: socket.socket, worker_pid: int, first: int) -> None:
    die_with_parent()
    if os.getppid() != worker_pid:
        return
    # Ctrl-C or a SIGTERM to the whole group is for the worker, which stops its slots itself. Blocked,
    # not ignored: a SIGTERM sent to a new slot before it has set its handlers waits for them
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    signal.set_wakeup_fd(-1)
    served = 0
    while True:
        if served == first:
            preload()      # the slots forked from now on have it at once
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1024, 1)
        except OSError:
            return
        if not msg or len(fds) != 1:
            return           # retired, or the worker is gone
        try:
            pid = _fork_sibling()
        except OSError as e:
            os.close(fds[0])
            sock.sendall((-(e.errno or 1)).to_bytes(8, "little", signed=True))
            continue
        if pid == 0:
            _become_slot(sock, fds[0], worker_pid, msg.decode())
        served += 1
        os.close(fds[0])
        sock.sendall(pid.to_bytes(8, "little", signed=True))


def _become_slot(sock: socket.socket, channel: int, worker_pid: int, worker_name: str) -> None:
    """In the new slot: drop the forker's state, then serve the worker until told to stop."""
    code = 1
    try:
        sock.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        devnull = os.open(os.devnull, os.O_RDONLY)    # a task reads no stdin (as in a multiprocessing child)
        os.dup2(devnull, 0)
        os.close(devnull)
        slot_main(socket.socket(fileno=channel), worker_name, worker_pid)
        code = 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
