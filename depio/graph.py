"""The resolved DAG of a pipeline, as compact arrays the scheduler can walk in O(out-degree).

`resolve()` turns the registered tasks into it and validates everything that can be known before a
run: path dependencies no task produces and no file provides, cycles, and whether each task's
function and arguments can travel to a worker process. Every error names the task and argument.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cloudpickle

from .exceptions import CyclicDependencyException, DependencyNotAvailableException, TaskNotPicklableException
from .Task import Task


def path_key(p: Path) -> str:
    """Two spellings of one file (`build/a`, `./build/a`, absolute) must meet in the indexes.
    A Path's string has no `.` or doubled `/` left, so only `..` needs normpath (the fast path
    matters with 100,000 tasks)."""
    s = os.fspath(p)
    if s[:1] != "/":
        s = os.getcwd().rstrip("/") + "/" + s
    return os.path.normpath(s) if ".." in s or not isinstance(p, Path) else s


class Graph:
    """Indexes of tasks (position = queue id - 1) and their edges."""

    def __init__(self, tasks: Sequence[Task]):
        self.tasks: List[Task] = list(tasks)
        n = len(self.tasks)
        # edges by task index; a task without edges shares the empty tuple (100,000 lists add up)
        self.deps: List[Sequence[int]] = [()] * n
        self.dependents: List[Sequence[int]] = [()] * n
        self.func_digest: List[bytes] = [b""] * n
        self.functions: Dict[bytes, bytes] = {}
        self.payloads: List[Optional[bytes]] = [None] * n

    def __len__(self) -> int:
        return len(self.tasks)


def resolve(tasks: Sequence[Task], producers: Dict[str, Task], check_inputs: bool = True) -> Graph:
    """Fill the 0.1.x attributes (`task_dependencies`, `path_dependencies`, `dependent_tasks`) and
    build the Graph. Raises before anything runs on a missing input or a cycle."""
    g = Graph(tasks)
    index = {id(t): i for i, t in enumerate(g.tasks)}
    missing: List[str] = []
    for i, t in enumerate(g.tasks):
        task_deps: List[Task] = []
        path_deps: List[Path] = []
        dep_indices: List[int] = []
        seen: Optional[set] = set() if len(t.dependencies) > 8 else None   # membership by scan when small
        for n, d in enumerate(t.dependencies):
            if isinstance(d, Task):
                dep = d
            else:
                path_deps.append(d)
                dep = producers.get(path_key(d))
                if dep is None:
                    if check_inputs and not d.exists():
                        arg = t.argument_of(d, 'dependency')
                        where = f"argument '{arg}'" if arg else "depends_on"
                        missing.append(f"Task {t.label}: {where} = {str(d)!r} does not exist and no task produces it")
                    continue
            j = index.get(id(dep))
            if j is None or j == i or (j in seen if seen is not None else j in dep_indices):
                continue
            if seen is not None:
                seen.add(j)
            dep_indices.append(j)
            task_deps.append(dep)
            if g.dependents[j]:
                g.dependents[j].append(i)   # type: ignore[union-attr]
            else:
                g.dependents[j] = [i]
        if dep_indices:
            g.deps[i] = dep_indices
        t.task_dependencies = task_deps
        t.path_dependencies = path_deps
    for j, t in enumerate(g.tasks):
        if g.dependents[j] or t.dependent_tasks:
            t.dependent_tasks = [g.tasks[i] for i in g.dependents[j]]
    if missing:
        raise DependencyNotAvailableException(
            f"{len(missing)} input(s) missing:\n  " + "\n  ".join(missing[:50])
            + (f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""))
    check_acyclic(g)
    return g


def check_acyclic(g: Graph) -> None:
    """Kahn's algorithm; on a cycle, name the tasks on one."""
    indeg = [len(d) for d in g.deps]
    stack = [i for i, d in enumerate(indeg) if d == 0]
    seen = 0
    while stack:
        i = stack.pop()
        seen += 1
        for j in g.dependents[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                stack.append(j)
    if seen == len(g):
        return
    # walk backwards from a task left over until a task repeats: that is a cycle
    left = {i for i, d in enumerate(indeg) if d > 0}
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
