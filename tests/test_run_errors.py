"""No error vanishes: a crash in the scheduler actor or in the view fails the run (exit 1), its
traceback is in the summary and in the run's log folder, no task is left without a reason, and no
process is left behind (conftest checks that after every test)."""
from pathlib import Path

import pytest

from conftest import run_script

pytestmark = pytest.mark.timeout(120)

SCRIPT = """
import sys, time
from pathlib import Path
from depio.Pipeline import Pipeline
from depio.Executors import ParallelExecutor
from depio.runtime.transitions import TaskStates
import depio.view.display as display
{patch}
def work(i):
    time.sleep(0.2)
p = Pipeline(ParallelExecutor(), quiet=False, refreshrate=0.05)
ts = [p.add_task(__import__("depio.Task", fromlist=["Task"]).Task(f"t{{i}}", work, [i])) for i in range(4)]
code = p.run()
print("STATES", ",".join(t._status.name for t in ts))
print("REASONS", "|".join(t.reason for t in ts))
sys.exit(code)
"""

CRASH_IN_TRANSITION = """
def broken(self, i):
    raise RuntimeError("injected transition failure")
TaskStates.running_ended = broken
"""

CRASH_IN_VIEW = """
def broken(*a, **k):
    raise RuntimeError("injected view failure")
display.summary_line = broken
_init = display.Display.__init__
def init(self, *a, **k):
    _init(self, *a, **k)
    self.progress_interval = 0.0
display.Display.__init__ = init
"""


def _run(workdir: Path, patch: str):
    script = workdir / "p.py"
    script.write_text(SCRIPT.format(patch=patch))
    return run_script(script, workdir, timeout=100)


def _logged_errors(workdir: Path) -> str:
    files = list((workdir / ".depio" / "logs").glob("*/run-errors.txt"))
    return files[0].read_text() if files else ""


def test_a_crash_in_the_scheduler_fails_the_run_with_its_traceback(workdir):
    r = _run(workdir, CRASH_IN_TRANSITION)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" in r.stdout and "injected transition failure" in r.stdout, out
    assert "THE RUN FAILED: the scheduler failed" in r.stdout, out
    states = next(line for line in r.stdout.splitlines() if line.startswith("STATES")).split()[1].split(",")
    assert all(s in ("FINISHED", "CANCELED") for s in states) and "CANCELED" in states, out
    reasons = next(line for line in r.stdout.splitlines() if line.startswith("REASONS"))
    assert "the scheduler failed: RuntimeError: injected transition failure" in reasons, out
    assert "injected transition failure" in _logged_errors(workdir)


def test_a_crash_in_the_view_is_reported_and_fails_the_run(workdir):
    r = _run(workdir, CRASH_IN_VIEW)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "THE RUN FAILED: the view failed to draw" in r.stdout and "injected view failure" in r.stdout, out
    assert "Traceback" in r.stdout, out
    states = next(line for line in r.stdout.splitlines() if line.startswith("STATES")).split()[1].split(",")
    assert states == ["FINISHED"] * 4, out       # the run itself went on, without progress lines
    assert "injected view failure" in _logged_errors(workdir)
