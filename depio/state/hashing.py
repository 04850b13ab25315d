"""What a task's products were made from, as hashes: its compiled code, file contents, arguments.

`code_hash(func)` hashes the compiled code, not the source text: the bytecode, constants (nested code
objects recursively), names, argument counts and flags of the code objects, default values, and the
same of every function of the user's own modules that it reaches (through the globals it names, the
attributes of user modules it names, its closure, `__wrapped__`, and the methods of user classes).
Not hashed: line and position tables, file name, qualified name. So comments, blank lines, the
indentation of continuation lines, re-wrapping an expression and moving the function in its file do
not count; a changed constant, operator, name, default or called helper does. A docstring is a
constant of the code object: editing one counts as a change (it is text, not formatting). So does
editing a module-level constant the function names (`SCALE = 3`) when it has a short exact repr.

Code objects differ between Python versions, so the Python version is not part of the hash but is
kept beside it (`PYTHON`, `MadeRecord.python`): only the caller can decide what a record made under
another version means (`Decision(python_change=...)`).

"User's own code": a file that is not in the standard library or a site-packages folder, and not
depio itself (`is_user_file`). File contents and arguments: see `files` and `values`, re-exported here.
"""
from __future__ import annotations

import functools
import linecache
import os
import re
import site
import sys
import sysconfig
import types
import weakref
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

from .files import HashMemo, content_hash, hash_paths, norm_path
from .values import (CODE_DIGEST_SIZE, PYTHON, ArgEntry, ArgsRecord, _new, _put, _text, args_diff, args_hash, args_record,
                     canonical, record_digest, short_repr, value_digest)


class CodeDesc(NamedTuple):
    """Where a function is, to name it in a reason; `parts` are (name, file, line, own hash) of the
    function itself (first) and of each function of the user's own code that it reaches."""
    file: str
    line: int
    name: str
    parts: Tuple[Tuple[str, str, int, str], ...] = ()

    def where(self) -> str:
        return f"{self.file}, def at line {self.line}"


_PACKAGE_DIRS = tuple(str(p) + os.sep for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                os.path.join(os.path.dirname(os.path.dirname(
                                                    os.path.dirname(os.path.abspath(__file__)))), "worker")))
_system: Optional[Tuple[str, ...]] = None


def _system_dirs() -> Tuple[str, ...]:
    """The standard library and site-packages folders. Not sys.prefix itself: that is /usr for a
    system Python, under which user code may live too."""
    global _system
    if _system is None:
        dirs = set()
        paths = sysconfig.get_paths()
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            if paths.get(key):
                dirs.add(paths[key])
        try:
            dirs.update(site.getsitepackages())
        except AttributeError:
            pass
        try:
            dirs.add(site.getusersitepackages())
        except AttributeError:
            pass
        dirs.update(p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages"))
        real = {os.path.realpath(d) for d in dirs if d} | {os.path.abspath(d) for d in dirs if d}
        _system = tuple(sorted(d.rstrip(os.sep) + os.sep for d in real))
    return _system


def is_user_file(filename: Optional[str]) -> bool:
    """Whether code from this file is the user's own: not the standard library, not an installed
    package, not depio itself. Code without a real file (`<stdin>`, exec) is the user's."""
    if not filename:
        return True
    if filename.startswith("<"):
        return not filename.startswith("<frozen")
    path = os.path.abspath(filename)
    return not path.startswith(_system_dirs()) and not path.startswith(_PACKAGE_DIRS)


def _code_into(h, co: types.CodeType) -> None:
    """Everything of a code object that is behaviour, not position: no line tables, no file name."""
    _put(h, b"C" + _text(co.co_name))
    _put(h, b"%d,%d,%d,%d,%d" % (co.co_argcount, co.co_posonlyargcount, co.co_kwonlyargcount,
                                  co.co_nlocals, co.co_flags))
    _put(h, co.co_code)
    _put(h, getattr(co, "co_exceptiontable", b""))
    for names in (co.co_names, co.co_varnames, co.co_freevars, co.co_cellvars):
        _put(h, _text("\0".join(names)))
    _put(h, b"K%d" % len(co.co_consts))
    for c in co.co_consts:
        _const_into(h, c)


def _const_into(h, c: Any) -> None:
    if isinstance(c, types.CodeType):
        _code_into(h, c)
    elif type(c) is tuple:
        _put(h, b"T%d" % len(c))
        for x in c:
            _const_into(h, x)
    elif type(c) is frozenset:
        _put(h, _text("S" + "\0".join(sorted(f"{type(x).__qualname__}:{x!r}" for x in c))))
    else:
        _put(h, _text(f"{type(c).__qualname__}:{c!r}"))


def _names(co: types.CodeType, out: set) -> set:
    out.update(co.co_names)
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            _names(c, out)
    return out


def _unwrap(obj: Any) -> Optional[types.FunctionType]:
    while True:
        if isinstance(obj, types.FunctionType):
            return obj
        if isinstance(obj, (types.MethodType, staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, functools.partial):
            obj = obj.func
        else:
            return None


def _cell_values(func: types.FunctionType) -> List[Any]:
    out = []
    for cell in func.__closure__ or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:
            out.append(None)
    return out


def _references(func: types.FunctionType) -> List[Any]:
    """What the function may call: the globals its code names (and attributes of user modules it
    names), its closure's values, what it wraps."""
    names = sorted(_names(func.__code__, set()))
    g = func.__globals__
    found, modules = [], []
    for n in names:
        if n in g:
            v = g[n]
            (modules if isinstance(v, types.ModuleType) else found).append(v)
    for m in modules:
        if is_user_file(getattr(m, "__file__", None)) and getattr(m, "__file__", None):
            found.extend(m.__dict__[n] for n in names if n in m.__dict__)
    found.extend(_cell_values(func))
    wrapped = getattr(func, "__wrapped__", None)
    if wrapped is not None:
        found.append(wrapped)
    return found


def _functions_of(obj: Any) -> List[types.FunctionType]:
    """The user-code functions an object stands for: itself, or a user class's methods."""
    f = _unwrap(obj)
    if f is not None:
        return [f] if is_user_file(f.__code__.co_filename) else []
    if isinstance(obj, type):
        module = sys.modules.get(obj.__module__)
        if module is None or not is_user_file(getattr(module, "__file__", None)) or obj.__module__ == "builtins":
            return []
        out = []
        for name in sorted(vars(obj)):
            member = vars(obj)[name]
            if isinstance(member, property):
                out.extend(x for x in (member.fget, member.fset, member.fdel) if isinstance(x, types.FunctionType))
            else:
                m = _unwrap(member)
                if m is not None and is_user_file(m.__code__.co_filename):
                    out.append(m)
        return out
    return []


_own: "weakref.WeakKeyDictionary[types.FunctionType, str]" = weakref.WeakKeyDictionary()
_roots: "weakref.WeakKeyDictionary[Any, Tuple[str, CodeDesc]]" = weakref.WeakKeyDictionary()


_CONSTANT_LIMIT = 1000


def _own_hash(func: types.FunctionType) -> str:
    """The function's own code, default values, non-function closure values, and the module-level
    constants it names that have a short exact repr (`SCALE = 3`: editing it is editing the code;
    a large or opaque global is data, not code, and is left out)."""
    digest = _own.get(func)
    if digest is None:
        h = _new(CODE_DIGEST_SIZE)
        _code_into(h, func.__code__)
        _put(h, _text(value_digest(func.__defaults__)))
        _put(h, _text(value_digest(func.__kwdefaults__)))
        for v in _cell_values(func):
            if _unwrap(v) is None and not isinstance(v, type):
                _put(h, _text(value_digest(v)))
        g = func.__globals__
        for name in sorted(_names(func.__code__, set())):
            if name in g and not name.startswith("__"):
                exact = canonical(g[name])
                if exact is not None and len(exact) <= _CONSTANT_LIMIT:
                    _put(h, _text(f"{name}={exact}"))
        digest = _own[func] = h.hexdigest()
    return digest


_DEF_RE = re.compile(r"\s*(?:async\s+)?def\s+(\w+)")


def _def_line(co: types.CodeType) -> int:
    """The `def` line (co_firstlineno is the first decorator's line)."""
    linecache.checkcache(co.co_filename)
    for n in range(co.co_firstlineno, co.co_firstlineno + 50):
        text = linecache.getline(co.co_filename, n)
        if not text:
            break
        m = _DEF_RE.match(text)
        if m and m.group(1) == co.co_name:
            return n
    return co.co_firstlineno


def _shown_file(filename: str) -> str:
    if filename.startswith("<"):
        return filename
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


def _part(func: types.FunctionType) -> Tuple[str, str, int, str]:
    co = func.__code__
    # named by file name, not module: a script is `__main__` when run and another name when imported
    return (f"{os.path.basename(co.co_filename)}:{func.__qualname__}", _shown_file(co.co_filename),
            _def_line(co), _own_hash(func))


def code_hash(func: Callable) -> Tuple[str, CodeDesc]:
    """(hex digest, description) of a function's compiled code together with every function of the
    user's own modules it reaches (guarded against cycles). Computed once per function object in a
    process (`clear_code_cache()` forgets); not comparable across Python versions (see `PYTHON`)."""
    try:
        cached = _roots.get(func)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    root = _unwrap(func)
    if root is None:
        call = getattr(type(func), "__call__", None)
        root = _unwrap(call) if isinstance(call, types.FunctionType) else None
    if root is None:             # a builtin or C callable: only its name can tell
        name = getattr(func, "__qualname__", type(func).__qualname__)
        h = _new(CODE_DIGEST_SIZE)
        _put(h, _text(f"{getattr(func, '__module__', '')}.{name}"))
        result = (h.hexdigest(), CodeDesc("?", 0, str(name)))
    else:
        parts, seen, todo = [], {id(root)}, [root]
        while todo:
            f = todo.pop()
            parts.append(_part(f))
            for ref in _references(f):
                for g in _functions_of(ref):
                    if id(g) not in seen:
                        seen.add(id(g))
                        todo.append(g)
        ordered = (parts[0],) + tuple(sorted(parts[1:]))
        h = _new(CODE_DIGEST_SIZE)
        for ident, _file, _line, own in ordered:
            _put(h, _text(ident + "\0" + own))
        if isinstance(func, functools.partial):
            _put(h, _text(value_digest((func.args, func.keywords))))
        result = (h.hexdigest(), CodeDesc(ordered[0][1], ordered[0][2], root.__name__, ordered))
    try:
        _roots[func] = result
    except TypeError:
        pass
    return result


def clear_code_cache() -> None:
    """Forget computed code hashes (after reloading modules in a long-lived process)."""
    _own.clear()
    _roots.clear()


def function_ident(func: Callable) -> str:
    """`file.py:qualname`, the same whether the script runs as `__main__` or is imported."""
    f = _unwrap(func)
    if f is not None:
        return f"{os.path.basename(f.__code__.co_filename)}:{f.__qualname__}"
    return f"{getattr(func, '__module__', '')}:{getattr(func, '__qualname__', type(func).__qualname__)}"


__all__ = ["code_hash", "CodeDesc", "clear_code_cache", "is_user_file", "function_ident", "content_hash",
           "hash_paths", "HashMemo", "norm_path", "args_record", "args_hash", "args_diff", "record_digest",
           "value_digest", "canonical", "short_repr", "ArgEntry", "ArgsRecord", "PYTHON"]
