"""The text tables a run prints: the README's task table, progress counts, the failure summary
(each failed task's error, traceback and output) and the plan of a dry run."""
from __future__ import annotations

import os
from collections import Counter
from typing import List, Optional, Sequence

from tabulate import tabulate

from ..Task import Task
from .status import _status_colors
from ..TaskStatus import TaskStatus

_ANSI = {"blue": "\033[34m", "yellow": "\033[33m", "green": "\033[32m", "red": "\033[31m", "white": "\033[37m"}
_RESET = "\033[0m"
HEADERS = ["ID", "Name", "Slurm ID", "Slurm Status", "Status", "Task Deps.", "Path Deps.", "Products"]
REPORT_TAIL_LINES = 40      # lines of a failed task's output shown when a log file holds the rest

# order and labels of the counts in progress lines
_COUNT_ORDER = [TaskStatus.FINISHED, TaskStatus.SKIPPED, TaskStatus.RUNNING, TaskStatus.PENDING,
                TaskStatus.WAITING, TaskStatus.HOLD, TaskStatus.FAILED, TaskStatus.DEPFAILED, TaskStatus.CANCELED,
                TaskStatus.UNKNOWN]
_COUNT_LABEL = {TaskStatus.DEPFAILED: "dep. failed", TaskStatus.CANCELED: "cancelled"}


def _label(s: TaskStatus) -> str:
    return _COUNT_LABEL.get(s, s.name.lower())


def _colored(text: str, color: str, on: bool) -> str:
    return f"{_ANSI.get(color, '')}{text}{_RESET}" if on and color in _ANSI else text


def _paths(paths) -> str:
    return str([str(p) for p in paths or []])


# ---------------------------------------------------------------- the README table

def printable(text: str) -> str:
    """A name as one table cell: newlines, tabs, NUL and other control characters escaped (a task
    name is any string; printed raw it would break the table, or the terminal)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def task_rows(tasks: Sequence[Task], color: bool, hide_successful: bool = False, limit: Optional[int] = None,
              reason: bool = False) -> List[list]:
    rows = []
    for t in tasks:
        s = t._status
        if hide_successful and s in (TaskStatus.FINISHED, TaskStatus.SKIPPED):
            continue
        if limit is not None and len(rows) >= limit:
            break
        text = _colored(s.name, t.statuscolor(s), color)
        row = [t._queue_id, printable(t.name), t._slurmid, t._slurmstate, text,
               str([d._queue_id for d in t.task_dependencies or []]),
               _paths(t.path_dependencies), _paths(t.products)]
        if reason:
            row.append(t.reason or "")
        rows.append(row)
    return rows


def _count_shown(tasks: Sequence[Task], hide_successful: bool, counts: Optional[Counter] = None) -> int:
    if not hide_successful:
        return len(tasks)
    if counts is not None:
        return len(tasks) - counts.get(TaskStatus.FINISHED, 0) - counts.get(TaskStatus.SKIPPED, 0)
    return sum(1 for t in tasks if t._status not in (TaskStatus.FINISHED, TaskStatus.SKIPPED))


def render_table(tasks: Sequence[Task], color: bool = False, hide_successful: bool = False,
                 limit: Optional[int] = None, reason: bool = False, counts: Optional[Counter] = None) -> str:
    """`Tasks:` and the README's columns (plus `Reason` when asked: terminals and dry runs only)."""
    rows = task_rows(tasks, color, hide_successful, limit, reason)
    cut = ""
    if limit is not None:
        shown = _count_shown(tasks, hide_successful, counts)
        if shown > len(rows):
            cut = f"\n  ... {shown - len(rows)} more tasks not shown"
    headers = HEADERS + (["Reason"] if reason else [])
    return "Tasks:\n" + tabulate(rows, headers=headers, tablefmt="plain") + cut


def counts_text(counts: Counter, color: bool = False, sep: str = ", ") -> str:
    parts = []
    for s in _COUNT_ORDER:
        if counts.get(s):
            parts.append(_colored(f"{counts[s]} {_label(s)}", _status_colors.get(s, ""), color))
    return sep.join(parts)


def summary_line(tasks: Sequence[Task], elapsed: float, counts: Optional[Counter] = None) -> str:
    """One short progress line (no escape codes)."""
    counts = Counter(t._status for t in tasks) if counts is None else counts
    return f"[{elapsed:7.1f}s] {len(tasks)} tasks: " + counts_text(counts)


# ---------------------------------------------------------------- the failure summary

def _tail(text: str, n: int) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) <= n:
        return "\n".join(lines)
    return f"... ({len(lines) - n} earlier lines in the log file)\n" + "\n".join(lines[-n:])


def _rel(path) -> str:
    try:
        r = os.path.relpath(path)
        return r if not r.startswith("..") else str(path)
    except ValueError:
        return str(path)


def failure_report(tasks: Sequence[Task], log_folder=None) -> str:
    """Each failed task's error with traceback, then its stdout and stderr (and their log files)."""
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
        for what, text, path in (("stdout", t.get_stdout(), getattr(t, "stdout_path", None)),
                                 ("stderr", t.get_stderr(), getattr(t, "stderr_path", None))):
            if not text:
                out.append(f"-- {what}: (empty)")
            elif path:
                out.append(f"-- {what} (log file {_rel(path)}):\n" + _tail(text, REPORT_TAIL_LINES))
            else:
                out.append(f"-- {what}:\n" + text.rstrip())
    depfailed = [t for t in tasks if t._status is TaskStatus.DEPFAILED]
    canceled = [t for t in tasks if t._status is TaskStatus.CANCELED]
    if depfailed:
        out.append(f"{len(depfailed)} task(s) not run because a dependency failed (DEPFAILED): "
                   + "; ".join(f"{t.label}: {t.reason}" for t in depfailed[:5])
                   + (" ..." if len(depfailed) > 5 else ""))
    if canceled:
        out.append(f"{len(canceled)} task(s) cancelled: {canceled[0].reason}")
    if out and log_folder is not None:
        out.append(f"Task logs of this run: {_rel(log_folder)}/")
    return "\n".join(out)


# ---------------------------------------------------------------- dry run

def render_dry_run(tasks: Sequence[Task], decisions: Sequence[Optional[str]], color: bool = False) -> str:
    """The plan of a dry run: for each task, run or skip, and why."""
    rows = []
    for t, reason in zip(tasks, decisions):
        action = "run" if reason is not None else "skip"
        rows.append([t._queue_id, printable(t.name), _colored(action, "yellow" if reason is not None else "green", color),
                     reason if reason is not None else (t.reason or "up to date"),
                     str([d._queue_id for d in t.task_dependencies or []]), _paths(t.products)])
    n_run = sum(1 for r in decisions if r is not None)
    table = tabulate(rows, headers=["ID", "Name", "Action", "Reason", "Task Deps.", "Products"], tablefmt="plain")
    return (f"Dry run (nothing is executed):\nTasks:\n{table}\n"
            f"{len(tasks)} task(s): {n_run} would run, {len(tasks) - n_run} would be skipped.")
