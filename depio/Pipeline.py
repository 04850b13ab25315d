"""The pipeline: registers tasks, validates the DAG, runs it, and reports (API of depio 0.1.x)."""
from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple

from .BuildMode import BuildMode
from .Executors import AbstractTaskExecutor, ParallelExecutor
from .Task import Task
from .TaskStatus import TaskStatus
from .runtime.decide import decide
from .runtime.identity import compute_hash
from .view.display import isatty, render_dry_run
from .exceptions import (DependencyNotAvailableException, ProductAlreadyRegisteredException,
                         TaskNotInQueueException, CyclicDependencyException, TaskNotPicklableException)
from .runtime.graph import Graph, path_key, pickle_payloads, resolve, topological_order, working_dir
from .runtime.run import PipelineRun, frozen_heap
from .state.tasks import STATE_MODES, TaskState, needs_state

log = logging.getLogger("depio.pipeline")


class Pipeline:
    """A set of tasks and how to run them. Building one starts nothing; `run()` does the work."""

    def __init__(self, depioExecutor: Optional[AbstractTaskExecutor] = None, name: str = "NONAME",
                 clear_screen: bool = True, hide_successful_terminated_tasks: bool = False,
                 submit_only_if_runnable: bool = False, quiet: bool = False, refreshrate: float = 1.0):
        self.depioExecutor = depioExecutor
        self.name = name
        self.clear_screen = clear_screen
        self.hide_successful_terminated_tasks = hide_successful_terminated_tasks
        self.submit_only_if_runnable = submit_only_if_runnable
        self.quiet = quiet
        self.refreshrate = refreshrate
        self.tasks: List[Task] = []
        self._by_hash: Dict[int, object] = {}           # dedup index: hash -> task (or tasks, on a collision)
        self._producers: Dict[str, Task] = {}           # product path -> task
        self._graph: Optional[Graph] = None

    # ------------------------------------------------------------ building
    def _registered(self, task: Task) -> bool:
        q = task._queue_id
        return q is not None and q <= len(self.tasks) and self.tasks[q - 1] is task

    def add_task(self, task: Task) -> Task:
        """Register a task, or return the equal task registered before (same function and arguments)."""
        tasks = self.tasks
        q = task._queue_id
        if q is not None and q <= len(tasks) and tasks[q - 1] is task:
            return task
        h = task._hash
        if h is None:
            try:
                # Task's own hash without the two calls of hash() -> __hash__ (a subclass may have its own)
                h = task._hash = compute_hash(task) if type(task) is Task else hash(task)
            except TypeError:            # an argument that cannot be hashed even in frozen form
                h = None
        bucket = self._by_hash.get(h) if h is not None else tasks
        if bucket is not None:
            for earlier in (bucket if isinstance(bucket, list) else (bucket,)):
                if earlier == task:
                    return earlier
        for d in task.dependencies:
            if isinstance(d, Task) and not self._registered(d):
                raise TaskNotInQueueException(
                    f"Task {task.name}: depends_on names task {d.name!r}, which was not added to the pipeline "
                    f"first (add it, and use the task add_task returns)")
        products = task.products
        producers = self._producers
        if len(products) == 1:         # the common case, without the lists and the set
            key = path_key(products[0])
            other = producers.get(key)
            if other is not None and other is not task:
                self._product_taken(task, products[0], other)
            producers[key] = task
        elif products:
            cwd = working_dir()
            keys = [path_key(p, cwd) for p in products]
            for p, k in zip(products, keys):
                other = producers.get(k)
                if other is not None and other is not task:
                    self._product_taken(task, p, other)
            if len(set(keys)) != len(keys):
                raise ProductAlreadyRegisteredException(f"Task {task.name}: names the same product twice: "
                                                        f"{[str(p) for p in task.products]}")
            for k in keys:
                producers[k] = task
        tasks.append(task)
        task._queue_id = len(tasks)
        if h is not None:
            if bucket is None:
                self._by_hash[h] = task
            elif isinstance(bucket, list):
                bucket.append(task)
            else:
                self._by_hash[h] = [bucket, task]
        self._graph = None
        return task

    @staticmethod
    def _product_taken(task: Task, path: Path, other: Task) -> NoReturn:
        """Raise: `path`, a product of `task`, is registered by `other` (out of add_task's hot path)."""
        arg = task.argument_of(path)
        where = f" (argument '{arg}')" if arg else ""
        raise ProductAlreadyRegisteredException(
            f"Task {task.name}: product {str(path)!r}{where} is already produced by task {other.label}")

    def add_tasks(self, tasks: Sequence[Task]) -> List[Task]:
        return [self.add_task(t) for t in tasks]

    def _solve_order(self, check_inputs: bool = True) -> Graph:
        """Fill every task's `task_dependencies`, `path_dependencies` and `dependent_tasks`;
        raise on a missing input or a cycle."""
        self._graph = resolve(self.tasks, self._producers, check_inputs=check_inputs)
        return self._graph

    def validate(self) -> Graph:
        """Everything that can go wrong before a run, checked now (inputs, cycles, pickling)."""
        g = self._solve_order()
        pickle_payloads(g)
        return g

    # ------------------------------------------------------------ running
    def _executor(self) -> AbstractTaskExecutor:
        ex = self.depioExecutor
        if (ex is None or (type(ex) is ParallelExecutor and ex.internal_executor is None)) and \
                os.environ.get("DEPIO_POOL", "").strip():
            # DEPIO_POOL=name: an unchanged script runs on that pool instead of local workers (the
            # pool package is imported only then: a run's start waits for every module it imports)
            from .pool.executor import executor_from_environment
            pooled = executor_from_environment()
            if pooled is not None:
                return pooled
        if ex is None:
            ex = self.depioExecutor = ParallelExecutor()
        return ex

    def run(self, dry_run: Optional[bool] = None) -> int:
        """Run what is missing or stale, in dependency order; 0 when every task ended FINISHED or
        SKIPPED, 1 otherwise. Never calls exit().

        `dry_run=True` (or the environment variable `DEPIO_DRY_RUN=1`, which works on an unchanged
        script) runs nothing: it shows which tasks would run and why, and which would be skipped."""
        if dry_run is None:
            dry_run = _env_flag(DRY_RUN_ENV)
        if dry_run:
            return self._dry_run()
        if _env_flag(ACCEPT_ENV):
            return self._accept_from_env()
        executor = self._executor()
        state = TaskState.open() if self.tasks else None
        try:
            with frozen_heap():
                return self._run(self.validate(), executor, state)
        finally:
            if state is not None:
                self._attach(None)
                state.close()

    _attached: Sequence[Task] = ()

    def _attach(self, state: Optional[TaskState], readers: Optional[List[Task]] = None) -> None:
        """Give the tasks whose build mode reads the store its view (None: take it back from them,
        without looking at every task again while the run ends); `readers`: those tasks, when the
        caller found them already."""
        if state is None:
            for t in self._attached:
                t._state = None
            self._attached = ()
        else:
            self._attached = readers if readers is not None else \
                [t for t in self.tasks if needs_state(t)]
            for t in self._attached:
                t._state = state

    def _may_make(self) -> Iterator[Task]:
        """The tasks a run may record as made: those with products, and those whose build mode reads
        the store (`_attach`); known without looking at every task (the recorder's thread takes them)."""
        return itertools.chain(self._producers.values(), self._attached)

    def _run(self, g: Graph, executor: AbstractTaskExecutor, state: Optional[TaskState]) -> int:
        readers: List[Task] = []
        looks = state is not None     # for the tasks that read the store, in this pass over every task
        for t in self.tasks:       # before the scheduler exists; from its start on, it alone writes these
            t._status, t.reason, t.error, t.start_time, t.end_time, t.attempts = \
                TaskStatus.WAITING, "", None, None, None, 0
            t.stdout_path = t.stderr_path = None
            if looks and (t.track_code or t.buildmode in STATE_MODES):      # `needs_state`, inline
                readers.append(t)
        if state is not None:
            self._attach(state, readers)
        return PipelineRun(self, g, executor, state).run()

    def explain(self) -> List[Tuple[Task, Optional[str]]]:
        """For each task, in registration order: why it would run now, or None if it would be
        skipped. Runs nothing and touches no file (what a dry run prints)."""
        g = self.validate()
        would = [False] * len(g)
        decisions: List[Optional[str]] = [None] * len(g)
        state = TaskState.open() if any(needs_state(t) for t in g.tasks) else None
        self._attach(state)
        try:
            for i in topological_order(g):     # upstream decisions are known first
                t = g.tasks[i]
                d = decide(t, any(would[j] for j in g.deps[i]), planning=True)
                t.reason = d.reason
                would[i] = d.run or d.error     # undecidable: it would be tried (and fail) in a run
                decisions[i] = d.reason if would[i] else None
        finally:
            if state is not None:
                self._attach(None)
                state.close()
        return list(zip(g.tasks, decisions))

    def accept(self, names: Optional[Sequence[str]] = None) -> List[Tuple[Task, Optional[str]]]:
        """Record the present state of the tasks (all, or those named by name or id) as made, without
        running anything: IF_CHANGED and IF_CODE_CHANGED then take it as up to date (a cosmetic change,
        an output made by hand). Returns (task, what was accepted; None: it was up to date) pairs.
        Raises ValueError for an unknown name or a task whose products are missing."""
        g = self.validate()
        order = [g.tasks[i] for i in topological_order(g)]
        if names:
            wanted = set(names)
            chosen = [t for t in order if t.name in wanted or str(t._queue_id) in wanted]
            unknown = wanted - {t.name for t in chosen} - {str(t._queue_id) for t in chosen}
            if unknown:
                raise ValueError(f"no task named {', '.join(sorted(unknown))} in this pipeline")
        else:
            chosen = order
        missing = [f"{t.label}: product missing: {t.missing_products()[0]}" for t in chosen if t.missing_products()]
        if missing:
            raise ValueError("cannot accept tasks whose products are missing (run them): " + "; ".join(missing))
        state = TaskState.open()
        if state is None:
            raise ValueError("the state store is off (DEPIO_STATE=off) or cannot be opened")
        try:
            return state.accept(chosen)
        finally:
            state.close()

    def _accept_from_env(self) -> int:
        """`depio accept SCRIPT [TASK ...]` runs the script with DEPIO_ACCEPT=1 (and the tasks in
        DEPIO_ACCEPT_TASKS): accept instead of run, and say what was accepted."""
        names = [n for n in os.environ.get(ACCEPT_TASKS_ENV, "").split("\n") if n]
        try:
            done = self.accept(names or None)
        except ValueError as e:
            print(f"depio: error: {e}", file=sys.stderr, flush=True)
            return 2
        for t, why in done:
            print(f"accepted {t.label}: {why}" if why else f"{t.label}: up to date, nothing to accept")
        print(f"{sum(1 for _, why in done if why)} of {len(done)} task(s) accepted", flush=True)
        return 0

    def _dry_run(self) -> int:
        plan = self.explain()
        if not self.quiet:
            text = render_dry_run([t for t, _ in plan], [r for _, r in plan], color=isatty(sys.stdout))
            print(text, flush=True)
        return 0


DRY_RUN_ENV = "DEPIO_DRY_RUN"
ACCEPT_ENV = "DEPIO_ACCEPT"                 # set by `depio accept`: run() accepts instead of running
ACCEPT_TASKS_ENV = "DEPIO_ACCEPT_TASKS"     # the tasks to accept, one a line (all when empty)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


__all__ = ["Pipeline", "Task", "BuildMode", "ProductAlreadyRegisteredException", "TaskNotInQueueException",
           "DependencyNotAvailableException", "CyclicDependencyException", "TaskNotPicklableException"]
