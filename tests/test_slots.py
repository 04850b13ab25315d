"""A slot process on its own: what the worker learns from it, and when."""
from __future__ import annotations

import os
import pickle
import select
import time
from pathlib import Path

import cloudpickle
import pytest

from depio.runtime.protocol import TaskSpec
from worker.slots import Slot, slot_context


def quick(out: str) -> None:
    Path(out).write_text("done")


def block_until(path: str) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def spec(key: int, func_digest: bytes, *args) -> TaskSpec:
    return TaskSpec(key, 1, f"t{key}", func_digest, pickle.dumps((args, {})))


@pytest.mark.timeout(60)
def test_a_result_is_not_held_back_while_the_next_task_of_its_batch_runs(workdir):
    """The worker learns that a task started only when the one before it in the slot ended. A quick
    task's result held in the slot while a long task after it runs would leave that long task
    'never started' in the dispatcher's eyes: a kill -9 would then run it again for free."""
    functions = {b"q": cloudpickle.dumps(quick), b"b": cloudpickle.dumps(block_until)}
    slot = Slot(slot_context(), 0, "test-worker")
    release = workdir / "release"
    try:
        slot.give([(1, spec(1, b"q", str(workdir / "q.txt"))), (2, spec(2, b"b", str(release)))], functions)
        got = []
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            select.select([slot.fileno()], [], [], 0.5)
            got = slot.receive()
        assert (workdir / "q.txt").exists()
        assert [jid for jid, _ in got] == [1], "the quick task's result stayed in the slot behind the blocked one"
        assert got[0][1].error is None
        assert not release.exists()      # the second task is still running: it was not what flushed it
    finally:
        release.write_text("")
        slot.stop(grace=5)


@pytest.mark.timeout(60)
def test_a_result_held_while_the_flusher_is_already_waiting_is_still_sent(workdir):
    """The slot wakes its flusher only when it sleeps for good; a batch that comes while the flusher
    waits for an earlier batch's deadline must still get its results out while a long task runs."""
    functions = {b"q": cloudpickle.dumps(quick), b"b": cloudpickle.dumps(block_until)}
    slot = Slot(slot_context(), 0, "test-worker")
    release = workdir / "release"
    try:
        slot.give([(1, spec(1, b"q", str(workdir / "1.txt"))), (2, spec(2, b"q", str(workdir / "2.txt")))], functions)
        slot.give([(3, spec(3, b"q", str(workdir / "3.txt"))), (4, spec(4, b"b", str(release)))], functions)
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 3 and time.monotonic() < deadline:
            select.select([slot.fileno()], [], [], 0.5)
            got += slot.receive()
        assert [jid for jid, _ in got] == [1, 2, 3], "task 3's result stayed in the slot behind the blocked one"
        assert not release.exists()
    finally:
        release.write_text("")
        slot.stop(grace=5)
