"""The pipeline: registers tasks, validates the DAG, runs it, and reports (API of depio 0.1.x)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Dict, List, Optional, Sequence

from .BuildMode import BuildMode
from .Executors import AbstractTaskExecutor, ParallelExecutor, SequentialExecutor
from .Task import Task
from .TaskStatus import TaskStatus, SUCCESSFUL_TERMINAL_STATES
from .display import Display
from .exceptions import (DependencyNotAvailableException, ProductAlreadyRegisteredException,
                         TaskNotInQueueException, CyclicDependencyException, TaskNotPicklableException)
from .graph import Graph, path_key, pickle_payloads, resolve
from .scheduler import Cancel, Limits, SchedulerActor, Start

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
        self._by_key: Dict[object, Task] = {}           # dedup index: (function, cleaned arguments)
        self._producers: Dict[str, Task] = {}           # product path -> task
        self._ids: Dict[int, Task] = {}                  # id(task) -> registered task
        self._graph: Optional[Graph] = None

    # ------------------------------------------------------------ building
    def add_task(self, task: Task) -> Task:
        """Register a task, or return the equal task registered before (same function and arguments)."""
        if id(task) in self._ids:
            return task
        try:
            earlier = self._by_key.get(task._key())
        except TypeError:            # an argument that cannot be hashed even in frozen form
            earlier = next((t for t in self.tasks if t == task), None)
        if earlier is not None:
            return earlier
        for d in task.dependencies:
            if isinstance(d, Task) and id(d) not in self._ids:
                raise TaskNotInQueueException(
                    f"Task {task.name}: depends_on names task {d.name!r}, which was not added to the pipeline "
                    f"first (add it, and use the task add_task returns)")
        keys = []
        for n, p in enumerate(task.products):
            k = path_key(p)
            other = self._producers.get(k)
            if other is not None and other is not task:
                arg = task._product_args[n]
                where = f" (argument '{arg}')" if arg else ""
                raise ProductAlreadyRegisteredException(
                    f"Task {task.name}: product {str(p)!r}{where} is already produced by task {other.label}")
            keys.append(k)
        for k in keys:
            self._producers[k] = task
        self.tasks.append(task)
        task._queue_id = len(self.tasks)
        self._ids[id(task)] = task
        try:
            self._by_key[task._key()] = task
        except TypeError:
            pass
        self._graph = None
        return task

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
        if ex is None:
            ex = self.depioExecutor = ParallelExecutor()
        return ex

    def run(self) -> int:
        """Run what is missing or stale, in dependency order; 0 when every task ended FINISHED or
        SKIPPED, 1 otherwise. Never calls exit()."""
        executor = self._executor()
        g = self.validate()
        for t in self.tasks:
            t._status, t.reason, t.error, t.start_time, t.end_time, t.attempts = \
                TaskStatus.WAITING, "", None, None, None, 0
        display = Display(self.tasks, quiet=self.quiet, clear_screen=self.clear_screen,
                          hide_successful=self.hide_successful_terminated_tasks, refreshrate=self.refreshrate)
        if not self.tasks:
            display.final(0)
            return 0
        backend = executor.make_backend()
        done = threading.Event()
        limits = Limits(executor.max_jobs_queued, executor.max_jobs_pending, executor.retries_on_worker_loss)
        scheduler = SchedulerActor.start(g, backend, done, limits)
        backend.bind(scheduler, g)
        interrupted = False
        previous = _install_sigterm()
        try:
            scheduler.tell(Start())
            while not backend.wait(done, self.refreshrate):
                if not scheduler.is_alive():
                    break
                display.refresh()
        except KeyboardInterrupt:
            interrupted = True
            if not self.quiet:
                print("\nInterrupted: cancelling the run ...", file=sys.stderr, flush=True)
            try:
                scheduler.tell(Cancel("interrupted (Ctrl-C / SIGTERM)"))
                done.wait(10)
            except Exception:
                pass
        finally:
            try:
                scheduler.stop(timeout=10)
            except Exception:
                pass
            backend.close()
            _restore_sigterm(previous)
        for t in self.tasks:      # the scheduler died: nothing may stay non-terminal
            if not t.is_in_terminal_state:
                t._status, t.reason = TaskStatus.CANCELED, t.reason or "the run ended before this task"
        ok = all(t._status in SUCCESSFUL_TERMINAL_STATES for t in self.tasks) and not interrupted
        code = 0 if ok else 1
        display.final(code)
        return code

    def exit_with_failed_tasks(self) -> int:
        return 1 if any(t.is_in_failed_terminal_state for t in self.tasks) else 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _install_sigterm():
    """SIGTERM stops a run like Ctrl-C does (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["Pipeline", "Task", "BuildMode", "ProductAlreadyRegisteredException", "TaskNotInQueueException",
           "DependencyNotAvailableException", "CyclicDependencyException", "TaskNotPicklableException"]
