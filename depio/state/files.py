"""Content hashes of files and directories, memoised by (path, size, mtime_ns, inode).

`content_hash(path, memo)` is blake2b (8 bytes: what `b2sum -l 64` prints for a file) of a file's
bytes, or, for a directory, of its files' relative names and hashes, sorted. With a `HashMemo`
(persisted by `StateStore.load_memo` / `save_memo`) an unchanged file costs one `stat`, no read: a
`touch` alone changes the mtime, so the file is read again, and its hash is the same.
"""
from __future__ import annotations

import os
import stat
import time
from typing import Dict, Iterable, Optional, Tuple, Union

from .values import RACY_WINDOW, READ_BUFFER, _new, _put, _text


class HashMemo:
    """Content hashes by absolute path, valid while (size, mtime_ns, inode) are unchanged. A file
    modified within RACY_WINDOW seconds is not memoised (it may change again within one mtime tick).
    `dirty` holds what `StateStore.save_memo` still has to write; `reads` counts files read."""

    __slots__ = ("entries", "dirty", "racy_window", "reads")

    def __init__(self, entries: Optional[Dict[str, Tuple[int, int, int, str]]] = None,
                 racy_window: float = RACY_WINDOW):
        self.entries = entries if entries is not None else {}
        self.dirty: Dict[str, Tuple[int, int, int, str]] = {}
        self.racy_window = racy_window
        self.reads = 0

    def __len__(self) -> int:
        return len(self.entries)


def _file_hash(path: str, st: os.stat_result, memo: Optional[HashMemo]) -> str:
    if memo is not None:
        e = memo.entries.get(path)
        if e is not None and e[0] == st.st_size and e[1] == st.st_mtime_ns and e[2] == st.st_ino:
            return e[3]
    h = _new()
    with open(path, "rb", buffering=0) as f:
        if st.st_size < READ_BUFFER:
            h.update(f.read())
        else:
            buf = bytearray(READ_BUFFER)
            view = memoryview(buf)
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
    digest = h.hexdigest()
    if memo is not None:
        memo.reads += 1
        if abs(time.time() - st.st_mtime) >= memo.racy_window:
            memo.entries[path] = memo.dirty[path] = (st.st_size, st.st_mtime_ns, st.st_ino, digest)
    return digest


def _dir_hash(root: str, memo: Optional[HashMemo]) -> str:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full) and os.path.isdir(full):
                entries.append((rel + "/", "link:" + os.readlink(full)))
                continue
            try:
                entries.append((rel, _file_hash(full, os.stat(full), memo)))
            except FileNotFoundError:              # a dangling symlink
                entries.append((rel, "dangling:" + os.readlink(full)))
    h = _new()
    h.update(b"D")
    for rel, digest in sorted(entries):
        _put(h, _text(rel + "\0" + digest))
    return h.hexdigest()


def content_hash(path: Union[str, os.PathLike], memo: Optional[HashMemo] = None) -> str:
    """blake2b hex digest of a file's bytes, or of a directory's files (relative names and hashes,
    sorted). Raises FileNotFoundError for a missing path."""
    p = os.fspath(path)
    p = os.path.normpath(p if p[:1] == os.sep else os.path.join(os.getcwd(), p))   # os.path.abspath, inline
    st = os.stat(p)
    if stat.S_ISDIR(st.st_mode):
        return _dir_hash(p, memo)
    return _file_hash(p, st, memo)


def hash_paths(paths: Iterable[Union[str, os.PathLike]], memo: Optional[HashMemo] = None) -> Dict[str, Optional[str]]:
    """{shown path: content hash, or None when missing}, paths shown as `norm_path` gives them."""
    out: Dict[str, Optional[str]] = {}
    cwd = os.getcwd()
    for p in paths:
        shown = norm_path(p, cwd)
        try:
            out[shown] = content_hash(p, memo)
        except (FileNotFoundError, NotADirectoryError):
            out[shown] = None
    return out


def norm_path(path: Union[str, os.PathLike], base: Optional[str] = None) -> str:
    """A path as records keep it: relative to `base` (the working directory) when inside it."""
    s = os.fspath(path)
    if s[:1] == os.sep:
        rel = os.path.relpath(s, base or os.getcwd())
        if not rel.startswith(".."):
            s = rel
    return os.path.normpath(s)


__all__ = ["HashMemo", "content_hash", "hash_paths", "norm_path"]
