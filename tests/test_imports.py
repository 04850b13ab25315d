"""Every import path of depio 0.1.x still works."""
import pytest

pytestmark = pytest.mark.timeout(30)


def test_upstream_import_paths():
    from depio.Pipeline import (Pipeline, ProductAlreadyRegisteredException, TaskNotInQueueException,  # noqa
                                DependencyNotAvailableException, Task)
    from depio.Executors import SequentialExecutor, ParallelExecutor, AbstractTaskExecutor  # noqa
    from depio.Task import Task, Product, Dependency, IgnoredForEq  # noqa
    from depio.decorators import task  # noqa
    from depio.BuildMode import BuildMode
    from depio.TaskStatus import (TaskStatus, TERMINAL_STATES, SUCCESSFUL_TERMINAL_STATES,  # noqa
                                  FAILED_TERMINAL_STATES)
    from depio.exceptions import (ProductNotProducedException, ProductNotUpdatedException,  # noqa
                                  DependencyNotMetException, TaskRaisedExceptionException, UnknownStatusException,
                                  TaskNotInQueueException, ProductAlreadyRegisteredException,
                                  DependencyNotAvailableException)
    assert {m.name for m in BuildMode} >= {"NEVER", "IF_MISSING", "ALWAYS", "IF_NEW"}   # issue 17 adds modes


def test_flat_imports():
    import depio
    for name in depio.__all__:
        assert hasattr(depio, name), name


def test_pipeline_construction_starts_nothing():
    import threading
    from depio.Pipeline import Pipeline
    before = threading.active_count()
    p = Pipeline(None, False, quiet=True)
    assert p.tasks == [] and threading.active_count() == before


def test_every_package_is_installed():
    """A wheel carries only the packages pyproject.toml lists: a new subpackage must be listed too."""
    tomllib = pytest.importorskip("tomllib")     # Python 3.11+
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(root)).replace("/", ".")
             for top in ("depio", "worker") for p in (root / top).rglob("__init__.py")}
    assert found == listed
