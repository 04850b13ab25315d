"""End to end with real worker processes on loopback: the README examples, skipping, failures,
output capture, product checks, executors, limits, interruption, and no process left behind."""
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import pytest

from conftest import ROOT, descendants, run_script, wait_for, wait_no_descendants
from depio.Executors import ParallelExecutor, SequentialExecutor
from depio.Pipeline import Pipeline
from depio.Task import Dependency, Product, Task
from depio.TaskStatus import TaskStatus as S

pytestmark = pytest.mark.timeout(120)
EXAMPLES = ROOT / "examples"


# ---------------------------------------------------------------- the original README's examples

@pytest.mark.parametrize("name,rows", [("decorator_demo.py", 2), ("functional_demo.py", 2), ("dag_demo.py", 3)])
def test_readme_examples_run_non_interactively_and_rerun_skips(workdir, name, rows):
    r = run_script(EXAMPLES / name, workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "\033[" not in r.stdout                       # no escape codes into a pipe
    table = r.stdout[r.stdout.rindex("Tasks:"):]
    assert "Slurm ID" in table and "Path Deps." in table and table.rstrip().endswith("All jobs done! Exit.")
    lines = [l for l in table.splitlines()[2:] if l.strip() and not l.startswith("All jobs")]
    assert len(lines) == rows and all("FINISHED" in l for l in lines), table
    if name != "dag_demo.py":
        assert (workdir / "build" / "final1.txt").read_text() == "Hallo from depio"
        again = run_script(EXAMPLES / name, workdir)
        assert again.returncode == 0
        table = again.stdout[again.stdout.rindex("Tasks:"):]
        assert table.count("SKIPPED") == 2 and "FINISHED" not in table


def test_example_as_a_batch_job_without_terminal(workdir):
    """As in a Slurm batch script: no tty, new session, output to a file."""
    out = workdir / "job.log"
    with open(out, "w") as f:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        code = subprocess.run(["setsid", sys.executable, str(EXAMPLES / "functional_demo.py")], cwd=workdir,
                              stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                              timeout=60).returncode
    text = out.read_text()
    assert code == 0 and "functionaldemo2" in text and "All jobs done! Exit." in text


# ---------------------------------------------------------------- failures

FAILING = """
import sys
from depio import Pipeline, Task, ParallelExecutor
def bad(x):
    print("stdout of bad", x)
    print("stderr of bad", file=sys.stderr)
    raise ValueError("boom %s" % x)
def good(x):
    open("good-%s" % x, "w").write("ok")
p = Pipeline(ParallelExecutor(workers=2))
a = p.add_task(Task("bad", bad, [1]))
b = p.add_task(Task("after_bad", good, [2], depends_on=[a]))
c = p.add_task(Task("after_after", good, [3], depends_on=[b]))
d = p.add_task(Task("independent", good, [4]))
e = p.add_task(Task("after_independent", good, [5], depends_on=[d]))
sys.exit(p.run())
"""


def test_failure_report_and_exit_code(workdir):
    script = workdir / "failing.py"
    script.write_text(FAILING)
    r = run_script(script, workdir)
    assert r.returncode == 1
    out = r.stdout
    table = out[out.rindex("Tasks:"):]
    row = {l.split()[1]: l for l in table.splitlines()[1:] if l.strip()[:1].isdigit()}
    assert "FAILED" in row["bad"] and "DEPFAILED" in row["after_bad"] and "DEPFAILED" in row["after_after"]
    assert "FINISHED" in row["independent"] and "FINISHED" in row["after_independent"]
    assert (workdir / "good-5").exists() and not (workdir / "good-2").exists()
    assert "ValueError: boom 1" in out and "Traceback" in out and 'raise ValueError("boom %s" % x)' in out
    assert "stdout of bad 1" in out and "stderr of bad" in out


def noop(i=0):
    return i


def write(out: Annotated[Path, Product], text: str = "x"):
    print("writing", out)
    os.write(1, b"from fd 1\n")
    subprocess.run(["sh", "-c", "echo from a child process >&2"])
    Path(out).write_text(text)


def forget(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):
    print("not writing", out)


def test_output_capture_results_and_product_checks(workdir):
    Path("stale").write_text("old")
    Path("input").touch()
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    w = p.add_task(Task("write", write, [Path("new")]))
    n = p.add_task(Task("noop", noop, [7]))
    missing = p.add_task(Task("not_produced", forget, [Path("never")]))
    stale = p.add_task(Task("not_updated", forget, [Path("stale")], {"inp": Path("input")},
                            buildmode=__import__("depio").BuildMode.ALWAYS))
    assert p.run() == 1
    assert w.status[0] is S.FINISHED and Path("new").read_text() == "x"
    assert "writing new" in w.get_stdout() and "from fd 1" in w.get_stdout()
    assert "from a child process" in w.get_stderr()
    assert n.result == 7
    assert missing.status[0] is S.FAILED and missing.error["kind"] == "ProductNotProducedException"
    assert "never" in missing.reason and "not writing never" in missing.get_stdout()
    assert stale.status[0] is S.FAILED and stale.error["kind"] == "ProductNotUpdatedException"


def say(text: str, i: int = 0):
    if text:
        print(text)
        os.write(2, text.encode() + b"!")


def test_each_task_gets_only_its_own_output_in_one_slot(workdir):
    """One slot, tasks in a row: the capture files are reused, and must hold only the task's own
    output (emptied after a task that printed, left alone after one that did not)."""
    texts = ["a long first line " * 20, "", "", "short", "", "x", ""]
    p = Pipeline(ParallelExecutor(workers=1, slots_per_worker=1), quiet=True)
    tasks = [p.add_task(Task(f"say{i}", say, [text, i])) for i, text in enumerate(texts)]
    assert p.run() == 0
    for t, text in zip(tasks, texts):
        assert t.get_stdout() == (text + "\n" if text else ""), t.name
        assert t.get_stderr() == (text + "!" if text else ""), t.name


def test_dependency_gone_at_run_time(workdir):
    Path("input").touch()

    def remove(x):
        os.remove("input")

    def read(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):
        Path(out).write_text(Path(inp).read_text())
    p = Pipeline(ParallelExecutor(workers=1), quiet=True)
    first = p.add_task(Task("remove", remove, [1]))
    reader = p.add_task(Task("read", read, [Path("o")], {"inp": Path("input")}, depends_on=[first]))
    assert p.run() == 1
    assert reader.error["kind"] == "DependencyNotMetException" and "input" in reader.reason


# ---------------------------------------------------------------- executors

def where(x):
    return os.getpid(), threading.current_thread() is threading.main_thread()


def test_sequential_executor_runs_in_the_main_thread(workdir, capfd):
    p = Pipeline(SequentialExecutor(), quiet=True)
    tasks = [p.add_task(Task(f"t{i}", where, [i])) for i in range(3)]
    assert p.run() == 0
    assert all(t.result == (os.getpid(), True) for t in tasks)


def test_internal_executor_threads_and_processes(workdir):
    with ThreadPoolExecutor(2) as pool:
        p = Pipeline(ParallelExecutor(internal_executor=pool), quiet=True)
        t = p.add_task(Task("t", write, [Path("via_threads")]))
        assert p.run() == 0 and "writing" in t.get_stdout() and Path("via_threads").exists()
    with ProcessPoolExecutor(2) as pool:
        p = Pipeline(ParallelExecutor(internal_executor=pool), quiet=True)
        t = p.add_task(Task("t", write, [Path("via_processes")]))
        u = p.add_task(Task("u", noop, [3]))
        assert p.run() == 0 and "from fd 1" in t.get_stdout() and u.result == 3


def interval(i, sec=0.3):
    start = time.time()
    time.sleep(sec)
    return start, time.time()


def meet(d: str, i: int, bound: float = 30.0):
    """Mark task `i` started, then wait (up to `bound`) until another task has started too: tasks that
    run at the same time overlap however slow the machine or a worker's start; tasks run one after
    the other do not (the first gives up after `bound`)."""
    start = time.time()
    Path(d, f"started{i}").touch()
    deadline = time.monotonic() + bound
    while len(list(Path(d).glob("started*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return start, time.time()


def overlaps(results):
    spans = sorted(results)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_parallel_runs_at_once_and_max_jobs_queued_serialises(workdir):
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    ts = [p.add_task(Task(f"t{i}", meet, [str(workdir), i])) for i in range(4)]
    assert p.run() == 0 and overlaps([t.result for t in ts])
    p = Pipeline(ParallelExecutor(workers=2, max_jobs_queued=1), quiet=True)
    ts = [p.add_task(Task(f"t{i}", interval, [i, 0.1])) for i in range(4)]
    assert p.run() == 0 and not overlaps([t.result for t in ts])


def test_chain_of_1000_and_10000_independent_tasks(workdir, record_property):
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    prev = None
    for i in range(1000):
        prev = p.add_task(Task(f"c{i}", noop, [i], depends_on=[prev] if prev else None))
    t0 = time.monotonic()
    assert p.run() == 0
    record_property("chain1000_ms_per_hop", (time.monotonic() - t0))
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    ts = [p.add_task(Task("n", noop, [i])) for i in range(10_000)]
    t0 = time.monotonic()
    assert p.run() == 0
    record_property("noop10k_tasks_per_s", 10_000 / (time.monotonic() - t0))
    assert all(t.status[0] is S.FINISHED for t in ts) and ts[-1].result == 9999


def test_no_worker_outlives_run(workdir):
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    p.add_task(Task("n", noop, [1]))
    assert p.run() == 0
    assert wait_no_descendants(os.getpid(), 10) == []


def test_all_skipped_run_starts_no_worker(workdir, monkeypatch):
    from depio.runtime.launchers import LocalLauncher
    starts = []
    real_start = LocalLauncher.start
    monkeypatch.setattr(LocalLauncher, "start", lambda self, *a: (starts.append(a), real_start(self, *a)))
    Path("done").touch()
    p = Pipeline(ParallelExecutor(workers=2), quiet=True)
    t = p.add_task(Task("w", write, [Path("done")]))
    assert p.run() == 0 and t.status[0] is S.SKIPPED
    assert starts == []                       # nothing to run: no worker was started
    Path("done").unlink()
    assert p.run() == 0 and t.status[0] is S.FINISHED and len(starts) == 1


# ---------------------------------------------------------------- interruption

SLOW = """
import os, sys, time
from depio import Pipeline, Task, ParallelExecutor
HERE = os.getcwd()
def slow(i):
    open(os.path.join(HERE, f"started{i}"), "w").close()
    time.sleep(60)
p = Pipeline(ParallelExecutor(workers=2))
for i in range(4):
    p.add_task(Task("slow", slow, [i]))
print("started", flush=True)
sys.exit(p.run())
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_cancels_and_leaves_nothing(workdir, sig):
    script = workdir / "slow.py"
    script.write_text(SLOW)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(workdir.glob("started*"))) >= 2, 30, what="a task running on each worker")
        family = descendants(proc.pid)
        assert len(family) >= 4                     # 2 workers + 2 slots
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1, out
        assert time.monotonic() - t0 < 15
        assert "CANCELED" in out
        for pid in family:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] in "ZX"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_long_tasks_go_to_idle_workers_not_into_a_busy_workers_queue(workdir):
    """Two long tasks released together after a short one run at once on two workers (a worker
    that just learned 'tasks are short' must not hoard both). Nothing goes out before both workers
    registered: a second worker that starts late (a loaded machine) is not what this is about."""
    ex = ParallelExecutor(workers=2)
    make_backend = ex.make_backend

    def backend_that_waits_for_both_workers():
        b = make_backend()
        submit = b.submit

        def submit_once_both_are_in(specs, functions):
            b.warm_up()         # the actor waits here; its keep-alive thread lets the workers register
            wait_for(lambda: len(b.dispatcher.workers) >= 2, 30, what="both workers to register")
            submit(specs, functions)
        b.submit = submit_once_both_are_in
        return b

    ex.make_backend = backend_that_waits_for_both_workers
    p = Pipeline(ex, quiet=True)
    first = p.add_task(Task("first", interval, [0, 0.2]))
    a = p.add_task(Task("a", interval, [1, 1.5], depends_on=[first]))
    b = p.add_task(Task("b", interval, [2, 1.5], depends_on=[first]))
    assert p.run() == 0
    assert overlaps([a.result, b.result])


def test_a_run_keeps_the_collector_off_its_tasks_and_gives_the_heap_back(workdir):
    import gc
    seen = []

    def look():
        seen.append(gc.get_freeze_count())

    p = Pipeline(SequentialExecutor(), quiet=True)
    p.add_task(Task("look", look))
    assert p.run() == 0
    assert seen[0] > 0 and gc.get_freeze_count() == 0      # frozen while it ran (the task ran in this process)
    gc.freeze()                                             # someone else's frozen heap is left as it is
    try:
        p = Pipeline(SequentialExecutor(), quiet=True)
        p.add_task(Task("look", look))
        assert p.run() == 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
