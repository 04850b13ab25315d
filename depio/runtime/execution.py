"""Running one task: check inputs, call the function, check products, capture its output.

Shared by worker slot processes (`run_spec`, which captures at the file-descriptor level, so output
of C code and of child processes is caught too) and by in-process execution (SequentialExecutor, a user's
`internal_executor`, `Task.run()`), which captures `sys.stdout`/`sys.stderr` per thread.
"""
from __future__ import annotations

import io
import linecache
import os
import pickle
import platform
import re
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import cloudpickle

from ..exceptions import (DependencyNotMetException, ProductNotProducedException, ProductNotUpdatedException,
                         TaskRaisedExceptionException, DepioError)
from .protocol import TaskResult, TaskSpec

_EXCEPTIONS = {cls.__name__: cls for cls in (DependencyNotMetException, ProductNotProducedException,
                                             ProductNotUpdatedException, TaskRaisedExceptionException)}


def _error(kind: str, message: str, etype: str = "", tb: str = "") -> Dict[str, str]:
    return {"kind": kind, "type": etype or kind, "message": message, "traceback": tb,
            "summary": f"{etype}: {message}" if etype and etype != kind else message}


def _mtimes(paths: Sequence[str]) -> Dict[str, int]:
    stamps = {}
    for p in paths:
        try:
            stamps[p] = os.stat(p).st_mtime_ns
        except OSError:
            pass
    return stamps


def call_task(func: Callable, args: Sequence, kwargs: Dict[str, Any], label: str,
              products: Sequence[str], dependencies: Sequence[str]) -> Tuple[Optional[Dict[str, str]], Any]:
    """Run the function with depio's checks around it. Returns (error or None, return value)."""
    missing = [d for d in dependencies if not os.path.exists(d)]
    if missing:
        return _error("DependencyNotMetException", f"Task {label}: Dependency/ies {missing} not met."), None
    before = _mtimes(products) if products else {}
    try:
        value = func(*args, **kwargs)
    except (Exception, SystemExit) as e:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))  # from the task's frame on
        return _error("TaskRaisedExceptionException", str(e), type(e).__qualname__, tb), None
    if products:
        not_produced = [p for p in products if not os.path.exists(p)]
        if not_produced:
            return _error("ProductNotProducedException",
                          f"Task {label}: Product/s {not_produced} not produced."), value
        after = _mtimes(products)
        stale = [p for p, t in before.items() if after.get(p) == t]
        if stale:
            return _error("ProductNotUpdatedException", f"Task {label}: Product/s {stale} not updated."), value
    return None, value


def error_to_exception(error: Dict[str, str]) -> DepioError:
    """The 0.1.x exception for a failure reported by a worker."""
    cls = _EXCEPTIONS.get(error.get("kind", ""), TaskRaisedExceptionException)
    if cls is TaskRaisedExceptionException:
        inner = RuntimeError(f"{error.get('type')}: {error.get('message')}")
        exc = TaskRaisedExceptionException(inner)
        exc.traceback_text = error.get("traceback", "")
        return exc
    return cls(error.get("message", ""))


# ---------------------------------------------------------------- capture in a slot process

class FdCapture:
    """Redirects file descriptors 1 and 2 into two reusable temp files for the length of a task.
    Use: `with capture: ...`, then `capture.read()` (which also notes which file needs emptying)."""

    LIMIT = 1 << 20   # what is sent back per stream: the last MiB (a task may print gigabytes)

    def __init__(self) -> None:
        self._fds = [tempfile.TemporaryFile(prefix="depio-out-", buffering=0),
                     tempfile.TemporaryFile(prefix="depio-err-", buffering=0)]
        self._saved = [os.dup(1), os.dup(2)]
        self._written = [False, False]   # files left non-empty by the last task (most tasks print nothing)

    def __enter__(self) -> "FdCapture":
        sys.stdout.flush()
        sys.stderr.flush()
        for i, (target, f) in enumerate(zip((1, 2), self._fds)):
            if self._written[i]:
                os.ftruncate(f.fileno(), 0)
                os.lseek(f.fileno(), 0, os.SEEK_SET)
                self._written[i] = False
            os.dup2(f.fileno(), target)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)

    def read(self) -> Tuple[str, str]:
        out = []
        for i, f in enumerate(self._fds):
            fd = f.fileno()
            size = os.fstat(fd).st_size
            if not size:
                out.append("")
                continue
            self._written[i] = True
            start = max(0, size - self.LIMIT)
            text = os.pread(fd, size - start, start).decode("utf-8", "replace")
            out.append(f"[... {start} bytes cut ...]\n{text}" if start else text)
        return out[0], out[1]


VALUE_LIMIT = 1 << 20   # return values larger than this are not sent back


def run_spec(spec: TaskSpec, functions: Dict[bytes, Callable], blobs: Dict[bytes, bytes], capture: FdCapture,
             worker_name: str, context: Optional[Tuple[str, Sequence[str]]] = None) -> TaskResult:
    """Run one task spec in this process with fd-level capture and build its TaskResult (the return
    value pickled, unless it is too big). `functions` caches unpickled functions by digest; a function
    not in it yet is unpickled from (and removed from) `blobs`. `context`: a pool's pipeline's working
    directory and import path, which the task sees as it would locally (then this process's again)."""
    if context is None:
        return _run_spec(spec, functions, blobs, capture, worker_name)
    cwd, path = context
    old_cwd, old_path = os.getcwd(), list(sys.path)
    try:
        os.chdir(cwd)
    except OSError as e:
        now = time.time()
        msg = (f"the pipeline's working directory {cwd} does not exist on worker {worker_name} (host "
               f"{platform.node()}): {e.strerror}; run the pool's workers where the pipeline's files are (a "
               f"shared file system)")
        return TaskResult(spec.key, spec.attempt, now, now, "", "", _error("TaskRaisedExceptionException", msg,
                                                                          "FileNotFoundError"), None, worker_name)
    try:
        sys.path[:] = [p for p in path if os.path.isdir(p)] + [p for p in old_path if p not in path]
        return _run_spec(spec, functions, blobs, capture, worker_name)
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path


def _run_spec(spec: TaskSpec, functions: Dict[bytes, Callable], blobs: Dict[bytes, bytes], capture: FdCapture,
              worker_name: str) -> TaskResult:
    started = time.time()
    try:
        func = functions.get(spec.func_digest)
        if func is None:
            func = functions[spec.func_digest] = cloudpickle.loads(blobs.pop(spec.func_digest))
        args, kwargs = pickle.loads(spec.args)
    except Exception as e:
        return TaskResult(spec.key, spec.attempt, started, time.time(), "", "",
                          {"kind": "TaskRaisedExceptionException", "type": type(e).__qualname__,
                           "message": f"cannot load the task on worker {worker_name}: {e}",
                           "traceback": traceback.format_exc(),
                           "summary": f"cannot load the task on worker {worker_name}: {type(e).__name__}: {e}"},
                          None, worker_name)
    with capture:
        error, value = call_task(func, args, kwargs, spec.name, spec.products, spec.dependencies)
    out, err = capture.read()
    blob = None
    if value is not None:
        try:
            blob = pickle.dumps(value, protocol=5)
        except Exception:
            try:
                blob = cloudpickle.dumps(value)
            except Exception:
                blob = None
        if blob is not None and len(blob) > VALUE_LIMIT:
            blob = None
    return TaskResult(spec.key, spec.attempt, started, time.time(), out, err, error, blob, worker_name)


# ---------------------------------------------------------------- capture in this process

class _ThreadRouter(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr: a thread running a task writes to its own buffer
    (and, if asked, through to the real stream); every other thread writes to the real stream."""

    def __init__(self, real: Any):
        self.real = real
        self.local = threading.local()

    def _target(self):
        return getattr(self.local, "buffer", None)

    def write(self, s: str) -> int:
        buf = self._target()
        if buf is None:
            return self.real.write(s)
        buf.write(s)
        if self.local.echo:
            self.real.write(s)
        return len(s)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")


_router_lock = threading.Lock()


def _routers() -> Tuple[_ThreadRouter, _ThreadRouter]:
    with _router_lock:
        if not isinstance(sys.stdout, _ThreadRouter):
            sys.stdout = _ThreadRouter(sys.stdout)
        if not isinstance(sys.stderr, _ThreadRouter):
            sys.stderr = _ThreadRouter(sys.stderr)
        return sys.stdout, sys.stderr  # type: ignore[return-value]


def execute_inline(func: Callable, args: Sequence, kwargs: Dict[str, Any], label: str,
                   products: Sequence[str], dependencies: Sequence[str], echo: bool = False,
                   key: int = 0, attempt: int = 1) -> "InlineOutcome":
    """Run a task in this process and thread, capturing what it prints (through to the terminal
    too when `echo`, so that a debugger's prompt shows)."""
    out, err = _routers()
    bufs = io.StringIO(), io.StringIO()
    for router, buf in zip((out, err), bufs):
        router.local.buffer, router.local.echo = buf, echo
    started = time.time()
    try:
        error, value = call_task(func, args, kwargs, label, products, dependencies)
    finally:
        for router in (out, err):
            router.local.buffer = None
    return InlineOutcome(TaskResult(key, attempt, started, time.time(), bufs[0].getvalue(), bufs[1].getvalue(),
                                    error, None, "local"), value)


class InlineOutcome:
    """A TaskResult plus the return value as an object (nothing to unpickle in-process)."""

    __slots__ = ("result", "value")

    def __init__(self, result: TaskResult, value: Any):
        self.result, self.value = result, value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.result, name)

    def exception(self) -> DepioError:
        return error_to_exception(self.result.error or {})


_DYNAMIC_FRAME = re.compile(r'File "<dynamic-code>", line (\d+), in (\S+)\n')


def restore_source_lines(tb: str, func: Callable) -> str:
    """cloudpickle ships functions of `__main__` without their file name, so a worker's traceback
    says `<dynamic-code>`. Put back the file and the source line, which this process still knows."""
    if "<dynamic-code>" not in tb:
        return tb
    files: Dict[str, str] = {}
    main = sys.modules.get("__main__")
    for obj in list(vars(main).values()) if main is not None else []:
        code = getattr(getattr(obj, "__wrapped__", obj), "__code__", None)
        if code is not None:
            files.setdefault(code.co_name, code.co_filename)
    code = getattr(func, "__code__", None)
    if code is not None:
        files[code.co_name] = code.co_filename

    def repl(m: "re.Match") -> str:
        lineno, name = int(m.group(1)), m.group(2)
        filename = files.get(name)
        if filename is None:
            return m.group(0)
        line = linecache.getline(filename, lineno).strip()
        return f'File "{filename}", line {lineno}, in {name}\n' + (f"    {line}\n" if line else "")
    return _DYNAMIC_FRAME.sub(repl, tb)


__all__ = ["call_task", "execute_inline", "FdCapture", "error_to_exception", "run_spec"]
