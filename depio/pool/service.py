"""The long-lived pool service: a dispatcher with its client socket on TCP, and its workers.

`depio pool start` runs a `PoolService`: the same `Dispatcher` a pipeline runs in-process, with its
own workers (local ones it starts, Slurm pilots, and any `depio-worker` started by hand). Each
pipeline is a client with its own scheduler; the dispatcher shares slots between clients round-robin
and drops a client (cancelling its tasks) whose heartbeats stop.

Ports: a new pool binds port 0 (`tcp://host:*`) and records the ports the sockets got, so no port is
picked first and bound later (another process could take it in between). A restarted pool binds the
ports of its earlier run, so its hand-started workers come back.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import zmq

from ..runtime import protocol as P
from ..runtime.dispatcher import Dispatcher
from .workers import PoolWorkers
from .registry import POOL_ENV, PoolInfo, pools_dir, port_of, write_private

log = logging.getLogger("depio.pool")

NO_WORKER_LIMIT = 60.0      # seconds a pool without any worker (and none on its way) keeps pipelines waiting


class PoolService:
    """Runs a dispatcher and its local workers until stopped (SIGTERM, SIGINT or `depio pool stop`)."""

    def __init__(self, name: str = "default", host: str = "127.0.0.1", local: int = 0, slots: int = 1,
                 key_file: Optional[str] = None, heartbeat: float = 1.0, liveness: int = 3,
                 client_port: Optional[int] = None, worker_port: Optional[int] = None,
                 slurm: int = 0, slurm_slots: int = 1, slurm_time: float = 60.0,
                 slurm_parameters: Optional[Dict[str, Any]] = None, no_worker_limit: float = NO_WORKER_LIMIT,
                 slurm_shaped_idle: Optional[float] = None):
        self.name = name
        self.host = host
        self.local = local
        self.slots = slots
        self.slurm = slurm
        self.slurm_slots = slurm_slots
        self.slurm_time = slurm_time
        self.slurm_parameters = dict(slurm_parameters or {})
        self.slurm_shaped_idle = slurm_shaped_idle      # None: the launcher's default (SHAPED_IDLE)
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.no_worker_limit = no_worker_limit
        self.stop_reason: Optional[str] = None
        self._stop = threading.Event()
        previous = self._previous()
        self.key = self._key(key_file, previous)
        # None: the socket binds port 0 and the port it got is read back in run()
        self.client_port = client_port or (previous and port_of(previous.client_address)) or None
        self.worker_port = worker_port or (previous and port_of(previous.worker_address)) or None

    def _previous(self) -> Optional[PoolInfo]:
        try:
            info = PoolInfo.load(self.name)
        except LookupError:
            return None
        if info.running:
            raise RuntimeError(f"pool {self.name!r} is already running (pid {info.pid}, {info.client_address}); "
                               f"stop it with `depio pool stop --name {self.name}`")
        return info

    def _key(self, key_file: Optional[str], previous: Optional[PoolInfo]) -> bytes:
        """An explicit key file, else the key of this pool's earlier run (so its workers can come
        back), else $DEPIO_KEY, else a new key on loopback; off loopback, no key means no start."""
        if key_file or previous is None:
            return P.key_for_bind(self._address(None), key_file=key_file)
        return previous.key_bytes

    def _address(self, port: Optional[int]) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port or '*'}"

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    def _bind(self) -> Dispatcher:
        client_address, worker_address = self._address(self.client_port), self._address(self.worker_port)
        dispatcher = Dispatcher(self.key, worker_address, client_address, heartbeat=self.heartbeat,
                                liveness=self.liveness, name=f"pool-{self.name}")
        dispatcher.on_stop_request = self.request_stop
        dispatcher.no_worker_limit = self.no_worker_limit
        try:
            dispatcher.start()
        except zmq.ZMQError as e:
            raise RuntimeError(f"pool {self.name!r} cannot bind {client_address} / {worker_address}: {e}") from None
        self.client_port, self.worker_port = port_of(dispatcher.client_address), port_of(dispatcher.worker_address)
        return dispatcher

    def _launch(self, dispatcher: Dispatcher, launchers: List[Any]) -> None:
        if self.local > 0:
            launcher = PoolWorkers(self.local, self.slots, self.heartbeat, self.liveness)
            launcher.start(dispatcher.worker_address, self.key)
            launchers.append(launcher)
        if self.slurm > 0:
            from ..slurm import pool_pilots
            extra = {} if self.slurm_shaped_idle is None else {"shaped_idle": self.slurm_shaped_idle}
            launchers.append(pool_pilots(dispatcher, self.key, self.slurm, self.slurm_slots, self.slurm_time,
                                         self.slurm_parameters, pools_dir() / f"{self.name}-slurm",
                                         self.heartbeat, max(self.liveness, 5), **extra))
        dispatcher.workers_coming = lambda: workers_coming(launchers)

    def run(self) -> int:
        key_path = pools_dir() / f"{self.name}.key"
        write_private(key_path, self.key.hex() + "\n")
        dispatcher = self._bind()
        info = PoolInfo(self.name, dispatcher.client_address, dispatcher.worker_address, self.key.hex(),
                        str(key_path), os.getpid(), started=time.time(),
                        log_file=os.environ.get("DEPIO_POOL_LOG", ""))
        launchers: List[Any] = []
        try:
            self._launch(dispatcher, launchers)
            info.save()
            log.info("pool %s: clients at %s, workers at %s, %d local worker(s), %d Slurm pilot(s)", self.name,
                     info.client_address, info.worker_address, self.local, self.slurm)
            print(f"depio pool {self.name!r} running (pid {os.getpid()}): pipelines use "
                  f"PoolExecutor({self.name!r}) or {POOL_ENV}={self.name}; workers connect to "
                  f"{info.worker_address} with --key-file {key_path}; pipelines fail when it has had no worker "
                  f"(and none starting) for {self.no_worker_limit:g} s", flush=True)
            while not self._stop.wait(0.5):
                if not dispatcher.alive:
                    self.request_stop("the dispatcher thread ended")
        finally:
            info.pid = None
            info.save()
            for launcher in launchers:       # stopping: the workers told to leave must not be replaced
                hold = getattr(launcher, "hold", None)
                if hold is not None:
                    hold()
            dispatcher.stop(f"pool {self.name} stopping: {self.stop_reason}")
            for launcher in launchers:
                launcher.stop()
        log.info("pool %s stopped: %s", self.name, self.stop_reason)
        return 0


def workers_coming(launchers: List[Any]) -> str:
    """What workers are on their way to a pool ("" for none): local ones running but not registered
    yet, Slurm pilots waiting in the queue or starting."""
    parts = []
    for launcher in launchers:
        try:
            if isinstance(launcher, PoolWorkers):
                n = launcher.coming()
                if n:
                    parts.append(f"{n} local worker(s) starting")
            else:
                with launcher.lock:
                    waiting = [p for p in launcher.pilots.values() if not p.ended and not p.registered]
                if waiting:
                    parts.append(f"{len(waiting)} Slurm pilot job(s) on their way ("
                                 + ", ".join(sorted({p.state or "submitted" for p in waiting})) + ")")
        except Exception:      # a launcher's bug must not stop the dispatcher's loop: count it as coming
            log.exception("cannot tell which workers are on their way")
            parts.append("unknown")
    return "; ".join(parts)


def serve(name: str, **kwargs: Any) -> int:
    """Run a pool in the foreground of this process; SIGTERM and SIGINT stop it cleanly."""
    service = PoolService(name, **kwargs)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: service.request_stop(f"signal {signal.Signals(s).name}"))
    return service.run()


def start_detached(name: str, log_file: Optional[str], args: List[str], timeout: float = 20.0) -> PoolInfo:
    """Start `depio pool start` again in a new session with output to `log_file`; wait until it runs."""
    log_path = Path(log_file or pools_dir() / f"{name}.log").expanduser()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        before = PoolInfo.load(name)
        if before.running:
            raise RuntimeError(f"pool {name!r} is already running (pid {before.pid})")
    except LookupError:
        pass
    env = dict(os.environ, DEPIO_POOL_LOG=str(log_path))
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "depio.cli", "pool", "start", "--name", name] + args,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"pool {name!r} did not start (exit {proc.returncode}): " + " | ".join(tail))
        try:
            info = PoolInfo.load(name)
            if info.pid == proc.pid:
                return info
        except (LookupError, ValueError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"pool {name!r} did not come up within {timeout:g} s; see {log_path}")
