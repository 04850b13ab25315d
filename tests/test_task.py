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
