"""The view's Board follows the scheduler's change feed; decide() gives one reason text per case."""
from pathlib import Path
from typing import Annotated

from depio.BuildMode import BuildMode
from depio.Task import Product, Task
from depio.TaskStatus import TaskStatus as S
from depio.runtime.decide import decide
from depio.runtime.transitions import ChangeFeed, TaskStates
from depio.view.board import Board


def noop(x=0):
    pass


def _tasks(n):
    ts = [Task(f"t{i}", noop, [i]) for i in range(n)]
    for i, t in enumerate(ts):
        t._queue_id = i + 1
    return ts


def test_board_counts_running_failures_and_ended_from_the_feed_only():
    ts = _tasks(4)
    feed = ChangeFeed()
    st, board = TaskStates(ts, feed), Board(ts, feed)
    assert board.counts[S.WAITING] == 4
    for i in range(3):
        st.move(i, S.PENDING)
    st.move(0, S.RUNNING)
    st.move(1, S.RUNNING)
    board.update()
    assert [t.name for t in board.running_tasks()] == ["t0", "t1"] and board.counts[S.PENDING] == 1
    st.move(0, S.FINISHED)
    st.move(1, S.FAILED, "boom")
    st.move(3, S.CANCELED)
    board.update()
    assert board.running == {} and [t.name for t in board.failed_tasks()] == ["t1"]
    assert sorted(board.take_ended()) == [0, 1, 3] and board.take_ended() == []
    assert board.ended_count() == 3 and board.left() == 1 and board.eta(10.0) == 5.0
    assert feed.drain() == []


def test_board_catches_up_on_more_changes_than_tasks_in_one_pass():
    ts = _tasks(4)
    feed = ChangeFeed()
    st, board = TaskStates(ts, feed), Board(ts, feed)
    st.move(2, S.PENDING)
    st.move(2, S.RUNNING)
    board.update()                      # 2 changes for 4 tasks: followed one by one
    assert list(board.running) == [2]
    for i in (1, 0, 3):
        st.move(i, S.PENDING)
    st.move(1, S.RUNNING)
    st.move(0, S.RUNNING)
    st.move(3, S.RUNNING)
    st.move(3, S.FAILED, "boom")        # 6 changes for 4 tasks: one pass over every task
    board.update()
    assert list(board.running)[0] == 2 and set(board.running) == {0, 1, 2}   # the one running before stays first
    assert [t.name for t in board.failed_tasks()] == ["t3"] and board.take_ended() == [3]
    assert board.counts[S.RUNNING] == 3 and board.counts[S.FAILED] == 1 and board.counts[S.WAITING] == 0
    assert board.ended_count() == 1 and board.left() == 3 and feed.drain() == []


def test_board_without_a_feed_rescans():
    ts = _tasks(2)
    board = Board(ts)
    ts[0]._status = S.RUNNING
    board.update()
    assert board.counts[S.RUNNING] == 1 and board.running_tasks() == [ts[0]]


def test_decide_reasons_for_runs_skips_dry_runs_and_errors(workdir, monkeypatch):
    def mk(out: Annotated[Path, Product]):
        pass
    Path("have").touch()
    assert decide(Task("a", mk, [Path("have")]), False) == (False, "up to date", False)
    assert decide(Task("n", mk, [Path("x")], buildmode=BuildMode.NEVER), False).reason == "build mode NEVER"
    new = Task("b", mk, [Path("have")], buildmode=BuildMode.IF_NEW)
    assert decide(new, True) == (True, "an upstream task ran", False)
    assert decide(new, True, planning=True).reason == "an upstream task would run"

    def broken(self, upstream_ran=None):
        raise OSError("stale NFS handle")
    monkeypatch.setattr(Task, "run_reason", broken)
    d = decide(new, False)
    assert d.error and not d.run and d.reason == "cannot decide whether to run: stale NFS handle"
