"""Dry run and explain: nothing runs, no file is touched, the reasons are right for each build mode."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Annotated

import pytest

from conftest import ROOT, descendants, run_script
from depio import BuildMode, ParallelExecutor, Pipeline, Task
from depio.Task import Dependency, Product


def make(out: Annotated[pathlib.Path, Product], src: Annotated[pathlib.Path, Dependency] = None):
    pathlib.Path("ran.log").open("a").write(f"{out}\n")
    out.write_text("made")


def productless():
    pathlib.Path("ran.log").open("a").write("productless\n")


def _pipeline(workdir):
    """a (missing) -> b IF_NEW (exists) ; c exists (IF_MISSING) -> d IF_NEW (exists) ;
    e ALWAYS (exists); f NEVER (missing); g product-less; h IF_MISSING (exists) after a."""
    for name in ("b", "c", "d", "e", "h"):
        (workdir / f"{name}.txt").write_text("old")
    p = Pipeline(ParallelExecutor(workers=1))
    P = pathlib.Path
    a = p.add_task(Task("a", make, [P("a.txt")]))
    b = p.add_task(Task("b", make, [P("b.txt"), P("a.txt")], buildmode=BuildMode.IF_NEW))
    c = p.add_task(Task("c", make, [P("c.txt")]))
    d = p.add_task(Task("d", make, [P("d.txt"), P("c.txt")], buildmode=BuildMode.IF_NEW))
    e = p.add_task(Task("e", make, [P("e.txt")], buildmode=BuildMode.ALWAYS))
    f = p.add_task(Task("f", make, [P("f.txt")], buildmode=BuildMode.NEVER))
    g = p.add_task(Task("g", productless))
    h = p.add_task(Task("h", make, [P("h.txt"), P("a.txt")]))
    return p, dict(a=a, b=b, c=c, d=d, e=e, f=f, g=g, h=h)


EXPECTED = {
    "a": "product missing: a.txt",
    "b": "an upstream task would run",
    "c": None,
    "d": None,
    "e": "build mode ALWAYS",
    "f": None,
    "g": "declares no products",
    "h": None,
}


def _snapshot(workdir):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.iterdir() if p.is_file()}


@pytest.mark.timeout(60)
def test_explain_reasons_for_each_build_mode(workdir):
    p, _ = _pipeline(workdir)
    got = {t.name: reason for t, reason in p.explain()}
    assert got == EXPECTED


@pytest.mark.timeout(60)
def test_dry_run_runs_nothing_and_touches_nothing(workdir, capsys):
    p, tasks = _pipeline(workdir)
    before = _snapshot(workdir)
    assert p.run(dry_run=True) == 0
    out = capsys.readouterr().out
    assert _snapshot(workdir) == before
    assert not (workdir / "ran.log").exists() and not (workdir / ".depio").exists()
    assert not descendants(os.getpid())                      # no worker was started
    assert "Dry run (nothing is executed)" in out
    assert "8 task(s): 4 would run, 4 would be skipped." in out
    lines = {line.split()[1]: line for line in out.splitlines() if line[:4].strip().isdigit()}
    for name, reason in EXPECTED.items():
        if reason is None:
            assert " skip " in lines[name], lines[name]
        else:
            assert " run " in lines[name] and reason in lines[name], lines[name]
    assert "build mode NEVER" in lines["f"] and "up to date" in lines["c"]
    assert all(t.status[0].name == "WAITING" for t in tasks.values())


@pytest.mark.timeout(120)
def test_real_run_matches_the_dry_run(workdir, capsys):
    p, tasks = _pipeline(workdir)
    assert p.run() == 0
    ran = sorted((workdir / "ran.log").read_text().split())
    assert ran == ["a.txt", "b.txt", "e.txt", "productless"]
    for name, reason in EXPECTED.items():
        t = tasks[name]
        if reason is None:
            assert t.status[0].name == "SKIPPED", name
        else:
            assert t.status[0].name == "FINISHED", name
            assert t.reason == reason.replace("would run", "ran"), (name, t.reason)


SCRIPT = """
import pathlib
from typing import Annotated
from depio import Pipeline, ParallelExecutor, Task, Product

def make(out: Annotated[pathlib.Path, Product]):
    out.write_text("made")

p = Pipeline(ParallelExecutor())
p.add_task(Task("maker", make, [pathlib.Path("out.txt")]))
exit(p.run())
"""


@pytest.mark.timeout(120)
def test_environment_variable_on_an_unchanged_script(workdir):
    s = workdir / "pipe.py"
    s.write_text(SCRIPT)
    r = run_script(s, workdir, env={"DEPIO_DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    assert "maker" in r.stdout and "product missing: out.txt" in r.stdout
    assert not (workdir / "out.txt").exists()
    r = run_script(s, workdir, env={"DEPIO_DRY_RUN": "0"})
    assert r.returncode == 0 and (workdir / "out.txt").read_text() == "made"
    r = run_script(s, workdir, env={"DEPIO_DRY_RUN": "yes"})
    assert "skip" in r.stdout and "up to date" in r.stdout


@pytest.mark.timeout(120)
def test_depio_explain_command(workdir):
    s = workdir / "pipe.py"
    s.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", "import sys; from depio.cli import main; sys.exit(main())",
                        "explain", str(s)], cwd=workdir, capture_output=True, text=True, timeout=100, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "would run" in r.stdout and not (workdir / "out.txt").exists()
