"""What makes two calls the same task, computed once per function: the function's plan (which
arguments are products, dependencies, or hashed; where each sits in a call) and the hash and
equality key of a task built from it. Reading arguments through the plan's slots instead of
building dicts keeps building pipelines of 100,000 tasks fast.
"""
from __future__ import annotations

import inspect
import pickle
import sys
import typing
from pathlib import Path, PurePath
from typing import Annotated, Any, Callable, Dict, List, Union, get_args, get_origin

class Product:
    """Marker: `Annotated[Path, Product]` is a file the task writes."""


class Dependency:
    """Marker: `Annotated[Path, Dependency]` is a file the task reads."""


class IgnoredForEq:
    """Marker: the argument does not make two calls different (e.g. a verbosity flag)."""


for _marker in (Product, Dependency, IgnoredForEq):
    _marker.__module__ = "depio.Task"      # where upstream defines them (repr, pickle)


def _positional_names(fn: Callable) -> List[str]:
    code = getattr(fn, '__code__', None)
    if code is not None and not isinstance(fn, type):
        return list(code.co_varnames[:code.co_argcount])
    try:
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def _annotations_of(func: Callable) -> Dict[str, Any]:
    target = func
    if isinstance(func, type):
        target = func.__init__
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolved string annotations: fall back to what is there
        return dict(getattr(target, '__annotations__', None) or {})


def _marked(annotation: Any, marker: type) -> bool:
    if get_origin(annotation) is Annotated:
        return any(meta is marker for meta in get_args(annotation)[1:])
    # Optional[Annotated[...]] and similar unions
    if get_origin(annotation) is Union:
        return any(_marked(a, marker) for a in get_args(annotation))
    return False


def _parse_annotation_for_metaclass(func: Callable, *rest: Any) -> List[str]:
    """Names of the arguments (and 'return') annotated with the marker class.

    Called as `(func, marker)` or, as in later upstream versions, `(func, args_dict, marker)`."""
    marker = rest[-1]
    return [name for name, annotation in _annotations_of(func).items() if _marked(annotation, marker)]


_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})


class _Missing:
    """Hash stand-in for an argument a call does not have; one instance, kept by copy and pickle
    (a copied task must hash as the original does)."""
    __slots__ = ()

    def __reduce__(self) -> str:
        return "_MISSING"

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
_NO_EXTRAS = frozenset()   # the extra-keyword part of the hash when there are none


class _FunctionPlan:
    """What depio needs to know about a function, computed once per function.

    `*_slots` say where each named argument sits in a call, as (name, position, default):
    looking a value up through them gives what `_args_dict.get(name)` would, without building
    the dict (a Task is built 100,000 times; the function's signature is read once)."""

    __slots__ = ('func', 'positional', 'products', 'dependencies', 'ignored', 'defaults',
                 'product_slots', 'dependency_slots', 'hash_slots', 'hash_names', 'hash_arity')

    def __init__(self, func: Callable):
        self.func = func
        self.positional = _positional_names(func)
        self.products = tuple(n for n in _parse_annotation_for_metaclass(func, Product) if n != 'return')
        self.dependencies = tuple(n for n in _parse_annotation_for_metaclass(func, Dependency) if n != 'return')
        self.ignored = frozenset(_parse_annotation_for_metaclass(func, IgnoredForEq))
        # defaults of annotated file arguments count: f() with a default product still produces it
        self.defaults: Dict[str, Any] = {}
        try:
            for p in inspect.signature(func).parameters.values():
                if p.default is not p.empty and (p.name in self.products or p.name in self.dependencies):
                    self.defaults[p.name] = p.default
        except (TypeError, ValueError):
            pass
        position = {n: k for k, n in enumerate(self.positional)}
        nowhere = sys.maxsize      # not positional: only a keyword or a default can give a value

        def slot(name: str, missing: Any) -> tuple:
            return name, position.get(name, nowhere), self.defaults.get(name, missing)

        self.product_slots = tuple(slot(n, None) for n in self.products)
        self.dependency_slots = tuple(slot(n, None) for n in self.dependencies)
        # the names every call is hashed by, in a fixed order; any other keyword is hashed as a set
        names = [n for n in self.positional if n not in self.ignored]
        names += [n for n in self.defaults if n not in position and n not in self.ignored]
        self.hash_slots = tuple(slot(n, _MISSING) for n in names)
        self.hash_names = frozenset(names) | self.ignored
        # a call with every positional argument given and no keyword is hashed straight from its
        # arguments when those are exactly the hashed names, in order (the common decorated call)
        self.hash_arity = len(names) if names == self.positional else -1


_plans: Dict[int, _FunctionPlan] = {}


def _plan_for(func: Callable) -> _FunctionPlan:
    plan = _plans.get(id(func))
    if plan is None or plan.func is not func:
        plan = _FunctionPlan(func)
        _plans[id(func)] = plan
    return plan


def _collect_paths(slots: tuple, args: List, kwargs: Dict[str, Any]) -> List[Path]:
    """The paths in the named arguments of a call, in slot order: what
    `[p for n in names for p in _as_paths(args_dict.get(n))]` gives, without the dict."""
    nargs = len(args)
    paths: List[Path] = []
    for name, k, default in slots:
        if kwargs and name in kwargs:
            v = kwargs[name]
        elif k < nargs:
            v = args[k]
        else:
            v = default
        if v is None:
            continue
        if isinstance(v, Path):
            paths.append(v)
        else:
            paths += _as_paths(v)
    return paths


def _as_paths(value: Any) -> List[Path]:
    if value is None:
        return []
    if isinstance(value, Path):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [v if isinstance(v, Path) else Path(v) for v in value if v is not None]
    return [Path(value)]


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an argument value, equal exactly when the values are equal."""
    if type(value) in _SCALARS:
        return value
    if isinstance(value, PurePath):
        return ('path', str(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ('dict', frozenset((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return ('set', frozenset(_freeze(v) for v in value))
    try:
        hash(value)
        return value
    except TypeError:
        try:
            return ('pickled', type(value).__qualname__, pickle.dumps(value, protocol=4))
        except Exception:
            return ('object', id(value))


def task_key(task) -> tuple:
    """What makes two tasks equal: the function and the arguments not marked IgnoredForEq.
    Not cached (only its hash is): it would cost hundreds of bytes per task."""
    return (task.func, frozenset((k, _freeze(v)) for k, v in task.cleaned_args.items()))


def compute_hash(task) -> int:
    """A hash of exactly what `task_key()` compares (the function and the frozen `cleaned_args`),
    read through the plan's slots instead of building the argument dict, the frozenset and a
    tuple per argument: equal keys give equal hashes, which is all dedup needs."""
    plan, args, kwargs = task._plan, task.func_args, task.func_kwargs
    nargs = len(args)
    values = []
    if not kwargs and nargs == plan.hash_arity:     # the slots would read args in order
        for v in args:
            if type(v) in _SCALARS:
                values.append(v)
            elif isinstance(v, PurePath):
                values.append(('path', str(v)))
            else:
                values.append(_freeze(v))
        return hash((task.func, tuple(values), _NO_EXTRAS))
    # the same slot lookup as _collect_paths, inline: a shared helper costs ~3.5 us a task (18%)
    for name, k, default in plan.hash_slots:
        if kwargs and name in kwargs:
            v = kwargs[name]
        elif k < nargs:
            v = args[k]
        else:
            v = default
        if type(v) in _SCALARS:
            values.append(v)
        elif isinstance(v, PurePath):
            values.append(('path', str(v)))      # _freeze(v), without the call
        else:
            values.append(_freeze(v))
    extras = _NO_EXTRAS
    if kwargs:
        names = plan.hash_names
        extras = frozenset((n, _freeze(v)) for n, v in kwargs.items() if n not in names)
    return hash((task.func, tuple(values), extras))
