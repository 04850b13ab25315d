"""Issue 17 with real processes: run history (workers, hosts, attempts, reasons) and its report in a
headless browser, two pipelines in one folder at once, a pipeline killed with SIGKILL mid-run, and
IF_CHANGED chains on workers (a task in IF_CHANGED is never handed out as a follower)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from depio import BuildMode, TaskStatus
from depio.runtime.followers import Followers
from depio.state import StateStore

from conftest import script_env, wait_for
from test_rerun import depio, run
from test_state_report import _open, browser  # noqa: F401  (the headless-browser fixture)

pytestmark = pytest.mark.timeout(120)

HEADER = '''import os, sys, time
from pathlib import Path
from typing import Annotated
from depio import BuildMode, Dependency, ParallelExecutor, Pipeline, Product, Task


def write(out: Annotated[Path, Product], text: str, inp: Annotated[Path, Dependency] = None):
    out.write_text(text if inp is None else text + inp.read_text())


def wait_for_file(name, deadline=90):
    end = time.time() + deadline
    while not Path(name).exists():
        if time.time() > end:
            raise TimeoutError(name)
        time.sleep(0.02)


def report(p):
    for t in p.tasks:
        print("TASK", t.name, t._status.name, t.reason, sep="\\t")
'''


def made_count(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT COUNT(*) FROM made").fetchone()[0]
    except sqlite3.OperationalError:      # the tables are not there yet
        return 0
    finally:
        con.close()


def integrity(db: Path) -> str:
    con = sqlite3.connect(str(db), timeout=30)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def test_history_and_report_of_a_real_run(workdir, browser):  # noqa: F811
    (workdir / "pipe.py").write_text(HEADER + '''
def fail(out: Annotated[Path, Product]):
    print("about to fail", file=sys.stderr)
    raise ValueError("broken on purpose")


p = Pipeline(ParallelExecutor(workers=2), quiet=True)
a = p.add_task(Task("a", write, [Path("a.txt"), "A"], buildmode=BuildMode.IF_CHANGED))
p.add_task(Task("b", write, [Path("b.txt"), "B", Path("a.txt")], buildmode=BuildMode.IF_CHANGED))
p.add_task(Task("c", write, [Path("c.txt"), "C"]))
p.add_task(Task("bad", fail, [Path("bad.txt")]))
p.add_task(Task("after", write, [Path("after.txt"), "x", Path("bad.txt")]))
code = p.run()
report(p)
sys.exit(code)
''')
    run(workdir, expect=1)
    with StateStore(workdir / ".depio" / "state.sqlite") as store:
        (r,) = store.runs()
        tasks = {t.name: t for t in store.run_tasks(r["id"])}
    assert r["counts"] == {"FINISHED": 3, "FAILED": 1, "DEPFAILED": 1} and r["end"] is not None
    assert r["script"].endswith("pipe.py") and r["log_dir"].endswith(r["id"])
    assert {n: t.status for n, t in tasks.items()} == {"a": "FINISHED", "b": "FINISHED", "c": "FINISHED",
                                                       "bad": "FAILED", "after": "DEPFAILED"}
    for name in ("a", "b", "c", "bad"):
        t = tasks[name]
        assert t.worker and t.host and t.attempts == 1 and t.start <= t.end, t
    assert tasks["a"].reason == "product missing: a.txt" and tasks["after"].reason == "dependency bad (#4) failed"
    assert "broken on purpose" in tasks["bad"].reason
    assert r["id"] in depio(workdir, "runs")
    out = depio(workdir, "report", "-o", "report.html")
    assert "wrote report.html" in out
    _open(browser, workdir / "report.html")
    assert browser.execute_script("return document.querySelectorAll('svg rect.bar').length") == 4   # ran: 4
    failures = browser.execute_script("return Array.from(document.querySelectorAll('.failure'), f => f.innerText)")
    assert len(failures) == 1 and "bad" in failures[0] and "about to fail" in failures[0]


def test_two_pipelines_in_one_folder_at_once(workdir):
    for me, other in (("one", "two"), ("two", "one")):
        (workdir / f"{me}.py").write_text(HEADER + f'''
def meet(out: Annotated[Path, Product]):
    Path("{me}.here").write_text("")        # both pipelines are running tasks at the same time
    wait_for_file("{other}.here")
    out.write_text("met")


p = Pipeline(ParallelExecutor(workers=2), quiet=True)
p.add_task(Task("meet", meet, [Path("{me}-meet.txt")], buildmode=BuildMode.IF_CHANGED))
for i in range(300):
    p.add_task(Task("w", write, [Path("{me}-%d.txt" % i), str(i)], buildmode=BuildMode.IF_CHANGED))
code = p.run()
report(p)
sys.exit(code)
''')
    procs = [subprocess.Popen([sys.executable, f"{n}.py"], cwd=workdir, env=script_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL) for n in ("one", "two")]
    outs = [p.communicate(timeout=110)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    db = workdir / ".depio" / "state.sqlite"
    assert integrity(db) == "ok", outs
    assert made_count(db) == 602, outs
    with StateStore(db) as store:
        runs = store.runs()
        assert len(runs) == 2 and all(r["counts"] == {"FINISHED": 301} for r in runs)
        assert sorted(len(store.run_tasks(r["id"])) for r in runs) == [301, 301]
    for name in ("one.py", "two.py"):     # each sees all of its own tasks up to date
        assert {s for s, _ in run(workdir, name).values()} == {"SKIPPED"}


def test_a_pipeline_killed_mid_run_leaves_the_store_consistent(workdir):
    (workdir / "pipe.py").write_text(HEADER + '''
def block(out: Annotated[Path, Product], inp: Annotated[Path, Dependency]):
    out.write_text("half")                  # a product half written when the pipeline dies
    Path("blocking").write_text("")
    wait_for_file("release")
    out.write_text("full")


p = Pipeline(ParallelExecutor(workers=1), quiet=True)
p.add_task(Task("first", write, [Path("first.txt"), "1"], buildmode=BuildMode.IF_CHANGED))
p.add_task(Task("block", block, [Path("block.txt"), Path("first.txt")], buildmode=BuildMode.IF_CHANGED))
code = p.run()
report(p)
sys.exit(code)
''')
    db = workdir / ".depio" / "state.sqlite"
    proc = subprocess.Popen([sys.executable, "pipe.py"], cwd=workdir, env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (workdir / "blocking").exists(), 60, "the blocking task to start")
        wait_for(lambda: made_count(db) == 1, 60, "the first task to be recorded")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert integrity(db) == "ok" and made_count(db) == 1          # block never ended: not recorded as made
    with StateStore(db) as store:
        (r,) = store.runs()
        assert r["end"] is None
    (workdir / "release").write_text("")
    result = run(workdir)
    assert result["first"] == ("SKIPPED", "up to date")
    assert result["block"] == ("FINISHED", "no record of how block.txt was made")
    assert (workdir / "block.txt").read_text() == "full"


def test_if_changed_chains_on_workers(workdir):
    (workdir / "pipe.py").write_text(HEADER + '''
p = Pipeline(ParallelExecutor(workers=2), quiet=True)
prev = p.add_task(Task("head", write, [Path("0.txt"), os.environ.get("HEAD", "h")], buildmode=BuildMode.ALWAYS))
for i in range(1, 30):
    prev = p.add_task(Task("link%d" % i, write, [Path("%d.txt" % i), "+", Path("%d.txt" % (i - 1))],
                           buildmode=BuildMode.IF_CHANGED))
code = p.run()
report(p)
sys.exit(code)
''')
    assert {s for s, _ in run(workdir).values()} == {"FINISHED"}
    result = run(workdir)                 # head runs again and writes the same bytes: nothing downstream
    assert result.pop("head")[0] == "FINISHED" and {s for s, _ in result.values()} == {"SKIPPED"}
    result = run(workdir, env={"HEAD": "H"})
    assert {s for s, _ in result.values()} == {"FINISHED"}
    assert result["link5"][1] == "dependency 4.txt changed"
    assert (workdir / "29.txt").read_text() == "+" * 29 + "H"


def test_a_task_in_if_changed_is_never_made_a_follower():
    modes = [BuildMode.IF_MISSING, BuildMode.IF_CHANGED, BuildMode.IF_MISSING]
    tasks = [SimpleNamespace(buildmode=m, products=[], reason="", track_code=False, _state=None, label=f"t{i}",
                             task_dependencies=[], run_reason=lambda ran: "declares no products")
             for i, m in enumerate(modes)]
    status = [TaskStatus.PENDING, TaskStatus.WAITING, TaskStatus.WAITING]
    fl = Followers(3, tasks, [[1, 2], [], []], status, [0, 1, 1])
    assert fl.next_follower(0) == 2
