"""`@task("name")`: calling the decorated function builds a Task instead of running it."""
from __future__ import annotations

import functools
from typing import Any, Callable

from .BuildMode import BuildMode
from .Task import Task

# keywords that configure the task itself rather than its Slurm job
_TASK_OPTIONS = ("retries", "timeout", "description", "arg_resolver", "produces", "depends_on", "track_code",
                 "max_age", "resources")


def task(name: str, pipeline=None, buildmode: BuildMode = BuildMode.IF_MISSING, *dec_args: Any,
         **dec_kwargs: Any) -> Callable[[Callable], Callable[..., Task]]:
    """Decorate a function so that a call returns a `Task` (added to `pipeline` when given).

    Keywords such as `retries=2`, `timeout=600`, `track_code=True`, `max_age=3600` or `resources=...`
    set task options; any other keyword
    (`slurm_gpus_per_task=1`, `slurm_time=60`, `mem_gb=8`, ...) becomes a Slurm parameter of the task."""
    options = {k: dec_kwargs.pop(k) for k in _TASK_OPTIONS if k in dec_kwargs}
    slurm = dict(dec_kwargs.pop("slurm_parameters", None) or {})
    slurm.update(dec_kwargs)

    def decorator(func: Callable) -> Callable[..., Task]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Task:
            # the Task copies the positional arguments into its own list: no need for one here too
            if options:
                t = Task(name, func, args, kwargs, buildmode=buildmode, slurm_parameters=slurm, **options)
            else:   # positionally (produces, depends_on, buildmode, slurm_parameters): no keyword matching
                t = Task(name, func, args, kwargs, None, None, buildmode, slurm)
            return pipeline.add_task(t) if pipeline is not None else t

        wrapper.__wrapped__ = func
        wrapper.task_name = name
        return wrapper

    return decorator


__all__ = ["task"]
