"""Slots started through the fork server: children of this process all the same, in groups of their
own, reaped here, and started without forking this (possibly multi-threaded) process."""
from __future__ import annotations

import os
import pickle
import select
import signal
import time

import cloudpickle
import pytest

from depio.runtime.protocol import TaskSpec
from worker.forker import AVAILABLE, Forker
from worker.slots import Slot

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="the fork server needs Linux on x86-64 or arm64")


def parent_and_group() -> tuple:
    return os.getppid(), os.getpgid(0), os.getpid()


def run_one(slot: Slot, func, *args):
    digest = b"f%d" % id(func)
    slot.give([(1, TaskSpec(1, 1, "t", digest, pickle.dumps((args, {}))))], {digest: cloudpickle.dumps(func)})
    got = []
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        select.select([slot.fileno()], [], [], 0.5)
        got = slot.receive()
    slot.assigned.clear()        # what the worker does with a result: the slot is idle again
    return got[0][1]


def test_a_slot_is_a_child_of_the_worker_in_a_group_of_its_own():
    forker = Forker()
    slot = Slot(forker, 0, "w")
    try:
        result = run_one(slot, parent_and_group)
        ppid, pgid, pid = pickle.loads(result.value)
        assert ppid == os.getpid() and pid == slot.process.pid and pgid == pid
        assert os.getppid() != forker.pid
    finally:
        slot.stop(grace=5)
        forker.retire()
    assert slot.process.exitcode == 0 and not slot.process.is_alive()


def test_the_exit_code_of_a_killed_slot_is_minus_the_signal():
    forker = Forker()
    slot = Slot(forker, 0, "w")
    try:
        slot.signal(signal.SIGTERM)
        slot.process.join(10)
        assert slot.process.exitcode == -signal.SIGTERM
    finally:
        slot.close()
        forker.retire()


def test_a_retired_forker_exits_and_its_slots_live_on():
    forker = Forker()
    slot = Slot(forker, 0, "w")
    try:
        forker.retire()
        with pytest.raises(ChildProcessError):
            os.waitpid(forker.pid, os.WNOHANG)      # reaped by retire
        assert slot.process.is_alive()
        assert pickle.loads(run_one(slot, parent_and_group).value)[0] == os.getpid()
    finally:
        slot.stop(grace=5)


def test_a_forker_nobody_holds_retires():
    slot = Slot(Forker(), 0, "w")
    try:
        assert slot.process.is_alive()
    finally:
        slot.stop(grace=5)
