"""depio's state: how each product was made, the run history, and a report (issue 17's foundation).

This package decides nothing by itself and imports nothing of the runtime: the build decision, the
CLI and the Pipeline call it. What they call, in order:

**Opening.** `store = StateStore.open_default()` gives the database at `.depio/state.sqlite` in the
working directory (`DEPIO_STATE=path` moves it, `DEPIO_STATE=off` gives None; opening errors are
logged and give None, so a run goes on without state). `memo = store.load_memo()` loads the content
hashes once per run; pass it to every hashing call.

**Deciding (`BuildMode.IF_CHANGED`, after IF_MISSING found every product present).**

    fps = store.fingerprints()                      # {task key: fingerprint}, once per run (~0.1 s / 100k)
    cur = snapshot(task.name, task.func, task.cleaned_args, deps, products, memo)
    if fps.get(cur.key) != cur.fingerprint:         # the fast path: two strings, no record parsed
        old = store.get_made([cur.key]).get(cur.key)     # batch these keys when there are many
        reason = Decision().why_changed(old, cur)   # e.g. "argument lr: 0.1 -> 0.01"; None: up to date

`deps` are the task's dependency paths (files or folders; a folder counts by its files); the
dependency of a task that ran in this run must be hashed after it ended (its product record's hash
is in the memo then), so such a decision is taken when the upstream task ends, not when it is
handed out. Reasons: `no record of how build/x.txt was made`, `code of train changed (model.py, def
at line 12)`, `code of train changed: it calls norm (util.py, def at line 3), which changed`,
`dependency data/raw.csv changed`, `argument lr: 0.1 -> 0.01`. The fork's modes:
`Decision.why_code_changed(old, cur)` (IF_CODE_CHANGED, and `track_code=True` in any mode),
`Decision.why_older(products, path_deps)` (IF_OLDER: `product build/x.txt is older than its input
data/raw.csv`) and `Decision.why_old(products, max_age)` (IF_OLD: `product build/x.txt is older
than max_age (3600 s)`); the last two read mtimes only.

Code hashes are of compiled code (see `hashing`): comments, blank lines and formatting do not
count, a docstring does. They are not comparable across Python versions; a record made under
another version gives `code of train cannot be compared: made under Python 3.10, now 3.11` unless
`Decision(python_change="ignore")`.

**Recording.** Per run: `run_id = store.begin_run(script, log_dir=logs.folder)` (prunes the history to
`DEPIO_LOG_KEEP` runs, default 20, like the log folders) and `writer = StateWriter(store, run_id,
memo)`. When a task ends: `writer.ended(RunTask(seq, key, name, status, start, end, worker, host,
slurm, attempts, reason), made)` where `made = snapshot(..., hash_products=True)` for a FINISHED task
(ignored for any other status, so an unfinished task is never recorded as made); call
`writer.poll()` from the loop (one transaction per 2,000 tasks or 0.5 s) and
`writer.close(counts_by_status)` at the end. A kill -9 loses at most the unflushed batch: those
tasks run again.

**Accepting.** `depio accept`: `store.accept([snapshot(..., hash_products=True) for each task])`
returns (record, what was accepted or None when it was up to date) pairs to print.

**Wired in.** `TaskState` (`tasks.py`) is this recipe on a pipeline's tasks (the scheduler's
decisions reach it as `task._state`), `Recorder` (`recorder.py`) the recording in a thread of its
own (the history packed per batch, `codec.encode_history`), and `TaskState.accept` what
`Pipeline.accept` and `depio accept` call. A record's fingerprint covers its products as made too: a
product rewritten by a failed or killed run, or by hand, is not up to date. `TaskState` first tries
a record's *quick token*: the same fingerprint with each file's stamp (size, mtime_ns, inode) for its
content hash, kept once a task was found up to date by content with every file older than the racy
window; an up-to-date run then loads neither the memo nor the fingerprints, and a stat per product
decides (a stamp that differs, say after a `touch`, falls back to content, which sets the token again).

**History and report.** `store.runs()` (newest first: id, script, cwd, host, pid, start, end,
counts), `store.run_tasks(run_id)`, and `write_report(store, run_id_or_None, "report.html")`.

Sizes and speed (100,000 tasks with one dependency and one product each, on a shared 2-core
machine, Python 3.11): the store is 34 MB after the first run; loading the memo and the fingerprints
takes about 0.3 s, the quick tokens about 0.07 s; `TaskState.check_changed` takes about 9 us a task
by quick token (IF_MISSING's stat alone: 3.4 us), 10 us by content from the memo (a `stat` each, no
read: `memo.reads` counts reads), a whole `snapshot` + fingerprint comparison about 25 us, and the
writer about 20-30 us a recorded task. A file written less than `RACY_WINDOW` (2 s) ago is hashed
but not memoised, so products are read once more by the first decision after the run that made them.
"""
from .files import HashMemo, content_hash, hash_paths, norm_path
from .hashing import CodeDesc, clear_code_cache, code_hash, is_user_file
from .records import Decision, MadeRecord, RunTask, snapshot, task_key, why_changed
from .location import DEFAULT_STATE_PATH, STATE_ENV, state_path
from .store import StateStore
from .values import PYTHON, args_diff, args_hash, args_record
from .writer import StateWriter
from .recorder import Recorder
from .tasks import TaskState, inputs_of, needs_state


def __getattr__(name: str):
    """`write_report` on first use: the HTML report is for `depio report`, not for every run's start."""
    if name == "write_report":
        from .report import write_report
        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["HashMemo", "content_hash", "hash_paths", "norm_path", "CodeDesc", "clear_code_cache", "code_hash",
           "is_user_file", "Decision", "MadeRecord", "RunTask", "snapshot", "task_key", "why_changed",
           "write_report", "DEFAULT_STATE_PATH", "STATE_ENV", "StateStore", "StateWriter", "state_path", "PYTHON",
           "args_diff", "args_hash", "args_record", "Recorder", "TaskState", "inputs_of", "needs_state"]
