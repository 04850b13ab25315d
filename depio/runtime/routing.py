"""Routing by resources: tasks that ask for something special go only to workers that fit them.

The common task asks for nothing special: its `TaskSpec.shape` is None and it never comes here, so
the assignment's hot path pays one `any()` per `Submit` and one call per turn for this. A task with
a shape waits here, in a queue per shape, and goes only into a free slot (no prefetch) of a worker
whose offer fits it (`resources.fits`), before the common tasks take what is left.

A pinned task (`resources.pinned_shape(token)`, a per-task Slurm job's one task) goes only to the
worker whose offer names that pin: the job was started for it.

A pool whose workers come from a cluster sets `impossible`: a shape that no node of the cluster could
hold, and that no registered worker fits, fails at once with the reason instead of waiting for ever.
"""
from __future__ import annotations

import operator
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from .fairshare import failed
from .protocol import TaskSpec
from .resources import PIN, fits, from_shape

# assignment imports this module, never the other way round: its classes appear here by name only
_SHAPE = operator.attrgetter("shape")


class Routing:
    """Tasks with a shape, by shape (and pinned ones by pin). A worker's offer is `WorkerInfo.offer`,
    set when it registers; a worker that offered nothing takes only common tasks."""

    def __init__(self, assignment: Any, make_batch: Callable[[Any], Any]) -> None:
        self.a = assignment
        self.make_batch = make_batch
        self.held: Dict[tuple, Deque[Tuple[Any, TaskSpec]]] = {}
        self.pinned: Dict[str, Tuple[Any, TaskSpec]] = {}
        self._requests: Dict[tuple, object] = {}
        # why no worker could ever come for a shape (None: one could); set by a pool's pilot launcher
        self.impossible: Optional[Callable[[tuple], Optional[str]]] = None

    def hold(self, c: Any, specs: Sequence[TaskSpec]) -> Sequence[TaskSpec]:
        """Keep the specs that have a shape; return the others (for the client's common queue)."""
        if not any(map(_SHAPE, specs)):
            return specs
        rest = []
        for s in specs:
            shape = s.shape
            if shape is None:
                rest.append(s)
            elif shape[0] == PIN:
                self.pinned[shape[1]] = (c, s)
            elif shape not in self.held and self.impossible is not None and (why := self._never(shape)):
                self.a.report(c).done.append(failed(s, f"task {s.name} {why}", "ResourcesUnavailable"))
            else:
                self.held.setdefault(shape, deque()).append((c, s))
        return tuple(rest)

    def _never(self, shape: tuple) -> Optional[str]:
        """Why a task of `shape` can never run here: no registered worker fits it, and the cluster
        that workers come from has no node that could (`impossible`)."""
        request = self._requests.get(shape) or self._requests.setdefault(shape, from_shape(shape))
        if any(w.offer is not None and not w.offer.pin and fits(request, w.offer) for w in self.a.workers):
            return None
        return self.impossible(shape)

    def cancel(self, c: Any, keys: Optional[set]) -> None:
        """Forget the client's held tasks `keys` (None: all of them)."""
        if not self.held and not self.pinned:
            return
        drop = (lambda cc, s: cc is c) if keys is None else (lambda cc, s: cc is c and s.key in keys)
        for shape, q in list(self.held.items()):
            kept = deque(item for item in q if not drop(*item))
            if kept:
                self.held[shape] = kept
            else:
                del self.held[shape]
        for pin, item in list(self.pinned.items()):
            if drop(*item):
                del self.pinned[pin]

    def assign(self) -> Dict[bytes, Any]:
        """Held tasks into free slots of the workers that fit them, as batches by worker identity."""
        batches: Dict[bytes, Any] = {}
        if not self.held and not self.pinned:
            return batches
        workers = self.a.workers.with_credit()
        if self.pinned:
            for w in workers:
                offer = w.offer
                item = self.pinned.pop(offer.pin, None) if offer is not None and offer.pin else None
                if item is not None and item[0].identity in self.a.clients:
                    self._put(batches, w, *item)
        for shape in list(self.held):
            q = self.held[shape]
            request = self._requests.get(shape) or self._requests.setdefault(shape, from_shape(shape))
            for w in workers:
                free = min(w.credits, w.slots - len(w.jobs))
                offer = w.offer
                if free <= 0 or offer is None or offer.pin or not fits(request, offer):
                    continue
                while free > 0 and q:
                    c, spec = q.popleft()
                    if c.identity in self.a.clients:
                        self._put(batches, w, c, spec)
                        free -= 1
            if not q:
                del self.held[shape]
        return batches

    def _put(self, batches: Dict[bytes, Any], w: Any, c: Any, spec: TaskSpec) -> None:
        batch = batches.get(w.identity)
        if batch is None:
            batch = batches[w.identity] = self.make_batch(w)
        self.a._place(c, batch, spec)
        w.credits -= 1

    def waiting(self) -> Dict[tuple, int]:
        """How many held tasks wait, by shape (a pilot launcher sizes its groups by this)."""
        return {shape: len(q) for shape, q in self.held.items()}

    def work(self) -> Dict[tuple, Tuple[int, int]]:
        """By shape: (tasks held here or on a worker and not ended, how many of them not started).
        Read-only; a pool's pilot launcher reads it from another thread (it may raise RuntimeError
        if a dict changes meanwhile: read again)."""
        out: Dict[tuple, List[int]] = {}
        for shape, q in list(self.held.items()):
            out[shape] = [len(q), len(q)]
        for job in list(self.a.jobs.values()):
            shape = job.spec.shape
            if shape is not None and shape[0] != PIN:
                n = out.setdefault(shape, [0, 0])
                n[0] += 1
                n[1] += not job.started
        return {shape: (n[0], n[1]) for shape, n in out.items()}
