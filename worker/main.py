"""`depio-worker`: connects out to a dispatcher, runs the tasks it is given, reports back.

This module is the command line; the worker itself is `worker.worker.Worker` (its event loop) and
the parts it wires together (see that module's docstring).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import List, Optional

from depio.runtime import protocol as P

from .worker import DEFAULT_HEARTBEAT, DEFAULT_KILL_GRACE, DEFAULT_LIVENESS, Worker

__all__ = ["Worker", "build_parser", "exit_now", "install_stop_signals", "main", "read_key"]


def install_stop_signals(worker: Worker) -> None:
    """SIGTERM and SIGINT stop the worker cleanly. The handler only sets a flag and wakes the loop
    through a pipe: raising from a handler could hit the worker anywhere (in logging's locks, while
    forking a slot) and leave it half stopped."""
    def handler(signum, frame) -> None:
        worker.request_stop(f"stopped by {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.set_wakeup_fd(worker.wake_w, warn_on_full_buffer=False)


def read_key(key_file: Optional[str]) -> bytes:
    """The shared key: from --key-file (must be private to its owner) or $DEPIO_KEY."""
    key = P.load_key(key_file)
    if key is None:
        raise P.KeyRequiredError(f"no key: pass --key-file FILE or set ${P.KEY_ENV} (a local pipeline hands its "
                                 f"workers a key itself; for a pool or a remote pipeline, {P.MAKE_KEY_HINT})")
    return key


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="depio-worker",
        description="Run depio tasks for a pipeline or a pool: connects out to its dispatcher.",
        epilog="example: DEPIO_KEY=$(cat ~/.depio/pools/default.key) "
               "depio-worker --connect tcp://10.0.0.5:5555 --slots 8")
    p.add_argument("--connect", required=True, metavar="ADDR",
                   help="the dispatcher's address, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="tasks run at once [%(default)s]")
    p.add_argument("--key-file", help="file with the hex key (mode 600); default: $DEPIO_KEY")
    p.add_argument("--name", help="how this worker is shown [host:pid]")
    p.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT, help="seconds [%(default)s]")
    p.add_argument("--liveness", type=int, default=DEFAULT_LIVENESS,
                   help="heartbeats missed before the dispatcher counts as gone [%(default)s]")
    p.add_argument("--idle-timeout", type=float, default=None, help="exit after this many idle seconds")
    p.add_argument("--reconnect", type=float, default=None, metavar="SECONDS",
                   help="when the dispatcher goes away (dies, or shuts down), keep trying to re-register "
                        "with one at the same address for up to SECONDS instead of exiting")
    p.add_argument("--kill-grace", type=float, default=DEFAULT_KILL_GRACE, metavar="SECONDS",
                   help="a cancelled task gets SIGTERM, then SIGKILL after this long [%(default)s]")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="WARNING", help="logging level [%(default)s]")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="depio-worker %(levelname)s %(message)s")
    try:
        key = read_key(args.key_file)
    except (OSError, ValueError) as e:
        print(f"depio-worker: {e}", file=sys.stderr)
        return 2
    os.environ.pop(P.KEY_ENV, None)      # not inherited by the tasks' processes
    stopped_early: List[str] = []
    signal.signal(signal.SIGTERM, lambda s, f: stopped_early.append("SIGTERM"))   # until the worker exists
    worker = Worker(args.connect, key, slots=args.slots, name=args.name, heartbeat=args.heartbeat,
                    liveness=args.liveness, idle_timeout=args.idle_timeout, parent_pid=args.parent_pid,
                    reconnect=args.reconnect, slurm_job_id=os.environ.get("SLURM_JOB_ID", ""),
                    kill_grace=args.kill_grace)
    install_stop_signals(worker)
    if stopped_early:                 # the run it was started for ended already
        return 0
    code = worker.run()
    if code:
        print(f"depio-worker: {worker.stopping}", file=sys.stderr, flush=True)
    exit_now(worker, code)
    return code   # not reached


def exit_now(worker: Worker, code: int) -> None:
    """End the process without the interpreter's teardown. Everything of the worker's is settled by
    now (slots reaped, the Goodbye delivered or its linger spent, logs flushed below), and no user
    code runs in this process; module and object finalisation would only add 20 to 30 ms to the end
    of every run, which waits for its workers to exit."""
    worker.conn.terminate()        # returns once the sockets' linger has sent or dropped what was queued
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
