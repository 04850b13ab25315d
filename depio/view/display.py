"""What a run shows while it runs (the tables and summaries themselves are in `table.py`):

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

import os
import re
import sys
import threading
import time
import traceback
from collections import Counter
from typing import List, Optional, Sequence, TextIO

from ..Task import Task
from ..TaskStatus import TaskStatus, FAILED_TERMINAL_STATES
from .board import Board
from .table import (_ANSI, _RESET, _colored, counts_text, failure_report, render_dry_run, render_table,
                    summary_line, _rel)
from .keys import KeyReader

_BOLD = "\033[1m"
_DIM = "\033[2m"
HOME = "\033[H"
CLEAR_SCREEN = "\033[H\033[2J"
CLEAR_EOL = "\033[K"
CLEAR_EOS = "\033[J"
HIDE_CURSOR = "\033[?25l"
SHOW_CURSOR = "\033[?25h"
_ESC_RE = re.compile(r"\033\[[0-9;?]*[A-Za-z]")

PROGRESS_INTERVAL = 5.0     # seconds between progress lines when not on a terminal
RECENT_FAILURES = 3


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
               unicode: bool = True, keys: bool = True, board: Optional[Board] = None,
               notices: Sequence[str] = ()) -> List[str]:
    """The frame of the live view, at most `height` lines (each may still need `fit`). `notices`
    stay under the progress bar for the whole run (`note` is a transient in the head line)."""
    now = time.time()
    total = len(tasks)
    board = board or Board(tasks)
    counts = board.counts
    ended = board.ended_count()
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
    lines += [_colored(f"depio: {line}", "yellow", color) for line in notices]
    running = board.running_tasks()
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
    failed = board.failed_tasks()
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
        lines += render_table(tasks, color, hide_successful, limit=room - 1, counts=counts).splitlines()
    if footer:
        lines.append(footer)
    return lines[:max(1, height)]


class Display:
    """Runs in the pipeline's main thread: `start()`, `refresh()` every `refreshrate` seconds,
    `final(code)` once, `close()` on every exit path (restores the cursor). `feed`: the scheduler's
    change feed (see `Board`). A frame that cannot be drawn is not fatal: the live view gives way to
    plain progress lines (or, if those fail too, to nothing), and the traceback goes to `errors`,
    which the final summary shows and which fails the run."""

    def __init__(self, tasks: Sequence[Task], stream: Optional[TextIO] = None, quiet: bool = False,
                 clear_screen: bool = True, hide_successful: bool = False, refreshrate: float = 1.0,
                 name: str = "", live: Optional[bool] = None, keys: bool = False,
                 progress_interval: float = PROGRESS_INTERVAL, feed=None):
        self.tasks = tasks
        self.board = Board(tasks, feed)
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.tty = isatty(self.stream)
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
        self.notices: List[str] = []      # the backend's notices: in every frame and in the summary
        self._unsaid: List[str] = []      # those only frames showed so far: the summary writes them
        self._begun = False
        self.log_folder = None
        self.errors: List[str] = []       # tracebacks of what the view could not draw
        self._silent = False              # even plain output failed: draw nothing more
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
        except (OSError, ValueError):     # the terminal or pipe went away: the run goes on
            pass

    def _size(self):
        try:
            size = os.get_terminal_size(self.stream.fileno())
            return max(20, size.columns), max(6, size.lines)
        except (OSError, ValueError, AttributeError):
            return 80, 24

    def eta(self) -> Optional[float]:
        """Time left, from the throughput of the tasks that ran so far (None until one ended)."""
        return self.board.eta(time.monotonic() - self.started)

    def _failed(self, what: str) -> None:
        """Drawing raised: keep the traceback, fall back to plain lines, or to nothing."""
        self.errors.append(f"the view failed {what}:\n{traceback.format_exc()}")
        if self._live_on:
            self._live_on = False
            self._write(_RESET + SHOW_CURSOR + "\n")
        else:
            self._silent = True

    def start(self) -> None:
        if self.quiet:
            return
        with self._lock:
            self._begun = True
            try:
                if self.live:
                    self._live_on = True
                    self._write(HIDE_CURSOR + (CLEAR_SCREEN if self.clear_screen else ""))
                    self._frame_lines = 0
                    self._draw()
                else:
                    self._write(render_table(self.tasks, False, self.hide_successful) + "\n")
            except Exception:
                self._failed("to start")

    def notice(self, line: str) -> None:
        """A backend's notice (jobs of a dead run cancelled, a partition replaced), shown once and
        for good: a line of every frame of the live view and of the final summary; otherwise one
        plain line at once (on stderr when quiet: a quiet run still says it)."""
        with self._lock:
            if line in self.notices:
                return
            self.notices.append(line)
            if not self.quiet and (self._live_on or (self.live and not self._begun)):
                self._unsaid.append(line)       # the next frame shows it, the summary writes it
                return
            stream = sys.stderr if self.quiet or self._silent else self.stream
            try:
                stream.write(f"depio: {line}\n")
                stream.flush()
            except (OSError, ValueError):
                pass

    def _draw(self) -> None:
        width, height = self._size()
        lines = live_lines(self.tasks, name=self.name, elapsed=time.monotonic() - self.started, eta=self.eta(),
                           width=width, height=height - 1, paused=self.paused, note=self.note,
                           hide_successful=self.hide_successful, unicode=self.unicode, keys=self.keys,
                           board=self.board, notices=self.notices)
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
        """Take in the scheduler's changes, then redraw (or print a progress line when due)."""
        with self._lock:
            self.board.update()
            if self.quiet or self._silent:
                return
            try:
                if self._live_on:
                    self._draw()
                elif time.monotonic() - self.last_line >= self.progress_interval:
                    self.last_line = time.monotonic()
                    line = summary_line(self.tasks, time.monotonic() - self.started, self.board.counts)
                    self._write(line + (f"  ({self.note})" if self.note else "") + "\n")
            except Exception:
                self._failed("to draw")

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

    def final(self, code: int, errors: Sequence[str] = ()) -> None:
        """The final table and summary; `errors` (tracebacks of what failed the run itself: the
        scheduler, the pipeline's loop) and the view's own come last, whatever `quiet` says."""
        with self._lock:
            self.board.update()
            self._erase_live()
        self.close()
        if not self.quiet:
            try:
                self._summary(code)
            except Exception:
                self.errors.append(f"the view failed to write the summary:\n{traceback.format_exc()}")
        every = list(errors) + self.errors
        if every:
            self._write("".join(f"---- THE RUN FAILED: {e.rstrip()}\n" for e in every))
            if self.quiet or code == 0:
                self._write("Exit 1.\n")

    def _summary(self, code: int) -> None:
        color = self.tty
        self._write(render_table(self.tasks, color, self.hide_successful, reason=self.tty) + "\n")
        report = failure_report(self.tasks, self.log_folder)
        if report:
            self._write(report + "\n")
        for line in self._unsaid:          # those only the live view showed
            self._write(f"depio: {line}\n")
        self._unsaid = []
        if self.tty:
            logs = f" Task logs: {_rel(self.log_folder)}/" if self.log_folder and not report else ""
            self._write(f"Elapsed {hms(time.monotonic() - self.started)}.{logs}\n")
        if code == 0 and not self.errors:
            self._write("All jobs done! Exit.\n")
        else:
            failed = sum(1 for t in self.tasks if t._status in FAILED_TERMINAL_STATES)
            self._write(f"{failed} of {len(self.tasks)} task(s) did not succeed. Exit 1.\n")


def isatty(stream) -> bool:
    """Whether `stream` is a terminal (False for anything that cannot say)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


__all__ = ["Display", "KeyReader", "render_table", "render_dry_run", "failure_report", "live_lines", "summary_line",
           "fit", "visible_len", "hms"]
