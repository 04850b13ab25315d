"""depio: run research pipelines like make, locally or on Slurm.

    from depio import Pipeline, ParallelExecutor, Task, Product, Dependency, task

Names are imported on first use (PEP 562): a worker process imports only the protocol and the
execution code, not the scheduler, the display or submitit, so it starts in a fraction of the time.
"""
import importlib
import sys
import types
from typing import Any

__version__ = "0.2.0"

_WHERE = {
    "BuildMode": "BuildMode",
    "AbstractTaskExecutor": "Executors", "ParallelExecutor": "Executors", "SequentialExecutor": "Executors",
    "SubmitItExecutor": "Executors", "SlurmPilotExecutor": "Executors",
    "PoolExecutor": "pool",
    "Pipeline": "Pipeline",
    "Task": "Task", "Product": "Task", "Dependency": "Task", "IgnoredForEq": "Task",
    "TaskStatus": "TaskStatus", "TERMINAL_STATES": "TaskStatus", "SUCCESSFUL_TERMINAL_STATES": "TaskStatus",
    "FAILED_TERMINAL_STATES": "TaskStatus",
    "task": "decorators",
    **{name: "exceptions" for name in (
        "DepioError", "CyclicDependencyException", "DependencyNotAvailableException", "DependencyNotMetException",
        "ProductAlreadyRegisteredException", "ProductNotProducedException", "ProductNotUpdatedException",
        "TaskNotInQueueException", "TaskNotPicklableException", "TaskRaisedExceptionException",
        "UnknownStatusException")},
}

__all__ = list(_WHERE)


class _Package(types.ModuleType):
    """`depio.Task` must be the class even after the submodule `depio.Task` was imported (the import
    system then binds the module to the package attribute), as it was in depio 0.1.x."""

    def __getattribute__(self, name: str) -> Any:
        module = _WHERE.get(name)
        if module is not None:
            return getattr(importlib.import_module(f"depio.{module}"), name)
        return super().__getattribute__(name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
