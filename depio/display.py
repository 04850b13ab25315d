"""What a run shows: the task table, a refreshing view on a terminal, and the failure summary."""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import List, Optional, Sequence, TextIO

from tabulate import tabulate

from .Task import Task
from .TaskStatus import TaskStatus, FAILED_TERMINAL_STATES

_ANSI = {"blue": "\033[34m", "yellow": "\033[33m", "green": "\033[32m", "red": "\033[31m", "white": "\033[37m"}
_RESET = "\033[0m"
HEADERS = ["ID", "Name", "Slurm ID", "Slurm Status", "Status", "Task Deps.", "Path Deps.", "Products"]


def _paths(paths) -> str:
    return str([str(p) for p in paths or []])


def task_rows(tasks: Sequence[Task], color: bool, hide_successful: bool = False) -> List[list]:
    rows = []
    for t in tasks:
        s = t._status
        if hide_successful and s in (TaskStatus.FINISHED, TaskStatus.SKIPPED):
            continue
        text = s.name
        if color:
            text = f"{_ANSI.get(t.statuscolor(s), '')}{text}{_RESET}"
        rows.append([t._queue_id, t.name, t._slurmid, t._slurmstate, text,
                     str([d._queue_id for d in t.task_dependencies or []]),
                     _paths(t.path_dependencies), _paths(t.products)])
    return rows


def render_table(tasks: Sequence[Task], color: bool = False, hide_successful: bool = False,
                 limit: Optional[int] = None) -> str:
    rows = task_rows(tasks, color, hide_successful)
    cut = ""
    if limit is not None and len(rows) > limit:
        cut = f"\n  ... {len(rows) - limit} more tasks not shown"
        rows = rows[:limit]
    return "Tasks:\n" + tabulate(rows, headers=HEADERS, tablefmt="plain") + cut


def summary_line(tasks: Sequence[Task], elapsed: float) -> str:
    counts = Counter(t._status for t in tasks)
    parts = [f"{counts[s]} {s.name.lower()}" for s in TaskStatus if counts[s]]
    return f"[{elapsed:7.1f}s] {len(tasks)} tasks: " + ", ".join(parts)


def failure_report(tasks: Sequence[Task]) -> str:
    """Each failed task's error with traceback, then its stdout and stderr."""
    out = []
    for t in tasks:
        if t._status is not TaskStatus.FAILED:
            continue
        err = t.error or {}
        out.append(f"---- FAILED: {t.label}: {t.reason or err.get('summary', '')}")
        if err.get("traceback"):
            out.append(err["traceback"].rstrip())
        if t.worker:
            out.append(f"(ran on {t.worker}, attempt {t.attempts})")
        out.append("-- stdout:" + ("\n" + t.get_stdout().rstrip() if t.get_stdout() else " (empty)"))
        out.append("-- stderr:" + ("\n" + t.get_stderr().rstrip() if t.get_stderr() else " (empty)"))
    depfailed = sum(1 for t in tasks if t._status is TaskStatus.DEPFAILED)
    canceled = [t for t in tasks if t._status is TaskStatus.CANCELED]
    if depfailed:
        out.append(f"{depfailed} task(s) not run because a dependency failed (DEPFAILED).")
    if canceled:
        out.append(f"{len(canceled)} task(s) cancelled: {canceled[0].reason}")
    return "\n".join(out)


class Display:
    """Runs in the pipeline's main thread; `refresh()` is called every `refreshrate` seconds."""

    def __init__(self, tasks: Sequence[Task], stream: Optional[TextIO] = None, quiet: bool = False,
                 clear_screen: bool = True, hide_successful: bool = False, refreshrate: float = 1.0):
        self.tasks = tasks
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clear_screen = clear_screen
        self.hide_successful = hide_successful
        self.refreshrate = refreshrate
        self.started = time.monotonic()
        self.last_line = 0.0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def refresh(self) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.started
        if self.tty:
            try:
                rows = max(5, os.get_terminal_size(self.stream.fileno()).lines - 4)
            except (OSError, ValueError):
                rows = 40
            screen = render_table(self.tasks, True, self.hide_successful, limit=rows) + "\n" + \
                summary_line(self.tasks, elapsed) + "\n"
            prefix = "\033[H\033[2J" if self.clear_screen else ""
            self._write(prefix + screen)
        elif time.monotonic() - self.last_line >= 10.0:
            self.last_line = time.monotonic()
            self._write(summary_line(self.tasks, elapsed) + "\n")

    def final(self, code: int) -> None:
        if self.quiet:
            return
        if self.tty and self.clear_screen:
            self._write("\033[H\033[2J")
        self._write(render_table(self.tasks, self.tty, self.hide_successful) + "\n")
        report = failure_report(self.tasks)
        if report:
            self._write(report + "\n")
        if code == 0:
            self._write("All jobs done! Exit.\n")
        else:
            failed = sum(1 for t in self.tasks if t._status in FAILED_TERMINAL_STATES)
            self._write(f"{failed} of {len(self.tasks)} task(s) did not succeed. Exit 1.\n")
