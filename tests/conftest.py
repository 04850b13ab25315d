"""Shared fixtures: each test runs in its own folder, and no process it started may outlive it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and so
# would every pipeline it starts: Python then installs no KeyboardInterrupt handler and the Ctrl-C
# tests would test nothing. A Python-level handler here makes children start with the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def descendants(pid: int) -> List[int]:
    """PIDs of every living descendant of `pid` (from /proc, zombies excluded)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        if rest[0] in ("Z", "X"):
            continue
        children.setdefault(int(rest[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def wait_no_descendants(pid: int, timeout: float = 10.0) -> List[int]:
    deadline = time.monotonic() + timeout
    left = descendants(pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = descendants(pid)
    return left


def wait_for(predicate, timeout: float = 30.0, what: str = "the condition", interval: float = 0.02):
    """Poll `predicate` until it returns something truthy, and return that. After `timeout` seconds
    raise AssertionError naming `what` was awaited (the bound is for a hung run, not the pace of a
    fast one: a slow machine only waits longer, it does not fail)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; it did not happen")
        time.sleep(interval)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Every test must leave no child process behind (workers, slots, pipelines)."""
    before = set(descendants(os.getpid()))
    yield
    left = [p for p in wait_no_descendants(os.getpid(), 15.0) if p not in before]
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind by the test: {left}"


def script_env(env=None) -> dict:
    """This environment, with this checkout first on the import path, plus `env`."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return e


def run_script(path: Path, cwd: Path, timeout: float = 60, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(path)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=script_env(env), stdin=subprocess.DEVNULL, **kw)


def popen_script(path: Path, cwd: Path, env=None) -> subprocess.Popen:
    """A script running in the background, stdout and stderr together in `.stdout`."""
    return subprocess.Popen([sys.executable, str(path)], cwd=cwd, env=script_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- a real Slurm (scripts/local-slurm.sh)

SLURM_HOW = 'run: eval "$(bash scripts/local-slurm.sh up)" (then bash scripts/local-slurm.sh down)'


def slurm_problem(wait: float = 20.0) -> str:
    """Why Slurm cannot run jobs here ('' when it can). Waits a little for a node that is busy
    finishing the previous test's jobs."""
    import shutil
    if not shutil.which("sbatch") or not shutil.which("squeue"):
        return "no Slurm client (sbatch/squeue) on PATH"
    deadline = time.monotonic() + wait
    while True:
        try:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as e:
            return f"sinfo failed: {e}"
        if r.returncode != 0:
            return f"Slurm is not reachable: {r.stderr.strip()[:200]}"
        states = [s.rstrip("*~#") for s in r.stdout.split()]
        if any(s in ("idle", "mixed", "allocated", "completing") for s in states):
            return ""
        if time.monotonic() > deadline:
            return f"no usable Slurm node (sinfo: {' '.join(states) or 'nothing'})"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster's default partition; skips (or, with DEPIO_REQUIRE_SLURM=1 as in CI, fails)
    when there is no cluster."""
    problem = slurm_problem()
    if problem:
        if os.environ.get("DEPIO_REQUIRE_SLURM") == "1":
            pytest.fail(f"DEPIO_REQUIRE_SLURM=1 but {problem}; {SLURM_HOW}")
        pytest.skip(f"{problem}; {SLURM_HOW}")
    r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=10)
    default = next((p.rstrip("*") for p in r.stdout.split() if p.endswith("*")), r.stdout.split()[0].rstrip("*"))
    return {"partition": default}
