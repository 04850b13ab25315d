"""Followers: a task whose one unfinished dependency is in flight goes along to that dependency's
worker and starts there once it succeeded. Real dispatchers, workers, slots and pools on loopback;
what is checked is what ran, where, in which order, and what came back unstarted."""
from __future__ import annotations

import os
import pickle
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import cloudpickle
import pytest

from depio.runtime import protocol as P
from depio.Executors import ParallelExecutor
from depio.Pipeline import Pipeline
from depio.Task import Task
from depio.TaskStatus import TaskStatus
from depio.runtime.dispatcher import Dispatcher

from conftest import ROOT, wait_for

pytestmark = pytest.mark.timeout(90)


def step(d: str, name: str, seconds: float = 0.0, fail: bool = False, crash: bool = False) -> int:
    """Log the run (name, worker pid, start, end) in `d`/runs.log; sleep; maybe raise, or take the slot
    down the hard way (as a segfault in C code would)."""
    start = time.time()
    if seconds:
        time.sleep(seconds)
    with open(Path(d, "runs.log"), "a") as f:
        f.write(f"{name} {os.getppid()} {start:.6f} {time.time():.6f}\n")
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)
    if fail:
        raise ValueError(f"{name} fails on purpose")
    return os.getppid()


def fail_once(d: str, name: str) -> int:
    """Fails on its first attempt (a marker file tells the attempts apart), then succeeds."""
    first = not Path(d, f"{name}.failed").exists()
    Path(d, f"{name}.failed").touch()
    return step(d, name, fail=first)


def hold(d: str, name: str) -> int:
    """The first attempt says where it runs and waits for the test's `release` file; later ones return."""
    marker = Path(d, f"{name}.first")
    if not marker.exists():
        marker.write_text(f"{os.getppid()} {os.getpid()}")
        deadline = time.time() + 60
        while not Path(d, "release").exists() and time.time() < deadline:
            time.sleep(0.02)
    return step(d, name)


def runs(d: Path) -> List[tuple]:
    """(name, worker pid, start, end) of every run, in the order they ended."""
    path = d / "runs.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        name, pid, start, end = line.split()
        out.append((name, int(pid), float(start), float(end)))
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- dispatcher and worker, by hand

class Client:
    """A pipeline's side of a dispatcher in this process: sends specs, collects what comes back."""

    def __init__(self, d: Dispatcher, workdir: Path):
        self.inbox: "queue.Queue[object]" = queue.Queue()
        self.local = d.attach_local("test", self.inbox.put)
        self.workdir = workdir
        self.done: Dict[int, P.TaskResult] = {}
        self.returned: Dict[int, P.TaskReturned] = {}
        self.sent_function = False

    def spec(self, key: int, name: str, func=step, after: Optional[int] = None, **kw) -> P.TaskSpec:
        digest = func.__name__.encode()
        return P.TaskSpec(key, 1, name, digest, pickle.dumps(((str(self.workdir), name), kw)), after=after)

    def submit(self, *specs: P.TaskSpec) -> None:
        functions = {f.__name__.encode(): cloudpickle.dumps(f) for f in (step, fail_once, hold)}
        self.local.send(P.Submit(tuple(specs), functions))

    def wait(self, done=(), returned=(), timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not (set(done) <= set(self.done) and set(returned) <= set(self.returned)):
            try:
                msg = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"waited for results {done} and returns {returned}; have results "
                                     f"{sorted(self.done)} and returns {sorted(self.returned)}") from None
            if isinstance(msg, P.ClientReport):
                self.done.update((r.key, r) for r in msg.done)
                self.returned.update((r.key, r) for r in msg.returned)


@pytest.fixture
def one_worker(workdir):
    key = P.new_key()
    d = Dispatcher(key, heartbeat=0.5, liveness=6, remote_clients=False).start()
    # the task functions are this module's: the worker imports them (a pipeline would pickle them by value)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    env[P.KEY_ENV] = key.hex()
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--connect", d.worker_address, "--slots", "1",
                               "--kill-grace", "1"], env=env, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(d.workers) == 1, 30, "the worker to register")
        yield d, Client(d, workdir), worker
    finally:
        d.stop("test over")
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_a_follower_starts_where_and_when_its_predecessor_succeeded(one_worker, workdir):
    d, c, worker = one_worker
    c.submit(c.spec(0, "a", seconds=0.5), c.spec(1, "b", after=0))    # handed out together
    wait_for(lambda: len(d.jobs) == 2, 10, "both to be jobs of the worker")
    c.submit(c.spec(10, "c", after=1))                 # behind a placed follower: straight to its worker
    c.wait(done=[0, 1, 10])
    assert all(c.done[k].error is None for k in (0, 1, 10))
    assert c.done[0].ended <= c.done[1].started and c.done[1].ended <= c.done[10].started
    # a chain handed out in one go: each starts after the one before it ended
    c.submit(c.spec(2, "k1", seconds=0.05), c.spec(3, "k2", after=2), c.spec(4, "k3", after=3))
    c.wait(done=[2, 3, 4])
    assert c.done[2].ended <= c.done[3].started and c.done[3].ended <= c.done[4].started
    assert [r[0] for r in runs(workdir)] == ["a", "b", "c", "k1", "k2", "k3"]


def test_followers_come_back_unstarted_when_they_cannot_run(one_worker, workdir):
    d, c, worker = one_worker
    c.submit(c.spec(0, "a"))
    c.wait(done=[0])
    c.submit(c.spec(1, "late", after=0))                # a has ended: the dispatcher hands it back
    c.submit(c.spec(2, "orphan", after=99))             # no such task in flight
    c.submit(c.spec(8, "slow", seconds=0.5))
    wait_for(lambda: d.jobs, 10, "the slow task to be a job")
    c.submit(c.spec(9, "apart", after=8))               # not handed out with it: back, though it runs
    c.submit(c.spec(3, "bad", fail=True), c.spec(4, "after-bad", after=3), c.spec(5, "after-that", after=4))
    c.wait(done=[3, 8], returned=[1, 2, 4, 5, 9])
    assert all("not found" in c.returned[k].reason for k in (1, 2, 9))
    assert c.done[3].error["type"] == "ValueError"
    assert "did not succeed" in c.returned[4].reason and "did not succeed" in c.returned[5].reason
    # cancelling the predecessor while it runs gives its follower back
    c.submit(c.spec(6, "held", func=hold), c.spec(7, "after-held", after=6))
    wait_for(lambda: (workdir / "held.first").exists(), 20, "the held task to start")
    c.local.send(P.CancelTasks((6,), "test cancels it"))
    c.wait(returned=[7])
    assert "cancelled" in c.returned[7].reason
    assert [r[0] for r in runs(workdir)] == ["a", "slow", "bad"]     # nothing handed back ever ran
    assert not d.jobs                                          # and the dispatcher forgot them all


# ---------------------------------------------------------------- through a pipeline

def chain_pipeline(workdir: Path, names: List[str]) -> Pipeline:
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    prev = None
    for name in names:
        prev = p.add_task(Task(name, step, [str(workdir), name], depends_on=[prev] if prev else None))
    return p


def test_a_chain_runs_in_order_on_one_worker_each_task_once(workdir):
    names = [f"t{i}" for i in range(40)]
    p = chain_pipeline(workdir, names)
    assert p.run() == 0
    done = runs(workdir)
    assert [r[0] for r in done] == names
    assert all(prev[3] <= nxt[2] for prev, nxt in zip(done, done[1:]))
    # A chain stays where its last link ran: that worker holds the followers and has the free slot.
    # On a starved machine the chain can catch up with what was handed out; the next link then goes
    # out like any ready task, and the other (idle) worker may take it: now and then, not per link.
    hops = sum(prev[1] != nxt[1] for prev, nxt in zip(done, done[1:]))
    assert hops <= 3, f"a chain hops between workers {hops} times"
    assert all(t._status is TaskStatus.FINISHED and t.attempts == 1 for t in p.tasks)


def test_a_retried_link_reruns_alone_and_the_rest_of_the_chain_once(workdir):
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    a = p.add_task(Task("a", step, [str(workdir), "a"]))
    b = p.add_task(Task("b", fail_once, [str(workdir), "b"], depends_on=[a], retries=1))
    c = p.add_task(Task("c", step, [str(workdir), "c"], depends_on=[b]))
    e = p.add_task(Task("e", step, [str(workdir), "e"], depends_on=[c]))
    assert p.run() == 0
    assert [r[0] for r in runs(workdir)] == ["a", "b", "b", "c", "e"]
    assert (a.attempts, b.attempts, c.attempts, e.attempts) == (1, 2, 1, 1)
    assert all(t._status is TaskStatus.FINISHED for t in p.tasks)


def test_a_failed_link_stops_the_chain_and_nothing_behind_it_runs(workdir):
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    p.add_task(Task("keeper", step, [str(workdir), "keeper", 2.0]))    # the run goes on meanwhile
    a = p.add_task(Task("a", step, [str(workdir), "a"], {"fail": True}))
    rest = [a]
    for name in ("b", "c", "d"):
        rest.append(p.add_task(Task(name, step, [str(workdir), name], depends_on=[rest[-1]])))
    t0 = time.monotonic()
    assert p.run() == 1
    assert time.monotonic() - t0 < 30
    assert sorted(r[0] for r in runs(workdir)) == ["a", "keeper"]     # which ends first is not the point
    assert a._status is TaskStatus.FAILED
    assert all(t._status is TaskStatus.DEPFAILED and "a (#2)" in t.reason for t in rest[1:])


def test_a_predecessor_past_its_timeout_fails_and_its_follower_never_runs(workdir):
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    a = p.add_task(Task("a", step, [str(workdir), "a", 30.0], timeout=1.0))
    b = p.add_task(Task("b", step, [str(workdir), "b"], depends_on=[a]))
    p.add_task(Task("keeper", step, [str(workdir), "keeper", 3.0]))    # the run goes on meanwhile
    assert p.run() == 1
    assert a._status is TaskStatus.FAILED and "timed out" in a.reason
    assert b._status is TaskStatus.DEPFAILED and [r[0] for r in runs(workdir)] == ["keeper"]


def other_step(d: str, name: str) -> int:
    return step(d, name)


def test_a_predecessor_that_kills_its_process_stops_its_followers(workdir):
    """The followers wait in the slot itself: the crash must hand them back, not run them in the new
    slot. A slow independent task keeps the run going long enough to see it if they ran."""
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    a = p.add_task(Task("a", step, [str(workdir), "a"], {"crash": True}))
    b = p.add_task(Task("b", step, [str(workdir), "b"], depends_on=[a]))
    c = p.add_task(Task("c", step, [str(workdir), "c"], depends_on=[b]))
    p.add_task(Task("keeper", step, [str(workdir), "keeper", 2.0]))
    assert p.run() == 1
    assert a._status is TaskStatus.FAILED and "ended abruptly" in a.reason, a.reason
    assert b._status is TaskStatus.DEPFAILED and c._status is TaskStatus.DEPFAILED
    assert sorted(r[0] for r in runs(workdir)) == ["a", "keeper"]


def test_a_chain_of_different_functions_runs_in_order(workdir):
    """A follower whose function the slot has not seen yet waits for its predecessor's success in the
    worker instead of going into the slot early; the order holds either way."""
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    prev, names = None, [f"t{i}" for i in range(12)]
    for i, name in enumerate(names):
        f = step if i % 3 else other_step
        prev = p.add_task(Task(name, f, [str(workdir), name], depends_on=[prev] if prev else None))
    assert p.run() == 0
    done = runs(workdir)
    assert [r[0] for r in done] == names
    assert all(a[3] <= b[2] for a, b in zip(done, done[1:]))


def test_kill9_of_the_worker_holding_a_chain_runs_the_chain_elsewhere_once(workdir):
    """The head of a chain runs, three followers wait on its worker. kill -9 that worker: the head
    goes again elsewhere (one loss is allowed), and each follower runs once, after it."""
    p = Pipeline(ParallelExecutor(workers=2, heartbeat=0.3, liveness=4), quiet=True)
    head = p.add_task(Task("head", hold, [str(workdir), "head"]))
    prev, followers = head, []
    for name in ("f1", "f2", "f3"):
        prev = p.add_task(Task(name, step, [str(workdir), name], depends_on=[prev]))
        followers.append(prev)
    result: list = []
    t = threading.Thread(target=lambda: result.append(p.run()), daemon=True)
    t.start()
    victim, slot = map(int, wait_for(lambda: (workdir / "head.first").exists() and
                                     (workdir / "head.first").read_text().split(), 30, "the head to start"))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not pid_alive(slot), 20, "the killed worker's slot to end with it")
    (workdir / "release").touch()         # now only the head's second attempt can be let through
    t.join(60)
    assert not t.is_alive() and result == [0]
    done = runs(workdir)
    assert [r[0] for r in done] == ["head", "f1", "f2", "f3"]
    assert all(r[1] != victim for r in done)
    assert head.attempts == 2 and all(f._status is TaskStatus.FINISHED for f in followers)


def test_a_chain_on_a_pool_runs_on_one_worker(workdir, tmp_path):
    from test_pool import Pool, env_for
    home = tmp_path / "home"
    home.mkdir()
    pool = Pool(home, "chain", local=2)
    try:
        pool.wait_workers(2)
        script = workdir / "chain.py"
        script.write_text(f"""
import os, sys, time
from pathlib import Path
from depio import Pipeline, Task
from depio.pool import PoolExecutor
def step(d, name):
    with open(Path(d, "runs.log"), "a") as f:
        f.write(f"{{name}} {{os.getppid()}} {{time.time():.6f}} {{time.time():.6f}}\\n")
p = Pipeline(PoolExecutor("chain"), quiet=True)
prev = None
for i in range(30):
    prev = p.add_task(Task(f"t{{i}}", step, [{str(workdir)!r}, f"t{{i}}"], depends_on=[prev] if prev else None))
sys.exit(p.run())
""")
        r = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env_for(home), capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
        done = runs(workdir)
        assert [x[0] for x in done] == [f"t{i}" for i in range(30)]
        assert len({x[1] for x in done}) == 1, "a chain hops between the pool's workers"
    finally:
        pool.stop()


def flaky(d: str, name: str, mode: str, seconds: float) -> None:
    """Log the run as ok or fail: `mode` always fails, `once` fails its first attempt, `never` does not."""
    start = time.time()
    time.sleep(seconds)
    marker = Path(d, f"{name}.failed")
    fail = mode == "always" or (mode == "once" and not marker.exists())
    if fail:
        marker.touch()
    with open(Path(d, "flaky.log"), "a") as f:
        f.write(f"{name} {start:.6f} {time.time():.6f} {'fail' if fail else 'ok'}\n")
    if fail:
        raise RuntimeError(f"{name} fails ({mode})")


@pytest.mark.timeout(120)
def test_chains_with_failures_retries_and_killed_workers_keep_their_order(workdir):
    """Random chains (fixed seed) with cross links, tasks that fail once or always, and kill -9 of two
    workers while it runs. Whatever happens, no task starts before each of its dependencies has
    succeeded, nothing downstream of a failure runs, and every task ends FINISHED, FAILED (those that
    always fail, or a task lost with both killed workers) or DEPFAILED."""
    from depio.runtime.backends import DispatcherBackend
    rng = random.Random(7)
    ex = ParallelExecutor(workers=3, heartbeat=0.3, liveness=4)
    made: list = []
    make_backend = ex.make_backend
    ex.make_backend = lambda: made.append(make_backend()) or made[-1]
    p = Pipeline(ex, quiet=True)
    tasks: Dict[str, Task] = {}
    for c in range(12):
        prev = None
        for k in range(rng.randint(4, 16)):
            name = f"c{c}_{k}"
            r = rng.random()
            mode = "always" if r < 0.02 else "once" if r < 0.10 else "never"
            deps = [prev] if prev is not None else []
            if rng.random() < 0.1 and tasks:
                deps.append(rng.choice(list(tasks.values())))
            prev = p.add_task(Task(name, flaky, [str(workdir), name, mode, rng.choice([0.0, 0.002, 0.02, 0.1])],
                                   depends_on=deps or None, retries=1 if mode == "once" else 0))
            tasks[name] = prev
    result: list = []
    run = threading.Thread(target=lambda: result.append(p.run()), daemon=True)
    run.start()
    backend = wait_for(lambda: made and isinstance(made[0], DispatcherBackend) and made[0].dispatcher and made[0],
                       30, "the backend")
    killed = []

    def logged() -> int:
        path = workdir / "flaky.log"
        return len(path.read_text().splitlines()) if path.exists() else 0

    for _ in range(2):
        workers = wait_for(lambda: [w.pid for w in backend.dispatcher.workers if w.pid not in killed], 30,
                           "a live worker")
        victim = rng.choice(workers)
        before = logged()
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        # the kills come at two moments of the run: the next one after a task ended since this one
        wait_for(lambda: logged() > before or not run.is_alive(), 30, "a task to end after the kill")
    run.join(100)
    assert not run.is_alive() and result, "the pipeline did not finish"
    log: Dict[str, list] = {}
    for line in (workdir / "flaky.log").read_text().splitlines():
        name, start, end, how = line.split()
        log.setdefault(name, []).append((float(start), float(end), how))
    for name, t in tasks.items():
        ran = log.get(name, [])
        mode = t.func_args[2]
        assert t._status in (TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.DEPFAILED), (name, t._status)
        if t._status is TaskStatus.FAILED:      # failing on purpose, or lost with both killed workers
            assert mode == "always" or (t.error["kind"] == "WorkerLost" and
                                        any(f"pid {pid}" in t.reason for pid in killed)), (name, mode, t.reason)
        if t._status is TaskStatus.DEPFAILED:
            assert not ran, (name, ran)
        if t._status is TaskStatus.FINISHED:
            assert any(how == "ok" for _, _, how in ran), (name, ran)
        for start, _, _ in ran:
            for dep in t.task_dependencies or []:
                assert any(how == "ok" and end <= start + 1e-3 for _, end, how in log.get(dep.name, [])), \
                    f"{name} started before its dependency {dep.name} succeeded"
    assert result == [1 if any(t._status is not TaskStatus.FINISHED for t in tasks.values()) else 0]
