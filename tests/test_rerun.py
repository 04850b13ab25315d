"""Issue 17: IF_CHANGED reruns exactly what changed (code, dependency content, arguments, a helper of
the user's own module) and what is downstream of it; cosmetic edits, a `touch`, and an upstream task
that writes the same bytes again rerun nothing; `depio accept` stops a rerun.

Each run is a fresh process (as a user runs a script), on the in-process executor."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest

from conftest import script_env

pytestmark = pytest.mark.timeout(120)

STEPS = '''from pathlib import Path
from typing import Annotated

from depio import Dependency, Product


def norm(text):
    return text.strip().lower()


def clean(raw: Annotated[Path, Dependency], out: Annotated[Path, Product], scale: float = 1.0):
    out.write_text(norm(raw.read_text()) + f" x{scale}")


def train(data: Annotated[Path, Dependency], model: Annotated[Path, Product], lr: float = 0.1):
    model.write_text(f"model({data.read_text()}, lr={lr})")


def report(model: Annotated[Path, Dependency], out: Annotated[Path, Product]):
    out.write_text("report of " + model.read_text())


def other(out: Annotated[Path, Product]):
    out.write_text("independent")
'''

# the same functions, with comments, blank lines and formatting changed around and inside them
STEPS_COSMETIC = '''"""Steps of the pipeline."""   # a module docstring is not part of any function
from pathlib import Path
from typing import Annotated

from depio import Dependency, Product

# a comment before norm


def norm(  text  ):
    # a comment inside norm
    return (text.strip()
                .lower())



def clean(raw: Annotated[Path, Dependency],
          out: Annotated[Path, Product],
          scale: float = 1.0):   # trailing comment
    out.write_text(norm(raw.read_text())   +   f" x{scale}")


def train(data: Annotated[Path, Dependency], model: Annotated[Path, Product], lr: float = 0.1):

    # blank lines and a comment in the body
    model.write_text(f"model({data.read_text()}, lr={lr})")
def report(model: Annotated[Path, Dependency], out: Annotated[Path, Product]):
    out.write_text("report of "
                   + model.read_text())


def other(out: Annotated[Path, Product]):
    out.write_text('independent')
'''

PIPE = '''import os
import sys
from pathlib import Path

from depio import BuildMode, Pipeline, SequentialExecutor, Task
import steps

mode = BuildMode[os.environ.get("MODE", "IF_CHANGED")]
p = Pipeline(SequentialExecutor(), quiet=True)
p.add_task(Task("clean", steps.clean, [Path("raw.csv"), Path("clean.csv")], buildmode=mode))
p.add_task(Task("train", steps.train, [Path("clean.csv"), Path("model.txt")], {"lr": float(os.environ.get("LR", "0.1"))},
                buildmode=mode))
p.add_task(Task("report", steps.report, [Path("model.txt"), Path("report.txt")], buildmode=mode))
p.add_task(Task("other", steps.other, [Path("other.txt")], buildmode=mode))
code = p.run()
for t in p.tasks:
    print("TASK", t.name, t._status.name, t.reason, sep="\\t")
sys.exit(code)
'''


def run(folder: Path, script: str = "pipe.py", env=None, expect: int = 0) -> Dict[str, Tuple[str, str]]:
    """Run a pipeline script; {task name: (status, reason)}."""
    r = subprocess.run([sys.executable, script], cwd=folder, capture_output=True, text=True, timeout=100,
                       env=script_env(env), stdin=subprocess.DEVNULL)
    assert r.returncode == expect, r.stdout + r.stderr
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("TASK\t"):
            _, name, status, reason = line.split("\t", 3)
            out[name] = (status, reason)
    return out


def depio(folder: Path, *args: str, expect: int = 0) -> str:
    r = subprocess.run([sys.executable, "-m", "depio.cli", *args], cwd=folder, capture_output=True, text=True,
                       timeout=100, env=script_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == expect, r.stdout + r.stderr
    return r.stdout + r.stderr


def def_line(source: str, name: str) -> int:
    return next(i for i, x in enumerate(source.splitlines(), 1) if x.startswith(f"def {name}("))


def ran(result: Dict[str, Tuple[str, str]]) -> set:
    return {name for name, (status, _) in result.items() if status == "FINISHED"}


@pytest.fixture
def made(workdir):
    """The four-task pipeline, run once: everything made and recorded."""
    (workdir / "steps.py").write_text(STEPS)
    (workdir / "pipe.py").write_text(PIPE)
    (workdir / "raw.csv").write_text(" A,B \n")
    assert ran(run(workdir)) == {"clean", "train", "report", "other"}
    assert ran(run(workdir)) == set()
    return workdir


def test_cosmetic_edits_rerun_nothing(made):
    (made / "steps.py").write_text(STEPS_COSMETIC)
    result = run(made)
    assert ran(result) == set(), result
    assert all(status == "SKIPPED" and reason == "up to date" for status, reason in result.values())


def test_a_changed_function_reruns_it_and_downstream(made):
    (made / "steps.py").write_text(STEPS.replace('f"model({data.read_text()}, lr={lr})"',
                                                 'f"model2({data.read_text()}, lr={lr})"'))
    result = run(made)
    assert ran(result) == {"train", "report"}
    assert result["train"][1] == f"code of train changed (steps.py, def at line {def_line(STEPS, 'train')})"
    assert result["report"][1] == "dependency model.txt changed"
    assert ran(run(made)) == set()


def test_a_changed_helper_of_the_users_module_reruns_its_callers(made):
    (made / "steps.py").write_text(STEPS.replace("return text.strip().lower()", "return text.strip().upper()"))
    result = run(made)
    assert ran(result) == {"clean", "train", "report"}
    assert result["clean"][1] == (f"code of clean changed: it calls norm (steps.py, def at line "
                                  f"{def_line(STEPS, 'norm')}), which changed")


def test_a_touch_is_not_a_change_but_new_content_is(made):
    raw = made / "raw.csv"
    st = raw.stat()
    import os
    os.utime(raw, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert ran(run(made)) == set()
    raw.write_text(" A,B,C \n")
    result = run(made)
    assert ran(result) == {"clean", "train", "report"}
    assert result["clean"][1] == "dependency raw.csv changed"


def test_a_changed_argument_reruns_the_task_and_downstream(made):
    result = run(made, env={"LR": "0.01"})
    assert ran(result) == {"train", "report"}
    assert result["train"][1] == "argument lr: 0.1 -> 0.01"


def test_an_upstream_task_writing_the_same_bytes_does_not_rerun_downstream(made):
    # clean reruns (its code changed) but writes the same bytes: train and report stay up to date
    (made / "steps.py").write_text(STEPS.replace("out.write_text(norm(raw.read_text()) + f\" x{scale}\")",
                                                 "text = norm(raw.read_text())\n    out.write_text(text + f\" x{scale}\")"))
    result = run(made)
    assert ran(result) == {"clean"}
    assert result["train"] == ("SKIPPED", "up to date")


def test_accept_stops_a_rerun(made):
    (made / "steps.py").write_text(STEPS.replace('"independent"', '"independent!"'))
    plan = depio(made, "explain", "pipe.py")
    assert "code of other changed" in plan
    out = depio(made, "accept", "pipe.py", "other")
    assert f"accepted other (#4): code of other changed (steps.py, def at line {def_line(STEPS, 'other')})" in out, out
    assert ran(run(made)) == set()


def test_a_product_without_a_record_runs_unless_accepted(workdir):
    (workdir / "steps.py").write_text(STEPS)
    (workdir / "pipe.py").write_text(PIPE)
    (workdir / "raw.csv").write_text("a\n")
    for name in ("clean.csv", "model.txt", "report.txt", "other.txt"):     # made by hand
        (workdir / name).write_text("by hand")
    assert "no record of how other.txt was made" in depio(workdir, "explain", "pipe.py")
    out = depio(workdir, "accept", "pipe.py")
    assert "4 of 4 task(s) accepted" in out and "no record of how clean.csv was made" in out
    assert ran(run(workdir)) == set()
    assert (workdir / "model.txt").read_text() == "by hand"


def test_the_default_mode_is_unchanged_and_records_what_it_made(made):
    (made / "steps.py").write_text(STEPS.replace('"independent"', '"independent!"'))
    assert ran(run(made, env={"MODE": "IF_MISSING"})) == set()        # IF_MISSING: products exist
    result = run(made)                                                  # IF_CHANGED sees the edit
    assert ran(result) == {"other"}


def test_a_rerun_that_failed_is_not_up_to_date(made):
    # train is made; an edit makes it write its product and then fail: the old record must not count
    broken = STEPS.replace('    model.write_text(f"model({data.read_text()}, lr={lr})")',
                           '    model.write_text("half")\n    raise RuntimeError("boom")')
    (made / "steps.py").write_text(broken)
    result = run(made, expect=1)
    assert result["train"][0] == "FAILED" and result["report"][0] == "DEPFAILED"
    (made / "steps.py").write_text(STEPS)       # the edit undone: code as recorded, product not
    result = run(made)
    assert ran(result) == {"train"}
    assert result["train"][1] == "product model.txt changed since it was made"
