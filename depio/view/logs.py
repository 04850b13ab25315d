"""Per-task log files: each task's stdout and stderr, one folder per run.

    .depio/logs/<run-id>/<id>-<name>.out     what the task printed to stdout
    .depio/logs/<run-id>/<id>-<name>.err     what it printed to stderr
    .depio/logs/latest -> <run-id>           the most recent run

The folder is relative to the directory the pipeline runs in; `DEPIO_LOG_DIR` moves it
(`DEPIO_LOG_DIR=off` turns log files off). A file is written when the task printed something;
`task.get_stdout()` / `get_stderr()` return the same text. `DEPIO_LOG_KEEP` (default 20) is how
many run folders are kept; older ones are removed when a new run starts.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

log = logging.getLogger("depio.logs")

LOG_DIR_ENV = "DEPIO_LOG_DIR"
LOG_KEEP_ENV = "DEPIO_LOG_KEEP"
DEFAULT_LOG_DIR = os.path.join(".depio", "logs")
DEFAULT_KEEP = 20
_OFF = ("off", "none", "0", "false", "no")
_RUN_RE = re.compile(r"^\d{8}-\d{6}-\d+(-\d+)?$")


def log_root(env: Optional[dict] = None) -> Optional[Path]:
    """Where run folders go (None: log files are off)."""
    value = (env if env is not None else os.environ).get(LOG_DIR_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    return Path(os.path.abspath(os.path.expanduser(value or DEFAULT_LOG_DIR)))


def safe_name(name: str, limit: int = 60) -> str:
    """A task name made safe as part of a file name."""
    s = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name)).strip("._") or "task"
    return s[:limit]


def task_files(files: Iterable[Path], want: str) -> List[Path]:
    """The log files of task `want`: an id, or a name as given (`a/b/c`, `données`), matched
    against the made-safe name in the file names too."""
    if want.isdigit():
        return [f for f in files if f.name.split("-", 1)[0].isdigit() and int(f.name.split("-", 1)[0]) == int(want)]
    names = {want, safe_name(want)}
    return [f for f in files if f.stem.split("-", 1)[-1] in names]


def stdout_closed() -> int:
    """The reader of our output went away (`depio logs | head`): say nothing more, exit 0. Further
    writes (and the interpreter's final flush) go to /dev/null instead of raising BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def task_file_stem(task) -> str:
    return f"{task._queue_id}-{safe_name(task.name)}"


def list_runs(root: Path) -> List[Path]:
    """Run folders under `root`, oldest first."""
    try:
        return sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _RUN_RE.match(p.name)),
                      key=lambda p: p.name)
    except OSError:
        return []


class RunLogs:
    """The log folder of one run. Created by `open()`; `write(task)` stores a task's output."""

    def __init__(self, root: Optional[Path] = None, keep: Optional[int] = None):
        self.root = root if root is not None else log_root()
        if keep is None:
            try:
                keep = int(os.environ.get(LOG_KEEP_ENV, DEFAULT_KEEP))
            except ValueError:
                keep = DEFAULT_KEEP
        self.keep = max(1, keep)
        self.folder: Optional[Path] = None
        self.error: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def open(self) -> Optional[Path]:
        """Make this run's folder, point `latest` at it, prune old runs. Never raises: a run goes on
        without log files when the folder cannot be made (the reason is kept in `error`)."""
        if self.root is None:
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            base = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
            name, n = base, 1
            while True:
                try:
                    (self.root / name).mkdir()
                    break
                except FileExistsError:
                    n += 1
                    name = f"{base}-{n}"
            self.folder = self.root / name
        except OSError as e:
            self.error = f"cannot create the log folder under {self.root}: {e}"
            log.warning("%s", self.error)
            return None
        self._link_latest(name)
        self._prune()
        return self.folder

    def _link_latest(self, name: str) -> None:
        link = self.root / "latest"
        tmp = self.root / f".latest-{os.getpid()}-{id(self)}"
        try:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(name, tmp)
            os.replace(tmp, link)
        except OSError as e:      # no symlinks here (some file systems): leave a note instead
            try:
                if tmp.is_symlink():
                    tmp.unlink()
                if not link.is_symlink() and not link.is_dir():
                    link.write_text(name + "\n")
            except OSError:
                log.debug("cannot link latest: %s", e)

    def _prune(self) -> None:
        runs = list_runs(self.root)
        for old in runs[:max(0, len(runs) - self.keep)]:
            if old == self.folder:
                continue
            shutil.rmtree(old, ignore_errors=True)

    def paths(self, task) -> tuple:
        stem = task_file_stem(task)
        return self.folder / f"{stem}.out", self.folder / f"{stem}.err"

    def write(self, task) -> None:
        """Write the task's captured stdout/stderr (non-empty ones) and note the paths on the task
        (`task.stdout_path`, `task.stderr_path`; None when the task printed nothing there)."""
        if self.folder is None:
            return
        if not task.get_stdout() and not task.get_stderr():   # the common case: no file, no path to build
            task.stdout_path = task.stderr_path = None
            return
        out_path, err_path = self.paths(task)
        for text, path, attr in ((task.get_stdout(), out_path, "stdout_path"),
                                 (task.get_stderr(), err_path, "stderr_path")):
            if not text:
                setattr(task, attr, None)
                continue
            try:
                with open(path, "w", encoding="utf-8", errors="replace") as f:
                    f.write(text)
                setattr(task, attr, path)
            except OSError as e:
                setattr(task, attr, None)
                if self.error is None:
                    self.error = f"cannot write {path}: {e}"
                    log.warning("%s", self.error)

    def write_all(self, tasks: Iterable) -> None:
        for t in tasks:
            self.write(t)


class LogWriter:
    """Writes each task's logs once, as soon as it has ended (called from the pipeline's loop).
    With a `board` (see `board.py`) it reads the tasks that ended since the last pass; without one
    it checks every task not yet written."""

    def __init__(self, logs: RunLogs, tasks: Sequence, board=None):
        self.logs = logs
        self.tasks = tasks
        self.board = board
        self.todo = list(range(len(tasks))) if logs.enabled else []
        self.written = bytearray(len(tasks))

    def _write(self, i: int) -> None:
        """Task i's logs, once. A task that printed nothing has no file: its paths stay None, as the
        run set them at its start (plain attributes: this runs for every task at a run's end)."""
        if not self.written[i]:
            self.written[i] = 1
            t = self.tasks[i]
            if t._stdout or t._stderr:
                self.logs.write(t)

    def poll(self, final: bool = False) -> None:
        if not self.todo:
            return
        if self.board is not None:
            for i in self.board.take_ended():
                self._write(i)
            if not final:
                return
        written = self.written       # the last pass: only the tasks not written yet (few, with a board)
        for i in [i for i in self.todo if not written[i]]:
            if final or self.tasks[i].is_in_terminal_state:
                self._write(i)
        self.todo = [i for i in self.todo if not written[i]]

    def write_errors(self, errors: Sequence[str]) -> Optional[Path]:
        """What failed the run itself (the scheduler, the view), next to the task logs."""
        if not errors or not self.logs.enabled:
            return None
        path = self.logs.folder / "run-errors.txt"
        try:
            path.write_text("\n\n".join(e.rstrip() for e in errors) + "\n", encoding="utf-8")
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)
            return None
        return path


__all__ = ["RunLogs", "LogWriter", "log_root", "list_runs", "safe_name", "task_file_stem", "task_files",
           "stdout_closed", "LOG_DIR_ENV",
           "LOG_KEEP_ENV", "DEFAULT_LOG_DIR"]
