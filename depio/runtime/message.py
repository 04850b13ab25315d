"""What every wire message is (`depio.runtime.protocol` has them all): a frozen dataclass with slots,
compared, hashed and shown by its fields, which `FIELDS_OF` reads as one tuple (the wire form)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Callable, Dict, Tuple

FIELDS_OF: Dict[type, Callable[[object], tuple]] = {}      # message class -> its fields' values, as a tuple


def _getter(names: Tuple[str, ...]) -> Callable[[object], tuple]:
    if not names:
        return lambda obj: ()
    if len(names) == 1:
        get1 = attrgetter(names[0])
        return lambda obj: (get1(obj),)
    return attrgetter(*names)


class Message:
    """Equality, hash and repr by the fields, written here once: generated per class by `dataclass`,
    they cost every process that imports the protocol (each worker, at its start) ~5 ms."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        get = FIELDS_OF[type(self)]
        return get(self) == get(other)

    def __hash__(self) -> int:
        return hash((type(self), FIELDS_OF[type(self)](self)))

    def __repr__(self) -> str:
        values = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{type(self).__qualname__}({values})"


def message(cls: type) -> type:
    """Make `cls` (a subclass of `Message`) a message: a frozen dataclass with slots."""
    cls = dataclass(frozen=True, slots=True, eq=False, repr=False)(cls)
    FIELDS_OF[cls] = _getter(tuple(f.name for f in fields(cls)))
    return cls
