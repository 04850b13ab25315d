"""depio.state's store and decisions: where the database is, what a record holds, the reasons a task
reruns, accepting, batched writes, kill -9 and two pipelines at once, and the run history."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from depio.state import (Decision, HashMemo, RunTask, StateStore, StateWriter, snapshot, state_path, task_key,
                         why_changed)
from depio.state.hashing import clear_code_cache
from depio.Task import Task
from depio.TaskStatus import TaskStatus


def old(path: Path, age: float = 3600) -> Path:
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def write(path: Path, text: str, age: float = 3600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return old(path, age)


def step(output, input, lr=0.1):
    return lr


def other_step(output, input, lr=0.1):
    return lr * 2


@pytest.fixture
def store(workdir):
    s = StateStore(workdir / ".depio" / "state.sqlite")
    yield s
    s.close()


def test_state_path_follows_the_log_conventions(workdir, tmp_path):
    assert state_path({}) == Path(os.getcwd(), ".depio", "state.sqlite")
    assert state_path({"DEPIO_STATE": "off"}) is None and state_path({"DEPIO_STATE": "OFF "}) is None
    assert state_path({"DEPIO_STATE": str(tmp_path / "x.db")}) == tmp_path / "x.db"
    assert state_path({"DEPIO_STATE": str(tmp_path)}) == tmp_path / "state.sqlite"
    assert state_path({"DEPIO_LOG_DIR": "/elsewhere/logs"}) == Path("/elsewhere/logs/state.sqlite")
    assert state_path({"DEPIO_LOG_DIR": "off"}) == Path(os.getcwd(), ".depio", "state.sqlite")
    assert state_path({"DEPIO_LOG_DIR": "/elsewhere/logs", "DEPIO_STATE": str(tmp_path)}) == tmp_path / "state.sqlite"
    assert StateStore.open_default({"DEPIO_STATE": "off"}) is None
    s = StateStore.open_default({})
    assert s is not None and s.path.exists()
    s.close()


def record_of(memo=None, lr=0.1, func=step, **kw):
    return snapshot("step", func, {"output": Path("build/x.txt"), "input": Path("data/raw.csv"), "lr": lr},
                    [Path("data/raw.csv")], [Path("build/x.txt")], memo, **kw)


def test_reasons_in_the_words_of_the_issue(workdir, tmp_path):
    write(tmp_path / "data" / "raw.csv", "1,2\n")
    write(tmp_path / "build" / "x.txt", "made")
    made = record_of(HashMemo(), hash_products=True)
    assert made.products == {"build/x.txt": made.products["build/x.txt"]} and made.products["build/x.txt"]
    assert why_changed(None, record_of()) == "no record of how build/x.txt was made"
    assert why_changed(made, record_of()) is None
    os.utime(tmp_path / "data" / "raw.csv")                                      # a touch alone
    assert why_changed(made, record_of()) is None
    write(tmp_path / "data" / "raw.csv", "1,2\n", age=100)                      # rewritten, same bytes
    assert why_changed(made, record_of()) is None
    write(tmp_path / "data" / "raw.csv", "1,3\n")
    assert why_changed(made, record_of()) == "dependency data/raw.csv changed"
    write(tmp_path / "data" / "raw.csv", "1,2\n")
    assert why_changed(made, record_of(lr=0.01)) == "argument lr: 0.1 -> 0.01"
    (tmp_path / "data" / "raw.csv").unlink()
    assert why_changed(made, record_of()) == "dependency data/raw.csv is missing"


def test_code_reason_names_the_def_line(workdir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    src = "import helpers_m\n\n\ndef train(x, lr=0.1):\n    return helpers_m.norm(x) * lr\n"
    (tmp_path / "helpers_m.py").write_text("def norm(x):\n    return x / 2\n")
    (tmp_path / "model.py").write_text(src)
    import model

    def rec():
        return snapshot("train", model.train, {"x": 1}, [], [Path("build/t.txt")])

    made = rec()
    for name in ("model", "helpers_m"):
        sys.modules.pop(name, None)
    clear_code_cache()
    (tmp_path / "model.py").write_text("# the model\n" + src.replace("* lr", "* lr * 2"))
    import model  # noqa: F811
    assert why_changed(made, rec()) == "code of train changed (model.py, def at line 5)"
    made = rec()
    for name in ("model", "helpers_m"):
        sys.modules.pop(name, None)
    clear_code_cache()
    (tmp_path / "helpers_m.py").write_text("def norm(x):\n    return x / 3\n")
    import model  # noqa: F811
    assert why_changed(made, rec()) == "code of train changed: it calls norm (helpers_m.py, def at line 1), which changed"
    assert Decision().why_code_changed(made, rec()) is not None
    made.python = "3.1"
    assert "cannot be compared: made under Python 3.1" in why_changed(made, rec())
    assert Decision(python_change="ignore").why_changed(made, rec()) is None
    for name in ("model", "helpers_m"):
        sys.modules.pop(name, None)


def test_fork_modes_reasons(workdir, tmp_path):
    write(tmp_path / "data" / "raw.csv", "x", age=10)
    write(tmp_path / "build" / "x.txt", "y", age=20)
    assert Decision.why_older(["build/x.txt"], ["data/raw.csv"]) == \
        "product build/x.txt is older than its input data/raw.csv"
    assert Decision.why_older(["build/x.txt"], ["data/none.csv"]) is None
    old(tmp_path / "build" / "x.txt", 5)
    assert Decision.why_older(["build/x.txt"], ["data/raw.csv"]) is None
    assert Decision.why_old(["build/x.txt"], 3600) is None
    old(tmp_path / "build" / "x.txt", 7200)
    assert Decision.why_old(["build/x.txt"], 3600) == "product build/x.txt is older than max_age (3600 s)"
    assert Decision.why_old(["build/none.txt"], 3600) == "product build/none.txt is missing"


def test_records_round_trip_and_accept(workdir, tmp_path, store):
    write(tmp_path / "data" / "raw.csv", "1,2\n")
    write(tmp_path / "build" / "x.txt", "made")
    memo = store.load_memo()
    made = record_of(memo, hash_products=True)
    assert store.record_made([made]) == 1
    store.save_memo(memo)
    got = store.get_made([made.key])[made.key]
    assert (got.deps, got.args, got.products, got.code, got.python) == \
        (made.deps, made.args, made.products, made.code, made.python)
    assert got.code_desc.name == "step" and got.fingerprint == made.fingerprint
    assert store.fingerprints() == {made.key: made.fingerprint}
    memo2 = store.load_memo()
    assert set(memo2.entries) == set(memo.entries)
    record_of(memo2)
    assert memo2.reads == 0
    accepted = store.accept([record_of(lr=0.5, hash_products=True)])
    assert [reason for _, reason in accepted] == ["argument lr: 0.1 -> 0.5"]
    assert store.get_made([made.key])[made.key].accepted
    assert store.accept([record_of(lr=0.5)])[0][1] is None
    store.forget([made.key])
    assert store.fingerprints() == {}


def test_task_key_by_products_or_function(workdir):
    a = task_key(step, ["build/x.txt", "build/y.txt"], {"lr": 1})
    assert a == task_key(other_step, [Path("build/y.txt"), os.path.abspath("build/x.txt")], {"lr": 2})
    assert task_key(step, [], {"lr": 1}) != task_key(step, [], {"lr": 2}) != task_key(other_step, [], {"lr": 2})


def test_writer_records_made_only_for_finished_tasks_in_batches(workdir, store):
    run = store.begin_run("p.py")
    writer = StateWriter(store, run, batch=100, interval=3600)
    for i in range(250):
        status = "FINISHED" if i % 5 else "FAILED"
        rec = snapshot(f"t{i}", step, {"i": i}, [], [f"out/{i}.txt"])
        writer.ended(RunTask(i + 1, rec.key, f"t{i}", status, time.time(), time.time() + 1, "w1", "h"), rec)
        writer.poll()
    assert len(store.run_tasks(run)) == 200 and len(store.fingerprints()) == 160      # two batches written
    writer.close({"FINISHED": 200, "FAILED": 50, "SKIPPED": 7})
    assert len(store.fingerprints()) == 200
    tasks = store.run_tasks(run)
    assert len(tasks) == 250 and tasks[1].worker == "w1" and abs(tasks[1].end - tasks[1].start - 1) < 0.01
    assert store.runs()[0]["counts"] == {"FINISHED": 200, "FAILED": 50, "SKIPPED": 7}


def test_history_is_pruned_like_log_folders(store, monkeypatch):
    ids = [store.begin_run("p.py", keep=3) for _ in range(5)]
    for run_id in ids[-3:]:
        store.record_run_tasks(run_id, [RunTask(1, "", "t", "FINISHED", 1.0, 2.0)])
    assert [r["id"] for r in store.runs()] == ids[:1:-1] and len(set(ids[-3:])) == 3
    monkeypatch.setenv("DEPIO_LOG_KEEP", "1")
    store.begin_run("p.py")
    assert len(store.runs()) == 1
    assert store._read("SELECT COUNT(*) FROM run_tasks")[0][0] == 0


WRITER = textwrap.dedent('''
    import sys, time
    from depio.state import StateStore, StateWriter, RunTask, MadeRecord
    store = StateStore(sys.argv[1])
    run = store.begin_run("p.py")
    writer = StateWriter(store, run, batch=500, interval=3600)
    tag, n = sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    for i in range(n):
        status = "FINISHED" if i % 3 else "FAILED"
        key = "%032x" % (hash((tag, i)) & (2 ** 128 - 1))
        made = MadeRecord(key, f"{tag}{i}", None, None, {}, {"i": str(i)}, {f"{tag}/{i}": None})
        writer.ended(RunTask(i, key, f"{tag}{i}", status, time.time(), time.time()), made)
        writer.poll()
        if i % 500 == 499:
            print("batch", i, flush=True)
    writer.close()
    print("done", flush=True)
''')


def test_kill_9_mid_run_leaves_only_finished_tasks_recorded(tmp_path):
    db = tmp_path / "state.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), "k", "10000000"], stdout=subprocess.PIPE, text=True)
    try:
        batches = 0
        for line in proc.stdout:
            batches += line.startswith("batch")
            if batches == 6:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    with StateStore(db) as store:
        assert store._read("PRAGMA integrity_check") == [("ok",)]
        run = store.runs()[0]["id"]
        finished = {t.key for t in store.run_tasks(run) if t.status == "FINISHED"}
        made = set(store.fingerprints())
        assert len(made) >= 5 * 500 * 2 // 3 and made <= finished


def test_two_pipelines_in_one_folder_at_once(tmp_path):
    db = tmp_path / "state.sqlite"
    StateStore(db).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), tag, "6000"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    outs = [p.communicate(timeout=100) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    with StateStore(db) as store:
        assert len(store.fingerprints()) == 2 * 4000
        assert sorted(len(store.run_tasks(r["id"])) for r in store.runs()) == [6000, 6000]


def _open_store(path: str) -> None:
    StateStore(path, timeout=30).close()


def test_pipelines_creating_the_store_at_the_same_moment_all_open_it(tmp_path):
    """SQLite fails a journal-mode change at once while another connection holds the new file (no busy
    handler): each of several processes creating the database together must still open it."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    for i in range(120):
        path = str(tmp_path / f"{i}" / "state.sqlite")
        procs = [ctx.Process(target=_open_store, args=(path,)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], f"round {i}: a process could not open {path}"


def test_size_per_task_stays_small(workdir, tmp_path):
    """A 2,000-task run, sized per task, is a guard on the 100,000-task figure (under 50 MB)."""
    n = 2000
    for i in range(n):
        write(tmp_path / "build" / f"in_{i}.txt", f"in {i}")
        write(tmp_path / "build" / f"out_{i}.txt", f"out {i}")
    with StateStore(tmp_path / ".depio" / "state.sqlite") as store:
        memo = store.load_memo()
        run = store.begin_run("p.py")
        writer = StateWriter(store, run, memo)
        for i in range(n):
            out, inp = Path(f"build/out_{i}.txt"), Path(f"build/in_{i}.txt")
            rec = snapshot("step", step, {"output": out, "input": inp, "lr": 0.1}, [inp], [out], memo, hash_products=True)
            writer.ended(RunTask(i + 1, rec.key, f"step_{i}", "FINISHED", time.time(), time.time() + 1, f"w{i % 4}",
                                 "node01", "", 1, f"no record of how build/out_{i}.txt was made"), rec)
            writer.poll()
        writer.close()
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        used = store._read("PRAGMA page_count")[0][0] * store._read("PRAGMA page_size")[0][0]
    assert used / n < 480, used / n                  # 100,000 tasks: under 48 MB
    conn = sqlite3.connect(tmp_path / ".depio" / "state.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM made").fetchone()[0] == n
    conn.close()


def test_history_written_by_an_older_depio_still_reads():
    """Version 1 packed times as ms from the run's start; a store kept from then still shows them."""
    import marshal
    from depio.state.codec import decode_history
    t0 = 1_700_000_000.0
    blob = marshal.dumps((1, [1, 2], ["k", ""], ["a", "b"], [0, 1500], [1000, None], ["n1:1", "n1:1"], ["n1", "n1"],
                          ["", "77"], [1, 2], ["FINISHED", "FAILED"], ["", "boom"]))
    a, b = decode_history(blob, t0)
    assert (a.name, a.status, a.start, a.end, a.key) == ("a", "FINISHED", t0, t0 + 1.0, "k")
    assert (b.name, b.status, b.start, b.end, b.slurm, b.attempts, b.reason) == ("b", "FAILED", t0 + 1.5, None, "77", 2, "boom")
    blob2 = zlib.compress(marshal.dumps((2, [1, 2], ["k", ""], ["a", "b"], [t0, t0 + 1.5], [t0 + 1.0, None],
                                         ["n1:1", "n1:1"], ["n1", "n1"], ["", "77"], [1, 2], ["FINISHED", "FAILED"],
                                         ["", "boom"])))        # version 2: times as they are, compressed
    assert decode_history(blob2, 0.0) == [a, b]


def noop(i):
    return i


def test_history_keeps_every_text_as_it_was():
    """Texts go joined by NUL when none holds one; a name or reason that does must come back whole."""
    from depio.state.codec import decode_history, encode_history
    ts = [Task(n, noop, [i]) for i, n in enumerate(["plain", "with\0nul", ""])]
    for i, t in enumerate(ts):
        t._queue_id, t.start_time, t.end_time, t.attempts = i + 1, 10.0 + i, None if i == 2 else 11.0 + i, i
        t._status, t.worker, t.reason = TaskStatus.FAILED, ["n1:4242", "pilot-1@n2", ""][i], ["", "a\0b", "x"][i]
    got = decode_history(encode_history(ts, ["", "ab" * 16, ""]), 0.0)
    assert [(r.seq, r.name, r.key, r.start, r.end, r.worker, r.host, r.attempts, r.status, r.reason) for r in got] == [
        (1, "plain", "", 10.0, 11.0, "n1:4242", "n1", 0, "FAILED", ""),
        (2, "with\0nul", "ab" * 16, 11.0, 12.0, "pilot-1@n2", "n2", 1, "FAILED", "a\0b"),
        (3, "", "", 12.0, None, "", "", 2, "FAILED", "x")]


def test_history_of_tasks_that_share_their_texts():
    """A column whose texts are all one text (a run's name, status, reason) is packed once; it must
    come back once per task, a NUL in it or not, and a one-task batch too."""
    from depio.state.codec import decode_history, encode_history
    for n, name in ((3, "same\0name"), (1, "alone")):
        ts = [Task(name, noop, [i]) for i in range(n)]
        for i, t in enumerate(ts):
            t._queue_id, t.start_time, t.end_time, t.attempts = i + 1, 10.0 + i, 11.0 + i, 1
            t._status, t.worker, t.reason = TaskStatus.FINISHED, "n1:4242", "declares no products"
        got = decode_history(encode_history(ts, [""] * n), 0.0)
        assert [(r.seq, r.name, r.key, r.start, r.worker, r.host, r.slurm, r.attempts, r.status, r.reason)
                for r in got] == [(i + 1, name, "", 10.0 + i, "n1:4242", "n1", "", 1, "FINISHED", "declares no products")
                                  for i in range(n)]


def test_history_of_version_3_still_reads():
    """Version 3 (texts joined, no host column) as an older depio wrote it."""
    import marshal
    from depio.state.codec import decode_history
    blob = zlib.compress(marshal.dumps((3, [1, 2], "\0k", "a\0b", [5.0, 6.0], [7.0, None], "n1:1\0p-1@n2", "\0" + "77",
                                        [1, 2], "FINISHED\0FAILED", ["", "boom"])))
    got = decode_history(blob, 0.0)
    assert [(r.seq, r.key, r.name, r.start, r.end, r.worker, r.host, r.slurm, r.status, r.reason) for r in got] == [
        (1, "", "a", 5.0, 7.0, "n1:1", "n1", "", "FINISHED", ""),
        (2, "k", "b", 6.0, None, "p-1@n2", "n2", "77", "FAILED", "boom")]
