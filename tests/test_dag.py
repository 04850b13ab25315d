"""Building and validating the DAG: dedup, products, missing inputs, cycles, pickling (no processes)."""
import threading
from pathlib import Path
from typing import Annotated

import pytest

from depio.Pipeline import Pipeline
from depio.Task import Dependency, Product, Task
from depio.exceptions import (CyclicDependencyException, DependencyNotAvailableException,
                              ProductAlreadyRegisteredException, TaskNotInQueueException,
                              TaskNotPicklableException)
from depio.decorators import task

pytestmark = pytest.mark.timeout(60)


def step(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None, n: int = 0):
    out.write_text(str(n))


def test_add_task_returns_the_earlier_equal_task():
    p = Pipeline(None, False, quiet=True)
    a = p.add_task(Task("one", step, [Path("a")]))
    b = p.add_task(Task("two", step, [Path("a")]))
    assert a is b and len(p.tasks) == 1 and a.name == "one"


def test_product_claimed_twice_names_both_tasks():
    p = Pipeline(None, False, quiet=True)
    p.add_task(Task("first", step, [Path("a")], {"n": 1}))
    with pytest.raises(ProductAlreadyRegisteredException) as e:
        p.add_task(Task("second", step, [Path("./a")], {"n": 2}))
    assert "second" in str(e.value) and "first" in str(e.value) and "'out'" in str(e.value)


def test_depends_on_unregistered_task():
    p = Pipeline(None, False, quiet=True)
    stray = Task("stray", step, [Path("s")])
    with pytest.raises(TaskNotInQueueException) as e:
        p.add_task(Task("t", step, [Path("t")], depends_on=[stray]))
    assert "stray" in str(e.value)


def test_solve_order_fills_upstream_attributes(workdir):
    p = Pipeline(None, False, quiet=True)
    Path("input").touch()
    a = p.add_task(Task("a", step, [Path("a")], {"inp": Path("input")}))
    b = p.add_task(Task("b", step, [Path("b")], {"inp": Path("a")}))
    c = p.add_task(Task("c", step, [Path("c")], depends_on=[b]))
    p._solve_order()
    assert b.task_dependencies == [a] and b.path_dependencies == [Path("a")]
    assert a.dependent_tasks == [b] and b.dependent_tasks == [c]
    assert a.task_dependencies == [] and a.path_dependencies == [Path("input")]


def test_missing_input_names_task_and_argument(workdir):
    p = Pipeline(None, False, quiet=True)
    p.add_task(Task("needs", step, [Path("o")], {"inp": Path("nowhere.txt")}))
    with pytest.raises(DependencyNotAvailableException) as e:
        p.run()
    msg = str(e.value)
    assert "needs" in msg and "'inp'" in msg and "nowhere.txt" in msg


def test_cycle_is_reported_with_its_tasks(workdir):
    p = Pipeline(None, False, quiet=True)
    p.add_task(Task("x", step, [Path("x")], {"inp": Path("y")}))
    p.add_task(Task("y", step, [Path("y")], {"inp": Path("x")}))
    with pytest.raises(CyclicDependencyException) as e:
        p.run()
    assert "x (#1)" in str(e.value) and "y (#2)" in str(e.value)


def test_unpicklable_argument_named_before_anything_runs(workdir):
    def f(out: Annotated[Path, Product], lock=None):
        out.touch()
    p = Pipeline(None, False, quiet=True)
    p.add_task(Task("locked", f, [Path("o")], {"lock": threading.Lock()}))
    before = threading.active_count()
    with pytest.raises(TaskNotPicklableException) as e:
        p.run()
    assert "locked" in str(e.value) and "'lock'" in str(e.value)
    assert not Path("o").exists() and threading.active_count() == before


def test_unpicklable_function_named(workdir):
    class Bad:
        def __reduce__(self):
            raise TypeError("no pickling here")

        def __call__(self):
            pass
    p = Pipeline(None, False, quiet=True)
    p.add_task(Task("badfunc", Bad()))
    with pytest.raises(TaskNotPicklableException) as e:
        p.run()
    assert "badfunc" in str(e.value)


@task("big")
def big(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):
    pass


def test_100k_tasks_build_and_resolve_without_quadratic_cost(workdir):
    """Not a timing test: quadratic cost would take minutes here; the timeout catches it."""
    p = Pipeline(None, False, quiet=True)
    Path("root").touch()
    prev = Path("root")
    for i in range(100_000):
        out = Path(f"f{i}")
        p.add_task(big(out, inp=prev if i % 10 else Path("root")))
        prev = out
    assert len(p.tasks) == 100_000
    g = p._solve_order()
    assert len(g) == 100_000 and sum(len(d) for d in g.deps) == 90_000


def test_acyclic_shortcut_only_when_every_edge_points_back(workdir):
    """resolve() skips Kahn's algorithm when every task depends only on tasks registered before it;
    a consumer registered before its producer (an edge forwards) must still be checked."""
    from depio.runtime.graph import check_acyclic
    p = Pipeline(None, False, quiet=True)
    Path("root").touch()
    p.add_task(Task("late-consumer", step, [Path("c")], {"inp": Path("m")}))   # edge to a later task
    p.add_task(Task("middle", step, [Path("m")], {"inp": Path("root")}))
    p.add_task(Task("after", step, [Path("z")], {"inp": Path("c")}))
    g = p._solve_order()
    assert g.deps == [(1,), (), (0,)]
    check_acyclic(g)                                    # the long way agrees: no cycle
    p.add_task(Task("closes-loop", step, [Path("root2")], {"inp": Path("z")}))
    p.add_task(Task("m-again", step, [Path("m2")], {"inp": Path("root2")}))
    p.tasks[1].dependencies.append(Path("m2"))          # middle <- m-again <- closes-loop <- after <- c <- middle
    with pytest.raises(CyclicDependencyException):
        p._solve_order()


@pytest.mark.parametrize("enabled", [True, False])
def test_resolve_leaves_the_garbage_collector_as_it_found_it(workdir, enabled):
    """resolve pauses the cyclic collector for its bulk work; it must restore the user's setting,
    also when it raises (a missing input)."""
    import gc
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        p = Pipeline(None, quiet=True)
        p.add_task(Task("ok", step, [Path("a")]))
        p._solve_order()
        assert gc.isenabled() is enabled
        p.add_task(Task("needs", step, [Path("b")], {"inp": Path("nowhere.txt")}))
        with pytest.raises(DependencyNotAvailableException):
            p._solve_order()
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
