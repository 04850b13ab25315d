"""Long-lived worker pools: a dispatcher as a service that many pipelines share.

`depio pool start` runs a `PoolService`: the same `Dispatcher` a pipeline runs in-process, but with
its client socket on TCP and its own workers (local ones it starts, and any `depio-worker` started
by hand). Pipelines reach it through `PoolExecutor("name")` or, unchanged, through the environment
variable `DEPIO_POOL=name`. Each pipeline is a client with its own scheduler; the dispatcher shares
slots between clients round-robin and drops a client (cancelling its tasks) whose heartbeats stop.

A pool is found through its connection file `~/.depio/pools/<name>.json` (override the folder with
`DEPIO_HOME`): addresses, pid and the key, readable only by its owner. The key also lives in
`<name>.key` for `depio-worker --key-file`. Both survive a stop, so a restarted pool binds the same
addresses with the same key and hand-started workers (`--reconnect`) come back by themselves.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import zmq

from ..runtime import protocol as P
from ..Executors import AbstractTaskExecutor
from ..runtime.backends import Backend, DispatcherBackend
from ..runtime.dispatcher import Dispatcher
from ..runtime.launchers import LocalLauncher

log = logging.getLogger("depio.pool")

POOL_ENV = "DEPIO_POOL"


def pools_dir() -> Path:
    """The per-user folder of connection files, created private (0700)."""
    path = Path(os.environ.get("DEPIO_HOME", "~/.depio")).expanduser() / "pools"
    if not path.is_dir():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    return path


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, without a moment where it is readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pid_alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


@dataclass
class PoolInfo:
    """The connection file of a pool."""
    name: str
    client_address: str
    worker_address: str
    key: str                       # hex
    key_file: str
    pid: Optional[int] = None
    host: str = field(default_factory=platform.node)
    started: Optional[float] = None
    log_file: str = ""

    @staticmethod
    def path_for(name: str) -> Path:
        return pools_dir() / f"{name}.json"

    def save(self) -> None:
        _write_private(self.path_for(self.name), json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, name: str) -> "PoolInfo":
        path = cls.path_for(name) if not name.endswith(".json") else Path(name)
        try:
            P.check_key_file(str(path))
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LookupError(f"no pool named {name!r}: start one with `depio pool start --name {name}` "
                              f"(looked for {path})") from None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def running(self) -> bool:
        return self.pid is not None and self.host == platform.node() and _pid_alive(self.pid)

    @property
    def key_bytes(self) -> bytes:
        return P.key_from_hex(self.key)


def resolve_pool(spec: str, key_file: Optional[str] = None) -> PoolInfo:
    """A pool by name, by connection-file path, or by client address (key from `key_file` or $DEPIO_KEY)."""
    if "://" in spec:
        key = P.load_key(key_file)
        if key is None:
            raise P.KeyRequiredError(f"pool address {spec} given without a key: pass a key file or set "
                                     f"${P.KEY_ENV}")
        return PoolInfo(spec, spec, "", key.hex(), key_file or "")
    return PoolInfo.load(spec)


# ---------------------------------------------------------------- the service

class PoolService:
    """Runs a dispatcher and its local workers until stopped (SIGTERM, SIGINT or `depio pool stop`)."""

    def __init__(self, name: str = "default", host: str = "127.0.0.1", local: int = 0, slots: int = 1,
                 key_file: Optional[str] = None, heartbeat: float = 1.0, liveness: int = 3,
                 client_port: Optional[int] = None, worker_port: Optional[int] = None,
                 slurm: int = 0, slurm_slots: int = 1, slurm_time: float = 60.0,
                 slurm_parameters: Optional[Dict[str, Any]] = None):
        self.name = name
        self.host = host
        self.local = local
        self.slots = slots
        self.slurm = slurm
        self.slurm_slots = slurm_slots
        self.slurm_time = slurm_time
        self.slurm_parameters = dict(slurm_parameters or {})
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.stop_reason: Optional[str] = None
        self._stop = threading.Event()
        previous = self._previous()
        self.key = self._key(key_file, previous)
        self.client_port = client_port or (previous and _port_of(previous.client_address)) or _free_port(host)
        self.worker_port = worker_port or (previous and _port_of(previous.worker_address)) or _free_port(host)

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
            return P.key_for_bind(self._address(0), key_file=key_file)
        return previous.key_bytes

    def _address(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port}"

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    def run(self) -> int:
        client_address, worker_address = self._address(self.client_port), self._address(self.worker_port)
        key_path = pools_dir() / f"{self.name}.key"
        _write_private(key_path, self.key.hex() + "\n")
        dispatcher = Dispatcher(self.key, worker_address, client_address, heartbeat=self.heartbeat,
                                liveness=self.liveness, name=f"pool-{self.name}")
        dispatcher.on_stop_request = self.request_stop
        try:
            dispatcher.start()
        except zmq.ZMQError as e:
            raise RuntimeError(f"pool {self.name!r} cannot bind {client_address} / {worker_address}: {e}") from None
        info = PoolInfo(self.name, dispatcher.client_address, dispatcher.worker_address, self.key.hex(),
                        str(key_path), os.getpid(), started=time.time(),
                        log_file=os.environ.get("DEPIO_POOL_LOG", ""))
        launchers: List[Any] = []
        try:
            if self.local > 0:
                launcher = LocalLauncher(self.local, self.slots, self.heartbeat, self.liveness,
                                         max_restarts=1_000_000)
                launcher.start(dispatcher.worker_address, self.key)
                launchers.append(launcher)
            if self.slurm > 0:
                from ..slurm import pool_pilots
                launchers.append(pool_pilots(dispatcher, self.key, self.slurm, self.slurm_slots, self.slurm_time,
                                             self.slurm_parameters, pools_dir() / f"{self.name}-slurm",
                                             self.heartbeat, max(self.liveness, 5)))
            info.save()
            log.info("pool %s: clients at %s, workers at %s, %d local worker(s), %d Slurm pilot(s)", self.name,
                     info.client_address, info.worker_address, self.local, self.slurm)
            print(f"depio pool {self.name!r} running (pid {os.getpid()}): pipelines use "
                  f"PoolExecutor({self.name!r}) or {POOL_ENV}={self.name}; workers connect to "
                  f"{info.worker_address} with --key-file {key_path}", flush=True)
            while not self._stop.wait(0.5):
                if not dispatcher.alive:
                    self.request_stop("the dispatcher thread ended")
        finally:
            info.pid = None
            info.save()
            dispatcher.stop(f"pool {self.name} stopping: {self.stop_reason}")
            for launcher in launchers:
                launcher.stop()
        log.info("pool %s stopped: %s", self.name, self.stop_reason)
        return 0


def _port_of(address: str) -> Optional[int]:
    try:
        return int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


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
    before = None
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


# ---------------------------------------------------------------- talking to a running pool

def request(info: PoolInfo, msg: object, timeout: float = 5.0) -> object:
    """One request/answer with a pool's dispatcher over its client socket."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if "[" in info.client_address:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(info.client_address)
        sock.send_multipart(P.encode(msg, info.key_bytes))
        if not sock.poll(timeout * 1000):
            raise TimeoutError(f"pool {info.name!r} at {info.client_address} did not answer within {timeout:g} s")
        return P.decode(sock.recv_multipart(), info.key_bytes, accept_refusal=True)
    finally:
        sock.close()


def status(spec: str) -> Dict[str, Any]:
    info = resolve_pool(spec)
    if "://" not in spec and not info.running:
        return {"name": info.name, "running": False, "client_address": info.client_address,
                "worker_address": info.worker_address}
    reply = request(info, P.StatusRequest())
    if isinstance(reply, P.Refused):
        raise RuntimeError(f"pool {info.name!r} refused the status request: {reply.reason}")
    data = dict(reply.snapshot)
    data.update(name=info.name, running=True, pid=info.pid, client_address=info.client_address,
                worker_address=info.worker_address)
    return data


def stop(spec: str, timeout: float = 20.0) -> str:
    info = resolve_pool(spec)
    if "://" not in spec and not info.running:
        return f"pool {info.name!r} is not running"
    request(info, P.StopRequest("depio pool stop"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "://" in spec or not _pid_alive(info.pid):
            return f"pool {info.name!r} stopped"
        time.sleep(0.05)
    raise TimeoutError(f"pool {info.name!r} (pid {info.pid}) did not stop within {timeout:g} s")


# ---------------------------------------------------------------- the pipeline's side

class PoolExecutor(AbstractTaskExecutor):
    """Run a pipeline's tasks on a running pool: `PoolExecutor("default")`, a connection file, or a
    client address (`tcp://host:port`, key from `key_file` or $DEPIO_KEY).

    `wait_for_pool`: seconds a run waits for a pool that went away to come back before its in-flight
    tasks fail (0: fail at once)."""

    def __init__(self, pool: str = "default", key_file: Optional[str] = None, max_jobs_pending: Optional[int] = None,
                 max_jobs_queued: Optional[int] = None, retries_on_worker_loss: int = 1,
                 heartbeat: float = 1.0, liveness: int = 3):
        super().__init__(max_jobs_pending, max_jobs_queued, retries_on_worker_loss)
        self.pool = pool
        self.key_file = key_file
        self.heartbeat = heartbeat
        self.liveness = liveness

    def make_backend(self) -> Backend:
        info = resolve_pool(self.pool, self.key_file)
        if "://" not in self.pool and not info.running:
            raise RuntimeError(f"pool {info.name!r} is not running: start it with `depio pool start --name "
                               f"{info.name} --local N`")
        return DispatcherBackend(None, address=info.client_address, key=info.key_bytes, heartbeat=self.heartbeat,
                                 liveness=self.liveness, name=f"pipeline pid {os.getpid()}")

    def describe(self) -> str:
        return f"PoolExecutor({self.pool!r})"


def executor_from_environment() -> Optional[PoolExecutor]:
    """`DEPIO_POOL=name` (or an address) makes an unchanged script run on that pool."""
    spec = os.environ.get(POOL_ENV, "").strip()
    return PoolExecutor(spec) if spec else None


# ---------------------------------------------------------------- `depio pool ...`

def _fmt_time(t: Optional[float]) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else ""


def _cmd_start(args) -> int:
    if args.local is None:
        args.local = 0 if args.slurm else (os.cpu_count() or 1)
    extra = ["--local", str(args.local), "--slots", str(args.slots), "--host", args.host,
             "--heartbeat", str(args.heartbeat), "--slurm", str(args.slurm), "--slurm-slots", str(args.slurm_slots),
             "--slurm-time", str(args.slurm_time)] + [f"--slurm-param={p}" for p in args.slurm_param]
    if args.key_file:
        extra += ["--key-file", args.key_file]
    if args.detach:
        info = start_detached(args.name, args.log, extra)
        print(f"pool {args.name!r} started (pid {info.pid}); clients: {info.client_address}, workers: "
              f"{info.worker_address}, key: {info.key_file}, log: {info.log_file}")
        return 0
    return serve(args.name, host=args.host, local=args.local, slots=args.slots, key_file=args.key_file,
                 heartbeat=args.heartbeat, slurm=args.slurm, slurm_slots=args.slurm_slots,
                 slurm_time=args.slurm_time, slurm_parameters=_slurm_params(args.slurm_param))


def _slurm_params(pairs: List[str]) -> Dict[str, Any]:
    """`KEY=VALUE` pairs (submitit's slurm_* names, e.g. slurm_partition=gpu or mem_gb=8)."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm-param takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return out


def _cmd_status(args) -> int:
    from tabulate import tabulate
    data = status(args.name)
    if args.json:
        print(json.dumps(data, indent=1, default=str))
        return 0
    if not data.get("running"):
        print(f"pool {data['name']!r}: not running (last addresses: clients {data['client_address']}, "
              f"workers {data['worker_address']})")
        return 1
    now = time.time()
    print(f"pool {data['name']!r}: pid {data.get('pid')}, clients {data['client_address']}, "
          f"workers {data['worker_address']}")
    workers = [[w["name"], w["host"], w["pid"], w["slots"], w["busy"], w["done"],
                f"{now - w['since']:.0f} s ago", w.get("slurm_job_id", "")] for w in data["workers"]]
    print(f"\nWorkers ({len(workers)}, {sum(w['slots'] for w in data['workers'])} slots):")
    print(tabulate(workers, headers=["name", "host", "pid", "slots", "busy", "done", "joined", "slurm job"],
                   tablefmt="simple") if workers else "  none")
    clients = [[c["name"], c["host"], c["pid"], c["queued"], c["running"], c["done"],
                _fmt_time(c["since"])] for c in data["clients"]]
    print(f"\nClients ({len(clients)}):")
    print(tabulate(clients, headers=["name", "host", "pid", "ready", "running", "done", "since"],
                   tablefmt="simple") if clients else "  none")
    totals = (f"\nTotals: {sum(w['busy'] for w in data['workers'])} running, "
              f"{sum(c['queued'] for c in data['clients'])} ready, {sum(w['done'] for w in data['workers'])} done")
    if data.get("workers_lost"):
        totals += f", {data['workers_lost']} workers lost"
    if data.get("bad_messages"):
        totals += f", bad messages dropped: {data['bad_messages']}"
    print(totals)
    return 0


def _cmd_stop(args) -> int:
    print(stop(args.name))
    return 0


def add_pool_commands(sub) -> None:
    """Register `depio pool start|status|stop` on the CLI's subparsers."""
    pool = sub.add_parser("pool", help="long-lived worker pools shared by pipelines",
                          description="A pool keeps warm workers that many pipelines use, one after "
                                      f"another or at once. Pipelines pick one with PoolExecutor(NAME) or "
                                      f"{POOL_ENV}=NAME.")
    psub = pool.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    start = psub.add_parser("start", help="run a pool (foreground; --detach for background)")
    start.add_argument("--name", default="default", help="pool name [%(default)s]")
    start.add_argument("--local", type=int, default=None,
                       help="local workers to start [one per core, or 0 with --slurm]")
    start.add_argument("--slots", type=int, default=1, help="slots per local worker [%(default)s]")
    start.add_argument("--slurm", type=int, default=0, metavar="N",
                       help="keep N depio-worker pilot jobs in Slurm, replaced at their walltime [%(default)s]")
    start.add_argument("--slurm-slots", type=int, default=1, help="slots per Slurm pilot [%(default)s]")
    start.add_argument("--slurm-time", type=float, default=60.0, help="pilot walltime in minutes [%(default)s]")
    start.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                       help="a submitit Slurm parameter for the pilots, e.g. slurm_partition=gpu (repeatable); "
                            "SBATCH_* environment variables apply too")
    start.add_argument("--host", default="127.0.0.1",
                       help="address to bind; off loopback a key file is required [%(default)s]")
    start.add_argument("--key-file", help="protocol key (mode 600); default: the pool's own key")
    start.add_argument("--heartbeat", type=float, default=1.0, help="seconds [%(default)s]")
    start.add_argument("--detach", action="store_true", help="run in the background")
    start.add_argument("--log", help="log file with --detach [~/.depio/pools/NAME.log]")
    start.set_defaults(func=_cmd_start)
    st = psub.add_parser("status", help="workers and clients of a pool, as a table")
    st.add_argument("--name", default="default", help="pool name, connection file or address [%(default)s]")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_cmd_status)
    sp = psub.add_parser("stop", help="stop a pool (its local workers end; hand-started ones wait)")
    sp.add_argument("--name", default="default", help="pool name [%(default)s]")
    sp.set_defaults(func=_cmd_stop)
