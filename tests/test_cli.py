"""`depio` on the command line: help with examples, one-line errors, logs, keys."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from conftest import ROOT, script_env

CLI = "import sys; from depio.cli import main; sys.exit(main())"


def depio(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=script_env(env), stdin=subprocess.DEVNULL)


@pytest.mark.timeout(60)
def test_help_lists_commands_with_examples():
    r = depio("--help")
    assert r.returncode == 0
    for cmd in ("explain", "logs", "key", "info"):
        assert cmd in r.stdout
    assert "examples:" in r.stdout and "depio explain pipeline.py" in r.stdout and "depio logs 3" in r.stdout


@pytest.mark.timeout(60)
def test_worker_help():
    r = subprocess.run([sys.executable, "-m", "worker", "--help"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "--connect" in r.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["bogus"], ["key"], ["logs"], ["logs", "--run", "nope"], ["explain", "nope.py"],
                                  ["logs", "--runs"]])
def test_errors_are_one_line(args, tmp_path):
    r = depio(*args, cwd=tmp_path)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr


@pytest.mark.timeout(60)
def test_key_file_mode_and_no_overwrite(tmp_path):
    f = tmp_path / "k" / "cluster.key"
    r = depio("key", str(f))
    assert r.returncode == 0 and len(f.read_text().strip()) >= 32
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    r = depio("key", str(f))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--force" in r.stderr


@pytest.mark.timeout(60)
def test_logs_list_and_print(tmp_path):
    run = tmp_path / ".depio" / "logs" / "20250101-120000-1"
    run.mkdir(parents=True)
    (run / "1-prep.out").write_text("prep says hi\n")
    (run / "2-train.err").write_text("train warns\n")
    os.symlink(run.name, tmp_path / ".depio" / "logs" / "latest")
    r = depio("logs", cwd=tmp_path)
    assert r.returncode == 0 and "1-prep.out" in r.stdout and "2-train.err" in r.stdout
    r = depio("logs", "1", cwd=tmp_path)
    assert r.returncode == 0 and "prep says hi" in r.stdout and "train" not in r.stdout
    r = depio("logs", "train", cwd=tmp_path)
    assert "train warns" in r.stdout
    r = depio("logs", "--runs", cwd=tmp_path)
    assert r.stdout.split() == ["20250101-120000-1"]
    r = depio("logs", "9", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(60)
def test_info():
    r = depio("info")
    assert r.returncode == 0 and r.stdout.startswith("depio ")
