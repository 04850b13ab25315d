"""`depio pool start|status|stop`: the pool's part of the command line (wired by `depio/cli.py`)."""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional

from .control import status, stop
from .registry import POOL_ENV
from .service import NO_WORKER_LIMIT, serve, start_detached


def _fmt_time(t: Optional[float]) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else ""


def _cmd_start(args: argparse.Namespace) -> int:
    if args.local is None:
        args.local = 0 if args.slurm else (os.cpu_count() or 1)
    extra = ["--local", str(args.local), "--slots", str(args.slots), "--host", args.host,
             "--heartbeat", str(args.heartbeat), "--slurm", str(args.slurm), "--slurm-slots", str(args.slurm_slots),
             "--slurm-time", str(args.slurm_time), "--no-worker-limit", str(args.no_worker_limit)] + \
        [f"--slurm-param={p}" for p in args.slurm_param] + \
        (["--slurm-shaped-idle", str(args.slurm_shaped_idle)] if args.slurm_shaped_idle is not None else [])
    if args.key_file:
        extra += ["--key-file", args.key_file]
    if args.detach:
        info = start_detached(args.name, args.log, extra)
        print(f"pool {args.name!r} started (pid {info.pid}); clients: {info.client_address}, workers: "
              f"{info.worker_address}, key: {info.key_file}, log: {info.log_file}")
        return 0
    return serve(args.name, host=args.host, local=args.local, slots=args.slots, key_file=args.key_file,
                 heartbeat=args.heartbeat, slurm=args.slurm, slurm_slots=args.slurm_slots,
                 slurm_time=args.slurm_time, slurm_parameters=_slurm_params(args.slurm_param),
                 slurm_shaped_idle=args.slurm_shaped_idle, no_worker_limit=args.no_worker_limit)


def _slurm_params(pairs: List[str]) -> Dict[str, Any]:
    """`KEY=VALUE` pairs (submitit's slurm_* names, e.g. slurm_partition=gpu or mem_gb=8)."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm-param takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return out


def _cmd_status(args: argparse.Namespace) -> int:
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


def _cmd_stop(args: argparse.Namespace) -> int:
    print(stop(args.name))
    return 0


def add_pool_commands(sub: Any) -> None:
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
    start.add_argument("--slurm-shaped-idle", type=float, default=None, metavar="SECONDS",
                       help="pilots started for tasks that ask for more than --slurm-param gives (GPUs, memory, ...) "
                            "leave after this long without such work [60]")
    start.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                       help="a submitit Slurm parameter for the pilots, e.g. slurm_partition=gpu (repeatable); "
                            "SBATCH_* environment variables apply too")
    start.add_argument("--host", default="127.0.0.1",
                       help="address to bind; off loopback a key file is required [%(default)s]")
    start.add_argument("--key-file", help="protocol key (mode 600); default: the pool's own key")
    start.add_argument("--heartbeat", type=float, default=1.0, help="seconds [%(default)s]")
    start.add_argument("--no-worker-limit", type=float, default=NO_WORKER_LIMIT, metavar="SECONDS",
                       help="pipelines with tasks waiting fail (with the reason) once the pool has had no worker, "
                            "and none starting or queued in Slurm, this long [%(default)s]")
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
