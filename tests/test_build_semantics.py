"""What the fast paths of building a pipeline must keep: the 0.1.x list attributes, dedup through the
positional hash, and resolve's lookup of registered tasks by their place (no processes)."""
import copy
import pickle
from pathlib import Path
from typing import Annotated, List

import pytest

from depio.Pipeline import Pipeline
from depio.Task import Dependency, IgnoredForEq, Product, Task
from depio.decorators import task
from depio.exceptions import (CyclicDependencyException, DependencyNotAvailableException,
                              ProductAlreadyRegisteredException, TaskNotInQueueException)

pytestmark = pytest.mark.timeout(60)


def step(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None, n: int = 0):
    out.write_text(str(n))


def many(outs: Annotated[List[Path], Product], ins: Annotated[List[Path], Dependency] = None):
    pass


def quiet_step(out: Annotated[Path, Product], verbose: Annotated[bool, IgnoredForEq] = False):
    pass


def with_default(n: int, out: Annotated[Path, Product] = Path("dflt.txt"),
                 inp: Annotated[Path, Dependency] = Path("dflt-in.txt")):
    pass


LIST_ATTRIBUTES = ("products", "dependencies", "dependent_tasks", "task_dependencies", "path_dependencies")


def test_list_attributes_are_lists_before_and_after_resolve(workdir):
    Path("in").touch()
    p = Pipeline(None, False, quiet=True)
    a = p.add_task(Task("a", step, [Path("a")], {"inp": Path("in")}))
    b = p.add_task(Task("b", step, [Path("b")], {"inp": Path("a")}))
    leaf = p.add_task(Task("leaf", step, [Path("c")]))
    for t in (a, b, leaf):
        assert type(t.products) is list and type(t.dependencies) is list and type(t.dependent_tasks) is list
        assert t.task_dependencies is None and t.path_dependencies is None    # not resolved yet
    p._solve_order()
    for t in (a, b, leaf):
        for name in LIST_ATTRIBUTES:
            assert type(getattr(t, name)) is list, (t.name, name)
    assert a.products == [Path("a")] and a.dependencies == [Path("in")]
    assert leaf.dependencies == [] and leaf.task_dependencies == [] and leaf.path_dependencies == []
    assert a.dependent_tasks == [b] and b.dependent_tasks == [] and leaf.dependent_tasks == []
    assert b.task_dependencies == [a] and b.path_dependencies == [Path("a")]
    assert a.task_dependencies == [] and a.path_dependencies == [Path("in")]


def test_a_read_list_is_the_same_object_and_mutations_count(workdir):
    Path("in").touch()
    p = Pipeline(None, False, quiet=True)
    a = p.add_task(Task("a", step, [Path("a")]))
    b = p.add_task(Task("b", step, [Path("b")]))
    assert b.dependencies is b.dependencies and a.products is a.products
    b.dependencies.append(Path("a"))                 # read, then changed: resolve sees the change
    b.dependencies.append(Path("in"))
    a.products.append(Path("a2"))
    p._solve_order()
    assert b.task_dependencies == [a] and b.path_dependencies == [Path("a"), Path("in")]
    assert a.dependent_tasks == [b]
    deps = a.dependent_tasks
    a.add_dependent_task(b)
    assert a.dependent_tasks is deps and deps == [b, b]


def test_assigned_values_read_back_as_assigned(workdir):
    t = Task("t", step, [Path("o")])
    mine = [Path("x"), Path("y")]
    t.products = mine
    assert t.products is mine
    t.dependencies = None
    assert t.dependencies is None
    as_tuple = (Path("i"),)
    t.path_dependencies = as_tuple
    assert t.path_dependencies is as_tuple
    t.task_dependencies = None
    assert t.task_dependencies is None
    t.dependent_tasks = []
    assert t.dependent_tasks == []
    other = Task("other", step, [Path("p")])
    t.dependent_tasks = None                     # add_dependent_task starts a list over a non-list
    t.add_dependent_task(other)
    assert t.dependent_tasks == [other]
    fresh = Task("fresh", step, [Path("q")])
    fresh.add_dependent_task(other)
    assert fresh.dependent_tasks == [other]


def test_an_assigned_product_list_is_what_add_task_registers(workdir):
    p = Pipeline(None, False, quiet=True)
    t = Task("t", step, [Path("o")])
    t.products = [Path("x"), Path("y")]
    p.add_task(t)
    with pytest.raises(ProductAlreadyRegisteredException) as e:
        p.add_task(Task("u", step, [Path("y")]))
    assert "Task u:" in str(e.value) and "by task t " in str(e.value) and "'out'" in str(e.value)
    p.add_task(Task("v", step, [Path("o")]))         # free again: t no longer produces it


def test_products_are_decided_when_the_task_is_made():
    """As in 0.1.x: changing func_args afterwards does not change the products."""
    t = Task("t", step, [Path("o"), Path("i")])
    t.func_args[0] = Path("other")
    t.func_args[1] = Path("other-in")
    assert t.products == [Path("o")] and t.dependencies == [Path("i")]


def test_copy_and_pickle_keep_the_lists():
    t = Task("t", step, [Path("o")], {"inp": Path("i")})
    c = copy.copy(t)
    assert c.products == [Path("o")] and c.dependencies == [Path("i")] and c.dependent_tasks == []
    u = pickle.loads(pickle.dumps(Task("u", step, [Path("o")])))
    assert u.products == [Path("o")] and u.dependencies == [] and u.task_dependencies is None


def test_positional_and_keyword_spellings_dedup():
    """The positional fast path of the hash and the slot path must agree."""
    p = Pipeline(None, False, quiet=True)
    spellings = [
        ([Path("o"), Path("i"), 3], {}),
        ([Path("o"), Path("i")], {"n": 3}),
        ([Path("o")], {"inp": Path("i"), "n": 3}),
        ([], {"out": Path("o"), "inp": Path("i"), "n": 3}),
    ]
    tasks = [Task(f"t{k}", step, a, kw) for k, (a, kw) in enumerate(spellings)]
    assert len({hash(t) for t in tasks}) == 1
    first = p.add_task(tasks[0])
    assert all(p.add_task(t) is first for t in tasks[1:]) and p.tasks == [first]
    other = Task("x", step, [Path("o"), Path("i"), 4])
    assert other != first
    with pytest.raises(ProductAlreadyRegisteredException):
        p.add_task(other)


def test_string_and_path_arguments_are_different_tasks():
    a = Task("a", step, [Path("o"), None, 0])
    b = Task("b", step, ["o", None, 0])
    assert a != b and a.products == b.products == [Path("o")]


def test_ignored_argument_dedups_and_default_product_counts():
    p = Pipeline(None, False, quiet=True)
    a = p.add_task(Task("a", quiet_step, [Path("q"), True]))
    assert p.add_task(Task("b", quiet_step, [Path("q"), False])) is a
    d = Task("d", with_default, [1])
    assert d.products == [Path("dflt.txt")] and d.dependencies == [Path("dflt-in.txt")]
    assert Task("e", with_default, [1, Path("dflt.txt"), Path("dflt-in.txt")]) == d
    p.add_task(d)
    with pytest.raises(ProductAlreadyRegisteredException) as e:
        p.add_task(Task("f", with_default, [2]))
    assert "'out'" in str(e.value)


def test_duplicate_product_names_task_and_argument_for_one_and_many(workdir):
    p = Pipeline(None, False, quiet=True)
    p.add_task(Task("first", many, [[Path("m1"), Path("m2")]]))
    with pytest.raises(ProductAlreadyRegisteredException) as e:
        p.add_task(Task("second", step, [Path("m2")]))
    assert "second" in str(e.value) and "first" in str(e.value) and "'out'" in str(e.value)
    with pytest.raises(ProductAlreadyRegisteredException) as e:
        p.add_task(Task("third", many, [[Path("n1"), Path("m1")]]))
    assert "third" in str(e.value) and "'outs'" in str(e.value)
    with pytest.raises(ProductAlreadyRegisteredException) as e:
        p.add_task(Task("twice", many, [[Path("z"), Path("./z")]]))
    assert "twice" in str(e.value)
    p.add_task(Task("fourth", step, [Path("n1")]))   # the failed adds claimed nothing


def test_produces_and_depends_on_with_a_task(workdir):
    p = Pipeline(None, False, quiet=True)
    a = p.add_task(Task("a", step, [Path("a")], produces=[Path("a-extra")]))
    b = p.add_task(Task("b", step, [Path("b")], depends_on=[a]))
    c = p.add_task(Task("c", step, [Path("c")], depends_on=["a-extra"]))
    assert a.products == [Path("a"), Path("a-extra")]
    assert b.dependencies == [a] and c.dependencies == [Path("a-extra")]
    stray = Task("stray", step, [Path("s")])
    with pytest.raises(TaskNotInQueueException):
        p.add_task(Task("d", step, [Path("d")], depends_on=[stray]))
    with pytest.raises(TaskNotInQueueException):
        p.add_task(Task("e", many, [[Path("e")]], depends_on=[Path("a"), stray]))
    p._solve_order()
    assert b.task_dependencies == [a] and b.path_dependencies == []
    assert c.task_dependencies == [a] and c.path_dependencies == [Path("a-extra")]
    assert a.dependent_tasks == [b, c]


def test_a_task_in_two_pipelines_at_different_places_resolves_in_both(workdir):
    """resolve finds a registered task by its place in the pipeline (its queue id); a task added to a
    second pipeline elsewhere has another queue id there, and must still be found in the first."""
    Path("root").touch()
    shared = Task("shared", step, [Path("shared")], {"inp": Path("root")})
    p1, p2 = Pipeline(None, False, quiet=True), Pipeline(None, False, quiet=True)
    p1.add_task(shared)
    user1 = p1.add_task(Task("user1", step, [Path("u1")], {"inp": Path("shared")}))
    p2.add_task(Task("other", step, [Path("other")], {"inp": Path("root")}))
    p2.add_task(shared)                       # its queue id is now 2, its place in p1 is 1
    user2 = p2.add_task(Task("user2", step, [Path("u2")], {"inp": Path("shared")}))
    g1 = p1._solve_order()
    assert g1.deps[1] == (0,) and user1.task_dependencies == [shared]
    g2 = p2._solve_order()
    assert g2.deps[2] == (1,) and user2.task_dependencies == [shared]


def test_missing_input_and_cycle_are_named(workdir):
    p = Pipeline(None, False, quiet=True)
    p.add_task(Task("needs", step, [Path("o")], {"inp": Path("nowhere.txt")}))
    with pytest.raises(DependencyNotAvailableException) as e:
        p._solve_order()
    assert "needs" in str(e.value) and "'inp'" in str(e.value) and "nowhere.txt" in str(e.value)
    p = Pipeline(None, False, quiet=True)
    p.add_task(Task("x", step, [Path("x")], {"inp": Path("y")}))
    p.add_task(Task("y", step, [Path("y")], {"inp": Path("x")}))
    with pytest.raises(CyclicDependencyException) as e:
        p._solve_order()
    assert "x" in str(e.value) and "y" in str(e.value)


def test_resolving_again_after_a_change_refills_the_lists(workdir):
    Path("in").touch()
    p = Pipeline(None, False, quiet=True)
    a = p.add_task(Task("a", step, [Path("a")], {"inp": Path("in")}))
    b = p.add_task(Task("b", step, [Path("b")], {"inp": Path("a")}))
    p._solve_order()
    assert a.dependent_tasks == [b]
    b.dependencies[0] = Path("in")
    p._solve_order()
    assert a.dependent_tasks == [] and b.task_dependencies == [] and b.path_dependencies == [Path("in")]


@task("counted")
def counted(i: int, out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):
    pass
