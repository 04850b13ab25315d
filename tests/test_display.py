"""The live view on a real pseudo-terminal (keys included) and the plain output elsewhere."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import ROOT, descendants, run_script, wait_for
from depio.Task import Task
from depio.TaskStatus import TaskStatus
from depio.view.display import (Display, fit, live_lines, render_table, visible_len)

ESC = "\033"


def _task(i, name, status, **kw):
    t = Task(name, print, [i])
    t._queue_id = i
    t._status = status
    t.task_dependencies, t.path_dependencies = [], []
    for k, v in kw.items():
        setattr(t, k, v)
    return t


# ---------------------------------------------------------------- units

@pytest.mark.timeout(30)
def test_plain_table_has_readme_columns_and_no_escape_codes():
    tasks = [_task(1, "a", TaskStatus.FINISHED), _task(2, "b", TaskStatus.FAILED)]
    text = render_table(tasks)
    assert text.splitlines()[0] == "Tasks:"
    assert text.splitlines()[1].split() == ["ID", "Name", "Slurm", "ID", "Slurm", "Status", "Status", "Task",
                                            "Deps.", "Path", "Deps.", "Products"]
    assert ESC not in text
    assert "Reason" not in text


@pytest.mark.timeout(30)
def test_fit_keeps_escape_codes_and_cuts_visible_width():
    line = "\033[32m" + "x" * 50 + "\033[0m" + "y" * 50
    cut = fit(line, 30)
    assert visible_len(cut) == 30
    assert cut.startswith("\033[32m")
    assert fit("short", 30) == "short"


@pytest.mark.timeout(30)
def test_live_frame_fits_the_terminal():
    tasks = [_task(i, f"t{i}", TaskStatus.RUNNING if i % 3 else TaskStatus.FAILED, start_time=time.time() - i,
                   reason="ValueError: x") for i in range(1, 200)]
    lines = live_lines(tasks, name="demo", elapsed=12.0, eta=30.0, width=100, height=20, paused=True, note="",
                       hide_successful=False)
    assert len(lines) <= 20
    text = "\n".join(lines)
    assert "PAUSED" in text and "Running (" in text and "Failures (" in text and "ETA 0:00:30" in text


@pytest.mark.timeout(30)
def test_display_not_on_a_terminal_prints_tables_and_rare_progress_lines(monkeypatch):
    # the display's clock is the test's: "too soon" and "due" do not depend on how fast this machine is
    now = [1000.0]
    clock = type("Clock", (), {"monotonic": staticmethod(lambda: now[0]), "time": staticmethod(time.time)})
    monkeypatch.setattr(sys.modules[Display.__module__], "time", clock)
    tasks = [_task(1, "a", TaskStatus.WAITING), _task(2, "b", TaskStatus.WAITING)]
    out = io.StringIO()
    d = Display(tasks, stream=out, progress_interval=0.3)
    d.start()
    for _ in range(5):
        now[0] += 0.05
        d.refresh()                       # too soon: nothing
    assert out.getvalue().count("\n") == 4      # Tasks:, header, 2 rows
    now[0] += 0.1                         # 0.35 s after the start: one progress line is due
    tasks[0]._status = TaskStatus.FINISHED
    d.refresh()
    d.refresh()
    assert out.getvalue().count("tasks: ") == 1
    tasks[1]._status = TaskStatus.FINISHED
    d.final(0)
    text = out.getvalue()
    assert ESC not in text
    assert text.rstrip().endswith("All jobs done! Exit.")
    assert text.count("Tasks:") == 2


@pytest.mark.timeout(30)
def test_quiet_prints_nothing():
    out = io.StringIO()
    d = Display([_task(1, "a", TaskStatus.FINISHED)], stream=out, quiet=True)
    d.start(), d.refresh(), d.final(0)
    assert out.getvalue() == ""


@pytest.mark.timeout(30)
def test_hide_successful_tasks():
    tasks = [_task(1, "good", TaskStatus.FINISHED), _task(2, "bad", TaskStatus.FAILED)]
    out = io.StringIO()
    d = Display(tasks, stream=out, hide_successful=True)
    d.final(1)
    assert "bad" in out.getvalue() and "good" not in out.getvalue()


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.timeout(30)
def test_a_notice_stays_in_every_frame_and_is_in_the_summary_once():
    tasks = [_task(1, "a", TaskStatus.RUNNING, start_time=time.time())]
    out = _Tty()
    d = Display(tasks, stream=out, live=True)
    d.notice("cancelled 2 Slurm job(s) of an earlier run")        # before the view started
    d.start()
    d.notice("this cluster has no partition 'gpu'")
    d.notice("this cluster has no partition 'gpu'")                # the same line again: shown once
    for _ in range(3):
        d.refresh()
    frames = [f for f in out.getvalue().split("\033[H") if "done  elapsed" in f]
    assert len(frames) == 4 and all("depio: cancelled 2 Slurm job(s)" in f for f in frames), frames
    assert all(f.count("no partition 'gpu'") == 1 for f in frames[1:]), frames
    tasks[0]._status = TaskStatus.FINISHED
    before = len(out.getvalue())
    d.final(0)
    summary = out.getvalue()[before:]
    assert summary.count("depio: cancelled 2 Slurm job(s)") == 1 and summary.count("no partition 'gpu'") == 1
    assert summary.rstrip().endswith("All jobs done! Exit.")


@pytest.mark.timeout(30)
def test_a_notice_is_one_plain_line_off_a_terminal_and_on_stderr_when_quiet(capsys):
    out = io.StringIO()
    d = Display([_task(1, "a", TaskStatus.FINISHED)], stream=out)
    d.start()
    d.notice("cancelled 1 Slurm job(s) of an earlier run")
    d.refresh()
    d.final(0)
    assert out.getvalue().count("depio: cancelled 1 Slurm job(s) of an earlier run\n") == 1
    assert ESC not in out.getvalue()
    quiet = io.StringIO()
    q = Display([_task(1, "a", TaskStatus.FINISHED)], stream=quiet, quiet=True)
    q.start()
    q.notice("cancelled 1 Slurm job(s) of an earlier run")
    q.final(0)
    assert quiet.getvalue() == ""
    assert capsys.readouterr().err == "depio: cancelled 1 Slurm job(s) of an earlier run\n"


# ---------------------------------------------------------------- a real run, not on a terminal

SCRIPT = """
import sys, time
from depio import Pipeline, ParallelExecutor, Task

def work(sec, i):
    print("working", i)
    print("note", i, file=sys.stderr)
    time.sleep(sec)
    if i == 99:
        raise ValueError("task 99 fails")

p = Pipeline(ParallelExecutor(workers=2), name="ptydemo", refreshrate=0.2, clear_screen={clear})
a = p.add_task(Task("first", work, [{first}, 1]))
p.add_task(Task("second", work, [{second}, 2], depends_on=[a]))
p.add_task(Task("third", work, [{third}, {third_id}], depends_on=[a]))
exit(p.run())
"""


def _script(path: Path, first=0.5, second=0.5, third=0.5, third_id=3, clear=True) -> Path:
    path.write_text(SCRIPT.format(first=first, second=second, third=third, third_id=third_id, clear=clear))
    return path


@pytest.mark.timeout(120)
def test_non_terminal_run_has_no_escape_codes(workdir):
    s = _script(workdir / "p.py", third_id=99)
    r = run_script(s, workdir, timeout=100)
    assert r.returncode == 1, r.stdout + r.stderr
    assert ESC not in r.stdout and ESC not in r.stderr
    assert "---- FAILED: third (#3)" in r.stdout
    assert r.stdout.rstrip().endswith("Exit 1.")


# ---------------------------------------------------------------- under a pseudo-terminal

class PtyRun:
    """A script run as the foreground job of a fresh pseudo-terminal (40 x 120)."""

    def __init__(self, script: Path, cwd: Path):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["TERM"] = "xterm"
        env["LANG"] = env.get("LANG") or "C.UTF-8"
        self.pid, self.fd = pty.fork()
        if self.pid == 0:       # child: exec at once
            try:
                os.chdir(cwd)
                os.execve(sys.executable, [sys.executable, str(script)], env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.out = b""
        self.code = None
        self.seen_pids = set()

    def read_until(self, needle: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.out:
                return True
            if not self._read(0.1):
                return needle in self.out
        return needle in self.out

    def _read(self, wait: float) -> bool:
        self.seen_pids.update(descendants(self.pid))
        r, _, _ = select.select([self.fd], [], [], wait)
        if r:
            try:
                data = os.read(self.fd, 65536)
            except OSError:        # EIO: the child closed the terminal
                return False
            if not data:
                return False
            self.out += data
        return True

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read(0.05):
                    pass
                self.code = os.waitstatus_to_exitcode(status)
                return self.code
            self._read(0.1)
        self.kill()
        raise AssertionError("the pipeline did not end; output:\n" + self.text[-3000:])

    def terminal_attrs(self):
        return termios.tcgetattr(self.fd)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def close(self) -> None:
        if self.code is None:
            self.kill()
        try:
            os.close(self.fd)
        except OSError:
            pass

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace")


def _frames(out: bytes, start: int):
    """(end offset, text) of each whole live-view frame (home ... clear to end) drawn after `start`."""
    return [(m.end(), m.group(1)) for m in re.compile(rb"\033\[H(.*?)\033\[J", re.S).finditer(out, start)
            if m.group(1)]


def _alive(pids):
    left = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    left.append(p)
        except OSError:
            pass
    return left


@pytest.mark.timeout(120)
def test_live_view_renders_and_ends_with_the_final_table(workdir):
    run = PtyRun(_script(workdir / "p.py", first=1.5, second=1.5, third=1.5), workdir)
    try:
        assert run.read_until(b"keys: p pause", 60), run.text
        assert run.read_until(b"Running (", 60), run.text
        code = run.finish(90)
        attrs = run.terminal_attrs()
    finally:
        run.close()
    text = run.text
    assert code == 0, text
    assert "depio\033[0m ptydemo" in text and "elapsed 0:00:0" in text and "ETA" in text
    assert "\033[?25l" in text and "\033[?25h" in text           # cursor hidden, then shown again
    assert text.count("\033[2J") == 1                              # one clear at the start, none per frame
    assert text.count("\033[H") >= 3                               # redrawn in place, several times
    final = text[text.rindex("\033[?25h"):]
    assert "Tasks:" in final and "Reason" in final and final.count("FINISHED") == 3
    assert final.rstrip().endswith("All jobs done! Exit.")
    lflag = attrs[3]
    assert lflag & termios.ICANON and lflag & termios.ECHO        # the terminal is restored


@pytest.mark.timeout(120)
def test_pause_and_resume_keys(workdir):
    run = PtyRun(_script(workdir / "p.py", first=2.0, second=0.3, third=0.3), workdir)
    try:
        assert run.read_until(b"Running (1)", 60), run.text
        run.send(b"p")
        assert run.read_until(b"PAUSED", 20), run.text
        paused_at = run.out.index(b"PAUSED")
        # while paused, the first task ends; a follower handed out with it before the pause (one link
        # of the chain) may still run, then nothing is in the workers' hands
        assert run.read_until(b"1/3 done", 30), run.text
        idle = wait_for(lambda: run._read(0.05) and next((end for end, f in _frames(run.out, paused_at)
                                                          if b"RUNNING" not in f and b"PENDING" not in f), 0),
                        30, what="a paused frame with no task running or pending")
        # "nothing new starts" has no event to wait for: watch the frames for 1 s (and 3 frames at least)
        watch_until = time.monotonic() + 1.0
        wait_for(lambda: run._read(0.05) and time.monotonic() > watch_until and len(_frames(run.out, idle)) >= 3,
                 30, what="three more live-view frames while paused")
        for _, f in _frames(run.out, idle):
            assert b"PAUSED" in f and b"RUNNING" not in f and b"PENDING" not in f, f
        started = {n for _, f in _frames(run.out, paused_at) for n in (b"second", b"third")
                   if re.search(rb"\s" + n + rb"\s.*(RUNNING|FINISHED)", f)}
        assert len(started) <= 1 and b"3/3" not in run.out, run.text    # at most the one follower ran
        run.send(b"r")
        code = run.finish(90)
    finally:
        run.close()
    assert code == 0, run.text
    assert run.text.rstrip().endswith("All jobs done! Exit.")


@pytest.mark.timeout(120)
def test_q_cancels_the_run_and_leaves_no_process(workdir):
    run = PtyRun(_script(workdir / "p.py", first=0.3, second=60, third=60), workdir)
    try:
        assert run.read_until(b"1/3 done", 60), run.text
        assert run.read_until(b"#2", 30) or run.read_until(b"#3", 1), run.text     # second/third running
        workers = set(run.seen_pids)
        assert workers, "the pipeline started no worker process"
        started = time.monotonic()
        run.send(b"q")
        code = run.finish(60)
        attrs = run.terminal_attrs()
    finally:
        run.close()
    text = run.text
    assert code == 1, text
    assert time.monotonic() - started < 40
    final = text[text.rindex("\033[?25h"):]
    assert final.count("CANCELED") == 2 and "quit by the user" in final and "FINISHED" in final
    assert attrs[3] & termios.ICANON
    deadline = time.monotonic() + 15
    while _alive(run.seen_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(run.seen_pids), f"left running: {_alive(run.seen_pids)}"


@pytest.mark.timeout(120)
def test_live_view_without_clear_screen_redraws_below(workdir):
    run = PtyRun(_script(workdir / "p.py", first=1.0, second=0.5, third=0.5, clear=False), workdir)
    try:
        code = run.finish(90)
    finally:
        run.close()
    text = run.text
    assert code == 0, text
    assert "\033[2J" not in text and "\033[H" not in text
    assert "A\033[1mdepio" in text or "A" in text                 # cursor up, then the frame again
    assert text.rstrip().endswith("All jobs done! Exit.")
