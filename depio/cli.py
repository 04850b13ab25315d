"""`depio`: the command line (dry runs, accepting changes, run history and reports, task logs, pools,
keys, versions).

Every error is one line on stderr (`depio: error: ...`) and exit code 2; no tracebacks.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

EXAMPLES = """examples:
  depio explain pipeline.py            dry run of an unchanged script (same as DEPIO_DRY_RUN=1 python pipeline.py)
  depio accept pipeline.py [TASK ...]  record the present state as made (a cosmetic edit, a hand-made output)
  depio runs                           the runs in the state store, newest first
  depio report [RUN] [-o FILE]         one self-contained HTML page of a run (default: the latest)
  depio logs                           the log files of the latest run (.depio/logs/latest)
  depio logs 3                         print stdout and stderr of task 3 of the latest run
  depio logs --run 20250101-120000-42 train
                                       task "train" of an earlier run
  depio pool start --local 4 --detach  a worker pool in the background; pipelines use DEPIO_POOL=default
  depio pool status                    its workers and clients (--json for scripts)
  depio key ~/.depio/cluster.key       write a new key (mode 600) for non-loopback use
  depio info                           versions (protocol, Python, cloudpickle)
  depio-worker --help                  the worker that runs tasks (local or on compute nodes)

environment:
  DEPIO_DRY_RUN=1      run() shows the plan and runs nothing
  DEPIO_LOG_DIR=DIR    where per-task logs go (default .depio/logs; "off" disables them)
  DEPIO_LOG_KEEP=N     run folders (and runs in the state store) kept (default 20)
  DEPIO_STATE=PATH     the state store (default .depio/state.sqlite, or DIR/state.sqlite with
                       DEPIO_LOG_DIR=DIR; "off" disables it)
  DEPIO_ADDRESS=HOST   the address Slurm jobs connect back to
"""


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see depio --help)\n")


# ---------------------------------------------------------------- explain (dry run)

def _cmd_explain(args: argparse.Namespace) -> int:
    script = Path(args.script)
    if not script.is_file():
        raise CliError(f"no such script: {script}")
    env = dict(os.environ)
    env["DEPIO_DRY_RUN"] = "1"
    try:
        return subprocess.call([sys.executable, str(script)] + list(args.args), env=env)
    except KeyboardInterrupt:
        return 1


# ---------------------------------------------------------------- accept, runs, report (the state store)

def _cmd_accept(args: argparse.Namespace) -> int:
    """Run SCRIPT as `explain` does, with DEPIO_ACCEPT=1: its Pipeline.run() accepts instead of running."""
    script = Path(args.script)
    if not script.is_file():
        raise CliError(f"no such script: {script}")
    env = dict(os.environ)
    env["DEPIO_ACCEPT"] = "1"
    env["DEPIO_ACCEPT_TASKS"] = "\n".join(args.tasks)
    try:
        return subprocess.call([sys.executable, str(script)] + list(args.script_args), env=env)
    except KeyboardInterrupt:
        return 1


def _store():
    from .state import StateStore, state_path
    path = state_path()
    if path is None:
        raise CliError("the state store is off (DEPIO_STATE=off)")
    if not path.is_file():
        raise CliError(f"no state store at {path} (run a pipeline first, or set DEPIO_STATE)")
    return StateStore(path)


def _cmd_runs(args: argparse.Namespace) -> int:
    import time
    with _store() as store:
        runs = store.runs()
    if not runs:
        print("no runs recorded")
        return 0
    for r in runs:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start"])) if r["start"] else "?"
        took = f"{r['end'] - r['start']:.1f} s" if r["end"] and r["start"] else "did not end"
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(r["counts"].items())) or "-"
        print(f"{r['id']}  {start}  {took:>11}  {counts}  {r['script'] or ''}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .state import write_report
    with _store() as store:
        run = store.run(args.run)
        if run is None:
            raise CliError(f"no run {args.run!r} (depio runs lists them)" if args.run else "no run recorded")
        out = Path(args.output or f"depio-report-{run['id']}.html")
        write_report(store, run["id"], out)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- logs

def _run_folder(args: argparse.Namespace) -> Path:
    from .view.logs import list_runs, log_root
    root = Path(args.dir).expanduser() if args.dir else log_root()
    if root is None:
        raise CliError("log files are off (DEPIO_LOG_DIR=off)")
    if not root.is_dir():
        raise CliError(f"no logs at {root} (run a pipeline first, or pass --dir)")
    if args.run:
        folder = root / args.run
        if not folder.is_dir():
            raise CliError(f"no run {args.run!r} in {root} (depio logs --runs lists them)")
        return folder
    latest = root / "latest"
    if latest.is_dir():
        return latest.resolve()
    if latest.is_file():       # file systems without symlinks: the name is written in it
        folder = root / latest.read_text().strip()
        if folder.is_dir():
            return folder
    runs = list_runs(root)
    if not runs:
        raise CliError(f"no runs in {root}")
    return runs[-1]


def _cmd_logs(args: argparse.Namespace) -> int:
    from .view.logs import list_runs, log_root, stdout_closed, task_files
    try:
        if args.runs:
            root = Path(args.dir).expanduser() if args.dir else log_root()
            if root is None or not root.is_dir():
                raise CliError(f"no logs at {root}")
            for r in list_runs(root):
                print(r.name)
            return 0
        folder = _run_folder(args)
        files = sorted(folder.iterdir(), key=lambda p: (_id_of(p.name), p.suffix != ".out", p.name))
        if not args.task:
            print(f"{folder}:")
            for f in files:
                print(f"  {f.name}  ({f.stat().st_size} bytes)")
            if not files:
                print("  (no task printed anything)")
            return 0
        want = args.task
        chosen = task_files(files, want)
        if not chosen:
            raise CliError(f"no log file of task {want!r} in {folder} (a task that printed nothing has none)")
        for f in chosen:
            which = "stdout" if f.suffix == ".out" else "stderr"
            print(f"==> {f} ({which}) <==")
            sys.stdout.write(f.read_text(errors="replace"))
            sys.stdout.flush()
        return 0
    except BrokenPipeError:      # `depio logs | head`: the reader has what it wanted
        return stdout_closed()


def _id_of(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


# ---------------------------------------------------------------- key, info

def _cmd_key(args: argparse.Namespace) -> int:
    from .runtime import protocol as P
    path = os.path.expanduser(args.file)
    if os.path.exists(path) and not args.force:
        raise CliError(f"{path} exists; pass --force to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(P.new_key().hex() + "\n")
    os.chmod(path, 0o600)
    print(f"wrote a new key to {path} (mode 600)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__
    from .runtime import protocol as P
    print(f"depio {__version__}")
    for k, v in P.runtime_signature().items():
        print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="depio", description="depio: run research pipelines like make, locally or on Slurm.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    e = sub.add_parser("explain", help="dry run: which tasks a script would run and why (runs nothing)",
                       description="Run SCRIPT with DEPIO_DRY_RUN=1: Pipeline.run() prints the plan and "
                                   "runs no task.")
    e.add_argument("script", help="the pipeline script")
    e.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    e.set_defaults(func=_cmd_explain)
    a = sub.add_parser("accept", help="record the present state as made, without running (IF_CHANGED)",
                       description="Run SCRIPT so that Pipeline.run() records each task's present state (code, "
                                   "inputs, arguments, products) as made instead of running: a cosmetic change or "
                                   "an output made by hand no longer reruns. Says what it accepted.")
    a.add_argument("script", help="the pipeline script")
    a.add_argument("tasks", nargs="*", help="task names or ids (default: every task)")
    a.add_argument("--args", dest="script_args", nargs=argparse.REMAINDER, default=[],
                   help="arguments for the script (the rest of the line)")
    a.set_defaults(func=_cmd_accept)
    r = sub.add_parser("runs", help="list the runs in the state store, newest first")
    r.set_defaults(func=_cmd_runs)
    rp = sub.add_parser("report", help="write one self-contained HTML page of a run (timeline, failures)",
                        description="A timeline of the run's tasks per worker coloured by status, the failures "
                                    "with the tail of their logs, and the slowest tasks; no network needed.")
    rp.add_argument("run", nargs="?", help="a run id (depio runs; default: the latest)")
    rp.add_argument("-o", "--output", help="the HTML file [depio-report-RUN.html]")
    rp.set_defaults(func=_cmd_report)
    lg = sub.add_parser("logs", help="list or print per-task log files (default: the latest run)",
                        description="Task logs live in .depio/logs/<run-id>/<id>-<name>.out/.err "
                                    "($DEPIO_LOG_DIR moves them); .depio/logs/latest is the latest run.")
    lg.add_argument("task", nargs="?", help="a task id or name: print its stdout and stderr")
    lg.add_argument("--run", help="a run id (folder name) instead of the latest run")
    lg.add_argument("--runs", action="store_true", help="list the runs kept")
    lg.add_argument("--dir", help="the logs folder [$DEPIO_LOG_DIR or .depio/logs]")
    lg.set_defaults(func=_cmd_logs)
    from .pool.cli import add_pool_commands       # `depio pool start|status|stop` (depio/pool/cli.py)
    add_pool_commands(sub)
    k = sub.add_parser("key", help="write a new protocol key file (mode 600)")
    k.add_argument("file", help="where to write it")
    k.add_argument("--force", action="store_true", help="replace an existing file")
    k.set_defaults(func=_cmd_key)
    i = sub.add_parser("info", help="show versions (protocol, Python, cloudpickle)")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CliError as e:
        print(f"depio: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depio: interrupted", file=sys.stderr)
        return 130
    except Exception as e:      # anything else: still one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, (LookupError, RuntimeError, TimeoutError, OSError, ValueError)) and msg:
            print(f"depio: error: {msg}", file=sys.stderr)
        else:
            print(f"depio: error: {type(e).__name__}{': ' + msg if msg else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
