"""What a run shows: the task table, the live view on a terminal, the failure summary, dry runs.

- Not a terminal (batch job, CI, pipe, file): no escape codes at all. The README's task table at
  the start and at the end, and between them one short progress line at most every
  `PROGRESS_INTERVAL` seconds.
- A terminal: a live view redrawn in place every `refreshrate` seconds (cursor home or cursor up,
  each line rewritten and cleared to its end: no full-screen clears per frame, no flicker, no
  scrolling): a progress bar with counts per status, elapsed time, an estimate of the time left,
  the running tasks with their durations and Slurm ids, the most recent failures, and as much of
  the task table as fits. Keys: `p` pause, `r` resume, `q` quit (see `KeyReader`).
"""
from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading
import time
from collections import Counter
from typing import Callable, List, Optional, Sequence, TextIO

from tabulate import tabulate

from ..Task import Task, _status_colors
from ..TaskStatus import TaskStatus, FAILED_TERMINAL_STATES, TERMINAL_STATES

_ANSI = {"blue": "\033[34m", "yellow": "\033[33m", "green": "\033[32m", "red": "\033[31m", "white": "\033[37m"}
_RESET = "\033[0m"
_BOLD = "\033[1m"
_DIM = "\033[2m"
HOME = "\033[H"
CLEAR_SCREEN = "\033[H\033[2J"
CLEAR_EOL = "\033[K"
CLEAR_EOS = "\033[J"
HIDE_CURSOR = "\033[?25l"
SHOW_CURSOR = "\033[?25h"
_ESC_RE = re.compile(r"\033\[[0-9;?]*[A-Za-z]")

HEADERS = ["ID", "Name", "Slurm ID", "Slurm Status", "Status", "Task Deps.", "Path Deps.", "Products"]
PROGRESS_INTERVAL = 5.0     # seconds between progress lines when not on a terminal
RECENT_FAILURES = 3
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


def hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def visible_len(text: str) -> int:
    return len(_ESC_RE.sub("", text))


def fit(line: str, width: int) -> str:
    """Cut a line to `width` visible characters, keeping escape codes intact (a wrapped line would
    break the in-place redraw)."""
    if width <= 0 or visible_len(line) <= width:
        return line
    out, n, pos = [], 0, 0
    for m in _ESC_RE.finditer(line):
        chunk = line[pos:m.start()]
        if n + len(chunk) >= width:
            out.append(chunk[:max(0, width - 1 - n)] + "…")
            return "".join(out) + _RESET
        out.append(chunk)
        n += len(chunk)
        out.append(m.group(0))
        pos = m.end()
    chunk = line[pos:]
    out.append(chunk[:max(0, width - 1 - n)] + "…")
    return "".join(out) + (_RESET if "\033[" in line else "")


# ---------------------------------------------------------------- the README table

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
        row = [t._queue_id, t.name, t._slurmid, t._slurmstate, text,
               str([d._queue_id for d in t.task_dependencies or []]),
               _paths(t.path_dependencies), _paths(t.products)]
        if reason:
            row.append(t.reason or "")
        rows.append(row)
    return rows


def _count_shown(tasks: Sequence[Task], hide_successful: bool) -> int:
    if not hide_successful:
        return len(tasks)
    return sum(1 for t in tasks if t._status not in (TaskStatus.FINISHED, TaskStatus.SKIPPED))


def render_table(tasks: Sequence[Task], color: bool = False, hide_successful: bool = False,
                 limit: Optional[int] = None, reason: bool = False) -> str:
    """`Tasks:` and the README's columns (plus `Reason` when asked: terminals and dry runs only)."""
    rows = task_rows(tasks, color, hide_successful, limit, reason)
    cut = ""
    if limit is not None:
        shown = _count_shown(tasks, hide_successful)
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


def summary_line(tasks: Sequence[Task], elapsed: float) -> str:
    """One short progress line (no escape codes)."""
    counts = Counter(t._status for t in tasks)
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
        rows.append([t._queue_id, t.name, _colored(action, "yellow" if reason is not None else "green", color),
                     reason if reason is not None else (t.reason or "up to date"),
                     str([d._queue_id for d in t.task_dependencies or []]), _paths(t.products)])
    n_run = sum(1 for r in decisions if r is not None)
    table = tabulate(rows, headers=["ID", "Name", "Action", "Reason", "Task Deps.", "Products"], tablefmt="plain")
    return (f"Dry run (nothing is executed):\nTasks:\n{table}\n"
            f"{len(tasks)} task(s): {n_run} would run, {len(tasks) - n_run} would be skipped.")


# ---------------------------------------------------------------- the live view

def progress_bar(counts: Counter, total: int, width: int, color: bool, unicode: bool) -> str:
    full, empty = ("█", "░") if unicode else ("#", "-")
    if total <= 0 or width <= 0:
        return ""
    segs = []
    used = 0
    for s, col in ((TaskStatus.FINISHED, "green"), (TaskStatus.SKIPPED, "green"), (TaskStatus.FAILED, "red"),
                   (TaskStatus.DEPFAILED, "red"), (TaskStatus.CANCELED, "white")):
        n = round(width * counts.get(s, 0) / total)
        n = min(n, width - used)
        if n:
            segs.append(_colored(full * n, col, color))
            used += n
    running = counts.get(TaskStatus.RUNNING, 0)
    n = min(round(width * running / total), width - used)
    if n:
        segs.append(_colored(full * n, "yellow", color))
        used += n
    segs.append(empty * (width - used))
    return "".join(segs)


def live_lines(tasks: Sequence[Task], *, name: str, elapsed: float, eta: Optional[float], width: int,
               height: int, paused: bool, note: str, hide_successful: bool, color: bool = True,
               unicode: bool = True, keys: bool = True) -> List[str]:
    """The frame of the live view, at most `height` lines (each may still need `fit`)."""
    now = time.time()
    total = len(tasks)
    counts = Counter(t._status for t in tasks)
    ended = sum(counts.get(s, 0) for s in TERMINAL_STATES)
    pct = 100.0 * ended / total if total else 100.0
    head = f"{_BOLD}depio{_RESET} {name}  {ended}/{total} done  elapsed {hms(elapsed)}  " \
           f"ETA {hms(eta) if eta is not None else '--:--'}"
    if paused:
        head += f"  {_BOLD}{_ANSI['yellow']}PAUSED{_RESET} (no more tasks go to the workers; r resumes)"
    if note:
        head += f"  {note}"
    if not color:
        head = _ESC_RE.sub("", head)
    bar_w = max(10, min(40, width - 60))
    lines = [head, f"[{progress_bar(counts, total, bar_w, color, unicode)}] {pct:5.1f}%  "
                   + counts_text(counts, color, "  ")]
    running = [t for t in tasks if t._status is TaskStatus.RUNNING]
    budget = max(3, height - 4)
    if running:
        lines.append(f"Running ({len(running)}):")
        room = max(1, min(len(running), budget // 2))
        for t in sorted(running, key=lambda t: t.start_time or now)[:room]:
            dur = hms(now - t.start_time) if t.start_time else "-:--:--"
            slurm = f"  slurm {t._slurmid} {t._slurmstate}".rstrip() if t._slurmid else ""
            where = f"  on {t.worker}" if t.worker and not t._slurmid else ""
            lines.append(f"  #{t._queue_id:<5} {t.name[:30]:<30} {dur}{slurm}{where}")
        if len(running) > room:
            lines.append(f"  ... and {len(running) - room} more")
    failed = [t for t in tasks if t._status is TaskStatus.FAILED]
    if failed:
        failed.sort(key=lambda t: t.end_time or 0)
        lines.append(_colored(f"Failures ({len(failed)}), most recent:", "red", color))
        for t in failed[-RECENT_FAILURES:][::-1]:
            lines.append(f"  #{t._queue_id:<5} {t.name[:30]:<30} {t.reason}")
    footer = f"{_DIM}keys: p pause  r resume  q quit{_RESET}" if keys else ""
    if not color:
        footer = _ESC_RE.sub("", footer)
    room = height - len(lines) - (2 if footer else 1) - 1
    if room >= 3:
        lines += render_table(tasks, color, hide_successful, limit=room - 1).splitlines()
    if footer:
        lines.append(footer)
    return lines[:max(1, height)]


class Display:
    """Runs in the pipeline's main thread: `start()`, `refresh()` every `refreshrate` seconds,
    `final(code)` once, `close()` on every exit path (restores the cursor)."""

    def __init__(self, tasks: Sequence[Task], stream: Optional[TextIO] = None, quiet: bool = False,
                 clear_screen: bool = True, hide_successful: bool = False, refreshrate: float = 1.0,
                 name: str = "", live: Optional[bool] = None, keys: bool = False,
                 progress_interval: float = PROGRESS_INTERVAL):
        self.tasks = tasks
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.tty = _isatty(self.stream)
        self.live = self.tty if live is None else bool(live and self.tty)
        self.clear_screen = clear_screen
        self.hide_successful = hide_successful
        self.refreshrate = refreshrate
        self.name = "" if name in (None, False, "NONAME") else str(name)
        self.keys = keys
        self.progress_interval = progress_interval
        self.started = time.monotonic()
        self.last_line = self.started
        self.paused = False
        self.note = ""
        self.log_folder = None
        self._frame_lines = 0
        self._live_on = False
        self._lock = threading.Lock()
        enc = (getattr(self.stream, "encoding", None) or "").lower()
        self.unicode = "utf" in enc

    # ------------------------------------------------------------ output
    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _size(self):
        try:
            size = os.get_terminal_size(self.stream.fileno())
            return max(20, size.columns), max(6, size.lines)
        except (OSError, ValueError, AttributeError):
            return 80, 24

    def eta(self) -> Optional[float]:
        """Time left, from the throughput of the tasks that ran so far (None until one ended)."""
        ran = 0
        left = 0
        for t in self.tasks:
            s = t._status
            if s in (TaskStatus.FINISHED, TaskStatus.FAILED):
                ran += 1
            elif s not in TERMINAL_STATES:
                left += 1
        if not left:
            return 0.0
        if not ran:
            return None
        return (time.monotonic() - self.started) * left / ran

    def start(self) -> None:
        if self.quiet:
            return
        with self._lock:
            if self.live:
                self._live_on = True
                self._write(HIDE_CURSOR + (CLEAR_SCREEN if self.clear_screen else ""))
                self._frame_lines = 0
                self._draw()
            else:
                self._write(render_table(self.tasks, False, self.hide_successful) + "\n")

    def _draw(self) -> None:
        width, height = self._size()
        lines = live_lines(self.tasks, name=self.name, elapsed=time.monotonic() - self.started, eta=self.eta(),
                           width=width, height=height - 1, paused=self.paused, note=self.note,
                           hide_successful=self.hide_successful, unicode=self.unicode, keys=self.keys)
        if self.clear_screen:
            prefix = HOME
        elif self._frame_lines:
            prefix = f"\r\033[{self._frame_lines}A"
        else:
            prefix = "\r"
        body = "".join(fit(line, width - 1) + CLEAR_EOL + "\n" for line in lines)
        self._write(prefix + body + CLEAR_EOS)
        self._frame_lines = len(lines)

    def refresh(self) -> None:
        if self.quiet:
            return
        with self._lock:
            if self._live_on:
                self._draw()
            elif time.monotonic() - self.last_line >= self.progress_interval:
                self.last_line = time.monotonic()
                self._write(summary_line(self.tasks, time.monotonic() - self.started) + "\n")

    def _erase_live(self) -> None:
        if not self._live_on:
            return
        if self.clear_screen:
            self._write(HOME + CLEAR_EOS)
        elif self._frame_lines:
            self._write(f"\r\033[{self._frame_lines}A" + CLEAR_EOS)
        self._frame_lines = 0

    def close(self) -> None:
        """Leave the terminal as it was (cursor shown); safe to call more than once."""
        with self._lock:
            if self._live_on:
                self._live_on = False
                self._write(_RESET + SHOW_CURSOR)

    def final(self, code: int) -> None:
        if self.quiet:
            self.close()
            return
        with self._lock:
            self._erase_live()
        self.close()
        color = self.tty
        self._write(render_table(self.tasks, color, self.hide_successful, reason=self.tty) + "\n")
        report = failure_report(self.tasks, self.log_folder)
        if report:
            self._write(report + "\n")
        if self.tty:
            logs = f" Task logs: {_rel(self.log_folder)}/" if self.log_folder and not report else ""
            self._write(f"Elapsed {hms(time.monotonic() - self.started)}.{logs}\n")
        if code == 0:
            self._write("All jobs done! Exit.\n")
        else:
            failed = sum(1 for t in self.tasks if t._status in FAILED_TERMINAL_STATES)
            self._write(f"{failed} of {len(self.tasks)} task(s) did not succeed. Exit 1.\n")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


# ---------------------------------------------------------------- keys on a terminal

class KeyReader:
    """Reads single keys from a terminal stdin in cbreak mode (no Enter needed, Ctrl-C still works)
    in a daemon thread and hands each to `on_key`. `stop()` restores the terminal; it is also
    registered with atexit, so every exit path leaves the terminal as it was."""

    def __init__(self, on_key: Callable[[str], None], stream: Optional[TextIO] = None):
        self.on_key = on_key
        self.stream = stream or sys.stdin
        self.fd: Optional[int] = None
        self.saved = None
        self.thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def start(self) -> bool:
        """False (and nothing changed) unless stdin is a terminal this process owns the foreground of."""
        try:
            import termios
            import tty
            fd = self.stream.fileno()
            if not os.isatty(fd) or os.tcgetpgrp(fd) != os.getpgrp():
                return False       # a background job must not touch the terminal (SIGTTOU)
            self.saved = termios.tcgetattr(fd)
            tty.setcbreak(fd, termios.TCSANOW)
        except Exception:
            self.saved = None
            return False
        self.fd = fd
        atexit.register(self.stop)
        self.thread = threading.Thread(target=self._loop, name="depio-keys", daemon=True)
        self.thread.start()
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self.fd], [], [], 0.1)
                if not r:
                    continue
                data = os.read(self.fd, 64)
            except (OSError, ValueError):
                return
            if not data:
                return
            for ch in data.decode("utf-8", "ignore"):
                try:
                    self.on_key(ch)
                except Exception:
                    pass

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(1.0)
        if self.saved is not None and self.fd is not None:
            try:
                import termios
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except Exception:
                pass
            self.saved = None
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
