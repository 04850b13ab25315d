"""Unit tests of the Task API and its 0.1.x helpers (no processes)."""
from pathlib import Path
from typing import Annotated, List

import pytest

from depio.BuildMode import BuildMode
from depio.Task import (Dependency, IgnoredForEq, Product, Task, UnknownStatusException, _get_args_dict,
                        _get_not_updated_products, _parse_annotation_for_metaclass, _status_colors)
from depio.TaskStatus import TaskStatus
from depio.decorators import task
from depio.Pipeline import Pipeline

pytestmark = pytest.mark.timeout(30)


def test_get_args_dict_like_upstream():
    def f(a, b, c, *args, **kwargs):
        pass
    assert _get_args_dict(f, [1, 2, 3], {}) == {"a": 1, "b": 2, "c": 3}
    assert _get_args_dict(f, [1], {"b": 2, "c": 3, "d": 4}) == {"a": 1, "b": 2, "c": 3, "d": 4}


class A:
    pass


def test_parse_annotation_for_metaclass_both_signatures():
    def f(inputa: Annotated[str, A], other: int) -> Annotated[str, A]:
        pass
    assert _parse_annotation_for_metaclass(f, A) == ["inputa", "return"]
    assert _parse_annotation_for_metaclass(f, {}, A) == ["inputa", "return"]

    def g(a, b):
        pass
    assert _parse_annotation_for_metaclass(g, A) == []


def test_not_updated_products_in_before_order():
    before = {"b": 1, "a": 2, "c": 3}
    after = {"a": 2, "b": 5, "c": 3}
    assert _get_not_updated_products(after, before) == ["a", "c"]


def test_status_helpers():
    t = Task("x", print)
    assert t.statustext() == "waiting" and t.statuscolor() == "blue"
    assert t.statustext(TaskStatus.DEPFAILED) == "dep. failed"
    assert _status_colors[TaskStatus.FAILED] == "red"
    with pytest.raises(UnknownStatusException):
        t.statuscolor("nonsense")
    assert t.status[0] is TaskStatus.WAITING
    assert not t.is_in_terminal_state


def produce(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None,
            many: Annotated[List[Path], Product] = None, verbose: Annotated[bool, IgnoredForEq] = False):
    pass


def test_products_and_dependencies_from_annotations():
    t = Task("p", produce, [Path("o")], {"inp": Path("i"), "many": [Path("m1"), "m2"]},
             produces=[Path("extra")], depends_on=["d"])
    assert t.products == [Path("o"), Path("m1"), Path("m2"), Path("extra")]
    assert t.dependencies == [Path("i"), Path("d")]


def test_none_arguments_are_ignored():
    t = Task("p", produce, [Path("o")])
    assert t.products == [Path("o")] and t.dependencies == []


def test_equality_ignores_name_and_ignored_args_but_not_others():
    a = Task("a", produce, [Path("o")], {"verbose": True})
    b = Task("b", produce, [Path("o")], {"verbose": False})
    c = Task("c", produce, [Path("o2")])
    assert a == b and hash(a) == hash(b)
    assert a != c


def test_equality_with_unhashable_arguments():
    def f(x, y=None):
        pass
    a = Task("a", f, [[1, 2, {"k": [3]}]])
    b = Task("b", f, [[1, 2, {"k": [3]}]])
    c = Task("c", f, [[1, 2, {"k": [4]}]])
    assert a == b and hash(a) == hash(b) and a != c


def test_arg_resolver_runs_before_parsing():
    def resolver(func, args, kwargs):
        return args, {**kwargs, "inp": Path("resolved")}
    t = Task("r", produce, [Path("o")], arg_resolver=resolver)
    assert Path("resolved") in t.dependencies


def test_decorator_builds_task_and_keeps_slurm_keywords():
    @task("deco", slurm_gpus_per_task=1, retries=2, timeout=5)
    def f(out: Annotated[Path, Product]):
        pass
    t = f(Path("x"))
    assert isinstance(t, Task) and t.name == "deco" and t.products == [Path("x")]
    assert t.slurm_parameters == {"slurm_gpus_per_task": 1}
    assert t.retries == 2 and t.timeout == 5.0


def test_decorator_with_pipeline_adds_and_dedups():
    p = Pipeline(None, False, quiet=True)

    @task("deco", pipeline=p)
    def f(out: Annotated[Path, Product]):
        pass
    t1 = f(Path("x"))
    t2 = f(Path("x"))
    assert t1 is t2 and p.tasks == [t1]


def test_build_mode_decisions(tmp_path):
    out = tmp_path / "o"
    assert Task("m", produce, [out]).run_reason() .startswith("product missing")
    out.touch()
    assert Task("m", produce, [out]).run_reason() is None
    assert Task("m", produce, [out], buildmode=BuildMode.ALWAYS).run_reason() == "build mode ALWAYS"
    assert Task("m", produce, [out], buildmode=BuildMode.NEVER).run_reason() is None
    assert Task("m", produce, [out], buildmode=BuildMode.IF_NEW).run_reason(upstream_ran=True) is not None
    assert Task("m", produce, [out], buildmode=BuildMode.IF_NEW).run_reason(upstream_ran=False) is None
    assert Task("n", print).run_reason() == "declares no products"


def test_task_run_in_process_checks_products(tmp_path, capsys):
    out = tmp_path / "o"

    def writes(o: Annotated[Path, Product]):
        print("hello")
        o.write_text("x")

    def forgets(o: Annotated[Path, Product]):
        pass
    t = Task("w", writes, [out])
    t.run()
    assert t.status[0] is TaskStatus.FINISHED and t.get_stdout() == "hello\n"
    from depio.exceptions import ProductNotProducedException, ProductNotUpdatedException
    with pytest.raises(ProductNotProducedException):
        Task("f", forgets, [tmp_path / "never"]).run()
    with pytest.raises(ProductNotUpdatedException):
        Task("f", forgets, [out]).run()


def test_invalid_options():
    with pytest.raises(ValueError):
        Task("x", print, retries=-1)
    with pytest.raises(ValueError):
        Task("x", print, timeout=0)


# ---------------------------------------------------------------- fast paths against their definitions

def _spelled(out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = Path("dflt"), n: int = 0,
             *rest, quiet: Annotated[bool, IgnoredForEq] = False,
             side: Annotated[List[Path], Product] = None, kw: Annotated[Path, Dependency] = Path("k"), **extra):
    pass


def _calls():
    """Many spellings of a few calls: positional or keyword, defaults given or left out, ignored
    arguments, surplus positionals, extra keywords, strings and lists for paths, unhashable values."""
    o, o2, i = Path("o"), Path("o2"), Path("i")
    for out in (o, o2, "o"):
        yield [out], {}
        yield [], {"out": out}
        yield [out, Path("dflt")], {}
        yield [out], {"inp": Path("dflt")}
        yield [out, i], {"quiet": True}
        yield [out, None, 0], {}
        yield [out, i, 0, "surplus"], {}
        yield [out, i, 0], {"n": 1}                     # a keyword wins over the positional
        yield [out], {"kw": Path("k")}
        yield [out], {"kw": None, "side": [Path("s1"), "s2"]}
        yield [out], {"x": [1, {"a": [2]}], "y": {3}}
        yield [out], {"x": [1, {"a": [2]}], "y": {3}, "quiet": True}


def test_hash_agrees_with_equality_for_every_spelling():
    """`__hash__` reads the arguments through the plan's slots; `==` compares `_key()`, built from
    the argument dict: two tasks that are equal must hash alike, whatever the spelling."""
    tasks = [Task(f"t{k}", _spelled, a, kw) for k, (a, kw) in enumerate(_calls())]
    for a in tasks:
        for b in tasks:
            if a._key() == b._key():
                assert a == b and hash(a) == hash(b), (a.func_args, a.func_kwargs, b.func_args, b.func_kwargs)
            else:
                assert a != b
    # the hash is also what it was before the slots: a hash of the frozen key, up to collisions
    assert len({hash(t) for t in tasks}) == len({t._key() for t in tasks})


def test_products_and_dependencies_match_the_argument_dict():
    """The slot lookup gives what the 0.1.x definition (`_as_paths` of each named argument of the
    argument dict, in annotation order) gives."""
    from depio.Task import _as_paths
    for a, kw in _calls():
        t = Task("t", _spelled, a, kw)
        args = t._args_dict
        assert t.products == [p for n in t._plan.products for p in _as_paths(args.get(n))]
        assert t.dependencies == [p for n in t._plan.dependencies for p in _as_paths(args.get(n))]


def test_pipeline_dedups_like_pairwise_equality():
    p = Pipeline(None, False, quiet=True)
    kept = []
    for k, (a, kw) in enumerate(_calls()):
        t = Task(f"t{k}", _spelled, a, {**kw, "tag": k % 2} if "x" in kw else kw)
        earlier = next((e for e in kept if e == t), None)
        if earlier is None:
            if any(str(x) in {str(y) for e in kept for y in e.products} for x in t.products):
                continue             # a product another task claims: not what this test is about
            kept.append(t)
        assert p.add_task(t) is (earlier or t)
    assert p.tasks == kept
