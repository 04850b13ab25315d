"""What a Slurm backend has to say reaches the run's view (issue 15): the orphans of a killed run,
cancelled, and the built-in partition replaced, stay in every frame of the live view (a real
pseudo-terminal) and are in the final summary. Real pipelines on the local Slurm."""
from __future__ import annotations

import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import popen_script, wait_for
from test_display import PtyRun, _frames

pytestmark = pytest.mark.slurm

SCRIPT = """
import os, pathlib, sys, time
from typing import Annotated
from depio import Pipeline, SubmitItExecutor, Product, Task

def work(out: Annotated[pathlib.Path, Product], seconds: float):
    job = os.environ["SLURM_JOB_ID"]
    pathlib.Path(f"start-{out.name}-{job}").write_text(repr(time.time()))
    time.sleep(seconds)
    out.write_text(job)

seconds = float(os.environ.get("TEST_SECONDS", "60"))
# upstream's defaults: partition "gpu", which this cluster does not have
p = Pipeline(SubmitItExecutor(folder="slurm"), quiet=os.environ.get("TEST_QUIET") == "1", refreshrate=0.2,
             name="notices")
for name in ("a", "b"):
    p.add_task(Task(name, work, [pathlib.Path(name + ".out"), seconds]))
sys.exit(p.run())
"""


def _jobs_of(folder: Path) -> list:
    return sorted({p.name.split("_")[0] for p in folder.glob("*_submission.sh")}) if folder.exists() else []


@pytest.fixture
def slurm_env(slurm_cluster, workdir, monkeypatch):
    monkeypatch.setenv("DEPIO_ADDRESS", "127.0.0.1")
    monkeypatch.delenv("SBATCH_PARTITION", raising=False)
    monkeypatch.delenv("DEPIO_KEY", raising=False)
    yield workdir
    ids = _jobs_of(workdir / "slurm")          # only the jobs this test's pipelines submitted
    if ids:
        subprocess.run(["scancel"] + ids, capture_output=True, timeout=30)


@pytest.mark.timeout(200)
def test_orphans_cancelled_and_the_partition_replaced_stay_in_the_live_view_and_the_summary(slurm_env, monkeypatch):
    script = slurm_env / "p.py"
    script.write_text(textwrap.dedent(SCRIPT))
    first = popen_script(script, slurm_env, env={"TEST_QUIET": "1"})
    try:
        wait_for(lambda: len(list(slurm_env.glob("start-*"))) >= 2, 90, "the first run's 2 tasks to start")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    monkeypatch.setenv("TEST_SECONDS", "2")
    run = PtyRun(script, slurm_env)            # the same script in the same folder: its orphans are found
    try:
        code = run.finish(150)
    finally:
        run.close()
    text = run.text
    assert code == 0, text
    orphans, partition = "depio: cancelled 2 Slurm job(s) of an earlier run", "no partition 'gpu'"
    frames = [f.decode("utf-8", "replace") for _, f in _frames(run.out, 0)]
    with_orphans = [i for i, f in enumerate(frames) if orphans in f]
    assert len(with_orphans) >= 3, text                         # said in the view ...
    assert all(orphans in f for f in frames[with_orphans[0]:]), text        # ... and no redraw erases it
    assert all(partition in f for f in frames), text
    final = text[text.rindex("\033[?25h"):]                      # after the live view: the summary
    assert final.count(orphans) == 1 and final.count(partition) == 1, final
    assert final.rstrip().endswith("All jobs done! Exit."), final
