"""How hard depio's Slurm executors work the controller: sbatch/squeue/sacct/scancel calls and wall time.

Runs three pipelines on the local Slurm (`scripts/local-slurm.sh up`, best with LOCAL_SLURM_CPUS=4
LOCAL_SLURM_GPUS=2) with PATH wrappers that log every Slurm command the pipeline's process runs
(not those run inside the jobs):

- `per-task`: 300 independent tasks with `SubmitItExecutor` (default caps: 20 queued, 45 pending);
- `pilots`:   5,000 tasks on 2 pilots (`SlurmPilotExecutor(workers=2)`), with a key set;
- `gpu`:      GPU tasks (`slurm_gpus_per_task=1`) and CPU tasks on pilots: where each ran, and
              which GPUs it saw (`CUDA_VISIBLE_DEVICES`).

    python scripts/slurm_counts.py [--src DIR] [--only per-task,pilots,gpu] [--tasks 300]

`--src DIR`: run another checkout of depio (e.g. a `git worktree` of an older commit) by putting DIR
first on the pipelines' PYTHONPATH. Prints one line per run and a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List

COMMANDS = ("sbatch", "squeue", "sacct", "scancel")

PER_TASK = """
import sys
from depio import Pipeline, SubmitItExecutor, Task

def work(i):
    return i

p = Pipeline(SubmitItExecutor(folder="slurm", parameters={{"slurm_time": 10, "slurm_mem": 100}}), quiet=True)
tasks = [p.add_task(Task(f"w{{i}}", work, [i])) for i in range({n})]
code = p.run()
print("OK", sum(t.result == i for i, t in enumerate(tasks)))
sys.exit(code)
"""

PILOTS = """
import sys
from depio import Pipeline, SlurmPilotExecutor, Task

def work(i):
    return i

ex = SlurmPilotExecutor(workers=2, slots=1, folder="slurm", idle_timeout=20, parameters={{"slurm_time": 10}})
p = Pipeline(ex, quiet=True)
tasks = [p.add_task(Task(f"w{{i}}", work, [i])) for i in range({n})]
code = p.run()
print("OK", sum(t.result == i for i, t in enumerate(tasks)))
sys.exit(code)
"""

GPU = """
import os, sys, time
from depio import Pipeline, SlurmPilotExecutor, Task
from depio.decorators import task

def where():
    return (os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_JOB_GPUS", ""),
            os.environ.get("CUDA_VISIBLE_DEVICES", ""))

@task("train", slurm_gpus_per_task=1)
def train(i):
    time.sleep(1)
    return where()

@task("prep")
def prep(i):
    time.sleep(0.2)
    return where()

ex = SlurmPilotExecutor(workers=2, slots=2, folder="slurm", idle_timeout=20, parameters={{"slurm_time": 10}})
p = Pipeline(ex, quiet=True)
gpu = [p.add_task(train(i)) for i in range({n})]
cpu = [p.add_task(prep(i)) for i in range(2 * {n})]
code = p.run()
ok = sum(1 for t in gpu if t.result and len(t.result[2].split(",")) == 1 and t.result[2] != "")
print("OK", ok + sum(1 for t in cpu if t.result is not None))
print("GPU_TASKS_WITH_ONE_GPU", ok, "of", len(gpu))
print("GPU_SEEN", sorted({{t.result[2] for t in gpu if t.result}}))
sys.exit(code)
"""


def wrappers(folder: Path, log_file: Path) -> Path:
    """A bin directory whose sbatch/squeue/sacct/scancel log each call, then run the real command."""
    bindir = folder / "countbin"
    bindir.mkdir()
    for cmd in COMMANDS:
        real = shutil.which(cmd)
        if real is None:
            continue
        (bindir / cmd).write_text(
            "#!/bin/sh\n"
            f"printf '%s %s %s\\n' \"$(date +%s.%N)\" {cmd} \"${{SLURM_JOB_ID:--}}\" >> '{log_file}'\n"
            f"exec '{real}' \"$@\"\n")
        (bindir / cmd).chmod(0o755)
    return bindir


def run(name: str, template: str, n: int, src: str, env_extra: Dict[str, str]) -> Dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix=f"slurm-counts-{name}-"))
    log_file = work / "calls.log"
    bindir = wrappers(work, log_file)
    (work / "p.py").write_text(textwrap.dedent(template.format(n=n)))
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", **env_extra)
    env.setdefault("DEPIO_ADDRESS", "127.0.0.1")
    env.setdefault("SBATCH_PARTITION", "debug")
    if src:
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "p.py"], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    calls: List[List[str]] = [line.split() for line in log_file.read_text().splitlines()] if log_file.exists() else []
    mine = [(float(t), cmd) for t, cmd, job in calls if job == "-"]
    counts = {c: sum(1 for _, cmd in mine if cmd == c) for c in COMMANDS}
    sb = sorted(t for t, c in mine if c == "sbatch")
    peak_10s = max((sum(1 for u in sb if t <= u < t + 10) for t in sb), default=0)
    sizes = []
    for sub in (work / "slurm").glob("*_submission.sh"):
        m = re.search(r"--array=0-(\d+)", sub.read_text())
        sizes.append(int(m.group(1)) + 1 if m else 1)
    ok = next((int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("OK ")), 0)
    extra = [line for line in r.stdout.splitlines() if line.startswith("GPU_")]
    out = {"run": name, "tasks": n, "exit": r.returncode, "ok": ok, "wall_s": round(wall, 1), **counts,
           "sbatch_peak_per_10s": peak_10s, "array_sizes": sorted(sizes, reverse=True), "notes": extra}
    if r.returncode != 0:
        out["tail"] = (r.stdout + r.stderr)[-1500:]
    shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="", help="a depio checkout to run instead of the installed one")
    ap.add_argument("--only", default="per-task,pilots,gpu")
    ap.add_argument("--tasks", type=int, default=300, help="per-task run's task count")
    ap.add_argument("--pilot-tasks", type=int, default=5000)
    ap.add_argument("--gpu-tasks", type=int, default=4)
    args = ap.parse_args()
    key_env = {"DEPIO_KEY": os.urandom(32).hex()}
    runs = {"per-task": (PER_TASK, args.tasks, {}), "pilots": (PILOTS, args.pilot_tasks, key_env),
            "gpu": (GPU, args.gpu_tasks, {})}
    results = []
    for name in args.only.split(","):
        template, n, env_extra = runs[name]
        res = run(name, template, n, args.src, env_extra)
        results.append(res)
        print(f"{name}: {n} tasks, exit {res['exit']}, ok {res['ok']}, {res['wall_s']} s, "
              + ", ".join(f"{c} {res[c]}" for c in COMMANDS) + f", sbatch peak {res['sbatch_peak_per_10s']}/10 s, arrays {res['array_sizes']} "
              + " ".join(res["notes"]), flush=True)
        if "tail" in res:
            print(res["tail"], flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
