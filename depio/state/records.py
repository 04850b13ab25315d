"""Records of how products were made and of what ran, and the decisions taken from them.

A `MadeRecord` says what a task's products were made from (dependency, code and argument hashes);
`snapshot()` takes the same record of the present, and `Decision` compares the two and names the
first difference in the words the dry run and `task.reason` show.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from .hashing import (PYTHON, ArgsRecord, CodeDesc, HashMemo, args_diff, args_hash, args_record, code_hash,
                      function_ident, hash_paths, norm_path, record_digest)

PathLike = Union[str, "os.PathLike[str]"]


def task_key(func: Callable, products: Iterable[PathLike], cleaned_args: Optional[Mapping[str, Any]] = None,
             _shown: Optional[List[str]] = None) -> str:
    """A task's identity in the store, stable across processes: its products (sorted, as `norm_path`
    shows them) when it has any, so that a changed argument is reported as one instead of as a new
    task; otherwise its function and arguments."""
    shown = sorted(_shown if _shown is not None else (norm_path(p) for p in products))
    h = hashlib.blake2b(digest_size=16)
    if shown:
        h.update(("P\0" + "\0".join(shown)).encode("utf-8", "surrogateescape"))
    else:
        h.update(("F\0" + function_ident(func) + "\0" + args_hash(cleaned_args or {})).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@dataclass
class MadeRecord:
    """What a task's products were made from. `deps` and `products` map shown paths to content
    hashes (None: missing); `args` is an `args_record`; `code` is `code_hash(func)[0]`, comparable
    only under the same `python` (major.minor)."""
    key: str
    name: str
    code: Optional[str]
    code_desc: Optional[CodeDesc]
    deps: Dict[str, Optional[str]]
    args: ArgsRecord
    products: Dict[str, Optional[str]] = field(default_factory=dict)
    python: str = PYTHON
    made_at: float = 0.0
    accepted: bool = False

    @property
    def fingerprint(self) -> str:
        """One digest of what decides a rerun (code, dependency contents, arguments, and the products
        as made: one rewritten by a failed or killed run, or by hand, is not up to date), so that an
        up-to-date task is recognised by comparing two strings, without parsing its record."""
        deps = "\1".join(f"{p}\0{d or '-'}" for p, d in sorted(self.deps.items()))
        products = "\1".join(f"{p}\0{d or '-'}" for p, d in sorted(self.products.items()))
        text = f"{self.code or '-'}\2{deps}\2{record_digest(self.args)}\2{products}"
        return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


@dataclass
class RunTask:
    """One task of one run, for the history and the report. `seq` is the task's number in the run
    (its queue id: log files are named `<seq>-<name>.out/.err`)."""
    seq: int
    key: str
    name: str
    status: str
    start: Optional[float] = None
    end: Optional[float] = None
    worker: str = ""
    host: str = ""
    slurm: str = ""
    attempts: int = 0
    reason: str = ""


def snapshot(name: str, func: Callable, cleaned_args: Mapping[str, Any], deps: Iterable[PathLike],
             products: Iterable[PathLike], memo: Optional[HashMemo] = None, key: Optional[str] = None,
             hash_products: bool = False, track_code: bool = True) -> MadeRecord:
    """The record of the present: what a task would be made from now. Products are hashed only with
    `hash_products` (when recording a task that just FINISHED); deciding needs only their names."""
    products = list(products)
    code, desc = code_hash(func) if track_code else (None, None)
    cwd = os.getcwd()
    shown = {norm_path(p, cwd): None for p in products}
    return MadeRecord(key=key or task_key(func, products, cleaned_args, _shown=list(shown)), name=name, code=code,
                      code_desc=desc,
                      deps=hash_paths(deps, memo), args=args_record(cleaned_args),
                      products=hash_paths(products, memo) if hash_products else shown,
                      python=PYTHON, made_at=time.time())


def _first_product(current: MadeRecord) -> str:
    return sorted(current.products)[0] if current.products else current.name


class Decision:
    """Why a task must run, in words. `python_change` says what a record from another Python version
    means for the code, whose hashes cannot be compared across versions: "rerun" (the default: say so
    and rerun) or "ignore" (compare everything but the code)."""

    def __init__(self, python_change: str = "rerun"):
        if python_change not in ("rerun", "ignore"):
            raise ValueError(f"python_change must be 'rerun' or 'ignore', not {python_change!r}")
        self.python_change = python_change

    def why_changed(self, record: Optional[MadeRecord], current: MadeRecord) -> Optional[str]:
        """`BuildMode.IF_CHANGED`'s reason to run beyond a missing product (None: up to date)."""
        if record is not None and record.fingerprint == current.fingerprint:
            return None
        reasons = self.changes(record, current)
        return reasons[0] if reasons else None

    def changes(self, record: Optional[MadeRecord], current: MadeRecord) -> List[str]:
        """Every difference, most telling first: code, dependency contents, arguments, the set of
        dependencies."""
        if record is None:
            return [f"no record of how {_first_product(current)} was made"]
        out = []
        code = self.why_code_changed(record, current)
        if code:
            out.append(code)
        for path in sorted(current.deps):
            if path in record.deps and record.deps[path] != current.deps[path]:
                out.append(f"dependency {path} is missing" if current.deps[path] is None else f"dependency {path} changed")
        out.extend(f"argument {line}" for line in args_diff(record.args, current.args))
        out.extend(f"product {p} changed since it was made" for p, h in sorted(current.products.items())
                   if h is not None and p in record.products and record.products[p] != h)
        out.extend(f"dependency {p} is new" for p in sorted(set(current.deps) - set(record.deps)))
        out.extend(f"dependency {p} is no longer used" for p in sorted(set(record.deps) - set(current.deps)))
        return out

    def why_code_changed(self, record: Optional[MadeRecord], current: MadeRecord) -> Optional[str]:
        """`IF_CODE_CHANGED` and `track_code=True`: only the code counts; no record counts as changed."""
        if record is None:
            return f"no record of how {_first_product(current)} was made"
        if record.code is None or current.code is None or record.code == current.code:
            return None
        desc = current.code_desc
        name = desc.name if desc else current.name
        if record.python != current.python:
            if self.python_change == "ignore":
                return None
            return f"code of {name} cannot be compared: made under Python {record.python}, now {current.python}"
        if desc is None:
            return f"code of {name} changed"
        old = {p[0]: p[3] for p in (record.code_desc.parts if record.code_desc else ())}
        if not old or not desc.parts or old.get(desc.parts[0][0]) != desc.parts[0][3]:
            return f"code of {name} changed ({desc.where()})"
        for ident, file, line, own in desc.parts[1:]:
            if old.get(ident) != own:
                return f"code of {name} changed: it calls {ident.split(':', 1)[-1]} ({file}, def at line {line}), which changed"
        gone = sorted(set(old) - {p[0] for p in desc.parts})
        if gone:
            return f"code of {name} changed: it no longer calls {gone[0].split(':', 1)[-1]}"
        return f"code of {name} changed ({desc.where()})"

    @staticmethod
    def why_older(products: Iterable[PathLike], inputs: Iterable[PathLike]) -> Optional[str]:
        """`IF_OLDER` (make's rule): the oldest product is older than the newest input that exists."""
        oldest = None
        for p in products:
            try:
                m = os.stat(p).st_mtime_ns
            except FileNotFoundError:
                return f"product {norm_path(p)} is missing"
            if oldest is None or m < oldest[0]:
                oldest = (m, p)
        newest = None
        for p in inputs:
            try:
                m = os.stat(p).st_mtime_ns
            except FileNotFoundError:
                continue
            if newest is None or m > newest[0]:
                newest = (m, p)
        if oldest is None or newest is None or oldest[0] >= newest[0]:
            return None
        return f"product {norm_path(oldest[1])} is older than its input {norm_path(newest[1])}"

    @staticmethod
    def why_old(products: Iterable[PathLike], max_age: float, now: Optional[float] = None) -> Optional[str]:
        """`IF_OLD`: a product was modified more than `max_age` seconds ago."""
        now = time.time() if now is None else now
        for p in products:
            try:
                age = now - os.stat(p).st_mtime
            except FileNotFoundError:
                return f"product {norm_path(p)} is missing"
            if age > max_age:
                return f"product {norm_path(p)} is older than max_age ({max_age:g} s)"
        return None


_default = Decision()


def why_changed(record: Optional[MadeRecord], current: MadeRecord) -> Optional[str]:
    """`Decision().why_changed`: the reason to rerun, or None."""
    return _default.why_changed(record, current)


__all__ = ["MadeRecord", "RunTask", "task_key", "snapshot", "Decision", "why_changed"]
