"""Faults: what clusters do to a run (kill -9, SIGSTOP, timeouts, Ctrl-C, a dispatcher dying, a rogue
peer), with real worker processes on loopback. Every test has a timeout and checks that every task
ends in a terminal state with a reason, and (through conftest) that no process is left behind.

Heartbeats are short only where detection time is under test; elsewhere they are generous, because
the machine is small and shared.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import cloudpickle
import pytest
import zmq

from depio.runtime import protocol as P
from depio.Executors import ParallelExecutor
from depio.Pipeline import Pipeline
from depio.Task import Task
from depio.TaskStatus import TaskStatus
from depio.runtime.backends import DispatcherBackend
from depio.runtime.client import DispatcherClient
from depio.runtime.dispatcher import Dispatcher
from depio.runtime.launchers import LocalLauncher

from conftest import ROOT, descendants

HOST = platform.node()


# ---------------------------------------------------------------- helpers

def wait_for(cond: Callable[[], object], timeout: float, what: str, step: float = 0.02):
    """Bounded polling of a condition (for states no event announces to the test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def assert_all_dead(pids, timeout: float = 5.0) -> None:
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in pids if pid_alive(p)]
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not alive, f"processes still alive: {alive}"


def assert_all_terminal(tasks) -> None:
    for t in tasks:
        assert t.is_in_terminal_state, f"{t.name} ended {t._status}"
        assert t.reason, f"{t.name} ({t._status}) has no reason"


class Executor(ParallelExecutor):
    """ParallelExecutor that keeps its backend (the test inspects the dispatcher and launcher) and
    lets the test choose the launcher's restart budget."""

    def __init__(self, *args, max_restarts: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_restarts = max_restarts
        self.backend: Optional[DispatcherBackend] = None

    def make_backend(self):
        launcher = LocalLauncher(self.workers, self.slots_per_worker, self.heartbeat, self.liveness,
                                 max_restarts=self.max_restarts)
        self.backend = DispatcherBackend(launcher, heartbeat=self.heartbeat, liveness=self.liveness)
        return self.backend

    def dispatcher(self) -> Dispatcher:
        return wait_for(lambda: self.backend and self.backend.dispatcher, 20, "the dispatcher")


class Run:
    """A pipeline run in a background thread, so the test can act on its processes meanwhile."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.code: Optional[int] = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.code = self.pipeline.run()
        except BaseException as e:      # surfaced by join()
            self.error = e

    def join(self, timeout: float) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the pipeline did not finish within {timeout} s"
        if self.error:
            raise self.error
        return self.code


# ---------------------------------------------------------------- task functions (run in slots)

def hold_until_released(d: str, name: str) -> int:
    """Record where the first attempt runs (worker pid = the slot's parent) and keep it running until
    the test says so; later attempts return at once."""
    first = Path(d, f"{name}.first")
    try:
        fd = os.open(first, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        Path(d, f"{name}.rerun").write_text(f"{os.getppid()} {os.getpid()}")
        return os.getppid()
    os.write(fd, f"{os.getppid()} {os.getpid()}".encode())
    os.close(fd)
    deadline = time.time() + 60
    while not Path(d, "release").exists() and time.time() < deadline:
        time.sleep(0.02)
    return os.getppid()


def note_worker(d: str, name: str) -> int:
    Path(d, f"{name}.worker").write_text(str(os.getppid()))
    return os.getppid()


def sleep_then_note(d: str, name: str, seconds: float) -> int:
    first = not Path(d, f"{name}.first").exists()
    Path(d, f"{name}.first" if first else f"{name}.rerun").write_text(f"{os.getppid()} {os.getpid()}")
    if first:
        time.sleep(seconds)
        Path(d, f"{name}.first-done").write_text("")
    return os.getppid()


def sleep_with_child(d: str, name: str, seconds: float) -> None:
    child = subprocess.Popen(["sleep", str(seconds)])
    Path(d, f"{name}.pids").write_text(f"{os.getppid()} {os.getpid()} {child.pid}")
    time.sleep(seconds)


def hold_the_gil(seconds: float) -> float:
    """A C call made through `ctypes.PyDLL`, which does not release the GIL: the task holds it for
    exactly `seconds`, however fast the CPU."""
    t = time.perf_counter()
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))
    return time.perf_counter() - t


def square(i: int, out: str) -> None:
    Path(out).write_text(str(i * i))


def wait_for_file(path: str) -> None:
    deadline = time.time() + 50
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.exists(path), "the test never released this task"


def read_pids(path: Path) -> List[int]:
    return [int(x) for x in path.read_text().split()]


# ---------------------------------------------------------------- worker loss: kill -9

@pytest.mark.timeout(90)
def test_kill9_worker_mid_task_reruns_on_the_other_worker(workdir):
    ex = Executor(workers=2, slots_per_worker=1, heartbeat=0.3, liveness=4)
    p = Pipeline(ex, quiet=True)
    victim = p.add_task(Task("victim", hold_until_released, [str(workdir), "victim"]))
    others = [p.add_task(Task(f"other{i}", note_worker, [str(workdir), f"other{i}"])) for i in range(4)]
    run = Run(p)
    worker_pid, slot_pid = wait_for(lambda: (workdir / "victim.first").exists() and
                                    read_pids(workdir / "victim.first"), 30, "the victim to start")
    d = ex.dispatcher()
    os.kill(worker_pid, signal.SIGKILL)
    code = run.join(60)
    assert code == 0
    assert victim._status is TaskStatus.FINISHED and victim.attempts == 2
    rerun_worker, _ = read_pids(workdir / "victim.rerun")
    assert rerun_worker != worker_pid
    assert victim.worker != f"{HOST}:{worker_pid}"
    assert all(t._status is TaskStatus.FINISHED for t in others)
    assert d.workers_lost >= 1
    assert_all_terminal(p.tasks)
    assert_all_dead([worker_pid, slot_pid])


@pytest.mark.timeout(90)
def test_kill9_only_worker_without_restarts_fails_naming_the_worker(workdir):
    ex = Executor(workers=1, slots_per_worker=1, heartbeat=0.3, liveness=4, max_restarts=0)
    p = Pipeline(ex, quiet=True)
    victim = p.add_task(Task("victim", hold_until_released, [str(workdir), "victim"]))
    later = p.add_task(Task("later", note_worker, [str(workdir), "later"], depends_on=[victim]))
    run = Run(p)
    worker_pid, slot_pid = wait_for(lambda: (workdir / "victim.first").exists() and
                                    read_pids(workdir / "victim.first"), 30, "the victim to start")
    os.kill(worker_pid, signal.SIGKILL)
    t0 = time.monotonic()
    code = run.join(30)
    assert time.monotonic() - t0 < 10
    assert code == 1
    assert victim._status is TaskStatus.FAILED
    assert str(worker_pid) in victim.reason and HOST in victim.reason, victim.reason
    assert later._status in (TaskStatus.DEPFAILED, TaskStatus.FAILED)
    assert_all_terminal(p.tasks)
    assert_all_dead([worker_pid, slot_pid])


@pytest.mark.timeout(90)
def test_kill9_with_loss_budget_spent_fails_naming_the_worker_and_the_rest_runs(workdir):
    """One worker, restarts allowed (the launcher replaces it), no re-dispatch after a loss: the task
    held by the killed worker fails with the worker named; the replacement runs everything else."""
    ex = Executor(workers=1, slots_per_worker=1, heartbeat=0.3, liveness=4, retries_on_worker_loss=0)
    p = Pipeline(ex, quiet=True)
    victim = p.add_task(Task("victim", hold_until_released, [str(workdir), "victim"]))
    others = [p.add_task(Task(f"other{i}", note_worker, [str(workdir), f"other{i}"])) for i in range(3)]
    run = Run(p)
    worker_pid, slot_pid = wait_for(lambda: (workdir / "victim.first").exists() and
                                    read_pids(workdir / "victim.first"), 30, "the victim to start")
    os.kill(worker_pid, signal.SIGKILL)
    code = run.join(60)
    assert code == 1
    assert victim._status is TaskStatus.FAILED and victim.attempts == 1
    assert f"pid {worker_pid}" in victim.reason and HOST in victim.reason and "lost" in victim.reason, victim.reason
    assert victim.error and victim.error["kind"] == "WorkerLost"
    # the tasks the worker had prefetched and not started go again without using the (zero) budget
    for t in others:
        assert t._status is TaskStatus.FINISHED, (t.name, t._status, t.reason)
        assert int((workdir / f"{t.name}.worker").read_text()) != worker_pid
    assert ex.backend.launcher.restarts == 1
    assert_all_terminal(p.tasks)
    assert_all_dead([worker_pid, slot_pid])


@pytest.mark.timeout(90)
def test_kill9_prefetched_tasks_go_again_without_using_the_loss_budget(workdir):
    """Forty short tasks first teach the worker to prefetch; the victim then holds its slot with six tasks
    queued behind it in the worker. kill -9: the victim, lost while running, fails (no budget); the six
    never started, so they run on the replacement worker instead of failing with it."""
    ex = Executor(workers=1, slots_per_worker=1, heartbeat=0.3, liveness=4, retries_on_worker_loss=0)
    p = Pipeline(ex, quiet=True)
    warm = [p.add_task(Task(f"warm{i}", note_worker, [str(workdir), f"warm{i}"])) for i in range(40)]
    victim = p.add_task(Task("victim", hold_until_released, [str(workdir), "victim"]))
    queued = [p.add_task(Task(f"queued{i}", note_worker, [str(workdir), f"queued{i}"])) for i in range(6)]
    run = Run(p)
    worker_pid, slot_pid = wait_for(lambda: (workdir / "victim.first").exists() and
                                    read_pids(workdir / "victim.first"), 30, "the victim to start")
    d = ex.dispatcher()
    def held():
        jobs = [j for j in list(d.jobs.values()) if j.spec.name.startswith("queued")]
        return jobs if len(jobs) == 6 else None
    assert not any(j.started for j in wait_for(held, 10, "the six queued tasks to be held by the worker"))
    # the worker learns of the victim's start when the slot reports the task before it, which the slot
    # never holds back longer than 2 ms (tests/test_slots.py); then the start goes out within 10 ms
    wait_for(lambda: any(j.started for j in list(d.jobs.values()) if j.spec.name.startswith("victim")), 30,
             "the dispatcher to know the victim started")
    os.kill(worker_pid, signal.SIGKILL)
    code = run.join(60)
    assert code == 1
    assert victim._status is TaskStatus.FAILED and victim.error["kind"] == "WorkerLost"
    for t in queued:
        assert t._status is TaskStatus.FINISHED, (t.name, t._status, t.reason)
        assert int((workdir / f"{t.name}.worker").read_text()) != worker_pid
    assert all(t._status is TaskStatus.FINISHED for t in warm)
    assert_all_terminal(p.tasks)
    assert_all_dead([worker_pid, slot_pid])


# ---------------------------------------------------------------- worker loss: SIGSTOP, then SIGCONT

@pytest.mark.timeout(90)
def test_sigstop_worker_is_lost_in_time_and_its_late_result_is_ignored(workdir):
    hb, liveness = 0.2, 4
    ex = Executor(workers=2, slots_per_worker=2, heartbeat=hb, liveness=liveness)
    p = Pipeline(ex, quiet=True)
    sleeper = p.add_task(Task("sleeper", sleep_then_note, [str(workdir), "sleeper", 2.0]))
    p.add_task(Task("gate", wait_for_file, [str(workdir / "release")]))
    run = Run(p)
    stopped = None
    try:
        worker_pid, slot_pid = wait_for(lambda: (workdir / "sleeper.first").exists() and
                                        read_pids(workdir / "sleeper.first"), 30, "the sleeper to start")
        d = ex.dispatcher()
        os.kill(worker_pid, signal.SIGSTOP)      # the worker only: its slot finishes the task meanwhile
        stopped, t0 = worker_pid, time.monotonic()
        wait_for(lambda: worker_pid not in [w["pid"] for w in d.snapshot()["workers"]], 10,
                 "the stopped worker to be declared lost")
        detected = time.monotonic() - t0
        window = hb * liveness
        assert detected <= window + 1.0, f"declared lost after {detected:.2f} s (window {window} s)"
        wait_for(lambda: sleeper._status is TaskStatus.FINISHED, 20, "the re-run to finish")
        assert sleeper.attempts == 2 and read_pids(workdir / "sleeper.rerun")[0] != worker_pid
        # the stopped worker's slot (not stopped) finishes the first attempt; its result waits in the pipe
        wait_for(lambda: (workdir / "sleeper.first-done").exists(), 20, "the first attempt to end")
        assert d.late_results == 0
        os.kill(worker_pid, signal.SIGCONT)
        stopped = None
        wait_for(lambda: d.late_results >= 1, 20, "the late result to arrive")
        wait_for(lambda: worker_pid in [w["pid"] for w in d.snapshot()["workers"]], 20,
                 "the resumed worker to register again")
        (workdir / "release").write_text("")
        code = run.join(40)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        (workdir / "release").write_text("")
    assert code == 0
    assert sleeper._status is TaskStatus.FINISHED and sleeper.worker != f"{HOST}:{worker_pid}"
    assert d.tasks_done == len(p.tasks), "a result was counted twice"
    assert_all_terminal(p.tasks)


# ---------------------------------------------------------------- timeouts and the GIL

@pytest.mark.timeout(90)
def test_task_past_its_timeout_fails_and_the_worker_lives_on(workdir):
    ex = Executor(workers=1, slots_per_worker=1, heartbeat=0.5, liveness=4)
    p = Pipeline(ex, quiet=True)
    slow = p.add_task(Task("slow", sleep_with_child, [str(workdir), "slow", 60], timeout=1))
    after = [p.add_task(Task(f"after{i}", note_worker, [str(workdir), f"after{i}"], depends_on=[slow]
                             if False else None)) for i in range(3)]
    t0 = time.monotonic()
    code = Run(p).join(60)
    assert time.monotonic() - t0 < 30
    assert code == 1
    assert slow._status is TaskStatus.FAILED
    assert "timed out after 1 s" in slow.reason, slow.reason
    worker_pid, slot_pid, child_pid = read_pids(workdir / "slow.pids")
    assert all(t._status is TaskStatus.FINISHED for t in after)
    assert {int((workdir / f"after{i}.worker").read_text()) for i in range(3)} == {worker_pid}
    assert ex.backend.launcher.restarts == 0 and ex.backend.dispatcher.workers_lost == 0
    assert_all_terminal(p.tasks)
    assert_all_dead([slot_pid, child_pid])       # the task's own subprocess too (process group)


def test_the_hog_really_holds_the_gil():
    """The GIL test below is only meaningful if this blocks other threads of its process."""
    ticks: List[float] = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.002)

    th = threading.Thread(target=ticker)
    th.start()
    wait_for(lambda: len(ticks) > 3, 5, "the ticker")
    took = hold_the_gil(0.5)
    stop.set()
    th.join()
    gap = max(b - a for a, b in zip(ticks, ticks[1:]))
    assert took >= 0.5 and gap >= 0.5, (took, gap)


@pytest.mark.timeout(90)
def test_task_holding_the_gil_keeps_heartbeats(workdir):
    hb, liveness = 0.2, 3
    ex = Executor(workers=1, slots_per_worker=1, heartbeat=hb, liveness=liveness)
    p = Pipeline(ex, quiet=True)
    hog = p.add_task(Task("hog", hold_the_gil, [2 * hb * liveness + 1.0]))
    code = Run(p).join(80)
    assert code == 0
    assert hog._status is TaskStatus.FINISHED and hog.attempts == 1
    assert hog.end_time - hog.start_time > 3 * hb * liveness
    assert ex.backend.dispatcher.workers_lost == 0 and ex.backend.launcher.restarts == 0


# ---------------------------------------------------------------- cancellation: Ctrl-C, SIGTERM

PIPELINE_SCRIPT = """
import os, subprocess, sys, time
from pathlib import Path
from depio.Executors import ParallelExecutor
from depio.Pipeline import Pipeline
from depio.Task import Task

def busy(name):
    child = subprocess.Popen(["sleep", "120"])
    Path(f"{name}.tmp").write_text(str(child.pid))
    os.replace(f"{name}.tmp", f"{name}.started")    # whole, never seen empty
    time.sleep(120)

p = Pipeline(ParallelExecutor(workers=2, slots_per_worker=1, heartbeat=0.5), quiet=True)
for i in range(6):
    p.add_task(Task(f"busy{i}", busy, [f"busy{i}"]))
code = p.run()
print("STATUSES", sorted({t._status.name for t in p.tasks}), "REASONS", all(t.reason for t in p.tasks))
sys.exit(code)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_pipeline_cancels_and_leaves_no_process(workdir, sig):
    script = workdir / "pipeline.py"
    script.write_text(PIPELINE_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list(workdir.glob("busy*.started"))) >= 2, 40, "two tasks to run")
        children = [int(f.read_text()) for f in workdir.glob("busy*.started")]    # before: more may start
        pids = descendants(proc.pid)      # workers, slots, the tasks' `sleep`s
        assert len(pids) >= 6 and set(children) <= set(pids), (pids, children)
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, (out, err)
    assert took < 8, f"the pipeline took {took:.1f} s to stop"
    assert "STATUSES ['CANCELED'] REASONS True" in out, (out, err)
    assert_all_dead(pids, timeout=2)


@pytest.mark.timeout(60)
def test_pipeline_killed_leaves_no_worker(workdir):
    """The pipeline cannot clean up after kill -9: its workers notice (parent gone, dispatcher silent)."""
    script = workdir / "pipeline.py"
    script.write_text(PIPELINE_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(workdir.glob("busy*.started"))) >= 2, 40, "two tasks to run")
        pids = descendants(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert_all_dead(pids, timeout=10)


# ---------------------------------------------------------------- the dispatcher dying

DISPATCHER_SCRIPT = """
import sys, threading
from depio.runtime.dispatcher import Dispatcher
d = Dispatcher(bytes.fromhex(sys.argv[1]), sys.argv[2], client_address=sys.argv[3], heartbeat=0.3, liveness=3)
d.start()
d._ready.wait()
print(d.worker_address, d.client_address, flush=True)
threading.Event().wait()     # serve until killed
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dispatcher_process(workdir: Path, key: bytes, port: int) -> subprocess.Popen:
    script = workdir / "dispatcher.py"
    script.write_text(DISPATCHER_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, str(script), key.hex(), f"tcp://127.0.0.1:{port}",
                             f"tcp://127.0.0.1:{free_port()}"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True)
    return proc


def start_worker(address: str, key: bytes, *extra: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env[P.KEY_ENV] = key.hex()
    return subprocess.Popen([sys.executable, "-m", "worker", "--connect", address, "--slots", "1",
                             "--kill-grace", "1", *extra], env=env, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def submit(client_address: str, key: bytes, func, *args, key_: int = 0) -> "Inbox":
    inbox = Inbox()
    client = DispatcherClient(client_address, key, "test", inbox.put, inbox.lost).start()
    client.wait_welcome(10)
    digest = b"f%d" % key_
    spec = P.TaskSpec(key_, 1, f"t{key_}", digest, pickle.dumps((args, {})))
    client.send(P.Submit((spec,), {digest: cloudpickle.dumps(func)}))
    inbox.client = client
    return inbox


class Inbox:
    def __init__(self):
        self.started, self.done, self.lost_reason = [], [], None
        self.client = None

    def put(self, msg) -> None:
        if isinstance(msg, P.ClientReport):
            self.started.extend(msg.started)
            self.done.extend(msg.done)

    def lost(self, reason: str) -> None:
        self.lost_reason = reason


@pytest.mark.timeout(60)
def test_workers_exit_when_the_dispatcher_dies(workdir):
    key = P.new_key()
    disp = start_dispatcher_process(workdir, key, free_port())
    worker = None
    inbox = None
    try:
        worker_address, client_address = disp.stdout.readline().split()
        worker = start_worker(worker_address, key)
        inbox = submit(client_address, key, time.sleep, 60)
        wait_for(lambda: inbox.started, 30, "the task to start")
        slots = descendants(worker.pid)
        assert slots
        disp.kill()
        disp.wait()
        t0 = time.monotonic()
        err = worker.communicate(timeout=20)[1]
        took = time.monotonic() - t0
    finally:
        if inbox is not None:
            inbox.client.close(timeout=1)
        for proc in (disp, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert worker.returncode == 2, err
    assert "is gone" in err, err
    assert took < 0.3 * 3 + 4, f"the worker took {took:.1f} s to notice"
    assert_all_dead(slots)


@pytest.mark.timeout(90)
def test_worker_with_reconnect_registers_with_a_new_dispatcher(workdir):
    key = P.new_key()
    port = free_port()
    disp = start_dispatcher_process(workdir, key, port)
    worker = inbox = second = None
    try:
        worker_address, client_address = disp.stdout.readline().split()
        worker = start_worker(worker_address, key, "--reconnect", "60")
        inbox = submit(client_address, key, time.sleep, 60)
        wait_for(lambda: inbox.started, 30, "the task to start")
        first_slots = descendants(worker.pid)
        disp.kill()
        disp.wait()
        inbox.client.close(timeout=1)
        # the worker stops the task it can no longer report, and waits for a dispatcher
        assert_all_dead(first_slots, timeout=15)
        assert worker.poll() is None
        second = Dispatcher(key, f"tcp://127.0.0.1:{port}", heartbeat=0.3, liveness=3).start()
        wait_for(lambda: worker.pid in [w["pid"] for w in second.snapshot()["workers"]], 30,
                 "the worker to register with the new dispatcher")
        inbox = submit(second.client_address, key, pow, 2, 10)
        wait_for(lambda: inbox.done, 30, "a task to run through the new dispatcher")
        assert inbox.done[0].error is None and pickle.loads(inbox.done[0].value) == 1024
        inbox.client.close(timeout=1)
        inbox = None
        second.stop("test over")        # a pool restarting: the worker waits for the next one
        second = None
        time.sleep(1.0)                 # (three heartbeats: it must not exit meanwhile)
        assert worker.poll() is None
        worker.terminate()              # SIGTERM: a clean exit
        err = worker.communicate(timeout=20)[1]
        assert worker.returncode == 0, err
    finally:
        if inbox is not None:
            inbox.client.close(timeout=1)
        if second is not None:
            second.stop("test over")
        for proc in (disp, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()


# ---------------------------------------------------------------- a rogue peer

class Boom:
    """Unpickling this creates a file: the proof that a rogue body was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def rogue_frames(rng: random.Random, marker: str, wrong_key: bytes):
    """An endless mix of random, truncated, unsigned, wrongly signed and wrong-version frame sets."""
    evil = pickle.dumps(Boom(marker))
    register = pickle.dumps(P.to_wire(P.Register("rogue", "rogue-host", 1, 64)))
    signed_wrong = [P.HEADER, evil, P.sign(wrong_key, P.HEADER + evil)]
    register_wrong = [P.HEADER, register, P.sign(wrong_key, P.HEADER + register)]
    while True:
        kind = rng.randrange(9)
        if kind == 0:
            yield [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 5))]
        elif kind == 1:
            yield signed_wrong
        elif kind == 2:
            yield register_wrong
        elif kind == 3:
            yield [P.HEADER, evil]                                   # unsigned
        elif kind == 4:
            yield [P.HEADER, evil, rng.randbytes(32)]                # forged MAC
        elif kind == 5:
            cut = rng.randrange(1, len(evil))
            yield [P.HEADER, evil[:cut], signed_wrong[2][:rng.randrange(0, 33)]]   # truncated
        elif kind == 6:
            yield [b"depio/%d" % rng.randrange(2, 99), evil, signed_wrong[2]]      # other version
        elif kind == 7:
            yield [P.REFUSED_HEADER, b"pretend refusal"]
        else:
            yield [P.HEADER[:rng.randrange(0, len(P.HEADER))], evil, b""]


@pytest.mark.timeout(120)
def test_rogue_flood_does_not_disturb_a_pipeline_and_is_never_unpickled(workdir, monkeypatch, caplog):
    marker = str(workdir / "rogue-was-unpickled")
    rogue_loads = []
    real_loads = pickle.loads

    class WatchedPickle:
        """protocol.py's view of `pickle`: count every unpickling of a rogue body."""
        dumps = staticmethod(pickle.dumps)

        @staticmethod
        def loads(data, *a, **kw):
            if marker.encode() in bytes(data):
                rogue_loads.append(len(data))
            return real_loads(data, *a, **kw)

    monkeypatch.setattr(P, "pickle", WatchedPickle)
    n_frames = 100_000
    ex = Executor(workers=2, slots_per_worker=1, heartbeat=1.0, liveness=5)
    p = Pipeline(ex, quiet=True)
    # the squares start once the flood has begun, and the run cannot end before the flood is over
    starter = p.add_task(Task("starter", wait_for_file, [str(workdir / "rogue-started")]))
    squares = [p.add_task(Task(f"sq{i}", square, [i, str(workdir / f"sq{i}.txt")], depends_on=[starter]))
               for i in range(300)]
    gate = p.add_task(Task("gate", wait_for_file, [str(workdir / "rogue-done")]))
    sent = {"worker": 0, "client": 0}
    rogue_error: List[BaseException] = []
    flood_over: List[float] = []

    def rogue() -> None:
        try:
            d = ex.dispatcher()
            d._ready.wait(10)
            ctx = zmq.Context.instance()
            socks = {}
            # two rogue peers; a pipeline's own dispatcher has no client socket (its one client is
            # in-process), so both go at the worker socket
            for name, address in (("worker", d.worker_address), ("client", d.worker_address)):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 0)
                s.connect(address)
                socks[name] = s
            frames = rogue_frames(random.Random(1234), marker, P.new_key())
            # n_frames at least, and on until a square has run: on one core, the OS may run the flood
            # to its end before any worker process gets the CPU (that would say nothing of depio)
            deadline, i = time.monotonic() + 60, 0
            while i < n_frames or (i < 5 * n_frames and time.monotonic() < deadline and not (
                    i % 1000 == 0 and any(Path(workdir, f"sq{k}.txt").exists() for k in range(300)))):
                name = "worker" if i % 2 else "client"
                socks[name].send_multipart(next(frames))
                sent[name] += 1
                if i == 2000:
                    Path(workdir, "rogue-started").write_text("")
                i += 1
            wait_for(lambda: sum(d.bad_messages.values()) >= i, 60, "the dispatcher to drop the flood")
            for s in socks.values():
                s.close()
        except BaseException as e:
            rogue_error.append(e)
        finally:
            Path(workdir, "rogue-started").write_text("")
            Path(workdir, "rogue-done").write_text("")
            flood_over.append(time.time())

    attacker = threading.Thread(target=rogue, daemon=True)
    attacker.start()
    t0 = time.monotonic()
    code = Run(p).join(100)
    attacker.join(10)
    took = time.monotonic() - t0
    assert not rogue_error, rogue_error
    assert code == 0
    assert all(Path(workdir, f"sq{i}.txt").read_text() == str(i * i) for i in range(300))
    assert all(t._status is TaskStatus.FINISHED for t in [starter] + squares + [gate])
    during = sum(1 for t in squares if t.start_time < flood_over[0])
    assert during > 0, "no task ran during the flood"
    d = ex.backend.dispatcher
    assert sent["worker"] + sent["client"] >= n_frames
    assert sum(d.bad_messages.values()) >= sent["worker"] + sent["client"], d.bad_messages
    assert rogue_loads == [] and not os.path.exists(marker)
    assert d.workers_lost == 0 and len(d.refusals) <= 2      # one plain refusal per rogue peer at most
    dropped_logs = [r for r in caplog.records if "dropped a bad message" in r.getMessage()]
    assert len(dropped_logs) <= 2, "bad messages must be logged once per peer"
    assert_all_terminal(p.tasks)
    print(f"flood of {n_frames} frames; pipeline of {len(p.tasks)} tasks took {took:.1f} s, {during} squares "
          f"started during the flood; dropped: {d.bad_messages}")


@pytest.mark.timeout(60)
def test_sigterm_while_a_worker_starts_is_quiet():
    """A run can end before its last worker has started; the SIGTERM it then gets must stop it
    cleanly at any point of its start-up (no traceback on the pipeline's stderr, no slot left)."""
    env = dict(os.environ, DEPIO_KEY=P.new_key().hex(), PYTHONPATH=str(ROOT))
    for delay in (0.02, 0.06, 0.1, 0.15, 0.2, 0.3):
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--connect", "tcp://127.0.0.1:1", "--slots", "2"],
                                env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert "Traceback" not in err, (delay, err)
        assert proc.returncode in (0, -signal.SIGTERM), (delay, proc.returncode, err)


@pytest.mark.timeout(120)
def test_a_held_launcher_replaces_no_worker(workdir):
    """`hold()` comes before the dispatcher tells the workers to leave: a worker that leaves (here:
    is killed) after it is not taken for one that died, and nothing new is started."""
    launcher = LocalLauncher(1, 1, max_restarts=5)
    launcher.start("tcp://127.0.0.1:9", b"k" * 32)      # nobody listens: the worker waits to register
    try:
        pid = launcher.pids[0]
        launcher.hold()
        os.kill(pid, signal.SIGKILL)
        watch = f"depio-watch-{pid}"      # the thread that waits on it, and would replace it
        wait_for(lambda: not any(t.name == watch for t in threading.enumerate()), 20, "the watch thread's end")
        assert launcher.pids == [pid] and launcher.restarts == 0
    finally:
        launcher.stop(grace=0.1)

