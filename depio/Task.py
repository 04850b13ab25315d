"""A task: one call of a user function, with the files it reads and writes (the user's record
and the 0.1.x API).

Products and dependencies come from the function's annotations
(`Annotated[Path, Product]`, `Annotated[Path, Dependency]`, lists of paths) and from the explicit
`produces=` / `depends_on=` arguments. Parsing an annotation is done once per function, not once
per task (`runtime.identity`), so that building pipelines of 100,000 tasks stays fast. Whether a
task runs is `runtime.decide`; its state during a run is written by the scheduler alone.
"""
from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from .BuildMode import BuildMode
from .TaskStatus import TaskStatus, TERMINAL_STATES, SUCCESSFUL_TERMINAL_STATES, FAILED_TERMINAL_STATES
from .runtime.decide import build_reason
# the function plan, identity and annotation parsing live in runtime.identity; these names stay importable here
from .runtime.identity import (Dependency, IgnoredForEq, Product, _as_paths, _collect_paths, _plan_for, _plans,
                               _parse_annotation_for_metaclass, _positional_names, compute_hash, task_key)
from .view.status import _status_colors, _status_texts
from .exceptions import (DependencyNotMetException, ProductNotProducedException, ProductNotUpdatedException,
                         TaskRaisedExceptionException, UnknownStatusException)


# ---------------------------------------------------------------- helpers of the 0.1.x API

def _get_args_dict(fn: Callable, args: Iterable, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Name the positional arguments of a call and merge the keywords (defaults not included)."""
    return {**dict(zip(_positional_names(fn), args)), **kwargs}


def _get_not_updated_products(product_timestamps_after_running: Dict,
                              product_timestamps_before_running: Dict) -> List[str]:
    """Products whose timestamp did not change, in the order of `before`."""
    return [product for product, before in product_timestamps_before_running.items()
            if product_timestamps_after_running.get(product) == before]


# ---------------------------------------------------------------- per-function plan (cached)


class Task:
    """One call of `func(*func_args, **func_kwargs)` with its products and dependencies.
    `track_code` and `max_age` refine the build mode (see BuildMode); `resources` holds resource
    requests that route the task to a fitting worker (kept as given, not part of the task's identity)."""

    def __init__(self, name: str, func: Callable, func_args: Optional[List] = None,
                 func_kwargs: Optional[Dict] = None,
                 produces: Optional[List[Path]] = None,
                 depends_on: Optional[List[Union[Path, 'Task']]] = None,
                 buildmode: BuildMode = BuildMode.IF_MISSING,
                 slurm_parameters: Optional[Dict] = None,
                 arg_resolver: Optional[Callable] = None,
                 description: Optional[str] = None,
                 retries: int = 0,
                 timeout: Optional[float] = None,
                 track_code: bool = False,
                 max_age: Optional[float] = None,
                 resources: Optional[Dict] = None):
        self.name = name
        self.func = func
        self.func_args: List = list(func_args) if func_args else []
        self.func_kwargs: Dict = dict(func_kwargs) if func_kwargs else {}
        self.buildmode = buildmode
        if slurm_parameters:
            self._slurm_parameters = dict(slurm_parameters)
        if description:
            self.description = description
        if retries:
            if int(retries) < 0:
                raise ValueError(f"Task {name}: retries must be >= 0, got {retries}")
            self.retries = int(retries)
        if timeout is not None:
            if float(timeout) <= 0:
                raise ValueError(f"Task {name}: timeout must be > 0 seconds, got {timeout}")
            self.timeout = float(timeout)
        if track_code:
            self.track_code = True
        if max_age is not None:
            if float(max_age) < 0:
                raise ValueError(f"Task {name}: max_age must be >= 0 seconds, got {max_age}")
            self.max_age = float(max_age)
        elif buildmode is BuildMode.IF_OLD:
            raise ValueError(f"Task {name}: build mode IF_OLD needs max_age (seconds)")
        if resources is not None:
            self.resources = resources

        if arg_resolver is not None:
            self.func_args, self.func_kwargs = arg_resolver(self.func, self.func_args, self.func_kwargs)
            self.func_args, self.func_kwargs = list(self.func_args), dict(self.func_kwargs)

        plan = _plans.get(id(func))
        if plan is None or plan.func is not func:
            plan = _plan_for(func)
        self._plan = plan
        # set later (by add_task and the resolver); assigned here so that every task's attribute
        # dict has one layout from the start (growing 100,000 dicts later costs ~400 B each)
        self._hash: Optional[int] = None
        self._queue_id: Optional[int] = None
        self.task_dependencies: Optional[List[Task]] = None
        self.path_dependencies: Optional[List[Path]] = None
        self.dependent_tasks: List[Task] = []
        args, kwargs = self.func_args, self.func_kwargs
        self.products: List[Path] = _collect_paths(plan.product_slots, args, kwargs)
        if produces:
            self.products += _as_paths(produces)
        self.dependencies: List[Union[Path, Task]] = _collect_paths(plan.dependency_slots, args, kwargs)
        for d in depends_on or ():
            self.dependencies.append(d if isinstance(d, Task) else Path(d))

    # Options and run state live in class-level defaults until set: a pipeline of 100,000 tasks
    # should not pay a dozen instance attributes per task before anything has happened.
    description: str = ""
    retries: int = 0
    timeout: Optional[float] = None
    track_code: bool = False                # rerun when the code changed, in any build mode but NEVER
    max_age: Optional[float] = None         # seconds: IF_OLD reruns a product older than this
    resources: Any = None                   # resource requests for routing (not part of identity)
    _state: Any = None                      # the run's state store view (depio.state.tasks), during a run
    _slurm_parameters: Optional[Dict] = None
    task_dependencies: Optional[List['Task']] = None      # filled by Pipeline._solve_order
    path_dependencies: Optional[List[Path]] = None
    dependent_tasks: List['Task'] = ()  # type: ignore[assignment]
    _queue_id: Optional[int] = None
    _status: TaskStatus = TaskStatus.WAITING
    _slurmid: str = ""
    _slurmstate: str = ""
    _stdout: str = ""
    _stderr: str = ""
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    reason: str = ""                        # why the task ran, was skipped, or failed
    error: Optional[Dict[str, str]] = None  # kind, type, message, traceback, summary of a failure
    _result: Any = None                     # the function's return value, when it could be sent back
    _result_blob: Optional[bytes] = None
    attempts: int = 0
    worker: str = ""
    _hash: Optional[int] = None

    @property
    def slurm_parameters(self) -> Dict:
        """This task's Slurm parameters (override the executor's); created on first use."""
        if self._slurm_parameters is None:
            self._slurm_parameters = {}
        return self._slurm_parameters

    @slurm_parameters.setter
    def slurm_parameters(self, value: Dict) -> None:
        self._slurm_parameters = dict(value or {})

    @property
    def _args_dict(self) -> Dict[str, Any]:
        """Every argument by name (defaults of file arguments included), rebuilt on demand: kept per
        task it would cost a dict each, and it is needed only for equality and error messages."""
        plan = self._plan
        args = dict(plan.defaults) if plan.defaults else {}
        args.update(zip(plan.positional, self.func_args))
        args.update(self.func_kwargs)
        return args

    @property
    def cleaned_args(self) -> Dict[str, Any]:
        """The arguments that make two tasks equal (those not marked IgnoredForEq)."""
        args, ignored = self._args_dict, self._plan.ignored
        return {k: v for k, v in args.items() if k not in ignored} if ignored else args

    def argument_of(self, path: Path, kind: str = "product") -> Optional[str]:
        """The name of the argument a product (or dependency) path came from, for error messages."""
        names = self._plan.products if kind == "product" else self._plan.dependencies
        return next((n for n in names if path in _as_paths(self._args_dict.get(n))), None)

    # ------------------------------------------------------------ identity
    def _key(self):
        return task_key(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Task):
            return NotImplemented
        if self is other:
            return True
        return self.func == other.func and hash(self) == hash(other) and self._key() == other._key()

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = self._compute_hash()
        return self._hash

    def _compute_hash(self) -> int:
        return compute_hash(self)

    def __str__(self) -> str:
        return f"Task:{self.name}"

    def __repr__(self) -> str:
        return f"<Task {self._queue_id} {self.name} {self._status.name}>"

    @property
    def label(self) -> str:
        """`name (#id)`: how errors refer to the task."""
        return f"{self.name} (#{self._queue_id})" if self._queue_id else self.name

    # ------------------------------------------------------------ build mode
    def missing_products(self) -> List[Path]:
        return [p for p in self.products if not p.exists()]

    def should_run(self) -> bool:
        """Whether the build mode asks for a run, judged from the files as they are now."""
        return self.run_reason() is not None

    def run_reason(self, upstream_ran: Optional[bool] = None) -> Optional[str]:
        """Why the task must run (None: it is skipped); see `runtime.decide.build_reason`."""
        return build_reason(self, upstream_ran)

    # ------------------------------------------------------------ running in this process
    def run(self) -> None:
        """Run the task here, now (upstream's in-process run); raises like upstream on failure."""
        from .runtime.execution import execute_inline
        self.start_time = time.time()
        self._status = TaskStatus.RUNNING
        outcome = execute_inline(self.func, self.func_args, self.func_kwargs, self.label,
                                 [str(p) for p in self.products],
                                 [str(p) for p in (self.path_dependencies if self.path_dependencies is not None
                                                   else [d for d in self.dependencies if isinstance(d, Path)])],
                                 echo=False)
        self._apply_outcome(outcome)
        if outcome.error is not None:
            raise outcome.exception()

    def _apply_outcome(self, outcome) -> None:
        self.start_time = outcome.started
        self.end_time = outcome.ended
        self._stdout = outcome.stdout
        self._stderr = outcome.stderr
        self._result = outcome.value
        if outcome.error is None:
            self._status = TaskStatus.FINISHED
            self.error = None
        else:
            self._status = TaskStatus.FAILED
            self.error = outcome.error
            self.reason = outcome.error.get('summary', '')

    @property
    def result(self) -> Any:
        """The function's return value from the last run (None if it could not be sent back)."""
        if self._result_blob is not None:
            self._result, self._result_blob = pickle.loads(self._result_blob), None
        return self._result

    def barerun(self) -> Any:
        return self.func(*self.func_args, **self.func_kwargs)

    # ------------------------------------------------------------ output and timing
    def get_stdout(self) -> str:
        return self._stdout

    def get_stderr(self) -> str:
        return self._stderr

    def get_duration(self) -> int:
        if self.start_time is None:
            return 0
        end = self.end_time if self.end_time is not None else time.time()
        return int(end - self.start_time)

    # ------------------------------------------------------------ status
    def statuscolor(self, s: Optional[TaskStatus] = None) -> str:
        s = self._status if s is None else s
        try:
            return _status_colors[s]
        except (KeyError, TypeError):
            raise UnknownStatusException(f"Status {s} is unknown.") from None

    def statustext(self, s: Optional[TaskStatus] = None) -> str:
        s = self._status if s is None else s
        try:
            return _status_texts[s]
        except (KeyError, TypeError):
            raise UnknownStatusException(f"Status {s} is unknown.") from None

    @property
    def status(self):
        s = self._status
        return s, self.statustext(s), self.statuscolor(s), self._slurmstate

    @property
    def is_in_terminal_state(self) -> bool:
        return self._status in TERMINAL_STATES

    @property
    def is_in_successful_terminal_state(self) -> bool:
        return self._status in SUCCESSFUL_TERMINAL_STATES

    @property
    def is_in_failed_terminal_state(self) -> bool:
        return self._status in FAILED_TERMINAL_STATES

    @property
    def id(self) -> str:
        return f"{self._queue_id: 4d}" if self._queue_id else "None"

    @property
    def slurmid(self) -> str:
        return self._slurmid

    @property
    def slurmjob_status(self) -> str:
        return self._slurmstate

    def add_dependent_task(self, task: 'Task') -> None:
        if not isinstance(self.dependent_tasks, list):
            self.dependent_tasks = []
        self.dependent_tasks.append(task)


__all__ = ['Task', 'Product', 'Dependency', 'IgnoredForEq', 'UnknownStatusException',
           'DependencyNotMetException', 'ProductNotProducedException', 'ProductNotUpdatedException',
           'TaskRaisedExceptionException', '_get_args_dict', '_parse_annotation_for_metaclass',
           '_get_not_updated_products', '_status_colors', '_status_texts']
