"""depio.state.tasks: the fast IF_CHANGED decision gives what `snapshot` + `why_changed` give, the
argument digest matches the record's, and a store that cannot be opened never fails a run."""
from __future__ import annotations

import os
import time
from pathlib import Path, PurePosixPath
from typing import Annotated

import pytest

from depio import BuildMode, Dependency, Pipeline, Product, SequentialExecutor, Task
from depio.state import StateStore, TaskState
from depio.state.values import args_digest, args_hash

pytestmark = pytest.mark.timeout(60)


def step(i: int, out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None, tag: str = "t"):
    out.write_text(f"{i}{tag}" + (inp.read_text() if inp else ""))


def tree(n: int = 30, tag: str = "t") -> Pipeline:
    p = Pipeline(SequentialExecutor(), quiet=True)
    for i in range(n):
        p.add_task(Task("step", step, [i, Path(f"{i}.txt"), Path(f"{i // 3}.txt") if i else None],
                        {"tag": tag}, buildmode=BuildMode.IF_CHANGED))
    return p


@pytest.mark.parametrize("value", [1, 0.1, "x", None, True, b"b", 3j, Path("a/b"), PurePosixPath("/c"), [1, 2],
                                   {"k": (1, 2)}, {3, 1}, "x" * 500, object, len, Path])
def test_args_digest_matches_the_records_digest(value):
    assert args_digest({"a": value, "b": 2}) == args_hash({"a": value, "b": 2})


def test_the_fast_path_agrees_with_the_record(workdir, monkeypatch):
    assert tree().run() == 0
    p = tree()
    p.validate()
    state = TaskState.open()
    try:
        for t in p.tasks:
            t._state = state
        fps = state.store.fingerprints()
        for t in p.tasks:
            cur = state.current(t)
            assert fps[cur.key] == cur.fingerprint
        with monkeypatch.context() as m:
            m.setattr(TaskState, "why_changed", lambda self, task: pytest.fail(f"slow path for {task}"))
            assert [t.run_reason(False) for t in p.tasks] == [None] * len(p.tasks)
        assert state._known                      # the products of skipped tasks are not stat'ed again
    finally:
        state.close()
    Path("4.txt").write_text("changed")
    p = tree()
    assert p.run() == 0
    ran = {t.func_args[0]: t.reason for t in p.tasks if t._status.name == "FINISHED"}
    assert ran[4] == "product 4.txt changed since it was made"
    assert set(ran) == {4}             # its rerun wrote the same bytes again: 12-14, which read 4.txt, did not
    p = tree(tag="u")                  # an argument of every task changed: all rerun; an input changed first
    assert p.run() == 0 and all(t._status.name == "FINISHED" for t in p.tasks)
    reasons = {t.func_args[0]: t.reason for t in p.tasks}
    assert reasons[0] == "argument tag: 't' -> 'u'" and reasons[12] == "dependency 4.txt changed"


def test_only_finished_tasks_are_recorded_as_made(workdir):
    def boom(out: Annotated[Path, Product]):
        out.write_text("half")
        raise ValueError("no")

    p = Pipeline(SequentialExecutor(), quiet=True)
    p.add_task(Task("ok", step, [1, Path("ok.txt")]))
    p.add_task(Task("boom", boom, [Path("boom.txt")]))
    p.add_task(Task("after", step, [2, Path("after.txt"), Path("boom.txt")]))
    assert p.run() == 1
    with StateStore(Path(".depio", "state.sqlite")) as store:
        made = store.get_made()
        assert [r.name for r in made.values()] == ["ok"]
        (run,) = store.runs()
        assert {t.name: t.status for t in store.run_tasks(run["id"])} == \
            {"ok": "FINISHED", "boom": "FAILED", "after": "DEPFAILED"}


def test_a_store_that_cannot_be_opened_does_not_fail_the_run(workdir, monkeypatch):
    Path("plain-file").write_text("")
    monkeypatch.setenv("DEPIO_STATE", str(Path("plain-file", "sub", "state.sqlite")))
    p = tree(3)
    assert p.run() == 0 and all(t._status.name == "FINISHED" for t in p.tasks)


def test_accept_names_unknown_tasks_and_missing_products(workdir):
    p = tree(3)
    with pytest.raises(ValueError, match="no task named nope"):
        p.accept(["nope"])
    with pytest.raises(ValueError, match="product missing"):
        p.accept()
    assert p.run() == 0
    assert [(t.name, why) for t, why in tree(3).accept(["1"])] == [("step", None)]     # by id; up to date


def _age(*paths: Path, seconds: float = 60) -> None:
    """Set the files' mtimes in the past: settled, as files are a few seconds after a run."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def _tokens() -> dict:
    with StateStore(Path(".depio", "state.sqlite")) as store:
        return {k.hex(): q for k, q in store._read("SELECT key, quick FROM made")}


def test_a_settled_up_to_date_task_is_decided_by_stat_alone(workdir, monkeypatch):
    assert tree().run() == 0
    assert set(_tokens().values()) == {None}          # just written: within the racy window, no token
    p = tree()
    assert p.run() == 0 and all(t._status.name == "SKIPPED" for t in p.tasks)
    assert set(_tokens().values()) == {None}          # up to date, but the files may still change unseen
    _age(*Path(".").glob("*.txt"))
    p = tree()
    assert p.run() == 0 and all(t._status.name == "SKIPPED" for t in p.tasks)
    assert None not in _tokens().values()             # found up to date by content: tokens for the next run
    p = tree()
    p.validate()
    state = TaskState.open()
    try:
        for t in p.tasks:
            t._state = state
        with monkeypatch.context() as m:
            m.setattr(TaskState, "_check_content", lambda self, task, key: pytest.fail(f"content read for {task}"))
            assert [t.run_reason(False) for t in p.tasks] == [None] * len(p.tasks)
        assert state._memo is None                    # not even the memo was loaded
    finally:
        state.close()


def test_a_quick_token_never_hides_a_change(workdir):
    assert tree().run() == 0
    _age(*Path(".").glob("*.txt"))
    assert tree().run() == 0                          # tokens set
    before = _tokens()
    Path("4.txt").write_text("X" * len(Path("4.txt").read_text()))     # same size, new content, mtime now
    p = tree()
    assert p.run() == 0
    ran = {t.func_args[0]: t.reason for t in p.tasks if t._status.name == "FINISHED"}
    assert ran == {4: "product 4.txt changed since it was made"}
    after = _tokens()
    changed = {k for k in before if before[k] != after[k]}
    assert len(changed) == 1 and after[changed.pop()] is None      # made again: its token goes
    Path("0.txt").write_bytes(Path("0.txt").read_bytes())           # the same bytes again: stamps differ
    _age(*Path(".").glob("*.txt"))
    p = tree()
    assert p.run() == 0 and all(t._status.name == "SKIPPED" for t in p.tasks)   # by content: up to date
    assert None not in _tokens().values()
    p = tree(tag="u")                                  # an argument: the token differs, content decides
    assert p.run() == 0 and all(t._status.name == "FINISHED" for t in p.tasks)


def test_a_store_without_the_quick_column_gains_it(workdir):
    import sqlite3
    Path(".depio").mkdir()
    db = sqlite3.connect(".depio/state.sqlite")
    db.execute("CREATE TABLE made(id INTEGER PRIMARY KEY, key BLOB UNIQUE NOT NULL, fp BLOB NOT NULL, name TEXT, "
               "code INTEGER, rec TEXT, made_at INTEGER, accepted INTEGER)")
    db.commit()
    db.close()
    assert tree(3).run() == 0
    _age(*Path(".").glob("*.txt"))
    assert tree(3).run() == 0
    assert len(_tokens()) == 3 and None not in _tokens().values()
