"""Issue 17: the fork's modes (IF_OLDER, IF_OLD, IF_CODE_CHANGED, `track_code`, `max_age`) with its
meanings (../shared/docs/fork-api.md sections 1 and 2) decided from the state store, without the
behaviours the fork doc lists as not worth copying; `resources`; the store switched off."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Callable

import pytest

from depio import BuildMode, Dependency, Pipeline, Product, SequentialExecutor, Task, task

pytestmark = pytest.mark.timeout(60)


def writer(text: str) -> Callable:
    """A new function object writing `text` (another text: another code hash, as after an edit)."""
    ns = {"Annotated": Annotated, "Path": Path, "Product": Product, "Dependency": Dependency}
    exec(compile(f"def step(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):\n"
                 f"    out.write_text({text!r})\n", "steps.py", "exec"), ns)
    return ns["step"]


def run(*tasks: Task) -> dict:
    p = Pipeline(SequentialExecutor(), quiet=True)
    for t in tasks:
        p.add_task(t)
    assert p.run() == 0
    return {t.name: (t._status.name, t.reason) for t in p.tasks}


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_build_mode_members_keep_the_0_1_order_then_the_forks():
    assert [m.name for m in BuildMode] == ["NEVER", "IF_MISSING", "ALWAYS", "IF_NEW", "IF_OLDER", "IF_OLD",
                                           "IF_CODE_CHANGED", "IF_CHANGED"]
    assert [BuildMode.NEVER.value, BuildMode.IF_MISSING.value, BuildMode.ALWAYS.value, BuildMode.IF_NEW.value] == \
        [0, 1, 2, 3]
    assert Task("t", writer("x"), [Path("o")]).buildmode is BuildMode.IF_MISSING


def test_if_older_is_makes_timestamp_rule(workdir):
    inp, out = Path("in.txt"), Path("out.txt")
    inp.write_text("1")
    f = writer("made")
    assert run(Task("t", f, [out, inp], buildmode=BuildMode.IF_OLDER))["t"][0] == "FINISHED"
    age(inp, 100)
    assert run(Task("t", f, [out, inp], buildmode=BuildMode.IF_OLDER))["t"] == ("SKIPPED", "up to date")
    age(out, 200)
    assert run(Task("t", f, [out, inp], buildmode=BuildMode.IF_OLDER))["t"] == \
        ("FINISHED", "product out.txt is older than its input in.txt")


def test_if_older_counts_upstream_products_and_a_task_without_products_runs(workdir):
    up = Task("up", writer("u"), [Path("u.txt")], buildmode=BuildMode.ALWAYS)
    down = Task("down", writer("d"), [Path("d.txt"), Path("u.txt")], buildmode=BuildMode.IF_OLDER)
    run(up, down)
    result = run(Task("up", writer("u"), [Path("u.txt")], buildmode=BuildMode.ALWAYS),
                 Task("down", writer("d"), [Path("d.txt"), Path("u.txt")], buildmode=BuildMode.IF_OLDER))
    assert result["down"][0] == "FINISHED"
    noprod = Task("noprod", lambda inp: None, [Path("u.txt")], buildmode=BuildMode.IF_OLDER)
    assert run(noprod)["noprod"] == ("FINISHED", "declares no products")     # the fork crashes here


def test_if_old_reruns_a_product_older_than_max_age(workdir):
    out = Path("out.txt")
    f = writer("made")
    assert run(Task("t", f, [out], buildmode=BuildMode.IF_OLD, max_age=60))["t"][0] == "FINISHED"
    assert run(Task("t", f, [out], buildmode=BuildMode.IF_OLD, max_age=60))["t"] == ("SKIPPED", "up to date")
    age(out, 120)
    assert run(Task("t", f, [out], buildmode=BuildMode.IF_OLD, max_age=60))["t"] == \
        ("FINISHED", "product out.txt is older than max_age (60 s)")
    with pytest.raises(ValueError, match="max_age"):
        Task("t", f, [out], buildmode=BuildMode.IF_OLD)
    late = Task("t", f, [out])
    late.buildmode = BuildMode.IF_OLD          # set afterwards without max_age: the decision says why
    p = Pipeline(SequentialExecutor(), quiet=True)
    p.add_task(late)
    assert p.run() == 1 and "IF_OLD needs max_age" in late.reason


def test_if_code_changed_reruns_on_code_only(workdir):
    inp, out = Path("in.txt"), Path("out.txt")
    inp.write_text("1")
    f = writer("v1")
    out.write_text("made by hand")
    assert run(Task("t", f, [out, inp], buildmode=BuildMode.IF_CODE_CHANGED))["t"] == \
        ("FINISHED", "no record of how out.txt was made")               # an unseen task counts as changed
    assert run(Task("t", f, [out, inp], buildmode=BuildMode.IF_CODE_CHANGED))["t"][0] == "SKIPPED"
    inp.write_text("2")                                                 # data: not this mode's business
    assert run(Task("t", f, [out, inp], buildmode=BuildMode.IF_CODE_CHANGED))["t"][0] == "SKIPPED"
    result = run(Task("t", writer("v2"), [out, inp], buildmode=BuildMode.IF_CODE_CHANGED))
    assert result["t"] == ("FINISHED", "code of step changed (steps.py, def at line 1)")
    out.unlink()                                                        # a missing product still runs it
    assert run(Task("t", writer("v2"), [out, inp], buildmode=BuildMode.IF_CODE_CHANGED))["t"][0] == "FINISHED"


def test_if_code_changed_without_products_runs_when_its_code_changed(workdir):
    calls = []

    def noprod(x):
        calls.append(x)
    assert run(Task("n", noprod, [1], buildmode=BuildMode.IF_CODE_CHANGED))["n"][0] == "FINISHED"
    assert run(Task("n", noprod, [1], buildmode=BuildMode.IF_CODE_CHANGED))["n"][0] == "SKIPPED"
    assert calls == [1]


def test_track_code_adds_the_code_rule_to_any_mode(workdir):
    inp, out = Path("in.txt"), Path("out.txt")
    inp.write_text("1")
    run(Task("t", writer("v1"), [out, inp], track_code=True))
    inp.write_text("2")
    assert run(Task("t", writer("v1"), [out, inp], track_code=True))["t"][0] == "SKIPPED"   # IF_MISSING's rule
    assert run(Task("t", writer("v2"), [out, inp], track_code=True))["t"][0] == "FINISHED"

    @task("deco", track_code=True, max_age=5)
    def deco(out: Annotated[Path, Product]):
        out.write_text("d")
    t = deco(Path("d.txt"))
    assert t.track_code is True and t.max_age == 5.0 and t.buildmode is BuildMode.IF_MISSING
    assert Task("x", writer("v"), [out]).track_code is False


def test_upstream_runs_propagate_to_the_forks_modes_but_not_to_never_or_if_missing(workdir):
    for name in ("a", "b", "c", "d"):
        Path(f"{name}.txt").write_text(name)
    up = Task("up", writer("u"), [Path("u.txt")], buildmode=BuildMode.ALWAYS)
    code = Task("code", writer("c"), [Path("c.txt"), Path("u.txt")], buildmode=BuildMode.IF_CODE_CHANGED)
    run(up, code)
    result = run(Task("up", writer("u"), [Path("u.txt")], buildmode=BuildMode.ALWAYS),
                 Task("code", writer("c"), [Path("c.txt"), Path("u.txt")], buildmode=BuildMode.IF_CODE_CHANGED),
                 Task("never", writer("n"), [Path("a.txt"), Path("u.txt")], buildmode=BuildMode.NEVER),
                 Task("missing", writer("m"), [Path("b.txt"), Path("u.txt")]),
                 Task("old", writer("o"), [Path("d.txt"), Path("u.txt")], buildmode=BuildMode.IF_OLD, max_age=3600))
    assert result["code"] == ("FINISHED", "an upstream task ran")
    assert result["old"] == ("FINISHED", "an upstream task ran")
    assert result["never"] == ("SKIPPED", "build mode NEVER")          # the fork runs it: not copied
    assert result["missing"] == ("SKIPPED", "up to date")               # 0.1.x's IF_MISSING


def test_resources_are_stored_and_not_part_of_identity(workdir):
    f = writer("x")
    a = Task("a", f, [Path("o.txt")], resources={"gpus": 1})
    b = Task("b", f, [Path("o.txt")])
    assert a.resources == {"gpus": 1} and b.resources is None
    assert a == b and hash(a) == hash(b)
    p = Pipeline(None, quiet=True)
    assert p.add_task(a) is p.add_task(b)


def test_explain_names_the_trigger_and_runs_nothing(workdir):
    inp, out = Path("in.txt"), Path("out.txt")
    inp.write_text("1")
    run(Task("t", writer("v1"), [out, inp], buildmode=BuildMode.IF_CHANGED))
    inp.write_text("2")
    p = Pipeline(None, quiet=True)
    t = p.add_task(Task("t", writer("v1"), [out, inp], buildmode=BuildMode.IF_CHANGED))
    assert p.explain() == [(t, "dependency in.txt changed")] and t.reason == "dependency in.txt changed"
    assert out.read_text() == "v1"


def test_with_the_store_off_the_store_modes_decide_as_if_missing(workdir, monkeypatch):
    monkeypatch.setenv("DEPIO_STATE", "off")
    out = Path("out.txt")
    out.write_text("by hand")
    assert run(Task("t", writer("v1"), [out], buildmode=BuildMode.IF_CHANGED))["t"] == ("SKIPPED", "up to date")
    assert run(Task("c", writer("v1"), [out], buildmode=BuildMode.IF_CODE_CHANGED))["c"][0] == "SKIPPED"
    assert not Path(".depio", "state.sqlite").exists()
