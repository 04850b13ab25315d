"""The store seen from a pipeline's tasks: the IF_CHANGED / IF_CODE_CHANGED / `track_code` decisions,
recording what ended, and accepting the present state.

Duck-typed on depio's Task (name, func, cleaned_args, products, path_dependencies, task_dependencies,
buildmode, track_code and the run state), so that this package still imports nothing of the runtime.
Deciding runs in the scheduler's thread and recording in the recorder's own: the memo and the lazily
loaded tables are shared, each load taken under a lock.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import sys
import threading
import time
from collections import Counter
from pathlib import Path, PosixPath, PurePosixPath
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..BuildMode import BuildMode
from ..TaskStatus import TaskStatus, TERMINAL_STATES
from .files import HashMemo, _file_hash, content_hash, norm_path
from .hashing import code_hash
from .codec import encode_history
from .records import Decision, MadeRecord, snapshot
from .store import StateStore
from .values import args_digest

log = logging.getLogger("depio.state")

FINISHED, SKIPPED = TaskStatus.FINISHED, TaskStatus.SKIPPED
_PLAIN_PATHS = frozenset({PosixPath, PurePosixPath})
STATE_MODES = (BuildMode.IF_CHANGED, BuildMode.IF_CODE_CHANGED)    # modes that read the store to decide
_TERMINAL = tuple(TERMINAL_STATES)     # a tuple: membership by identity; an Enum's hash is Python code


def needs_state(task) -> bool:
    """Whether deciding the task reads the store."""
    return task.buildmode in STATE_MODES or bool(task.track_code)


def inputs_of(task) -> List[Path]:
    """The files a task reads: its path dependencies and the products of the tasks it depends on
    (`depends_on=[task]`), each once."""
    paths = task.path_dependencies
    if paths is None:
        paths = [d for d in task.dependencies if isinstance(d, os.PathLike)]
    upstream = task.task_dependencies or ()
    if not upstream:
        return list(paths)
    out = list(paths)
    seen = {os.fspath(p) for p in out}
    for u in upstream:
        for p in u.products:
            if os.fspath(p) not in seen:
                seen.add(os.fspath(p))
                out.append(p)
    return out


class TaskState:
    """One run's (or dry run's, or accept's) view of the store. Records, fingerprints and the memo
    load on first use: a run of IF_MISSING tasks that makes no products reads none of them."""

    def __init__(self, store: StateStore, decision: Optional[Decision] = None):
        self.store = store
        self.decision = decision or Decision()
        self._lock = threading.Lock()
        self._memo: Optional[HashMemo] = None
        self._fps: Optional[Dict[str, str]] = None
        self._codes: Optional[Dict[str, Optional[str]]] = None
        self._cwd = os.getcwd()
        self._cwd_slash = self._cwd.rstrip("/") + "/"
        self._paths: Dict[str, Tuple[str, str]] = {}
        self._known: Dict[str, str] = {}       # absolute path -> hash, of products of tasks skipped in this run

    @classmethod
    def open(cls, env: Optional[Mapping[str, str]] = None) -> Optional["TaskState"]:
        """The default store's view, or None when the store is off or cannot be opened."""
        store = StateStore.open_default(env)
        return cls(store) if store is not None else None

    def close(self) -> None:
        self.store.close()

    @property
    def memo(self) -> HashMemo:
        if self._memo is None:
            with self._lock:
                if self._memo is None:
                    self._memo = self.store.load_memo()
        return self._memo

    def _fingerprints(self) -> Dict[bytes, bytes]:
        """{key: fingerprint} as the store keeps them (bytes: no conversion of 100,000 rows)."""
        if self._fps is None:
            with self._lock:
                if self._fps is None:
                    self._fps = dict(self.store._read("SELECT key, fp FROM made"))
        return self._fps

    def prefetch(self) -> None:
        """Load the fingerprints and the memo in a thread of their own, while the pipeline validates
        (the first decision waits for them)."""
        def load() -> None:
            try:
                self._fingerprints()
                self.memo
            except Exception as e:        # the decision loads again, and reports what fails then
                log.debug("prefetching the state failed: %s", e)
        threading.Thread(target=load, name="depio-state-prefetch", daemon=True).start()

    def _code_hashes(self) -> Dict[str, Optional[str]]:
        if self._codes is None:
            with self._lock:
                if self._codes is None:
                    self._codes = self.store.code_hashes()
        return self._codes

    def current(self, task, hash_inputs: bool = True) -> MadeRecord:
        """What the task's products would be made from now (products hashed as they are)."""
        return snapshot(task.name, task.func, task.cleaned_args, inputs_of(task) if hash_inputs else (),
                        task.products, self.memo, hash_products=hash_inputs)

    def _place(self, p) -> Tuple[str, str]:
        """(shown, absolute) path, as records show it and as it is stat'ed. A relative path's string
        has nothing to normalise but `..` (pathlib drops `.` and doubled slashes)."""
        s = os.fspath(p)
        if s[:1] != "/" and ".." not in s and type(p) in _PLAIN_PATHS:
            return s, self._cwd_slash + s
        e = self._paths.get(s)
        if e is None:
            e = self._paths[s] = (norm_path(s, self._cwd), os.path.normpath(os.path.join(self._cwd, s)))
        return e

    def _content(self, path: str, st: os.stat_result) -> str:
        if stat.S_ISDIR(st.st_mode):
            return content_hash(path, self.memo)
        e = self.memo.entries.get(path)
        if e is not None and e[0] == st.st_size and e[1] == st.st_mtime_ns and e[2] == st.st_ino:
            return e[3]
        return _file_hash(path, st, self.memo)

    def check_changed(self, task) -> Optional[str]:
        """IF_CHANGED's whole decision past NEVER/ALWAYS (missing products included), fast: the
        fingerprint `snapshot` would give, computed with a stat per file and none for a file that a
        task skipped in this run made (it cannot have changed since: its hash is known). A difference
        goes to `why_changed` to be named."""
        place, content, known = self._place, self._content, self._known
        products, missing = [], None
        for p in task.products:
            shown, path = place(p)
            try:
                products.append((shown, path, content(path, os.stat(path))))
            except (FileNotFoundError, NotADirectoryError):
                missing = missing or []
                missing.append(p)
        if missing:
            return f"product missing: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        deps = {}
        inputs = task.path_dependencies
        if inputs is None or len(inputs) != len(task.dependencies):     # a task in depends_on: its products
            inputs = inputs_of(task)
        for p in inputs:
            shown, path = place(p)
            h = known.get(path)
            if h is None:
                try:
                    h = content(path, os.stat(path))
                except (FileNotFoundError, NotADirectoryError):
                    h = None
            deps[shown] = h
        if len(products) == 1:
            shown, _, h = products[0]
            made, names = f"{shown}\0{h}", shown
        else:
            pairs = sorted({shown: h for shown, _, h in products}.items())
            made, names = "\1".join(f"{p}\0{d}" for p, d in pairs), "\0".join(p for p, _ in pairs)
        key = hashlib.blake2b(("P\0" + names).encode("utf-8", "surrogateescape"), digest_size=16).digest()
        text = "\2".join((code_hash(task.func)[0],
                          "\1".join(f"{p}\0{d or '-'}" for p, d in sorted(deps.items())),
                          args_digest(task.cleaned_args), made))
        if self._fingerprints().get(key) == hashlib.blake2b(text.encode("utf-8", "surrogateescape"),
                                                            digest_size=8).digest():
            for _, path, h in products:
                known[path] = h
            return None
        return self.why_changed(task)

    def why_changed(self, task) -> Optional[str]:
        """IF_CHANGED's reason beyond a missing product (None: up to date). The fast path compares
        two fingerprints; only a difference reads the record, to name it."""
        cur = self.current(task)
        fp = self._fingerprints().get(bytes.fromhex(cur.key))
        if fp is not None and fp.hex() == cur.fingerprint:
            return None
        old = self.store.get_made([cur.key]).get(cur.key) if fp is not None else None
        return self.decision.why_changed(old, cur)

    def why_code_changed(self, task) -> Optional[str]:
        """IF_CODE_CHANGED's and `track_code`'s reason: the code differs from the record's, or there is
        no record (as the fork counts an unseen task)."""
        cur = self.current(task, hash_inputs=False)
        codes = self._code_hashes()
        if cur.key in codes and codes[cur.key] in (None, cur.code):
            return None
        old = self.store.get_made([cur.key]).get(cur.key) if cur.key in codes else None
        return self.decision.why_code_changed(old, cur)

    def accept(self, tasks: Sequence) -> List[Tuple[object, Optional[str]]]:
        """Record each task's present state as made (products must exist); (task, what was accepted,
        None when it was up to date) pairs."""
        records = [self.current(t) for t in tasks]
        done = self.store.accept(records, self.decision)
        self.store.save_memo(self.memo)
        return [(t, why) for t, (_, why) in zip(tasks, done)]


class Recorder:
    """One run's history and made records, written in batched transactions from a thread of its
    own (every INTERVAL seconds, and once more at the end: `finish()` starts that last pass while the
    pipeline stops its workers, `close()` waits for it), so that recording stays off the scheduler's
    and the pipeline loop's way; the history goes packed (`codec.encode_history`). Only a task that
    ended FINISHED is recorded as made; SKIPPED tasks are counted, not listed (an up-to-date run of
    100,000 tasks writes one row)."""

    INTERVAL = 2.0          # seconds between transactions at most: what a kill -9 may lose (those tasks rerun)
    BATCH = 5000            # tasks per transaction at most

    def __init__(self, state: TaskState, tasks: Sequence, log_dir: Optional[os.PathLike] = None,
                 script: Optional[str] = None):
        self.state, self.tasks = state, tasks
        if script is None:
            script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c") else ""
        self.run_id = state.store.begin_run(script, log_dir=log_dir)
        self.t0 = state.store.run(self.run_id)["start"]
        self.todo = list(range(len(tasks)))
        self.skipped = self.pending = 0
        self.packed: List[bytes] = []          # history batches not written yet
        self.made: List[MadeRecord] = []
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="depio-state-recorder", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.poll()
        self.poll(final=True)
        if self.failed:
            return
        counts = Counter(t._status.name for t in self.tasks if t._status is not SKIPPED)
        if self.skipped:
            counts["SKIPPED"] = self.skipped
        try:
            self.state.store.end_run(self.run_id, dict(counts))
        except Exception as e:
            log.warning("cannot end the run's record in %s: %s", self.state.store.path, e)

    @classmethod
    def start(cls, state: Optional[TaskState], tasks: Sequence, log_dir: Optional[os.PathLike] = None
              ) -> Optional["Recorder"]:
        """A recorder, or None when there is no store or the run cannot be begun (logged): a run goes
        on without history rather than fail."""
        if state is None:
            return None
        try:
            return cls(state, tasks, log_dir)
        except Exception as e:
            log.warning("cannot record this run in %s: %s", state.store.path, e)
            return None

    def poll(self, final: bool = False) -> None:
        """Take the tasks that ended since the last call; write a batch when one is due. A store that
        fails (a full disk, a lock held too long) is logged once and recording stops: never the run."""
        if self.failed:
            return
        try:
            self._poll(final)
        except Exception as e:
            self.failed = True
            log.warning("recording the run in %s failed, recording stops: %s", self.state.store.path, e)

    failed = False

    def _poll(self, final: bool) -> None:
        tasks, terminal = self.tasks, _TERMINAL
        done = [i for i in self.todo if tasks[i]._status in terminal]
        if len(done) == len(self.todo):
            self.todo = []
        elif done:
            gone = set(done)
            self.todo = [i for i in self.todo if i not in gone]
        ended = [tasks[i] for i in done if tasks[i]._status is not SKIPPED]
        self.skipped += len(done) - len(ended)
        if ended:
            keys = [self._made(t) if t._status is FINISHED and (t.products or t.buildmode in STATE_MODES or t.track_code)
                    else "" for t in ended]
            self.packed.append(encode_history(ended, keys, self.t0))
            self.pending += len(ended)
        if final or self.pending >= self.BATCH or (self.packed or self.made) and \
                time.monotonic() - self.last >= self.INTERVAL:
            self._flush()

    def _made(self, t) -> str:
        """Record how a FINISHED task's products were made; its key ("" when it cannot be recorded)."""
        try:
            rec = self.state.current(t)
        except Exception as e:       # a product deleted meanwhile, an unreadable file: not recorded
            log.warning("cannot record how %s was made: %s", t.label, e)
            return ""
        self.made.append(rec)
        return rec.key

    def _flush(self) -> None:
        memo = self.state._memo
        if self.packed or self.made or (memo is not None and memo.dirty):
            packed, made = self.packed, self.made
            self.packed, self.made, self.pending = [], [], 0
            self.state.store.write_batch(self.run_id, (), made, memo, packed=packed)
        self.last = time.monotonic()

    def finish(self) -> None:
        """Every task has ended: write what is left and end the run with its counts by status (tasks
        that never ended count too), in the recorder's thread."""
        self._stop.set()

    def close(self) -> None:
        """`finish()`, and wait until it is written."""
        self._stop.set()
        self._thread.join()


__all__ = ["TaskState", "Recorder", "inputs_of", "needs_state", "STATE_MODES"]
