"""Single keys from a terminal (`p` pause, `r` resume, `q` quit) for the live view."""
from __future__ import annotations

import atexit
import os
import select
import sys
import threading
import traceback
from typing import Callable, List, Optional, TextIO


class KeyReader:
    """Reads single keys from a terminal stdin in cbreak mode (no Enter needed, Ctrl-C still works)
    in a daemon thread and hands each to `on_key`. `stop()` restores the terminal; it is also
    registered with atexit, so every exit path leaves the terminal as it was."""

    def __init__(self, on_key: Callable[[str], None], stream: Optional[TextIO] = None):
        self.on_key = on_key
        self.stream = stream or sys.stdin
        self.fd: Optional[int] = None
        self.saved = None
        self.thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.errors: List[str] = []      # tracebacks of on_key failures, for the run's summary

    def start(self) -> bool:
        """False (and nothing changed) unless stdin is a terminal this process owns the foreground of."""
        try:
            import termios
            import tty
            fd = self.stream.fileno()
            if not os.isatty(fd) or os.tcgetpgrp(fd) != os.getpgrp():
                return False       # a background job must not touch the terminal (SIGTTOU)
            self.saved = termios.tcgetattr(fd)
            tty.setcbreak(fd, termios.TCSANOW)
        except Exception:
            self.saved = None
            return False
        self.fd = fd
        atexit.register(self.stop)
        self.thread = threading.Thread(target=self._loop, name="depio-keys", daemon=True)
        self.thread.start()
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self.fd], [], [], 0.1)
                if not r:
                    continue
                data = os.read(self.fd, 64)
            except (OSError, ValueError):
                return
            if not data:
                return
            for ch in data.decode("utf-8", "ignore"):
                try:
                    self.on_key(ch)
                except Exception:
                    self.errors.append(f"a key ({ch!r}) could not be handled:\n{traceback.format_exc()}")

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(1.0)
        if self.saved is not None and self.fd is not None:
            try:
                import termios
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except Exception:      # the terminal is gone: nothing left to restore
                pass
            self.saved = None
        try:
            atexit.unregister(self.stop)
        except Exception:          # interpreter shutdown: atexit is being torn down
            pass


__all__ = ["KeyReader"]
