"""Slurm as researchers meet it (issue 15), on the local Slurm (best with LOCAL_SLURM_CPUS=4
LOCAL_SLURM_GPUS=2): arrays that spare the controller, transient sbatch failures, the default
partition, tasks too big for any node, GPUs routed on pilots, a killed pipeline's orphans, and a
pilot run without a configured key on a non-loopback address (a veth pair's host side)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, popen_script, run_script, wait_for

pytestmark = pytest.mark.slurm


@pytest.fixture
def slurm_env(slurm_cluster, workdir, monkeypatch):
    """Jobs connect back on loopback; the partition is the cluster's default (no SBATCH_PARTITION)."""
    monkeypatch.setenv("DEPIO_ADDRESS", "127.0.0.1")
    monkeypatch.delenv("SBATCH_PARTITION", raising=False)
    monkeypatch.delenv("DEPIO_KEY", raising=False)
    yield workdir
    _cancel_jobs_of(workdir)


def _jobs_of(folder: Path) -> set:
    return {p.name.split("_")[0] for p in folder.glob("*_submission.sh")} if folder.exists() else set()


def _cancel_jobs_of(workdir: Path) -> None:
    """Cleanup: cancel only the jobs this test's pipelines submitted (by id)."""
    ids = sorted(_jobs_of(workdir / "slurm"))
    if ids:
        subprocess.run(["scancel"] + ids, capture_output=True, timeout=30)


def _counting_path(folder: Path, fail_sbatch: int = 0) -> tuple:
    """PATH wrappers around sbatch/squeue/sacct/scancel that log each call of the pipeline; the first
    `fail_sbatch` sbatch calls fail as a busy controller does."""
    bindir, log = folder / "countbin", folder / "calls.log"
    bindir.mkdir()
    for cmd in ("sbatch", "squeue", "sacct", "scancel"):
        real = shutil.which(cmd)
        fail = ""
        if cmd == "sbatch" and fail_sbatch:
            fail = (f'n=$(grep -c " sbatch" "{log}" 2>/dev/null || echo 0)\n'
                    f'if [ "$n" -le {fail_sbatch} ]; then echo "sbatch: error: Batch job submission failed: '
                    f'Socket timed out on send/recv operation" >&2; exit 1; fi\n')
        (bindir / cmd).write_text(f"#!/bin/sh\nprintf '%s {cmd}\\n' \"$(date +%s.%N)\" >> '{log}'\n{fail}"
                                  f"exec '{real}' \"$@\"\n")
        (bindir / cmd).chmod(0o755)
    return f"{bindir}{os.pathsep}{os.environ['PATH']}", log


def _calls(log: Path, cmd: str) -> list:
    if not log.exists():
        return []
    return sorted(float(t) for t, c in (line.split() for line in log.read_text().splitlines()) if c == cmd)


@pytest.mark.timeout(150)
def test_40_ready_tasks_go_out_in_at_most_4_arrays(slurm_env):
    path, log = _counting_path(slurm_env)
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import sys
        from depio import Pipeline, SubmitItExecutor, Task

        def work(i):
            return i

        # default caps (20 in Slurm at once): the rest is gathered as capacity frees up
        p = Pipeline(SubmitItExecutor(folder="slurm", parameters={"slurm_time": 5, "slurm_mem": 100}), quiet=True)
        tasks = [p.add_task(Task(f"w{i}", work, [i])) for i in range(40)]
        code = p.run()
        assert all(t.result == i for i, t in enumerate(tasks))
        sys.exit(code)
    """))
    r = run_script(script, slurm_env, timeout=140, env={"PATH": path})
    assert r.returncode == 0, r.stdout + r.stderr
    sbatch = _calls(log, "sbatch")
    assert 1 <= len(sbatch) <= 4, sbatch
    assert all(b - a >= 0.9 for a, b in zip(sbatch, sbatch[1:])), sbatch     # at most one per second


@pytest.mark.timeout(120)
def test_transient_sbatch_failures_are_retried_a_bad_partition_fails_naming_it(slurm_env):
    path, log = _counting_path(slurm_env, fail_sbatch=2)
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import sys
        from depio import Pipeline, SubmitItExecutor, Task

        def work(i):
            return i

        p = Pipeline(SubmitItExecutor(folder="slurm", parameters={"slurm_time": 5, "slurm_mem": 100}), quiet=True)
        good = [p.add_task(Task(f"w{i}", work, [i])) for i in range(3)]
        bad = p.add_task(Task("elsewhere", work, [9], slurm_parameters={"slurm_partition": "nosuchpart"}))
        code = p.run()
        print("GOOD", [t.status[0].name for t in good])
        print("BAD", bad.status[0].name, bad.reason)
        sys.exit(code)
    """))
    r = run_script(script, slurm_env, timeout=110, env={"PATH": path})
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert next(x for x in out.splitlines() if x.startswith("GOOD")) == "GOOD ['FINISHED', 'FINISHED', 'FINISHED']", out
    bad = next(x for x in out.splitlines() if x.startswith("BAD"))
    assert bad.startswith("BAD FAILED") and "nosuchpart" in bad, out
    assert "Socket timed out" in out, out              # the reason was shown while it waited
    assert len(_calls(log, "sbatch")) >= 4, out        # 2 failed, then the good array and the bad one


@pytest.mark.timeout(120)
def test_the_built_in_partition_falls_back_and_a_task_too_big_fails_at_once(slurm_env):
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import sys
        from depio import Pipeline, SubmitItExecutor, Task
        from depio.decorators import task

        def work(i):
            return i

        @task("greedy", slurm_gpus_per_task=99)
        def greedy():
            return 1

        p = Pipeline(SubmitItExecutor(folder="slurm"), quiet=True)     # upstream's defaults: partition "gpu"
        t = p.add_task(Task("w", work, [1]))
        code = p.run()
        print("DEFAULT", t.status[0].name, code)
        p2 = Pipeline(SubmitItExecutor(folder="slurm"), quiet=True)
        g = p2.add_task(greedy())
        code2 = p2.run()
        print("GREEDY", g.status[0].name, code2, g.reason)
        sys.exit(code)
    """))
    r = run_script(script, slurm_env, timeout=110)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "DEFAULT FINISHED 0" in out, out
    assert sum("no partition 'gpu'" in line for line in out.splitlines()) == 2, out     # one line per run
    greedy = next(x for x in out.splitlines() if x.startswith("GREEDY"))
    assert greedy.startswith("GREEDY FAILED 1") and "greedy" in greedy and "99 GPU(s)" in greedy, out
    assert len(_jobs_of(slurm_env / "slurm")) == 1, out      # nothing was submitted for the greedy task


@pytest.mark.timeout(150)
def test_gpu_tasks_run_only_on_gpu_pilots_each_slot_its_own_gpu(slurm_env):
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=10).stdout
    if "gpu:" not in gres:
        pytest.skip("the local Slurm has no (fake) GPUs: LOCAL_SLURM_GPUS=2 bash scripts/local-slurm.sh up")
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from depio import Pipeline, SlurmPilotExecutor, Task
        from depio.decorators import task

        def where():
            return os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_JOB_GPUS", ""), os.environ.get("CUDA_VISIBLE_DEVICES", "")

        @task("train", slurm_gpus_per_task=1)
        def train(i):
            time.sleep(1)
            return where()

        @task("prep")
        def prep(i):
            return where()

        p = Pipeline(SlurmPilotExecutor(workers=1, slots=2, folder="slurm", idle_timeout=20,
                                        parameters={"slurm_time": 5}), quiet=True)
        gpu = [p.add_task(train(i)) for i in range(2)]
        cpu = [p.add_task(prep(i)) for i in range(4)]
        code = p.run()
        for t in gpu + cpu:
            print("RAN", t.name, *t.result)
        sys.exit(code)
    """))
    r = run_script(script, slurm_env, timeout=140)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    rows = [x.split() + [""] * 2 for x in out.splitlines() if x.startswith("RAN")]
    gpu_rows = [x for x in rows if x[1] == "train"]
    assert len(gpu_rows) == 2 and all(x[3] and len(x[4].split(",")) == 1 and x[4] for x in gpu_rows), out
    assert len({x[4] for x in gpu_rows if x[2] == gpu_rows[0][2]}) == len([x for x in gpu_rows
                                                                           if x[2] == gpu_rows[0][2]]), out
    assert len(_jobs_of(slurm_env / "slurm")) == 2, out       # one array per shape: CPU pilots, GPU pilots


@pytest.mark.timeout(150)
def test_per_task_jobs_ask_slurm_for_an_explicit_resources_request(slurm_env):
    """`resources=` wins over the task's Slurm parameters in per-task mode too: the job holds the GPU
    and memory the task asks for, and a task that asks nothing gets neither."""
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=10).stdout
    if "gpu:" not in gres:
        pytest.skip("the local Slurm has no (fake) GPUs: LOCAL_SLURM_GPUS=2 bash scripts/local-slurm.sh up")
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, sys
        from depio import Pipeline, SubmitItExecutor, Task

        def where(tag):
            job = os.environ["SLURM_JOB_ID"]
            show = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
            mem = next(f for f in show.split() if f.startswith("MinMemoryNode=") or f.startswith("MinMemoryCPU="))
            return job, os.environ.get("CUDA_VISIBLE_DEVICES", "-"), mem

        p = Pipeline(SubmitItExecutor(folder="slurm", parameters={"slurm_time": 5}), quiet=True)
        gpu = p.add_task(Task("gpu", where, ["gpu"], resources={"gpus": 1, "mem_gb": 1}))
        plain = p.add_task(Task("plain", where, ["plain"]))
        code = p.run()
        for t in (gpu, plain):
            print("RAN", t.name, *t.result)
        sys.exit(code)
    """))
    r = run_script(script, slurm_env, timeout=140)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    rows = {x.split()[1]: x.split()[2:] for x in out.splitlines() if x.startswith("RAN")}
    assert set(rows) == {"gpu", "plain"}, out
    assert rows["gpu"][1] not in ("-", "") and rows["gpu"][2] == "MinMemoryNode=1G", out
    assert rows["plain"][1] in ("-", ""), out
    assert rows["gpu"][0] != rows["plain"][0], out


def _started(folder: Path, n: int) -> list:
    return wait_for(lambda: (lambda m: m if len(m) >= n else None)(sorted(folder.glob("start-*"))), 60,
                    f"{n} task(s) started")


@pytest.mark.timeout(170)
def test_a_killed_pipelines_jobs_are_cancelled_before_the_same_script_submits_again(slurm_env):
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import os, pathlib, sys, time
        from typing import Annotated
        from depio import Pipeline, SubmitItExecutor, Product, Task

        def work(out: Annotated[pathlib.Path, Product], seconds: float):
            job = os.environ["SLURM_JOB_ID"]
            pathlib.Path(f"start-{out.name}-{job}").write_text(repr(time.time()))
            time.sleep(seconds)
            out.write_text(job)

        seconds = float(os.environ.get("TEST_SECONDS", "20"))
        p = Pipeline(SubmitItExecutor(folder="slurm", parameters={"slurm_time": 5, "slurm_mem": 100}), quiet=True)
        for name in ("a", "b"):
            p.add_task(Task(name, work, [pathlib.Path(name + ".out"), seconds]))
        sys.exit(p.run())
    """))
    first = popen_script(script, slurm_env)
    try:
        marks = _started(slurm_env, 2)
        orphans = {m.name.split("-")[2] for m in marks}
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = run_script(script, slurm_env, timeout=120, env={"TEST_SECONDS": "0.5"})
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    out = second.stdout + second.stderr
    assert second.returncode == 0, out
    assert "cancelled 2 Slurm job(s) of an earlier run" in out, out
    ends = {}
    for jid in orphans:
        show = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True, timeout=30).stdout
        state = next(kv.split("=", 1)[1] for kv in show.split() if kv.startswith("JobState="))
        end = next(kv.split("=", 1)[1] for kv in show.split() if kv.startswith("EndTime="))
        assert state == "CANCELLED", show
        ends[jid] = time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))
    for product in ("a.out", "b.out"):
        runs = sorted(slurm_env.glob(f"start-{product}-*"))
        new = [float(m.read_text()) for m in runs if m.name.split("-")[2] not in orphans]
        assert new and min(new) >= max(ends.values()), (product, new, ends)   # never two jobs on one product


@pytest.mark.timeout(120)
def test_jobs_of_a_pipeline_that_still_runs_are_left_alone(slurm_env):
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import os, pathlib, sys, time
        from depio import Pipeline, SubmitItExecutor, Task

        def work(seconds):
            pathlib.Path(f"start-{seconds}-{os.environ['SLURM_JOB_ID']}").touch()
            time.sleep(seconds)

        seconds = float(os.environ["TEST_SECONDS"])
        p = Pipeline(SubmitItExecutor(folder="slurm", parameters={"slurm_time": 5, "slurm_mem": 100}), quiet=True)
        p.add_task(Task("t", work, [seconds]))
        sys.exit(p.run())
    """))
    first = popen_script(script, slurm_env, env={"TEST_SECONDS": "30"})
    try:
        mark = _started(slurm_env, 1)[0]
        jid = mark.name.split("-")[2]
        second = run_script(script, slurm_env, timeout=90, env={"TEST_SECONDS": "0.1"})
        out = second.stdout + second.stderr
        assert second.returncode == 0, out
        assert "left alone 1 Slurm job(s) of another run of this script that is still running" in out, out
        st = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True, timeout=30)
        assert st.stdout.strip() == "RUNNING", st.stdout
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()


def _netns(name: str, host: str, node: str) -> str:
    """A network namespace with a veth pair (host side `host`/24 here); '' if `ip netns` is refused."""
    veth_h, veth_n = f"{name}h", f"{name}n"
    steps = [["ip", "netns", "add", name], ["ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_n],
             ["ip", "link", "set", veth_n, "netns", name], ["ip", "addr", "add", f"{host}/24", "dev", veth_h],
             ["ip", "link", "set", veth_h, "up"],
             ["ip", "netns", "exec", name, "ip", "addr", "add", f"{node}/24", "dev", veth_n],
             ["ip", "netns", "exec", name, "ip", "link", "set", veth_n, "up"]]
    for step in steps:
        r = subprocess.run(step, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"{' '.join(step)}: {r.stderr.strip()}"
    return ""


@pytest.mark.timeout(150)
def test_pilot_example_without_a_key_on_a_non_loopback_address(slurm_env, monkeypatch):
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): cannot make a veth pair")
    n = os.getpid() % 200 + 20
    name = f"dq{os.getpid() % 100000}"
    host, node = f"10.77.{n}.1", f"10.77.{n}.2"
    try:
        problem = _netns(name, host, node)
        if problem and ("Operation not permitted" in problem or "Permission denied" in problem):
            pytest.skip(f"ip netns is not permitted here: {problem}")
        assert not problem, problem
        monkeypatch.setenv("DEPIO_ADDRESS", host)            # the veth's host side: not loopback
        shutil.copy(ROOT / "examples" / "slurm_pilots_demo.py", slurm_env / "demo.py")
        r = run_script(slurm_env / "demo.py", slurm_env, timeout=140)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert "KeyRequiredError" not in out, out
        assert "All jobs done!" in out, out
        keys = list((slurm_env / "slurm").glob(".depio-key-*"))
        assert not keys, keys                                    # the run's key file is gone after it
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"{name}h"], capture_output=True, timeout=30)
