"""The resolved DAG of a pipeline, as compact arrays the scheduler can walk in O(out-degree).

`resolve()` turns the registered tasks into it and validates everything that can be known before a
run: path dependencies no task produces and no file provides, cycles, and whether each task's
function and arguments can travel to a worker process. Every error names the task and argument.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import pickle
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cloudpickle

from ..exceptions import CyclicDependencyException, DependencyNotAvailableException, TaskNotPicklableException
from ..Task import Task


_PLAIN_PATHS = frozenset({PosixPath, WindowsPath, PurePosixPath, PureWindowsPath})


def path_key(p: Path, cwd: Optional[str] = None) -> str:
    """Two spellings of one file (`build/a`, `./build/a`, absolute) must meet in the indexes.
    A Path's string has no `.` or doubled `/` left, so only `..` needs normpath (the fast path
    matters with 100,000 tasks). `cwd`: the working directory as `working_dir()` gives it, for
    callers that key many paths at once (one getcwd call instead of one per path)."""
    # pathlib's own classes: str() is what their __fspath__ returns, one call less
    s = str(p) if type(p) in _PLAIN_PATHS else os.fspath(p)
    if s[:1] != "/":
        s = (os.getcwd().rstrip("/") if cwd is None else cwd) + "/" + s   # = working_dir(), inline
    return os.path.normpath(s) if ".." in s or not isinstance(p, Path) else s


def working_dir() -> str:
    """The current directory as `path_key` prefixes it (no trailing slash, so `/` is '')."""
    return os.getcwd().rstrip("/")


class Graph:
    """Indexes of tasks (position = queue id - 1) and their edges."""

    def __init__(self, tasks: Sequence[Task]):
        self.tasks: List[Task] = list(tasks)
        n = len(self.tasks)
        # edges by task index; deps are tuples, and a task without edges shares the empty tuple
        self.deps: List[Sequence[int]] = [()] * n
        self.dependents: List[Sequence[int]] = [()] * n
        self.func_digest: List[bytes] = [b""] * n
        self.functions: Dict[bytes, bytes] = {}
        self.payloads: List[Optional[bytes]] = [None] * n

    def __len__(self) -> int:
        return len(self.tasks)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one bulk step that makes a few containers per task
    and no garbage: with 100,000 tasks alive, each full collection the new containers trigger walks
    all of them again (a third of resolve's time). Restores whatever state the collector was in."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def resolve(tasks: Sequence[Task], producers: Dict[str, Task], check_inputs: bool = True) -> Graph:
    """Fill the 0.1.x attributes (`task_dependencies`, `path_dependencies`, `dependent_tasks`) and
    build the Graph. Raises before anything runs on a missing input or a cycle."""
    with _collector_paused():
        return _resolve(tasks, producers, check_inputs)


def _resolve(tasks: Sequence[Task], producers: Dict[str, Task], check_inputs: bool) -> Graph:
    g = Graph(tasks)
    order = g.tasks
    deps, dependents = g.deps, g.dependents
    n = len(order)
    index: Optional[Dict[int, int]] = None    # by id, only for tasks whose queue id is not their place
    missing: List[str] = []
    cwd = working_dir()
    backward_only = True       # every edge from an earlier task to a later one: no cycle possible
    for i, t in enumerate(order):
        task_deps: List[Task] = []
        path_deps: List[Path] = []
        if t.dependencies:
            dep_indices: List[int] = []
            seen: Optional[set] = set() if len(t.dependencies) > 8 else None   # membership by scan when small
            for d in t.dependencies:
                if isinstance(d, Task):
                    dep = d
                else:
                    path_deps.append(d)
                    dep = producers.get(path_key(d, cwd))
                    if dep is None:
                        if check_inputs and not d.exists():
                            missing.append(_missing_input(t, d))
                        continue
                q = dep._queue_id          # a registered task's place, when tasks come from a pipeline
                if q is not None and 0 < q <= n and order[q - 1] is dep:
                    j: Optional[int] = q - 1
                else:
                    if index is None:
                        index = {id(x): k for k, x in enumerate(order)}
                    j = index.get(id(dep))
                if j is None or j == i or (j in seen if seen is not None else j in dep_indices):
                    continue
                if seen is not None:
                    seen.add(j)
                if j > i:
                    backward_only = False
                dep_indices.append(j)
                task_deps.append(dep)
                if dependents[j]:
                    dependents[j].append(i)   # type: ignore[union-attr]
                else:
                    dependents[j] = [i]
            if dep_indices:
                # a tuple of ints leaves the cyclic GC's books at its first pass; a list stays forever
                deps[i] = tuple(dep_indices)
        t.task_dependencies = task_deps
        t.path_dependencies = path_deps
    for j, t in enumerate(order):
        if dependents[j] or t.dependent_tasks:
            t.dependent_tasks = [order[i] for i in dependents[j]]
    if missing:
        raise DependencyNotAvailableException(
            f"{len(missing)} input(s) missing:\n  " + "\n  ".join(missing[:50])
            + (f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""))
    if not backward_only:      # registration order is a topological order otherwise
        check_acyclic(g)
    return g


def _missing_input(t: Task, d: Path) -> str:
    arg = t.argument_of(d, 'dependency')
    where = f"argument '{arg}'" if arg else "depends_on"
    return f"Task {t.label}: {where} = {str(d)!r} does not exist and no task produces it"


def topological_order(g: Graph) -> List[int]:
    """Kahn's algorithm: every task after the tasks it depends on (those on a cycle left out)."""
    indeg = [len(d) for d in g.deps]
    order = [i for i, d in enumerate(indeg) if d == 0]
    k = 0
    while k < len(order):
        for j in g.dependents[order[k]]:
            indeg[j] -= 1
            if indeg[j] == 0:
                order.append(j)
        k += 1
    return order


def check_acyclic(g: Graph) -> None:
    """On a cycle, name the tasks on one."""
    order = topological_order(g)
    if len(order) == len(g):
        return
    # walk backwards from a task left over until a task repeats: that is a cycle
    left = set(range(len(g))) - set(order)
    i = next(iter(left))
    path: List[int] = []
    pos: Dict[int, int] = {}
    while i not in pos:
        pos[i] = len(path)
        path.append(i)
        i = next(j for j in g.deps[i] if j in left)
    cycle = path[pos[i]:] + [i]
    names = " <- ".join(g.tasks[k].label for k in cycle)
    raise CyclicDependencyException(f"dependency cycle: {names}")


def digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=16).digest()


def pickle_payloads(g: Graph, indices: Optional[Sequence[int]] = None) -> None:
    """Pickle each function once and each task's arguments, so that an unpicklable function or
    argument is reported before anything runs, naming the task and the argument."""
    by_func: Dict[int, Tuple[object, bytes]] = {}
    errors: List[str] = []
    for i in (range(len(g)) if indices is None else indices):
        t = g.tasks[i]
        entry = by_func.get(id(t.func))
        if entry is None or entry[0] is not t.func:
            try:
                blob = cloudpickle.dumps(t.func)
            except Exception as e:
                errors.append(f"Task {t.label}: the function {getattr(t.func, '__qualname__', t.func)!r} "
                              f"cannot be pickled: {type(e).__name__}: {e}")
                continue
            entry = by_func[id(t.func)] = (t.func, digest(blob))
            g.functions.setdefault(entry[1], blob)
        g.func_digest[i] = entry[1]
        call = (tuple(t.func_args), t.func_kwargs)
        try:
            g.payloads[i] = pickle.dumps(call, protocol=5)
        except Exception:
            try:
                g.payloads[i] = cloudpickle.dumps(call)
            except Exception as e:
                errors.append(f"Task {t.label}: {_unpicklable_argument(t)}: {type(e).__name__}: {e}")
    if errors:
        raise TaskNotPicklableException("cannot send to a worker process:\n  " + "\n  ".join(errors[:50]))


def _unpicklable_argument(t: Task) -> str:
    for name, value in t._args_dict.items():
        try:
            cloudpickle.dumps(value)
        except Exception:
            return f"argument '{name}' ({type(value).__name__})"
    for k, value in enumerate(t.func_args):
        try:
            cloudpickle.dumps(value)
        except Exception:
            return f"positional argument {k} ({type(value).__name__})"
    return "an argument"
