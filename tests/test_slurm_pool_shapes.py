"""A Slurm pool follows its pipelines' request shapes (issue 15): a GPU task sent to a pool whose
pilots hold no GPU gets a pilot group of its own shape, runs there with its GPU, and that group
leaves when it has no work; CPU tasks stay on the base pilots. Real pool, pilots and pipeline on the
local Slurm (best with LOCAL_SLURM_CPUS=4 LOCAL_SLURM_GPUS=2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, wait_for
from depio.runtime import protocol as P
from depio.runtime.assignment import WorkerInfo
from depio.runtime.dispatcher import Dispatcher
from depio.runtime.resources import Offer, Resources, shape_of
from depio.slurm.cluster import Cluster, Node
from depio.slurm.pilot_launcher import SlurmPilotLauncher
from depio.slurm.pilots import _PoolView

SHAPED_IDLE = 8.0       # the GPU pilots' idle timeout in this pool: short, so the test sees them go


def _env(home: Path) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), DEPIO_HOME=str(home))
    for name in ("DEPIO_POOL", "DEPIO_KEY", "SBATCH_PARTITION"):
        e.pop(name, None)
    return e


def _jobs_of(folder: Path) -> list:
    """The pilot jobs this pool submitted: one submission script per sbatch call."""
    return sorted(p.name.split("_")[0] for p in folder.glob("*_submission.sh")) if folder.exists() else []


def _in_squeue(jobs: list) -> str:
    if not jobs:
        return ""
    r = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-t", "pending,running,completing,configuring",
                        "-o", "%i %T"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def _status(home: Path, name: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "depio.cli", "pool", "status", "--name", name, "--json"],
                       capture_output=True, text=True, timeout=30, env=_env(home), stdin=subprocess.DEVNULL)
    return json.loads(r.stdout) if r.returncode == 0 else {"workers": []}


@pytest.mark.timeout(30)
def test_a_pools_work_is_by_pilot_group_from_what_its_dispatcher_holds_and_runs(tmp_path, monkeypatch):
    """Read from a real (unstarted) dispatcher's assignment, on a cluster of one 4-CPU 2-GPU node."""
    monkeypatch.delenv("SBATCH_PARTITION", raising=False)
    cluster = Cluster()
    cluster._nodes, cluster._partitions = [Node("n", 4, 16000, 2, ("debug",), ())], {"debug": True}
    launcher = SlurmPilotLauncher(1, 1, {"cpus_per_task": 1, "time": 5}, tmp_path, 1, 1, 5.0, 5.0, None, 1.0, 5, 3,
                                  cluster=cluster)
    said = []
    launcher.notice = said.append
    d = Dispatcher(P.new_key())
    view = _PoolView(d, launcher)
    gpu, big = shape_of(Resources(gpus=1)), shape_of(Resources(gpus=99))
    c = d.assignment.add_client(b"c", "pipeline", "host", 1)
    c.functions[b"f"] = b"function"
    d.assignment.queue(c, tuple(P.TaskSpec(k, 1, f"t{k}", b"f", b"", shape=shape)
                                for k, shape in enumerate((gpu, gpu, big, None))))
    assert view.work() == {None: (1, 1), gpu: (2, 2)}         # the too-big shape gets no group ...
    assert view.work() == {None: (1, 1), gpu: (2, 2)}
    assert set(launcher.groups) == {None, gpu}
    (failed,) = d.assignment.report(c).done                   # ... its task fails at once, naming it
    assert failed.key == 2 and failed.error["type"] == "ResourcesUnavailable", failed
    assert failed.error["message"].startswith("task t2 asks for") and "99 GPU(s)" in failed.error["message"] \
        and "partition debug" in failed.error["message"], failed.error
    # a registered worker that fits it (started by hand): the task waits for it; no pilot group, said once
    huge = WorkerInfo(b"h", "by-hand@big", "big", 3, slots=1, offer=Offer(cpus=1, gpus=99, partition="debug"))
    d.assignment.workers.add(huge)
    d.assignment.queue(c, (P.TaskSpec(4, 1, "t4", b"f", b"", shape=big),))
    assert d.assignment.routing.waiting() == {gpu: 2, big: 1}
    assert view.work() == {None: (1, 1), gpu: (2, 2)} and view.work() == {None: (1, 1), gpu: (2, 2)}
    assert len(said) == 1 and "99 GPU(s)" in said[0] and "registered workers that fit" in said[0], said
    d.assignment.workers.remove(b"h")
    d.assignment.routing.cancel(c, {4})
    w = WorkerInfo(b"w", "pilot-1@n", "n", 2, slots=2, credits=2, offer=Offer(cpus=1, gpus=1, partition="debug"))
    d.assignment.workers.add(w)
    d.assignment.assign()                                      # both GPU tasks onto the GPU pilot
    assert view.work()[gpu] == (2, 2)                          # handed out, not started: still to wait for
    next(iter(d.assignment.jobs.values())).started = True
    assert view.work()[gpu] == (2, 1)


@pytest.fixture
def gpu_cluster(slurm_cluster):
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=10).stdout
    if "gpu:" not in gres:
        pytest.skip("the local Slurm has no (fake) GPUs: LOCAL_SLURM_GPUS=2 bash scripts/local-slurm.sh up")
    return slurm_cluster


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_a_gpu_task_on_a_cpu_slurm_pool_gets_a_gpu_pilot_that_leaves_when_idle(gpu_cluster, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    folder = home / "pools" / "g-slurm"
    log = open(tmp_path / "pool.out", "wb")
    pool = subprocess.Popen(
        [sys.executable, "-c", "import logging, sys; logging.basicConfig(level=logging.INFO); "
         "from depio.pool.service import serve; "
         f"sys.exit(serve('g', slurm=1, slurm_time=5, heartbeat=1.0, slurm_shaped_idle={SHAPED_IDLE}))"],
        cwd=tmp_path, env=_env(home), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(_status(home, "g")["workers"]) >= 1 or pool.poll() is not None, 90,
                 "the pool's CPU pilot to join")
        assert pool.poll() is None, (tmp_path / "pool.out").read_text()
        script = work / "p.py"
        script.write_text(textwrap.dedent("""
            import os, sys, time
            from depio import Pipeline, Task
            from depio.decorators import task
            from depio.pool import PoolExecutor

            def where():
                return os.environ.get("SLURM_JOB_ID", ""), os.environ.get("CUDA_VISIBLE_DEVICES", "")

            @task("train", slurm_gpus_per_task=1)
            def train():
                time.sleep(1)
                return where()

            @task("prep")
            def prep(i):
                return where()

            @task("huge", slurm_gpus_per_task=99)
            def huge():
                return where()

            p = Pipeline(PoolExecutor("g"), quiet=True)
            tasks = [p.add_task(train())] + [p.add_task(prep(i)) for i in range(3)]
            too_big = p.add_task(huge())
            code = p.run()
            for t in tasks:
                print("RAN", t.name, *(t.result or ("", "")))
            print("HUGE", too_big._status.name, too_big.reason)
            sys.exit(code)
        """))
        r = subprocess.run([sys.executable, str(script)], cwd=work, env=_env(home), capture_output=True,
                           text=True, timeout=150, stdin=subprocess.DEVNULL)
        out = r.stdout + r.stderr
        assert r.returncode == 1, out + (tmp_path / "pool.out").read_text()     # only the too-big task failed
        huge = next((x for x in out.splitlines() if x.startswith("HUGE")), out)
        assert huge.startswith("HUGE FAILED task huge (#5) asks for") and "99 GPU(s)" in huge, out
        rows = [(x.split() + ["", "", ""])[1:4] for x in out.splitlines() if x.startswith("RAN")]
        gpu = [x for x in rows if x[0] == "train"]
        cpu = [x for x in rows if x[0] == "prep"]
        assert len(gpu) == 1 and len(cpu) == 3, out
        gpu_job, gpu_devices = gpu[0][1], gpu[0][2]
        assert gpu_job and gpu_devices, out                         # a pilot that holds a GPU, and sees it
        cpu_jobs = {x[1] for x in cpu}
        assert all(cpu_jobs) and gpu_job not in cpu_jobs and not any(x[2] for x in cpu), out
        jobs = _jobs_of(folder)
        assert len(jobs) == 2, jobs                # two sbatch calls: the CPU pilot, then the GPU group
        assert gpu_job.split("_")[0] in jobs and {j.split("_")[0] for j in cpu_jobs} <= set(jobs), (jobs, rows)
        show = subprocess.run(["scontrol", "-o", "show", "job", gpu_job], capture_output=True, text=True,
                              timeout=30).stdout
        assert "gpu" in show, show
        # the GPU group has no more work: its pilot leaves; the pool keeps its CPU pilot
        wait_for(lambda: gpu_job not in _in_squeue(jobs), SHAPED_IDLE + 60, "the idle GPU pilot to leave")
        assert pool.poll() is None and _in_squeue(sorted(cpu_jobs)), _in_squeue(jobs)
    finally:
        if pool.poll() is None:
            subprocess.run([sys.executable, "-m", "depio.cli", "pool", "stop", "--name", "g"], env=_env(home),
                           capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
            try:
                pool.wait(60)
            except subprocess.TimeoutExpired:
                pool.kill()
                pool.wait()
        log.close()
        left = _in_squeue(_jobs_of(folder))
        if left:
            subprocess.run(["scancel"] + _jobs_of(folder), capture_output=True, timeout=30)
    assert pool.returncode == 0, (tmp_path / "pool.out").read_text()
    assert not left, f"pilot jobs still in Slurm after the pool stopped: {left}"
