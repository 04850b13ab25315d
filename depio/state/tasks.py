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
import threading
import time
from collections import deque
from pathlib import Path, PosixPath, PurePosixPath
from typing import Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..BuildMode import BuildMode
from .files import HashMemo, _file_hash, content_hash, norm_path
from .hashing import code_hash
from .records import Decision, MadeRecord, snapshot
from .store import StateStore
from .values import RACY_WINDOW, call_digest, call_text

log = logging.getLogger("depio.state")

_PLAIN_PATHS = frozenset({PosixPath, PurePosixPath})
STATE_MODES = (BuildMode.IF_CHANGED, BuildMode.IF_CODE_CHANGED)    # modes that read the store to decide


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


def _stamp(path: str, st: os.stat_result) -> Optional[str]:
    """What a quick token holds of a file: "size.mtime_ns.inode" (None for a directory)."""
    return None if stat.S_ISDIR(st.st_mode) else f"{st.st_size}.{st.st_mtime_ns}.{st.st_ino}"


class TaskState:
    """One run's (or dry run's, or accept's) view of the store. Records, fingerprints and the memo
    load on first use: a run of IF_MISSING tasks that makes no products reads none of them. (Not in a
    thread of their own while the pipeline validates: the 200,000 rows' GIL hand-offs slowed both.)"""

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
        self._known: Dict[str, str] = {}       # shown path -> hash, of products of tasks skipped in this run
        self._quicks: Optional[frozenset] = None
        self._stamped: Dict[str, str] = {}     # shown path -> stamp, of products of tasks skipped in this run
        self._last_code: Tuple[object, str] = (None, "")
        self.settled: Deque[Tuple[bytes, bytes, bytes]] = deque()   # (token, key, fingerprint): for the recorder

    @classmethod
    def open(cls, env: Optional[Mapping[str, str]] = None) -> Optional["TaskState"]:
        """The default store's view, or None when the store is off or cannot be opened."""
        store = StateStore.open_default(env)
        return cls(store) if store is not None else None

    def close(self) -> None:
        self.store.close()

    def _lazy(self, name: str, load):
        """The attribute `name`, loaded on first use (the scheduler decides while the recorder records)."""
        with self._lock:
            value = getattr(self, name)
            if value is None:
                value = load()
                setattr(self, name, value)
        return value

    @property
    def memo(self) -> HashMemo:
        return self._memo if self._memo is not None else self._lazy("_memo", self.store.load_memo)

    def _fingerprints(self) -> Dict[bytes, bytes]:
        """{key: fingerprint} as the store keeps them (bytes: no conversion of 100,000 rows)."""
        return self._fps if self._fps is not None else \
            self._lazy("_fps", lambda: dict(self.store._read("SELECT key, fp FROM made")))

    def _quick_tokens(self) -> frozenset:
        return self._quicks if self._quicks is not None else self._lazy("_quicks", self.store.quick_tokens)

    def _code_hashes(self) -> Dict[str, Optional[str]]:
        return self._codes if self._codes is not None else self._lazy("_codes", self.store.code_hashes)

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
        """IF_CHANGED's whole decision past NEVER/ALWAYS (missing products included). First by stat
        alone: the task's quick token (its fingerprint with each file's stamp for its content hash)
        against the one recorded once its files had settled; that reads no content and no memo. Then by
        content (`_check_content`), which leaves the token for the next run when the task is up to date."""
        quick = self.quick_token(task)
        if type(quick) is str:
            return quick
        token, names, made, deps = quick
        if token is not None and token in self._quick_tokens():
            stamped = self._stamped
            for shown, stamp in made:
                stamped[shown] = stamp
            return None
        key = hashlib.blake2b(("P\0" + names).encode("utf-8", "surrogateescape"), digest_size=16).digest()
        reason = self._check_content(task, key)
        if reason is None:
            self._stamped.update(made)
            if token is not None and self._settled(made) and self._settled(deps):
                self.settled.append((token, key, self._fingerprints()[key]))
        return reason

    def quick_token(self, task) -> Union[str, Tuple[Optional[bytes], str, tuple, tuple]]:
        """(quick token, the products' shown names, ((shown, stamp) of each product), ((shown, stamp) of
        each input)), or the reason a product is missing. A stamp is a file's "size.mtime_ns.inode" (what
        the memo trusts a content hash by); the token is None when a product or input is a directory (its
        stat does not follow its files). The token covers the names, so it is looked up alone (16 bytes:
        no two of a store's tokens meet by chance). A product of a task skipped in this run is not
        stat'ed again."""
        products = task.products
        if len(products) == 1:
            p = products[0]
            shown = os.fspath(p)
            if shown[:1] != "/" and ".." not in shown and type(p) in _PLAIN_PATHS:     # `_place`, inline
                path = self._cwd_slash + shown
            else:
                shown, path = self._place(p)
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                return f"product missing: {products[0]}"
            if stat.S_ISDIR(st.st_mode):
                return None, shown, (), ()
            stamp = f"{st.st_size}.{st.st_mtime_ns}.{st.st_ino}"
            made, made_text = ((shown, stamp),), f"{shown}\0{stamp}"
        else:
            made = self._product_stamps(products)
            if type(made) is str:
                return made
            shown = "\0".join(shown for shown, _ in made)
            if any(stamp is None for _, stamp in made):
                return None, shown, (), ()
            made_text = "\1".join(f"{p}\0{d}" for p, d in made)
        inputs = task.path_dependencies
        if inputs is None or len(inputs) != len(task.dependencies):     # a task in depends_on: its products
            inputs = inputs_of(task)
        if len(inputs) == 1:
            s = os.fspath(inputs[0])
            stamp = self._stamped.get(s)
            deps = ((s, stamp),) if stamp is not None else (self._input_stamp(inputs[0]),)
            deps_text = "%s\0%s" % deps[0]
        else:
            deps = tuple(sorted(dict(self._input_stamp(p) for p in inputs).items()))
            deps_text = "\1".join(f"{p}\0{d}" for p, d in deps)
        if deps and (deps[0][1] is None or any(stamp is None for _, stamp in deps)):
            return None, shown, made, deps
        func = task.func
        last, code = self._last_code
        if func is not last:
            code = code_hash(func)[0]
            self._last_code = (func, code)
        args = call_text(task)
        text = "\2".join((code, deps_text, args if args is not None else "\3" + call_digest(task), made_text))
        return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest(), shown, made, deps

    def _product_stamps(self, products) -> Union[str, tuple]:
        """((shown, stamp or None for a directory), ...) sorted, or the missing-product reason."""
        found, missing = {}, []
        for p in products:
            shown, path = self._place(p)
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(p)
                continue
            found[shown] = _stamp(path, st)
        if missing:
            return f"product missing: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        return tuple(sorted(found.items()))

    def _input_stamp(self, p) -> Tuple[str, Optional[str]]:
        """(shown path, stamp: "-" when missing, None for a directory) of an input."""
        return self._input_value(p, self._stamped, _stamp, "-")

    def _settled(self, stamps: Sequence[Tuple[str, str]]) -> bool:
        """Whether every file of these stamps is older than the racy window (then a stamp can only
        change with the file: a token may be kept)."""
        now = time.time_ns()
        window = RACY_WINDOW * 1e9
        for _, stamp in stamps:
            if stamp != "-" and abs(now - int(stamp.split(".")[1])) < window:
                return False
        return True

    def _check_content(self, task, key: bytes) -> Optional[str]:
        """IF_CHANGED by content: the fingerprint `snapshot` would give, computed with the memo, and
        without a stat for a file that a task skipped in this run made (its hash is known). A
        difference goes to `why_changed` to be named."""
        place, known, entries = self._place, self._known, self.memo.entries
        products = task.products
        if len(products) == 1:
            shown, path = place(products[0])
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                return f"product missing: {products[0]}"
            e = entries.get(path)
            h = e[3] if e is not None and e[0] == st.st_size and e[1] == st.st_mtime_ns and e[2] == st.st_ino \
                else self._content(path, st)
            made, names, made_paths = f"{shown}\0{h}", shown, ((shown, h),)
        else:
            made, names, made_paths = self._products_made(products)
            if made_paths is None:
                return made
        inputs = task.path_dependencies
        if inputs is None or len(inputs) != len(task.dependencies):     # a task in depends_on: its products
            inputs = inputs_of(task)
        if len(inputs) == 1:
            shown, h = self._input(inputs[0])
            deps = f"{shown}\0{h or '-'}"
        else:
            hashes = dict(self._input(p) for p in inputs)
            deps = "\1".join(f"{p}\0{d or '-'}" for p, d in sorted(hashes.items()))
        text = "\2".join((code_hash(task.func)[0], deps, call_digest(task), made))
        fp = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        if self._fingerprints().get(key) == fp:
            for shown, h in made_paths:
                known[shown] = h
            return None
        return self.why_changed(task)

    def _products_made(self, products) -> Tuple[str, str, Optional[tuple]]:
        """(made text, names, ((shown, hash), ...)) of several products, or (the missing reason, "", None)."""
        found, missing = {}, []
        for p in products:
            shown, path = self._place(p)
            try:
                found[shown] = (path, self._content(path, os.stat(path)))
            except (FileNotFoundError, NotADirectoryError):
                missing.append(p)
        if missing:
            return (f"product missing: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""),
                    "", None)
        pairs = sorted(found.items())
        return ("\1".join(f"{shown}\0{h}" for shown, (_, h) in pairs), "\0".join(shown for shown, _ in pairs),
                tuple((shown, h) for shown, (_, h) in pairs))

    def _input(self, p) -> Tuple[str, Optional[str]]:
        """(shown path, content hash or None when missing) of an input."""
        return self._input_value(p, self._known, self._content, None)

    def _input_value(self, p, known: Dict[str, str], value_of, missing) -> Tuple[str, Optional[str]]:
        """(shown path, its value in `known` or `value_of(path, stat)`, or `missing`). A product of a
        task skipped in this run is in `known` by its shown path (a string equal to one names that
        same file), and is not stat'ed again."""
        s = os.fspath(p)
        value = known.get(s)
        if value is not None:
            return s, value
        shown, path = self._place(p)
        value = known.get(shown)
        if value is None:
            try:
                value = value_of(path, os.stat(path))
            except (FileNotFoundError, NotADirectoryError):
                value = missing
        return shown, value

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


__all__ = ["TaskState", "inputs_of", "needs_state", "STATE_MODES"]
