"""Long-lived pools shared by pipelines: real pool, worker and pipeline processes on loopback."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, wait_for

pytestmark = pytest.mark.timeout(180)


def env_for(home: Path, **extra):
    e = dict(os.environ, PYTHONPATH=str(ROOT), DEPIO_HOME=str(home))
    e.pop("DEPIO_POOL", None)
    e.update(extra)
    return e


def depio(home, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "depio.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env_for(home), stdin=subprocess.DEVNULL)


class Pool:
    """A pool run in the foreground of a child process we own (so we keep its PID)."""

    def __init__(self, home: Path, name: str, local: int = 2, heartbeat: float = 1.0):
        self.home, self.name = home, name
        self.args = ["pool", "start", "--name", name, "--local", str(local), "--heartbeat", str(heartbeat)]
        self.start()

    def start(self):
        self.log = open(self.home / f"{self.name}.out", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "depio.cli", *self.args], env=env_for(self.home),
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        path = self.home / "pools" / f"{self.name}.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.home / f"{self.name}.out").read_text()
            try:
                info = json.loads(path.read_text())
                if info.get("pid") == self.proc.pid:
                    self.info = info
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError("pool did not start")

    def status(self):
        r = depio(self.home, "pool", "status", "--name", self.name, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def wait_workers(self, n, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if len(s["workers"]) >= n:
                return s
            time.sleep(0.1)
        raise AssertionError(f"pool has {len(s['workers'])} workers, expected {n}")

    def stop(self):
        if self.proc.poll() is None:
            r = depio(self.home, "pool", "stop", "--name", self.name)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"pool did not stop: {r.stdout} {r.stderr}")
        self.log.close()


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def pool(home):
    p = Pool(home, "t", local=2)
    p.wait_workers(2)
    yield p
    p.stop()


PIPELINE = """
import json, os, sys, time
from depio import Pipeline, Task
from depio.pool import PoolExecutor
def work(i, sec):
    start = time.time()
    time.sleep(sec)
    return start, time.time()
n, sec, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
p = Pipeline(PoolExecutor("t"), quiet=True)
tasks = [p.add_task(Task("work", work, [i, sec])) for i in range(n)]
if len(sys.argv) > 4:      # meet the other pipelines: start running when all are ready, not when each started
    barrier, count = sys.argv[4], int(sys.argv[5])
    open(f"{barrier}.{os.getpid()}", "w").close()
    deadline = time.monotonic() + 60
    while len([f for f in os.listdir(".") if f.startswith(barrier + ".")]) < count and time.monotonic() < deadline:
        time.sleep(0.01)
t0 = time.time()
code = p.run()
json.dump({"code": code, "t0": t0, "spans": [t.result for t in tasks]}, open(out, "w"))
sys.exit(code)
"""


def start_pipeline(home, workdir, n, sec, out, meet=()):
    """`meet=(name, count)`: the pipeline runs once `count` pipelines given that name are ready."""
    script = workdir / "pipe.py"
    script.write_text(PIPELINE)
    return subprocess.Popen([sys.executable, str(script), str(n), str(sec), str(out), *map(str, meet)], cwd=workdir,
                            env=env_for(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def busy_fraction(span, other_spans, bins=10):
    a0, a1 = span
    width = (a1 - a0) / bins
    hit = 0
    for k in range(bins):
        lo, hi = a0 + k * width, a0 + (k + 1) * width
        if any(s < hi and e > lo for s, e in other_spans):
            hit += 1
    return hit / bins


def test_two_pipelines_share_the_pool_fairly(pool, home, workdir):
    # both run from the same moment, however long each interpreter takes to start
    a = start_pipeline(home, workdir, 500, 0.01, workdir / "a.json", meet=("fair", 2))
    b = start_pipeline(home, workdir, 500, 0.01, workdir / "b.json", meet=("fair", 2))
    out_a, _ = a.communicate(timeout=150)
    out_b, _ = b.communicate(timeout=150)
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    ra, rb = (json.loads((workdir / f"{x}.json").read_text()) for x in "ab")
    spans_a, spans_b = ra["spans"], rb["spans"]
    span_a = (min(s for s, _ in spans_a), max(e for _, e in spans_a))
    span_b = (min(s for s, _ in spans_b), max(e for _, e in spans_b))
    assert busy_fraction(span_a, spans_b) >= 0.7, (span_a, span_b)
    assert busy_fraction(span_b, spans_a) >= 0.7, (span_a, span_b)


def test_killed_pipeline_is_dropped_and_others_go_on(pool, home, workdir):
    victim = start_pipeline(home, workdir, 100, 2.0, workdir / "victim.json")
    wait_for(lambda: any(c["running"] for c in pool.status()["clients"]), 30, what="the victim's tasks to run",
             interval=0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=10)
    other = start_pipeline(home, workdir, 20, 0.01, workdir / "other.json")
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0, out
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        s = pool.status()
        if not s["clients"] and all(w["busy"] == 0 for w in s["workers"]):
            break
        time.sleep(0.2)
    assert not any(c["pid"] == victim.pid for c in s["clients"]), s
    assert all(w["busy"] == 0 for w in s["workers"]), s
    assert len(s["workers"]) == 2


def test_status_table_and_json(pool, home):
    r = depio(home, "pool", "status", "--name", "t")
    assert r.returncode == 0 and "workers" in r.stdout.lower() and "slots" in r.stdout.lower()
    s = pool.status()
    assert len(s["workers"]) == 2 and all(w["slots"] == 1 for w in s["workers"])


def test_unchanged_script_runs_on_the_pool_through_the_environment(pool, home, workdir):
    before = sum(w["done"] for w in pool.status()["workers"])
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "dag_demo.py")], cwd=workdir,
                       env=env_for(home, DEPIO_POOL="t"), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sum(w["done"] for w in pool.status()["workers"]) == before + 3


def test_warm_pool_start_is_faster_than_cold_local_start(pool, home, workdir, record_property):
    """Records both numbers (the benchmark owns speed claims); checks only that both runs work."""
    script = workdir / "first.py"
    script.write_text("""
import sys, time, json
from depio import Pipeline, Task, ParallelExecutor
from depio.pool import PoolExecutor
def stamp():
    return time.time()
ex = PoolExecutor("t") if sys.argv[1] == "pool" else ParallelExecutor(workers=2)
p = Pipeline(ex, quiet=True)
t = p.add_task(Task("stamp", stamp))
t0 = time.time()
code = p.run()
print(json.dumps({"code": code, "latency": t.result - t0}))
""")
    lat = {}
    for mode in ("pool", "cold"):
        r = subprocess.run([sys.executable, str(script), mode], cwd=workdir, env=env_for(home),
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
        lat[mode] = json.loads(r.stdout.strip().splitlines()[-1])["latency"]
    record_property("first_task_latency_pool_s", lat["pool"])
    record_property("first_task_latency_cold_s", lat["cold"])
    print(f"first task latency: warm pool {lat['pool']:.3f} s, cold ParallelExecutor {lat['cold']:.3f} s")


def test_restart_hand_started_workers_come_back(home, workdir):
    p = Pool(home, "t", local=0)
    worker = None
    try:
        key_file = home / "pools" / "t.key"
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--connect", p.info["worker_address"],
                                   "--key-file", str(key_file), "--slots", "1", "--name", "by-hand",
                                   "--reconnect", "60"], env=env_for(home), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        s = p.wait_workers(1)
        assert s["workers"][0]["name"] == "by-hand"
        p.stop()
        assert worker.poll() is None            # it waits for the pool to come back
        p.start()
        s = p.wait_workers(1, timeout=40)
        assert s["workers"][0]["name"] == "by-hand"
        r = subprocess.run([sys.executable, str(ROOT / "examples" / "dag_demo.py")], cwd=workdir,
                           env=env_for(home, DEPIO_POOL="t"), capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        p.stop()
        if worker is not None:
            worker.terminate()
            worker.wait(10)


def test_pipeline_fails_clearly_when_the_pool_goes_away(home, workdir):
    p = Pool(home, "t", local=1)
    try:
        p.wait_workers(1)
        run = start_pipeline(home, workdir, 4, 30.0, workdir / "gone.json")
        wait_for(lambda: any(c["running"] for c in p.status()["clients"]), 30, what="the pipeline's tasks to run",
                 interval=0.1)
        p.stop()
        out, _ = run.communicate(timeout=30)
        assert run.returncode == 1
        result = json.loads((workdir / "gone.json").read_text())
        assert result["code"] == 1
    finally:
        p.stop()


def test_no_pool_gives_a_clear_error(home, workdir):
    r = depio(home, "pool", "status", "--name", "nosuch")
    assert r.returncode != 0 and "nosuch" in r.stderr and "Traceback" not in r.stderr


def test_small_pipeline_is_not_stuck_behind_a_big_one(pool, home, workdir):
    """A small pipeline arriving while a big one keeps every slot busy gets its share at once: it ends
    long before the big one (the pool does not serve pipelines one after the other)."""
    big = start_pipeline(home, workdir, 400, 0.05, workdir / "big.json")     # ~10 s of work on 2 slots
    wait_for(lambda: any(c["running"] for c in pool.status()["clients"]), 30, what="the big pipeline's tasks to run",
             interval=0.1)
    small = start_pipeline(home, workdir, 3, 0.01, workdir / "small.json")
    out, _ = small.communicate(timeout=60)
    assert small.returncode == 0, out
    assert big.poll() is None, "the big pipeline ended first: the small one waited for it"
    result = json.loads((workdir / "small.json").read_text())
    first_start = min(s for s, _ in result["spans"])
    out, _ = big.communicate(timeout=120)
    assert big.returncode == 0, out
    spans = json.loads((workdir / "big.json").read_text())["spans"]
    assert first_start < max(e for _, e in spans) - 3.0


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_pool_keeps_slurm_pilots_and_cancels_them_on_stop(home, workdir, slurm_cluster):
    env_extra = {"SBATCH_PARTITION": slurm_cluster["partition"]}
    p = Pool.__new__(Pool)
    p.home, p.name = home, "s"
    p.args = ["pool", "start", "--name", "s", "--slurm", "1", "--slurm-time", "5", "--heartbeat", "1"]
    os.environ.update(env_extra)
    try:
        p.start()
        s = p.wait_workers(1, timeout=60)
        job = s["workers"][0]["slurm_job_id"]
        assert job, s                                  # the worker is a Slurm job
        r = subprocess.run([sys.executable, str(ROOT / "examples" / "dag_demo.py")], cwd=workdir,
                           env=env_for(home, DEPIO_POOL="s"), capture_output=True, text=True, timeout=90,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
        assert sum(w["done"] for w in p.status()["workers"]) == 3
    finally:
        for k in env_extra:
            os.environ.pop(k, None)
        p.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job.split("_")[0], "-t", "pending,running,completing"],
                           capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(0.5)
    assert not q.stdout.strip(), f"pilot job still in Slurm after the pool stopped: {q.stdout}"


HANGING = """
import sys, time
from pathlib import Path
from depio import Pipeline, Task
from depio.pool import PoolExecutor
original = Task.run_reason
def hanging(self, upstream_ran=None):
    if self.name == "late":
        time.sleep(2.0)          # a file system that hangs in a stat, simulated
    return original(self, upstream_ran)
Task.run_reason = hanging
def write(path):
    Path(path).write_text("x")
p = Pipeline(PoolExecutor("t"), quiet=True)
first = p.add_task(Task("first", write, ["first.txt"], produces=[Path("first.txt")]))
late = p.add_task(Task("late", write, ["late.txt"], produces=[Path("late.txt")], depends_on=[first]))
code = p.run()
print(code, first.attempts, late.attempts, late.status[0].name, late.reason)
sys.exit(code)
"""


def test_the_pool_keeps_a_pipeline_whose_scheduler_blocks(home, workdir):
    """The pipeline's scheduler blocks 2 s in one decision; the pool (heartbeat 0.2 s, so it drops a
    client silent for 0.6 s) must still hear its heartbeats and keep its tasks."""
    p = Pool(home, "t", local=1, heartbeat=0.2)
    try:
        p.wait_workers(1)
        script = workdir / "hang.py"
        script.write_text(HANGING)
        r = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env_for(home), capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.split()[:4] == ["0", "1", "1", "FINISHED"], r.stdout
        assert not any("lost" in c for c in p.status().get("refusals", [])), p.status()
    finally:
        p.stop()
