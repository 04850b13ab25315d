"""Launchers start workers that connect back to a dispatcher.

`LocalLauncher` runs `depio-worker` as child processes of the pipeline (or pool). It keeps their
PIDs, hands them the key through the environment (not the command line, which `ps` shows), and on
`stop()` asks, then terminates, then kills: no worker outlives the process that started it.
"""
from __future__ import annotations

import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional, Set

from . import protocol as P
from .resources import Resources, fits, local_offer

log = logging.getLogger("depio.launchers")


def worker_command(address: str, slots: int, extra: Optional[List[str]] = None) -> List[str]:
    return [sys.executable, "-m", "worker", "--connect", address, "--slots", str(slots)] + list(extra or [])


def worker_environment(key: bytes) -> dict:
    """The pipeline's environment, its import path (so workers can import the user's modules) and the key."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in paths:
        paths.insert(0, here)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[P.KEY_ENV] = key.hex()
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# worker exit codes that a replacement would only repeat (see worker/main.py)
NO_RESTART_CODES = {2: "its dispatcher is gone", 3: "it was refused (key, protocol or runtime mismatch)"}


class LocalLauncher:
    """Starts `workers` local worker processes with `slots` slots each.

    A worker that dies (OOM killer, kill -9, a crash) is replaced, up to `max_restarts` times in all:
    what a user expects of a local pool is that it stays at strength, while the dispatcher hands the
    lost tasks back to the scheduler (a separate, per-task budget). A worker that exits because it
    was refused or lost its dispatcher is not replaced: its replacement would fare the same."""

    def __init__(self, workers: int, slots: int, heartbeat: float = 1.0, liveness: int = 3,
                 max_restarts: Optional[int] = None, log_level: str = "WARNING"):
        self.workers = max(1, int(workers))
        self.slots = max(1, int(slots))
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_restarts = self.workers * 2 if max_restarts is None else max_restarts
        self.log_level = log_level
        self.procs: List[subprocess.Popen] = []
        self.restarts = 0
        self._stopping = False
        self._lock = threading.Lock()
        self._exited = threading.Condition()     # notified by the watch threads as workers end
        self.on_all_gone: Optional[Callable[[str], None]] = None

    def too_big(self, request: Resources) -> Optional[str]:
        """Why no slot of this machine's workers could run a task asking `request` (None: one can)."""
        offer = local_offer(self.slots)
        if fits(request, offer):
            return None
        return (f"asks for {request.describe()}, more than this machine has for one of its worker slots "
                f"({offer.cpus} CPUs, {offer.gpus} GPU(s), {offer.mem_mb} MB memory)")

    def start(self, address: str, key: bytes) -> None:
        self.address, self.key = address, key
        for _ in range(self.workers):
            self._spawn()

    def _spawn(self) -> None:
        cmd = worker_command(self.address, self.slots,
                             ["--heartbeat", str(self.heartbeat), "--liveness", str(self.liveness),
                              "--parent-pid", str(os.getpid()), "--log-level", self.log_level])
        with self._lock:     # stop() sets _stopping under the lock: no worker starts after it looked
            if self._stopping:
                return
            proc = subprocess.Popen(cmd, env=worker_environment(self.key), stdin=subprocess.DEVNULL,
                                    start_new_session=True)   # Ctrl-C in the terminal goes to the pipeline only
            self.procs.append(proc)
        threading.Thread(target=self._watch, args=(proc,), name=f"depio-watch-{proc.pid}", daemon=True).start()

    def _watch(self, proc: subprocess.Popen) -> None:
        """Waits on one worker process (a blocking wait, not a poll); replaces it if it dies early."""
        code = proc.wait()
        with self._exited:
            self._exited.notify_all()
        if self._stopping:
            return
        pointless = NO_RESTART_CODES.get(code)
        with self._lock:
            alive = [p for p in self.procs if p.poll() is None]
            may_restart = self.restarts < self.max_restarts and pointless is None
            if may_restart:
                self.restarts += 1
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        who = f"local worker (host {platform.node()}, pid {proc.pid})"
        when = time.strftime("%H:%M:%S")
        if may_restart:
            log.warning("%s ended (%s) at %s; starting a replacement", who, how, when)
            self._spawn()
            return
        why = pointless or f"the restart budget ({self.max_restarts}) is spent"
        log.warning("%s ended (%s) at %s; not replaced: %s", who, how, when, why)
        if not alive and self.on_all_gone is not None:
            self.on_all_gone(f"{who} ended ({how}) at {when}; no local worker is left and none is started "
                             f"again: {why}")

    def hold(self) -> None:
        """Start no replacement from now on: call it before the dispatcher tells the workers to leave,
        or one that leaves at once is taken for one that died (and replaced, with a warning)."""
        with self._lock:
            self._stopping = True

    @property
    def pids(self) -> List[int]:
        with self._lock:
            return [p.pid for p in self.procs]

    def alive(self) -> List[int]:
        with self._lock:
            return [p.pid for p in self.procs if p.poll() is None]

    def stop(self, grace: float = 0.5, told: Optional[Set[int]] = None) -> None:
        """Workers were told to shut down by the dispatcher; give them `grace` seconds, then SIGTERM,
        then SIGKILL, each by PID. `told`: the PIDs the dispatcher knew (and so told); a worker not
        among them was still starting and gets SIGTERM at once (it stops cleanly on it too)."""
        with self._lock:
            self._stopping = True
            procs = list(self.procs)
        if told is not None:
            for p in procs:
                if p.pid not in told and p.poll() is None:
                    try:
                        os.kill(p.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
        self._wait_exit(procs, grace)
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            left = [p for p in procs if p.returncode is None]
            if not left:
                return
            for p in left:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass
            self._wait_exit(left, wait)

    def _wait_exit(self, procs: List[subprocess.Popen], timeout: float) -> None:
        """Until every one of `procs` has been reaped by its watch thread, or `timeout` s. (Not
        Popen.wait(timeout): that polls with sleeps of up to 50 ms, and every run waits here.)"""
        with self._exited:
            self._exited.wait_for(lambda: all(p.returncode is not None for p in procs), timeout)
