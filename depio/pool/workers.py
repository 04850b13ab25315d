"""A pool's own local workers: replaced whenever they are gone, for as long as the pool runs.

A pipeline's local workers that lose their dispatcher are not replaced (a replacement would fare the
same). A pool's are different: the pool *is* their dispatcher, so one that lost it lost it only for a
while (the service was stopped or starved, e.g. `kill -STOP`). So they run with `--reconnect`: they
wait and register again rather than exit, and die with the pool (`--parent-pid`); one that ends
anyway is replaced whatever its exit code, after a short pause if it lived only briefly (a crash on
start must not become a fork loop). A pool that is stopping first `hold()`s: no replacement starts.
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import threading
import time

from ..runtime.launchers import LocalLauncher, worker_command, worker_environment

log = logging.getLogger("depio.pool")

RECONNECT = 365 * 24 * 3600.0     # seconds a pool's worker waits to register again: the pool's life
QUICK_EXIT = 5.0                  # a worker that ended sooner than this after its start is replaced after a pause


class PoolWorkers(LocalLauncher):
    """`LocalLauncher` for a pool: see the module docstring."""

    def coming(self) -> int:
        """Worker processes that run (registered or on their way)."""
        with self._lock:
            return sum(1 for p in self.procs if p.poll() is None)

    def _spawn(self) -> None:
        cmd = worker_command(self.address, self.slots,
                             ["--heartbeat", str(self.heartbeat), "--liveness", str(self.liveness),
                              "--parent-pid", str(os.getpid()), "--log-level", self.log_level,
                              "--reconnect", str(RECONNECT)])
        with self._lock:
            if self._stopping:
                return
            proc = subprocess.Popen(cmd, env=worker_environment(self.key), stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            proc.depio_started = time.monotonic()       # type: ignore[attr-defined]
            self.procs = [p for p in self.procs if p.returncode is None] + [proc]
        threading.Thread(target=self._watch, args=(proc,), name=f"depio-watch-{proc.pid}", daemon=True).start()

    def _watch(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self._exited:
            self._exited.notify_all()
        if self._stopping:
            return
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        log.warning("pool worker (host %s, pid %d) ended (%s) at %s; starting a replacement", platform.node(),
                    proc.pid, how, time.strftime("%H:%M:%S"))
        self.restarts += 1
        if time.monotonic() - proc.depio_started < QUICK_EXIT:      # type: ignore[attr-defined]
            time.sleep(1.0)
        self._spawn()
