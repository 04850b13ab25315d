"""Stable digests and readable reprs of values: task arguments and default values.

An argument is identified by its exact repr when it has a short one (numbers, strings, paths and
containers of them, sets and dict keys sorted so hash seeds do not matter), otherwise by a digest of
its pickle; the record keeps a repr cut at REPR_LIMIT characters so a reason can say `lr: 0.1 -> 0.01`.
"""
from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import PosixPath, PurePath, PurePosixPath, PureWindowsPath, WindowsPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

DIGEST_SIZE = 8                  # bytes of content and value digests (see below)
CODE_DIGEST_SIZE = 16            # bytes of code hashes and task keys
READ_BUFFER = 1 << 20            # 1 MiB reads for files larger than that
REPR_LIMIT = 200                 # an argument's stored repr is cut here
RACY_WINDOW = 2.0                # s: a file modified this recently may change again within its mtime tick
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _new(size: int = DIGEST_SIZE):
    """blake2b. 64 bits for contents and values: a digest is only ever compared with the one of the
    same file or argument before, so a change goes unseen with probability 2^-64 (no birthday bound),
    and 100,000 tasks' records stay small. Keys and code hashes, compared across many, get 128."""
    return hashlib.blake2b(digest_size=size)


def _put(h, data: bytes) -> None:
    """Length-prefixed, so that ("ab", "c") and ("a", "bc") hash differently."""
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _text(s: str) -> bytes:
    return s.encode("utf-8", "backslashreplace")


_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def canonical(value: Any, depth: int = 0) -> Optional[str]:
    """A repr that identifies the value exactly (None when there is none): plain scalars, paths and
    lists/tuples/dicts/sets of them, sets and dict keys sorted so that hash seeds do not matter."""
    t = type(value)
    if t in _SCALARS:
        return repr(value)
    if depth > 20:
        return None
    if isinstance(value, PurePath):
        return f"Path({str(value)!r})"
    if t is list or t is tuple:
        items = [canonical(v, depth + 1) for v in value]
        if None in items:
            return None
        inner = ", ".join(items)
        return f"[{inner}]" if t is list else (f"({inner},)" if len(items) == 1 else f"({inner})")
    if t is dict:
        pairs = [(canonical(k, depth + 1), canonical(v, depth + 1)) for k, v in value.items()]
        if any(k is None or v is None for k, v in pairs):
            return None
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(pairs)) + "}"
    if t is set or t is frozenset:
        items = [canonical(v, depth + 1) for v in value]
        if None in items:
            return None
        inner = "{" + ", ".join(sorted(items)) + "}"
        return inner if t is set and items else f"{t.__name__}({inner if items else ''})"
    return None


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """repr() for people: cut at `limit` characters, never raising."""
    try:
        text = str(value) if isinstance(value, PurePath) else repr(value)
    except Exception:
        text = f"<{type(value).__qualname__}>"
    return text if len(text) <= limit else text[:limit] + "…"


def value_digest(value: Any) -> str:
    """A stable digest of any value: its canonical repr, else its pickle (cloudpickle for lambdas and
    local functions), else only its type (an unpicklable value counts as unchanged while its type is)."""
    h = _new()
    exact = canonical(value)
    if exact is not None:
        _put(h, b"R" + _text(exact))
        return h.hexdigest()
    try:
        data = pickle.dumps(value, protocol=4)
    except Exception:
        try:
            import cloudpickle
            data = cloudpickle.dumps(value, protocol=4)
        except Exception:
            data = b"T" + _text(f"{type(value).__module__}.{type(value).__qualname__}")
    _put(h, b"P" + data)
    return h.hexdigest()


ArgEntry = Union[str, List[str]]
ArgsRecord = Dict[str, ArgEntry]


def args_record(cleaned_args: Mapping[str, Any]) -> ArgsRecord:
    """Per argument, what identifies it: its exact repr when it has a short one; [path, "path"] for a
    path; otherwise [repr cut at REPR_LIMIT, digest]. Equal entries mean an equal argument, and the
    reprs let `args_diff` say `lr: 0.1 -> 0.01`. Pass the arguments not marked IgnoredForEq."""
    out: ArgsRecord = {}
    for name in sorted(cleaned_args):
        value = cleaned_args[name]
        if isinstance(value, PurePath):
            out[name] = [str(value), "path"]
            continue
        exact = canonical(value)
        if exact is not None and len(exact) <= REPR_LIMIT:
            out[name] = exact
        else:
            shown = exact[:REPR_LIMIT] + "…" if exact is not None else short_repr(value)
            out[name] = [shown, value_digest(value)]
    return out


def _identity(entry: ArgEntry) -> str:
    """What an entry is compared by: not the shown repr of a digested value, which may hold an address."""
    if isinstance(entry, str):
        return entry
    return entry[0] + "\0path" if entry[1] == "path" else "\0" + entry[1]


def record_digest(record: Mapping[str, ArgEntry]) -> str:
    """The digest of an `args_record` (reprs escape control characters, so \\0 and \\1 separate)."""
    text = "\1".join(name + "\0" + _identity(entry) for name, entry in sorted(record.items()))
    h = _new()
    h.update(_text(text))
    return h.hexdigest()


def args_hash(cleaned_args: Mapping[str, Any]) -> str:
    """One stable digest of a task's arguments (those not marked IgnoredForEq)."""
    return record_digest(args_record(cleaned_args))


_PATH_TYPES = frozenset({PosixPath, WindowsPath, PurePosixPath, PureWindowsPath})
_REPR_TYPES = frozenset(_SCALARS)


def _args_text(pairs: Sequence[Tuple[str, Any]]) -> Optional[str]:
    """What `args_hash` identifies (name, value) pairs by, sorted by name, when every value is a plain
    scalar with a short repr or a path; None otherwise."""
    parts = []
    for name, value in pairs:
        t = type(value)
        if t in _PATH_TYPES:
            parts.append(f"{name}\0{value}\0path")
            continue
        if t in _REPR_TYPES:
            text = repr(value)
            if len(text) <= REPR_LIMIT:
                parts.append(name + "\0" + text)
                continue
        return None
    return "\1".join(parts)


def args_digest(cleaned_args: Mapping[str, Any]) -> str:
    """`args_hash`, without building the record for the common arguments (plain scalars with a short
    repr, and paths): deciding 100,000 tasks takes one of these each."""
    text = _args_text([(name, cleaned_args[name]) for name in sorted(cleaned_args)])
    if text is None:
        return args_hash(cleaned_args)
    h = _new()
    h.update(_text(text))
    return h.hexdigest()


_call_plans: Dict[Any, tuple] = {}     # plan -> its slots sorted by name (the plan kept: an id could be reused)


def call_text(task) -> Optional[str]:
    """What `args_digest(task.cleaned_args)` hashes, read straight from a positional call through the
    function's plan (depio's Task: `_plan.hash_slots` name the arguments that count, with their
    positions), without building the arguments' dict; None for a call or value it does not cover."""
    plan = getattr(task, "_plan", None)
    if task.func_kwargs or plan is None:
        return None
    slots = _call_plans.get(plan)
    if slots is None:
        defaults = plan.defaults
        slots = _call_plans[plan] = tuple(sorted((name, k, name in defaults, defaults.get(name))
                                                 for name, k, _ in plan.hash_slots))
    args = task.func_args
    nargs = len(args)
    parts = []
    for name, k, has_default, default in slots:   # `_args_text`, inline: its list and call cost 0.6 us a task
        if k < nargs:
            value = args[k]
        elif has_default:
            value = default
        else:
            continue
        t = type(value)
        if t in _PATH_TYPES:
            parts.append(f"{name}\0{value}\0path")
        elif t in _REPR_TYPES and len(text := repr(value)) <= REPR_LIMIT:
            parts.append(name + "\0" + text)
        else:
            return None
    return "\1".join(parts)


def call_digest(task) -> str:
    """`args_digest(task.cleaned_args)`, through `call_text` when it covers the call: deciding 100,000
    up-to-date IF_CHANGED tasks takes one of these each."""
    text = call_text(task)
    if text is None:
        return args_digest(task.cleaned_args)
    h = _new()
    h.update(_text(text))
    return h.hexdigest()


def args_diff(old: Mapping[str, ArgEntry], new: Mapping[str, ArgEntry]) -> List[str]:
    """What changed between two argument records, readably: `lr: 0.1 -> 0.01`, one line each."""
    def shown(entry: Optional[ArgEntry]) -> str:
        return "(none)" if entry is None else entry if isinstance(entry, str) else entry[0]

    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is not None and b is not None and _identity(a) == _identity(b):
            continue
        if a is not None and b is not None and shown(a) == shown(b):
            out.append(f"{name}: {shown(b)} (changed)")
        else:
            out.append(f"{name}: {shown(a)} -> {shown(b)}")
    return out


__all__ = ["canonical", "short_repr", "value_digest", "args_record", "record_digest", "args_hash", "args_diff",
           "args_digest", "call_digest", "call_text", "ArgEntry", "ArgsRecord", "DIGEST_SIZE", "CODE_DIGEST_SIZE", "READ_BUFFER", "REPR_LIMIT", "RACY_WINDOW", "PYTHON"]
