"""Which pipeline each job on a pool's worker is of, so that its slot runs it in that pipeline's
working directory with that pipeline's import path.

A pool's dispatcher sends where each pipeline's tasks begin in a `RunTasks` (`places`), and a
pipeline's directory and path only the first time this worker sees it; a pipeline's own worker gets
no places and this stays empty.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from depio.runtime.protocol import TaskSpec

Context = Tuple[str, Tuple[str, ...]]       # (working directory, import path)


class Placement:
    """`contexts`: each pipeline's context, by pipeline id (kept: a pipeline's next batch may not
    repeat it). `of`: each held job's context, by job id (a plain dict: `SlotSet.fill` looks every
    task up in it)."""

    def __init__(self) -> None:
        self.contexts: Dict[int, Context] = {}
        self.of: Dict[int, Optional[Context]] = {}

    def place(self, tasks: Sequence[Tuple[int, TaskSpec]],
              places: Sequence[Tuple[int, int, str, Tuple[str, ...]]]) -> None:
        """Note the context of each of `tasks`, from `places` (see `RunTasks.places`)."""
        for i, (start, cid, cwd, path) in enumerate(places):
            if cwd:
                self.contexts[cid] = (cwd, tuple(path))
            context = self.contexts.get(cid)
            end = places[i + 1][0] if i + 1 < len(places) else len(tasks)
            for jid, _ in tasks[start:end]:
                self.of[jid] = context

    def clear(self) -> None:
        """Forget which job is whose (no job is held); the pipelines' contexts stay known."""
        self.of.clear()
