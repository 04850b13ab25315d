"""The state store: one SQLite file (stdlib sqlite3, WAL) with what each task was made from, the
content-hash memo and the run history; where it is, `location` says. Every write is one transaction
(`BEGIN IMMEDIATE`, waiting up to
`timeout` seconds for another pipeline's), so two pipelines in one folder work at once, and a
process killed mid-run leaves whole transactions only.

Tables (kept small: about 45 MB after one run of 100,000 one-input one-output tasks):

    made       task key -> fingerprint, name, code (-> code), deps/args/products as one JSON text, time, accepted,
               and the quick token: the fingerprint with each file's (size, mtime_ns, inode) for its content
               hash, set once the files are older than the racy window (`TaskState.check_changed` reads it)
    code       code hash -> Python version, file, def line, function name, parts (the functions it reaches);
               the version sits with the hash because a code hash means something only under it
    hash_memo  path (relative to `base` when inside it) -> size, mtime_ns, inode, content hash; one row a path
    runs       run id, script, cwd, host, pid, start, end, counts by status, log folder
    run_tasks  run, seq -> task key, name, start/end (ms from the run's start), worker, host, Slurm job id,
               attempts, status, reason
    run_history  the same, packed: one row per batch a pipeline recorded (`codec.encode_history`)
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .hashing import CodeDesc, HashMemo
from .codec import _decode_rec, _dumps, _encode_rec, decode_history
from .location import keep_runs, state_path
from .records import Decision, MadeRecord, RunTask

log = logging.getLogger("depio.state")

SCHEMA_VERSION = "1"
_CHUNK = 500                             # keys per IN (...) query, under SQLite's parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS code(id INTEGER PRIMARY KEY, hash TEXT UNIQUE, python TEXT, file TEXT, line INTEGER,
    name TEXT, parts TEXT);
CREATE TABLE IF NOT EXISTS made(id INTEGER PRIMARY KEY, key BLOB UNIQUE NOT NULL, fp BLOB NOT NULL, name TEXT,
    code INTEGER, rec TEXT, made_at INTEGER, accepted INTEGER, quick BLOB);
CREATE TABLE IF NOT EXISTS hash_memo(path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER,
    hash BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs(num INTEGER PRIMARY KEY, id TEXT UNIQUE, script TEXT, cwd TEXT, host TEXT,
    pid INTEGER, start REAL, end REAL, counts TEXT, log_dir TEXT);
CREATE TABLE IF NOT EXISTS run_tasks(run INTEGER, seq INTEGER, key BLOB, name TEXT, start_ms INTEGER, end_ms INTEGER,
    worker TEXT, host TEXT, slurm TEXT, attempts INTEGER, status TEXT, reason TEXT,
    PRIMARY KEY(run, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_history(run INTEGER, data BLOB);
"""


def _use_wal(db: sqlite3.Connection, timeout: float) -> None:
    """Switch to WAL (kept in the file: a no-op once done). SQLite does not call the busy handler for a
    journal-mode change, so a second pipeline creating the file at the same moment gets "database is
    locked" at once: wait for it here as for any other lock."""
    deadline, pause = time.monotonic() + timeout, 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


class StateStore:
    """The database. Thread-safe (one connection, one lock); open one per process."""

    def __init__(self, path: os.PathLike, timeout: float = 60.0, base: Optional[str] = None):
        self.path = Path(path)
        self.base = os.path.abspath(base or os.getcwd())     # memo paths are kept relative to it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        _use_wal(self._db, timeout)
        self._db.execute("PRAGMA synchronous=NORMAL")     # WAL + NORMAL: durable transactions, no torn ones
        with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            if "quick" not in {row[1] for row in self._db.execute("PRAGMA table_info(made)")}:   # a store of 0.2.0
                self._db.execute("ALTER TABLE made ADD COLUMN quick BLOB")
        self._run_nums: Dict[str, Tuple[int, float]] = {}      # run id -> (num, start)

    @classmethod
    def open_default(cls, env: Optional[Mapping[str, str]] = None) -> Optional["StateStore"]:
        """The store at `state_path()`, or None when it is off or cannot be opened (logged): a run
        goes on without state rather than fail."""
        path = state_path(env)
        if path is None:
            return None
        try:
            return cls(path)
        except (OSError, sqlite3.Error) as e:
            log.warning("cannot open the state store %s: %s", path, e)
            return None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    class _Tx:
        def __init__(self, store: "StateStore"):
            self.store = store

        def __enter__(self):
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb):
            try:
                self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def _write(self) -> "StateStore._Tx":
        """One write transaction, taken at its start (BEGIN IMMEDIATE) so that it waits for another
        process's instead of failing half-way."""
        return StateStore._Tx(self)

    def _read(self, sql: str, params: Sequence = ()) -> List[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ------------------------------------------------------------ made
    def fingerprints(self) -> Dict[str, str]:
        """{task key: fingerprint} of every record: enough to see that a task is up to date."""
        with self._lock:
            return {k.hex(): f.hex() for k, f in self._db.execute("SELECT key, fp FROM made")}

    def quick_tokens(self) -> frozenset:
        """The quick tokens of the records that have one (`TaskState.quick_token`; bytes as kept)."""
        with self._lock:
            return frozenset(q for (q,) in self._db.execute("SELECT quick FROM made WHERE quick IS NOT NULL"))

    def code_hashes(self) -> Dict[str, Optional[str]]:
        """{task key: code hash or None} of every record: enough for IF_CODE_CHANGED's decisions."""
        with self._lock:
            return {k.hex(): h for k, h in self._db.execute("SELECT m.key, c.hash FROM made m LEFT JOIN code c "
                                                             "ON c.id = m.code")}

    def get_made(self, keys: Optional[Iterable[str]] = None) -> Dict[str, MadeRecord]:
        """Full records (all when `keys` is None), to explain a fingerprint that differs."""
        sql = ("SELECT m.key, m.name, c.hash, m.rec, c.python, m.made_at, m.accepted, "
               "c.file, c.line, c.name, c.parts FROM made m LEFT JOIN code c ON c.id = m.code")
        rows: List[tuple] = []
        if keys is None:
            rows = self._read(sql)
        else:
            keys = [bytes.fromhex(k) for k in keys]
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                rows += self._read(sql + f" WHERE m.key IN ({','.join('?' * len(chunk))})", chunk)
        out = {}
        for key, name, code, rec, python, made_at, accepted, file, line, cname, parts in rows:
            desc = CodeDesc(file, line, cname, tuple(tuple(p) for p in json.loads(parts))) if file is not None else None
            deps, args, products = _decode_rec(rec)
            out[key.hex()] = MadeRecord(key.hex(), name, code, desc, deps, args, products, python or "",
                                        made_at, bool(accepted))
        return out

    @staticmethod
    def _made_rows(db: sqlite3.Connection, records: Sequence[MadeRecord], accepted: bool = False) -> None:
        codes = {r.code: (r.code_desc, r.python) for r in records if r.code is not None}
        ids = {}
        for h, (d, python) in codes.items():      # a few per batch, one per function; the latest place wins
            d = d or CodeDesc("?", 0, "?")
            db.execute("INSERT INTO code(hash, python, file, line, name, parts) VALUES (?,?,?,?,?,?) ON CONFLICT(hash) "
                       "DO UPDATE SET file=excluded.file, line=excluded.line, name=excluded.name, parts=excluded.parts",
                       (h, python, d.file, d.line, d.name, _dumps(d.parts)))
            ids[h] = db.execute("SELECT id FROM code WHERE hash = ?", (h,)).fetchone()[0]
        # the row is replaced whole: its quick token goes (set again once its files have settled)
        db.executemany("INSERT OR REPLACE INTO made(key, fp, name, code, rec, made_at, accepted) VALUES (?,?,?,?,?,?,?)",
                       [(bytes.fromhex(r.key), bytes.fromhex(r.fingerprint), r.name, ids.get(r.code), _encode_rec(r),
                         int(r.made_at), int(accepted or r.accepted)) for r in records])

    def record_made(self, records: Iterable[MadeRecord]) -> int:
        """Record tasks that ended FINISHED (only those), in one transaction."""
        records = list(records)
        if records:
            with self._write() as db:
                self._made_rows(db, records)
        return len(records)

    def accept(self, current: Iterable[MadeRecord], decision: Optional[Decision] = None) -> List[Tuple[MadeRecord, Optional[str]]]:
        """`depio accept`: record the present state as made, without running. Returns each record with
        what was accepted (the reason it would have run; None: it was up to date already)."""
        current = list(current)
        old = self.get_made(r.key for r in current)
        decision = decision or Decision()
        out = [(r, decision.why_changed(old.get(r.key), r)) for r in current]
        if current:
            with self._write() as db:
                self._made_rows(db, current, accepted=True)
        return out

    def forget(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        with self._write() as db:
            db.executemany("DELETE FROM made WHERE key = ?", [(bytes.fromhex(k),) for k in keys])

    # ------------------------------------------------------------ hash memo
    def load_memo(self) -> HashMemo:
        """The persisted content hashes, to pass to `content_hash` / `snapshot`."""
        prefix = self.base.rstrip(os.sep) + os.sep
        with self._lock:
            rows = self._db.execute("SELECT path, size, mtime_ns, inode, hash FROM hash_memo")
            return HashMemo({(p if p[:1] == os.sep else prefix + p): (s, m, i, h.hex()) for p, s, m, i, h in rows})

    def _memo_rows(self, db: sqlite3.Connection, memo: HashMemo) -> None:
        if memo.dirty:
            prefix = self.base.rstrip(os.sep) + os.sep
            cut = len(prefix)
            # another thread may be deciding with this memo: take its dict and leave a new one; an entry
            # put into the old one while it is copied makes the copy start again
            dirty, memo.dirty = memo.dirty, {}
            while True:
                try:
                    rows = [(p[cut:] if p.startswith(prefix) else p, s, m, i, bytes.fromhex(h))
                            for p, (s, m, i, h) in dirty.items()]
                    break
                except RuntimeError:
                    continue
            db.executemany("INSERT OR REPLACE INTO hash_memo VALUES (?,?,?,?,?)", rows)

    def save_memo(self, memo: HashMemo) -> None:
        """Write the memo's new entries (one transaction)."""
        if memo.dirty:
            with self._write() as db:
                self._memo_rows(db, memo)

    # ------------------------------------------------------------ runs
    def begin_run(self, script: str = "", cwd: Optional[str] = None, run_id: Optional[str] = None,
                  log_dir: Optional[os.PathLike] = None, keep: Optional[int] = None) -> str:
        """Start a run's history and prune runs beyond the `keep` newest. Pass the run's log folder
        (its name becomes the run id, so `depio report RUN` and the logs agree)."""
        if run_id is None:
            run_id = Path(log_dir).name if log_dir else time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        with self._write() as db:
            base, n = run_id, 1
            while db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                n += 1
                run_id = f"{base}-{n}"
            start = time.time()
            cur = db.execute("INSERT INTO runs(id, script, cwd, host, pid, start, log_dir) VALUES (?,?,?,?,?,?,?)",
                             (run_id, script, cwd or os.getcwd(), socket.gethostname(), os.getpid(), start,
                              os.path.abspath(log_dir) if log_dir else None))
            self._run_nums[run_id] = (cur.lastrowid, start)
        self.prune_runs(keep)
        return run_id

    def _num(self, run_id: str) -> Tuple[int, float]:
        """(row number, start time) of a run: task times are kept as milliseconds from its start."""
        num = self._run_nums.get(run_id)
        if num is None:
            row = self._read("SELECT num, start FROM runs WHERE id = ?", (run_id,))
            if not row:
                raise KeyError(f"no run {run_id!r}")
            num = self._run_nums[run_id] = (row[0][0], row[0][1])
        return num

    @staticmethod
    def _task_rows(db: sqlite3.Connection, run: Tuple[int, float], tasks: Sequence[RunTask]) -> None:
        num, t0 = run

        def ms(t: Optional[float]) -> Optional[int]:
            return None if t is None else round((t - t0) * 1000)

        db.executemany("INSERT OR REPLACE INTO run_tasks VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       [(num, t.seq, bytes.fromhex(t.key) if t.key else None, t.name, ms(t.start), ms(t.end),
                         t.worker or None, t.host or None, t.slurm or None, t.attempts, t.status, t.reason or None)
                        for t in tasks])

    def record_run_tasks(self, run_id: str, tasks: Iterable[RunTask]) -> None:
        tasks = list(tasks)
        num = self._num(run_id)
        with self._write() as db:
            self._task_rows(db, num, tasks)

    def write_batch(self, run_id: Optional[str], tasks: Sequence[RunTask], made: Sequence[MadeRecord],
                    memo: Optional[HashMemo] = None, packed: Sequence[bytes] = (),
                    quick: Sequence[Tuple[bytes, bytes, bytes]] = ()) -> None:
        """One transaction for a batch of ended tasks: their history rows (or `packed` batches of
        them), the made records of those that FINISHED, the memo's new hashes, and `quick` tokens
        (token, key, fingerprint) of records found up to date by content: set only where the record
        still has that fingerprint (another pipeline may have made the task again meanwhile)."""
        num = self._num(run_id) if run_id is not None and (tasks or packed) else None
        with self._write() as db:
            if num is not None:
                self._task_rows(db, num, tasks)
                db.executemany("INSERT INTO run_history VALUES (?,?)", [(num[0], b) for b in packed])
            if made:
                self._made_rows(db, made)
            if memo is not None:
                self._memo_rows(db, memo)
            if quick:
                db.executemany("UPDATE made SET quick = ? WHERE key = ? AND fp = ?", quick)

    def end_run(self, run_id: str, counts: Optional[Mapping[str, int]] = None) -> None:
        """Close a run; `counts` by status (default: counted from its recorded tasks; pass them to
        include tasks not recorded one by one, e.g. SKIPPED)."""
        num = self._num(run_id)
        if counts is None:
            counts = dict(self._read("SELECT status, COUNT(*) FROM run_tasks WHERE run = ? GROUP BY status", (num[0],)))
        with self._write() as db:
            db.execute("UPDATE runs SET end = ?, counts = ? WHERE num = ?", (time.time(), _dumps(dict(counts)), num[0]))
        self._read("PRAGMA wal_checkpoint(PASSIVE)")    # the log into the database now, not in close()

    def prune_runs(self, keep: Optional[int] = None) -> int:
        keep = keep_runs() if keep is None else max(1, keep)
        old = [n for (n,) in self._read("SELECT num FROM runs ORDER BY num DESC LIMIT -1 OFFSET ?", (keep,))]
        if old:
            with self._write() as db:
                db.executemany("DELETE FROM run_tasks WHERE run = ?", [(n,) for n in old])
                db.executemany("DELETE FROM run_history WHERE run = ?", [(n,) for n in old])
                db.executemany("DELETE FROM runs WHERE num = ?", [(n,) for n in old])
        return len(old)

    def runs(self) -> List[Dict]:
        """The runs kept, newest first: id, script, cwd, host, pid, start, end, counts, log_dir."""
        rows = self._read("SELECT id, script, cwd, host, pid, start, end, counts, log_dir FROM runs ORDER BY num DESC")
        names = ("id", "script", "cwd", "host", "pid", "start", "end", "counts", "log_dir")
        out = []
        for row in rows:
            d = dict(zip(names, row))
            d["counts"] = json.loads(d["counts"]) if d["counts"] else {}
            out.append(d)
        return out

    def run(self, run_id: Optional[str] = None) -> Optional[Dict]:
        """One run's summary (the latest with None)."""
        runs = self.runs()
        if run_id is None:
            return runs[0] if runs else None
        return next((r for r in runs if r["id"] == run_id), None)

    def run_tasks(self, run_id: str) -> List[RunTask]:
        num, t0 = self._num(run_id)
        rows = self._read("SELECT seq, key, name, status, start_ms, end_ms, worker, host, slurm, attempts, reason "
                          "FROM run_tasks WHERE run = ? ORDER BY seq", (num,))
        out = [RunTask(s, k.hex() if k else "", n, st, None if a is None else t0 + a / 1000,
                       None if e is None else t0 + e / 1000, w or "", h or "", sl or "", at or 0, r or "")
               for s, k, n, st, a, e, w, h, sl, at, r in rows]
        for (blob,) in self._read("SELECT data FROM run_history WHERE run = ?", (num,)):
            out += decode_history(blob, t0)
        return sorted(out, key=lambda t: t.seq) if len(out) > len(rows) else out


__all__ = ["StateStore"]
