"""Slurm for real: per-task jobs and pilot workers through submitit, on a real (local) Slurm.

Run them with a local single-node cluster:

    eval "$(bash scripts/local-slurm.sh up)"      # installs slurm-wlm on first use, ~30 s
    python -m pytest tests/test_slurm.py -q
    bash scripts/local-slurm.sh down

Without a reachable cluster they are skipped, unless DEPIO_REQUIRE_SLURM=1 (CI), then they fail.
Jobs connect back to the pipeline on 127.0.0.1 (DEPIO_ADDRESS), as compute nodes here are this host.
"""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, popen_script, run_script

pytestmark = pytest.mark.slurm

@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    return slurm_cluster


@pytest.fixture
def slurm_env(cluster, workdir, monkeypatch):
    """Jobs connect back on loopback; the local cluster's partition; a fresh submitit folder."""
    monkeypatch.setenv("DEPIO_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("SBATCH_PARTITION", cluster["partition"])
    yield workdir
    _wait_no_jobs(workdir)


def _squeue_active(name_filter: str = "") -> list:
    args = ["squeue", "-h", "-o", "%i|%j|%T"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    return [line for line in r.stdout.splitlines() if line.strip() and name_filter in line]


def _jobs_of(folder: Path) -> set:
    """Job ids submitit created in `folder` (one *_submission.sh per sbatch call)."""
    return {p.name.split("_")[0] for p in folder.glob("*_submission.sh")}


def _wait_no_jobs(folder: Path, timeout: float = 30.0) -> list:
    ids = _jobs_of(folder / "slurm") if (folder / "slurm").exists() else set()
    deadline = time.monotonic() + timeout
    left = []
    while ids:
        r = subprocess.run(["squeue", "-h", "-o", "%F|%i|%T"], capture_output=True, text=True, timeout=30)
        left = [line for line in r.stdout.splitlines() if line.split("|")[0] in ids]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return left


# ---------------------------------------------------------------- per-task mode: the README example

@pytest.mark.timeout(120)
def test_readme_slurm_example_per_task_jobs(slurm_env):
    t0 = time.monotonic()
    r = run_script(ROOT / "examples" / "slurm_demo.py", slurm_env, timeout=110)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert (slurm_env / "build" / "output1.txt").read_text() == "Hallo from depio"
    assert (slurm_env / "build" / "final1.txt").exists()
    jobs = _jobs_of(slurm_env / "slurm")
    assert len(jobs) == 2, (jobs, out)
    table = out[out.rfind("Tasks:"):]
    for jid in jobs:                       # the table shows each task's Slurm id and state
        assert jid in table, table
    assert table.count("COMPLETED") == 2, table
    assert "All jobs done!" in out
    # the key never sits in a world-readable file, and it is gone after the run
    assert not list((slurm_env / "slurm").glob(".depio-key-*"))
    print(f"README example: {time.monotonic() - t0:.1f} s")


@pytest.mark.timeout(120)
def test_per_task_parameters_env_failure_and_no_sacct(slurm_env, monkeypatch):
    """Per-task parameters reach sbatch (decorator keywords win over the executor's), a task's
    exception comes back over ZeroMQ, and depio never calls sacct (one that only fails is first on PATH)."""
    fake = slurm_env / "fakebin"
    fake.mkdir()
    calls = slurm_env / "sacct-calls"
    (fake / "sacct").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                                "echo 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    (fake / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import os, pathlib, sys
        from typing import Annotated
        from depio import Pipeline, SubmitItExecutor, Product, task

        @task("ok", slurm_comment="from-the-task")
        def ok(out: Annotated[pathlib.Path, Product]):
            out.write_text(os.environ.get("SLURM_JOB_ID", "none"))

        @task("boom")
        def boom(out: Annotated[pathlib.Path, Product]):
            print("about to fail")
            raise ValueError("kaputt")

        p = Pipeline(SubmitItExecutor(folder="slurm", parameters={"slurm_time": 5, "slurm_mem": 100,
                                                                   "slurm_comment": "from-the-executor"}))
        p.add_task(ok(pathlib.Path("a.txt")))
        p.add_task(boom(pathlib.Path("b.txt")))
        sys.exit(p.run())
    """))
    r = run_script(script, slurm_env, timeout=110)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    job_id = (slurm_env / "a.txt").read_text()
    assert job_id != "none" and job_id in out, out          # it ran in a Slurm job, shown in the table
    assert "kaputt" in out and "ValueError" in out and "about to fail" in out, out
    scripts = list((slurm_env / "slurm").glob("*_submission.sh"))
    assert scripts and all("--comment=from-the-task" in s.read_text() or "--comment" in s.read_text()
                           for s in scripts)
    assert any("--comment=from-the-task" in s.read_text() for s in scripts), [s.read_text() for s in scripts]
    assert any("--time=5" in s.read_text() for s in scripts)
    assert not calls.exists(), calls.read_text()             # status came over ZeroMQ, not from sacct


# ---------------------------------------------------------------- pilots

@pytest.mark.timeout(150)
def test_200_tasks_on_two_pilots(slurm_env):
    script = slurm_env / "p.py"
    name = f"pilot-{os.getpid()}-{int(time.time())}"
    script.write_text(textwrap.dedent(f"""
        import sys
        from depio import Pipeline, SlurmPilotExecutor, Task

        def square(i):
            return i * i

        ex = SlurmPilotExecutor(workers=2, slots=1, folder="slurm", idle_timeout=20,
                                parameters={{"slurm_time": 10, "slurm_job_name": "{name}"}})
        p = Pipeline(ex, quiet=True)
        tasks = [p.add_task(Task(f"sq{{i}}", square, [i])) for i in range(200)]
        code = p.run()
        assert all(t.result == i * i for i, t in enumerate(tasks))
        pilots = sorted({{t.slurmid for t in tasks}})
        print("PILOTS", pilots)
        sys.exit(code)
    """))
    t0 = time.monotonic()
    r = run_script(script, slurm_env, timeout=140)
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    sbatch_calls = _jobs_of(slurm_env / "slurm")
    assert 1 <= len(sbatch_calls) <= 2, sbatch_calls         # one job array (a replacement at most)
    q = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%F|%i|%T"], capture_output=True, text=True)
    assert len({line.split("|")[0] for line in q.stdout.split()}) == len(sbatch_calls), q.stdout
    line = next(x for x in out.splitlines() if x.startswith("PILOTS"))
    assert all("_" in jid for jid in eval(line[len("PILOTS"):])), line   # every task ran in a pilot array task
    print(f"200 tasks on 2 pilots: {elapsed:.1f} s, {len(sbatch_calls)} sbatch call(s)")


@pytest.mark.timeout(150)
def test_scancel_pilot_mid_task(slurm_env):
    """A pilot cancelled while it runs a task: the task runs again on another pilot (the launcher
    replaces the lost one), the run succeeds."""
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import os, pathlib, sys, time
        from depio import Pipeline, SlurmPilotExecutor, Task

        def work(i):
            job = os.environ.get("SLURM_ARRAY_JOB_ID", "") + "_" + os.environ.get("SLURM_ARRAY_TASK_ID", "")
            pathlib.Path(f"started-{i}-{job}").touch()
            time.sleep(6 if i == 0 else 0.5)
            return job

        ex = SlurmPilotExecutor(workers=2, slots=1, folder="slurm", idle_timeout=30,
                                parameters={"slurm_time": 10})
        p = Pipeline(ex, quiet=True)
        tasks = [p.add_task(Task(f"w{i}", work, [i])) for i in range(4)]
        code = p.run()
        for t in tasks:
            print("RAN", t.name, t.result, t.attempts)
        sys.exit(code)
    """))
    proc = popen_script(script, slurm_env)
    try:
        deadline = time.monotonic() + 60
        victim = None
        while time.monotonic() < deadline and victim is None:
            marks = list(slurm_env.glob("started-0-*"))
            if marks:
                victim = marks[0].name.split("-", 2)[2]
            else:
                time.sleep(0.2)
        assert victim, "task 0 never started"
        subprocess.run(["scancel", victim], check=True)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    ran = [line.split() for line in out.splitlines() if line.startswith("RAN")]
    w0 = next(x for x in ran if x[1] == "w0")
    assert w0[2] != victim and int(w0[3]) == 2, (victim, out)     # re-run elsewhere, second attempt
    st = subprocess.run(["squeue", "-h", "-t", "all", "-j", victim, "-o", "%T"], capture_output=True, text=True)
    assert "CANCELLED" in st.stdout, st.stdout


# ---------------------------------------------------------------- Ctrl-C

@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["per-task", "pilot"])
def test_ctrl_c_cancels_every_job(slurm_env, mode):
    executor = ('SubmitItExecutor(folder="slurm", parameters={"slurm_time": 10})' if mode == "per-task" else
                'SlurmPilotExecutor(workers=2, folder="slurm", parameters={"slurm_time": 10})')
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent(f"""
        import pathlib, sys, time
        from depio import Pipeline, SubmitItExecutor, SlurmPilotExecutor, Task

        def slow(i):
            pathlib.Path(f"running-{{i}}").touch()
            time.sleep(120)

        p = Pipeline({executor}, quiet=True)
        for i in range(4):
            p.add_task(Task(f"slow{{i}}", slow, [i]))
        sys.exit(p.run())
    """))
    proc = popen_script(script, slurm_env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(slurm_env.glob("running-*")):
            time.sleep(0.2)
        assert list(slurm_env.glob("running-*")), "no task started"
        ids = _jobs_of(slurm_env / "slurm")
        assert ids
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    r = subprocess.run(["squeue", "-h", "-o", "%F|%i|%T"], capture_output=True, text=True, timeout=30)
    mine = [line for line in r.stdout.splitlines() if line.split("|")[0] in ids]
    assert not mine, (mine, out)                    # nothing of this run is left in Slurm
    assert not r.stdout.strip(), r.stdout           # squeue is empty
    print(f"Ctrl-C ({mode}): pipeline gone {took:.1f} s after SIGINT")


# ---------------------------------------------------------------- Slurm kills a per-task job

@pytest.mark.timeout(120)
def test_per_task_job_killed_by_slurm_fails_with_reason(slurm_env):
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import os, pathlib, sys, time
        from depio import Pipeline, SubmitItExecutor, Task

        def victim():
            pathlib.Path("job-" + os.environ["SLURM_JOB_ID"]).touch()
            time.sleep(120)

        p = Pipeline(SubmitItExecutor(folder="slurm", parameters={"slurm_time": 10}), quiet=False)
        p.add_task(Task("victim", victim))
        sys.exit(p.run())
    """))
    proc = popen_script(script, slurm_env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(slurm_env.glob("job-*")):
            time.sleep(0.2)
        marks = list(slurm_env.glob("job-*"))
        assert marks, "the task never started"
        jid = marks[0].name[4:]
        t0 = time.monotonic()
        subprocess.run(["scancel", jid], check=True)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    assert f"Slurm job {jid} CANCELLED" in out, out
    assert took < 30, took


# ---------------------------------------------------------------- Slurm's time limit (TIMEOUT), per-task mode

def _finish(proc: subprocess.Popen, folder: Path) -> None:
    """Cleanup for a test's pipeline: stop it (by its pid) and cancel the Slurm jobs it created (by id)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if (folder / "slurm").exists():
        ids = sorted(_jobs_of(folder / "slurm"))
        if ids:
            subprocess.run(["scancel"] + ids, capture_output=True, timeout=30)


@pytest.mark.timeout(170)
def test_per_task_job_timeout_fails_with_slurm_reason(slurm_env):
    """A task that outlives its job's `slurm_time: 1` (minute): Slurm kills the job (TIMEOUT, on its
    own tick, OverTimeLimit=0); the task ends FAILED with the Slurm job id and TIMEOUT in its reason,
    is not run again, and the pipeline exits 1."""
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import os, pathlib, sys, time
        from depio import Pipeline, SubmitItExecutor, Task

        def sleeper():
            pathlib.Path("job-" + os.environ["SLURM_JOB_ID"]).touch()
            time.sleep(600)

        p = Pipeline(SubmitItExecutor(folder="slurm", parameters={"slurm_time": 1}), quiet=True)
        t = p.add_task(Task("sleeper", sleeper))
        code = p.run()
        print("STATUS", t.status[0].name, t.attempts, t.slurmid, t.slurmjob_status)
        print("REASON", t.reason)
        print("MESSAGE", (t.error or {}).get("message"))
        sys.exit(code)
    """))
    t0 = time.monotonic()
    proc = popen_script(script, slurm_env)
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        _finish(proc, slurm_env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, out
    marks = list(slurm_env.glob("job-*"))
    assert len(marks) == 1, (marks, out)                      # it ran once: TIMEOUT is not retried
    jid = marks[0].name[4:]
    status = next(line for line in out.splitlines() if line.startswith("STATUS")).split()
    assert status[1] == "FAILED" and status[2] == "1" and status[3] == jid, out
    reason = next(line for line in out.splitlines() if line.startswith("REASON"))
    message = next(line for line in out.splitlines() if line.startswith("MESSAGE"))
    assert f"Slurm job {jid} TIMEOUT" in reason, out
    assert f"Slurm job {jid} TIMEOUT" in message, out
    st = subprocess.run(["squeue", "-h", "-t", "all", "-j", jid, "-o", "%T"], capture_output=True, text=True,
                        timeout=30)
    assert st.stdout.split() == ["TIMEOUT"], st.stdout      # Slurm agrees: its limit ended the job
    assert elapsed > 55, elapsed                              # not before the limit
    print(f"TIMEOUT: task failed {elapsed:.1f} s after the start; {reason}")


# ---------------------------------------------------------------- pilot walltime: leave before the limit, get replaced

def _slurm_seconds(text: str) -> float:
    """squeue's %M ('SS', 'M:SS', 'H:MM:SS', 'D-HH:MM:SS') in seconds."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    secs = 0.0
    for part in text.split(":"):
        secs = secs * 60 + float(part)
    return days * 86400 + secs


@pytest.mark.timeout(170)
def test_pilots_leave_before_walltime_and_are_replaced(slurm_env):
    """Pilots with a 1-minute walltime and a 15 s margin, and ~100 s of 3-second tasks (more than a
    pilot's lifetime on 2 pilots): every pilot leaves on its own before Slurm's limit (none ends
    TIMEOUT), the launcher submits replacements while tasks remain, every task ends FINISHED on its
    first attempt, exit 0."""
    name = f"wall-{os.getpid()}-{int(time.time())}"
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from depio import Pipeline, SlurmPilotExecutor, Task

        def work(i):
            time.sleep(3)
            return i

        ex = SlurmPilotExecutor(workers=2, min_workers=1, max_workers=2, slots=1, walltime=1, margin=15,
                                idle_timeout=20, folder="slurm", parameters={{"slurm_job_name": "{name}"}})
        p = Pipeline(ex, quiet=True)
        tasks = [p.add_task(Task(f"w{{i}}", work, [i])) for i in range(34)]
        code = p.run()
        for t in tasks:
            print("TASK", t.name, t.status[0].name, t.attempts, t.slurmid, t.result)
        sys.exit(code)
    """))
    t0 = time.monotonic()
    proc = popen_script(script, slurm_env)
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        _finish(proc, slurm_env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, out
    rows = [line.split() for line in out.splitlines() if line.startswith("TASK ")]
    assert len(rows) == 34, out
    assert all(r[2] == "FINISHED" and r[5] == r[1][1:] for r in rows), out
    assert all(r[3] == "1" for r in rows), out            # a pilot leaving cleanly loses no task
    q = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i|%T|%M|%l"], capture_output=True,
                       text=True, timeout=30)
    jobs = [line.split("|") for line in q.stdout.split()]
    assert len(jobs) >= 3, (q.stdout, out)                  # 2 pilots, then replacements
    assert len(_jobs_of(slurm_env / "slurm")) >= 2, out     # replacements are new sbatch calls
    states = {j[0]: j[1] for j in jobs}
    assert not [j for j, s in states.items() if s.startswith("TIMEOUT")], states
    assert all(s in ("COMPLETED", "CANCELLED") for s in states.values()), states
    # the first pilots (one job array, the first sbatch) had more work than their walltime: they worked
    # until about `margin` + two tasks before their limit, then left on their own (not at Slurm's warning
    # signal). Replacements may be an array too, when both leave in one turn of the launcher.
    first_array = min(int(j[0].split("_")[0]) for j in jobs)
    first = [j for j in jobs if j[0].startswith(f"{first_array}_")]
    assert len(first) == 2, jobs
    assert all(j[1] == "COMPLETED" and 30 < _slurm_seconds(j[2]) < 60 - 5 for j in first), jobs
    for j in first:
        log_text = "".join(p.read_text() for p in (slurm_env / "slurm").glob(f"{j[0]}_*_log.err"))
        assert "draining: walltime nearly over" in log_text, log_text[-3000:]
    ran_on = {r[4] for r in rows}
    assert len(ran_on) >= 3, ran_on                         # tasks ran on the replacements too
    print(f"pilot walltime: {elapsed:.1f} s, pilot jobs {jobs}")


# ---------------------------------------------------------------- load on the cluster: batched, rate-limited queries

def _slurm_call_logger(folder: Path, log_file: Path) -> Path:
    """A bin directory with squeue/sacct/sbatch/scancel wrappers that log each call (time, command,
    $SLURM_JOB_ID or '-', arguments) and run the real command. Put first on PATH of the pipeline only."""
    import shutil
    bindir = folder / "logbin"
    bindir.mkdir()
    for cmd in ("squeue", "sacct", "sbatch", "scancel"):
        real = shutil.which(cmd)
        if real is None:
            continue
        (bindir / cmd).write_text(
            "#!/bin/sh\n"
            f"printf '%s %s %s %s\\n' \"$(date +%s.%N)\" {cmd} \"${{SLURM_JOB_ID:--}}\" \"$*\" >> '{log_file}'\n"
            f"exec '{real}' \"$@\"\n")
        (bindir / cmd).chmod(0o755)
    return bindir


@pytest.mark.timeout(150)
def test_pilots_ask_slurm_at_most_every_30_s(slurm_env):
    """Load on the cluster: 3 pilots for 300 short tasks on a 2-CPU node (the third pilot stays PENDING
    the whole run, so the launcher has a job to watch): while the tasks run, the pipeline asks
    Slurm (squeue/sacct) at most once per 30 s, batched; sbatch once. Counted by PATH wrappers
    around the real commands, for the pipeline's process tree only."""
    calls = slurm_env / "slurm-calls"
    bindir = _slurm_call_logger(slurm_env, calls)
    # two pilots fit on the node whatever CPUs it advertises (LOCAL_SLURM_CPUS): the third waits
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=30).stdout.split()[0])
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from depio import Pipeline, SlurmPilotExecutor, Task

        class Counting(SlurmPilotExecutor):
            def make_backend(self):
                self.backend = super().make_backend()
                return self.backend

        def work(i):
            time.sleep(0.25)
            return i

        ex = Counting(workers=3, slots=1, idle_timeout=30, folder="slurm",
                      parameters={"slurm_time": 10, "slurm_cpus_per_task": CPUS})
        p = Pipeline(ex, quiet=True)
        tasks = [p.add_task(Task(f"w{i}", work, [i])) for i in range(300)]
        t_start = time.time()
        code = p.run()
        assert all(t.result == i for i, t in enumerate(tasks))
        print("WINDOW", t_start, max(t.end_time for t in tasks), time.time())
        launcher = ex.backend.launcher
        print("COUNTS", ex.backend.slurm_queries, launcher.query.sacct_calls, launcher.sbatch_calls)
        sys.exit(code)
    """).replace("CPUS", str(max(1, cpus // 2))))
    t0 = time.monotonic()
    proc = popen_script(script, slurm_env, env={"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
    try:
        out, _ = proc.communicate(timeout=130)
    finally:
        _finish(proc, slurm_env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, out
    start, last_task_end, end = map(float, next(x for x in out.splitlines() if x.startswith("WINDOW")).split()[1:])
    queries, sacct_calls, sbatch_calls = map(int, next(x for x in out.splitlines() if x.startswith("COUNTS")).split()[1:])
    logged = [line.split(" ", 3) for line in calls.read_text().splitlines()]
    mine = [(float(t), cmd) for t, cmd, job, *_ in logged if job == "-"]     # not from inside the jobs
    by_cmd = {c: [t for t, cmd in mine if cmd == c] for c in ("squeue", "sacct", "sbatch", "scancel")}
    # the wrappers saw what the backend counted: every question is one squeue (+ a sacct for ids
    # squeue no longer knows), one sbatch for the 3 pilots
    assert len(by_cmd["squeue"]) == queries and len(by_cmd["sacct"]) == sacct_calls, (by_cmd, out)
    assert len(by_cmd["sbatch"]) == sbatch_calls == 1, (by_cmd, out)
    run_s = last_task_end - start
    assert run_s > 35, run_s                                   # long enough to see the rate limit
    asks = sorted(t for t, c in mine if c in ("squeue", "sacct"))
    during = [t for t in asks if t <= last_task_end]
    questions = []                                             # a squeue and its sacct are one question
    for t in during:
        if not questions or t - questions[-1] > 2.0:
            questions.append(t)
    assert 1 <= len(questions) <= 1 + run_s / 30, (questions, run_s)   # the pending pilot is watched, rarely
    gaps = [b - a for a, b in zip(questions, questions[1:])]
    assert all(g >= 29 for g in gaps), gaps
    # closing: one scancel and a short, bounded wait until Slurm lists no pilot as running
    closing = [t for t in asks if t > last_task_end]
    assert len(closing) <= 10, closing
    assert len(by_cmd["scancel"]) == 1, by_cmd
    print(f"slurm queries: {len(questions)} in {run_s:.0f} s of work ({len(closing)} while closing), "
          f"{queries} squeue + {sacct_calls} sacct in all, {sbatch_calls} sbatch; {elapsed:.1f} s")
