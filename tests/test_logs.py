"""Per-task log files: one folder per run, latest linked, the failure summary names the files."""
from __future__ import annotations

import os
import sys

import pytest

from depio import ParallelExecutor, Pipeline, Task
from depio.view.logs import RunLogs, list_runs, safe_name


def talk(i: int):
    print(f"out of {i}")
    print(f"err of {i}", file=sys.stderr)
    sys.stdout.flush()
    os.system(f"echo child process {i}")          # output of child processes is caught too
    if i == 2:
        raise RuntimeError("task 2 fails")


def silent():
    pass


def _pipeline(**kw):
    p = Pipeline(ParallelExecutor(workers=1), **kw)
    tasks = [p.add_task(Task(f"talk {i}", talk, [i])) for i in (1, 2)]
    tasks.append(p.add_task(Task("silent", silent)))
    return p, tasks


@pytest.mark.timeout(120)
def test_logs_written_per_task_and_named_in_the_failure_summary(workdir, capsys):
    p, (t1, t2, t3) = _pipeline()
    assert p.run() == 1
    out = capsys.readouterr().out
    root = workdir / ".depio" / "logs"
    latest = root / "latest"
    assert latest.is_symlink()
    run = latest.resolve()
    assert run.parent == root and list_runs(root) == [run]
    assert (run / "1-talk_1.out").read_text() == "out of 1\nchild process 1\n"
    assert (run / "1-talk_1.err").read_text() == "err of 1\n"
    assert (run / "2-talk_2.err").read_text().startswith("err of 2")
    assert not (run / "3-silent.out").exists()                 # printed nothing: no file
    assert t1.get_stdout() == "out of 1\nchild process 1\n" and t1.get_stderr() == "err of 1\n"
    assert t1.stdout_path == run / "1-talk_1.out" and t3.stdout_path is None
    # the summary names the failed task's files (relative to where the pipeline ran)
    rel = os.path.relpath(run)
    assert f"-- stdout (log file {rel}/2-talk_2.out):" in out
    assert f"-- stderr (log file {rel}/2-talk_2.err):" in out
    assert "out of 2" in out and "RuntimeError: task 2 fails" in out


@pytest.mark.timeout(120)
def test_each_run_has_its_folder_and_old_ones_are_pruned(workdir, monkeypatch):
    monkeypatch.setenv("DEPIO_LOG_KEEP", "2")
    runs = []
    for _ in range(3):
        p, _ = _pipeline(quiet=True)
        p.run()
        runs.append((workdir / ".depio" / "logs" / "latest").resolve())
    assert len(set(runs)) == 3
    assert list_runs(workdir / ".depio" / "logs") == runs[1:]


@pytest.mark.timeout(120)
def test_log_dir_from_environment_and_off(workdir, monkeypatch):
    monkeypatch.setenv("DEPIO_LOG_DIR", str(workdir / "elsewhere"))
    p, (t1, _, _) = _pipeline(quiet=True)
    p.run()
    assert t1.stdout_path.parent.parent == workdir / "elsewhere"
    assert not (workdir / ".depio").exists()
    monkeypatch.setenv("DEPIO_LOG_DIR", "off")
    p, (t1, _, _) = _pipeline(quiet=True)
    p.run()
    assert t1.stdout_path is None and t1.get_stdout().startswith("out of 1")
    assert len(list_runs(workdir / "elsewhere")) == 1


@pytest.mark.timeout(30)
def test_unwritable_log_dir_does_not_stop_a_run(workdir, monkeypatch):
    (workdir / "file").write_text("not a folder")
    logs = RunLogs(root=workdir / "file" / "logs")
    assert logs.open() is None and logs.error and not logs.enabled


@pytest.mark.timeout(30)
def test_safe_names():
    assert safe_name("train model/x:1") == "train_model_x_1"
    assert safe_name("../..") == "task"
    assert len(safe_name("x" * 500)) <= 60
