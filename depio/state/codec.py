"""How records and run history are written into the store: JSON texts for made records, and the
history of a run's tasks packed per batch (marshal of columns, compressed: 10,000 tasks' history costs a
few milliseconds, where as many rows cost a hundred).
"""
from __future__ import annotations

import json
import marshal
import zlib
from typing import List, Sequence

from .records import MadeRecord, RunTask

HISTORY_VERSION = 4     # 1: times as int ms from the run's start; 2: times as they are (floats), compressed;
                        # 3: each column of texts joined into one text where it can be, and no host column;
                        # 4: a column of texts that are all one text as that text alone, in a 1-tuple
_SEP = "\0"


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _encode_rec(r: MadeRecord) -> str:
    """deps, args and products as one JSON text; a path argument that is also a dependency or a
    product is written as ["d", i] / ["p", i] (its index among them) instead of a second copy."""
    where = {p: ("d", i) for i, p in enumerate(r.deps)}
    where.update({p: ("p", i) for i, p in enumerate(r.products)})
    args = {}
    for name, entry in r.args.items():
        if not isinstance(entry, str) and entry[1] == "path" and entry[0] in where:
            entry = list(where[entry[0]])
        args[name] = entry
    return _dumps([r.deps, args, r.products])


def _decode_rec(text: str) -> tuple:
    deps, args, products = json.loads(text)
    lists = {"d": list(deps), "p": list(products)}
    for name, entry in args.items():
        if not isinstance(entry, str) and entry[0] in lists and isinstance(entry[1], int):
            args[name] = [lists[entry[0]][entry[1]], "path"]
    return deps, args, products


def _host_of(worker: str) -> str:
    """`pilot-12@node3` and `node3:4242` (how workers name themselves) run on node3."""
    return worker.rsplit("@", 1)[1] if "@" in worker else worker.split(":", 1)[0] if ":" in worker else ""


def _texts(col: List[str]):
    """A column of texts as a 1-tuple when they are all one text (a run's status, reason or task name
    mostly is: `list.count` finds out in C, by identity first); else as one text, when none holds the
    separator (joined and split in C: a list of texts costs marshal a header and a lookup each); else
    the list as it is."""
    n = len(col)
    if n and col.count(col[0]) == n:
        return (col[0],)
    joined = _SEP.join(col)
    return joined if joined.count(_SEP) == n - 1 else col


def _untexts(col, n: int) -> List[str]:
    """What `_texts` made of a column of `n` texts."""
    if isinstance(col, tuple):
        return list(col) * n
    return col.split(_SEP) if isinstance(col, str) else col


def encode_history(tasks: Sequence, keys: Sequence[str]) -> bytes:
    """The history of ended tasks (depio Task objects: queue id, name, times, worker, Slurm id,
    attempts, status, reason), one column each; `keys` are their store keys ("" when not made).
    Comprehensions over plain attributes only (`_name_`: `.name` is a Python-level property), the
    times as they are, the texts joined: it runs while tasks run, and at the end of a short run it
    is what the run waits for."""
    packed = marshal.dumps((HISTORY_VERSION, [t._queue_id or 0 for t in tasks], _texts(list(keys)),
                            _texts([t.name for t in tasks]), [t.start_time for t in tasks],
                            [t.end_time for t in tasks], _texts([t.worker or "" for t in tasks]),
                            _texts([t._slurmid or "" for t in tasks]), [t.attempts for t in tasks],
                            _texts([t._status._name_ for t in tasks]), _texts([t.reason or "" for t in tasks])),
                           2)    # marshal version 2: no back-references, which cost a table lookup per float
    # level 1: a tenth of the size for 2 ms per 10,000 tasks, less than the writing and checkpointing it saves
    return zlib.compress(packed, 1)


def decode_history(blob: bytes, t0: float) -> List[RunTask]:
    """What `encode_history` packed (any version); `t0`: the run's start (version 1's times count from it)."""
    if blob[:1] == b"\x78":      # zlib's header (versions 2 to 4); a marshalled tuple (version 1) starts otherwise
        blob = zlib.decompress(blob)
    version, *cols = marshal.loads(blob)
    if version in (3, 4):
        seq, keys, names, starts, ends, workers, slurm, attempts, status, reasons = cols
        n = len(seq)
        workers = _untexts(workers, n)
        hosts = {w: _host_of(w) for w in set(workers)}
        cols = [seq, _untexts(keys, n), _untexts(names, n), starts, ends, workers, [hosts[w] for w in workers],
                _untexts(slurm, n), attempts, _untexts(status, n), _untexts(reasons, n)]
    elif version == 1:
        cols[3] = [None if a is None else t0 + a / 1000 for a in cols[3]]
        cols[4] = [None if e is None else t0 + e / 1000 for e in cols[4]]
    elif version != 2:
        return []
    return [RunTask(seq, key, name, status, started, ended, worker, host, slurm, attempts, reason)
            for seq, key, name, started, ended, worker, host, slurm, attempts, status, reason in zip(*cols)]


__all__ = ["encode_history", "decode_history"]
