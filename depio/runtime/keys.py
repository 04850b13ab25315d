"""The shared key: where it comes from, when one is required, and which files are safe to hold it.

Whoever has the key can make the dispatcher and the workers unpickle (run) anything, so a key is
required wherever the network can reach a socket, and a key file must be private (mode 600).
"""
from __future__ import annotations

import ipaddress
import os
import stat
from typing import Optional

KEY_ENV = "DEPIO_KEY"               # hex key handed to workers through the environment


def new_key() -> bytes:
    return os.urandom(32)


def key_from_hex(text: str) -> bytes:
    """Parse a key as `depio key` writes it (hex)."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("the depio key must be hex (as written by `depio key`)") from None
    if len(key) < 16:
        raise ValueError("the depio key is too short: use at least 16 bytes (32 hex digits)")
    return key


MAKE_KEY_HINT = ("make one with `depio key ~/.depio/cluster.key` (written with mode 600) and pass it as a "
                 f"key file, or export {KEY_ENV}=$(cat ~/.depio/cluster.key)")


class KeyRequiredError(ValueError):
    """No usable key where one is required (non-loopback address, unsafe or malformed key file)."""


def is_loopback(address: str) -> bool:
    """True when only this machine can reach `address` (a ZeroMQ endpoint).

    inproc:// and ipc:// never leave the host; tcp:// counts only for 127.0.0.0/8, ::1, `localhost` and
    the `lo` interface. A wildcard (`*`, 0.0.0.0, ::), a host name or another interface is reachable
    from the network, so it needs a key that is not handed around in this process alone."""
    transport, sep, rest = address.partition("://")
    if not sep:
        return False
    if transport in ("inproc", "ipc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if not rest.startswith("[") else rest[1:rest.find("]")]
    if ";" in host:        # tcp://source;destination: the destination decides
        host = host.rsplit(";", 1)[1]
    host = host.strip().lower()
    if host in ("localhost", "lo", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key_file(path: str) -> None:
    """Refuse a key file that someone else could read or that another user owns: whoever reads the key
    can make the dispatcher and the workers unpickle (run) anything."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise KeyRequiredError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyRequiredError(f"key file {path} is readable or writable by others (mode "
                               f"{st.st_mode & 0o777:o}); run: chmod 600 {path}")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KeyRequiredError(f"key file {path} belongs to another user (uid {st.st_uid})")


def load_key(path: Optional[str] = None, env: str = KEY_ENV) -> Optional[bytes]:
    """The shared key from `path` (mode 600 checked) if given, else from $DEPIO_KEY; None if neither.

    Raises KeyRequiredError for an unsafe file and ValueError for a malformed key."""
    if path:
        path = os.path.expanduser(str(path))
        try:
            check_key_file(path)
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise KeyRequiredError(f"key file {path} does not exist; {MAKE_KEY_HINT}") from None
        try:
            return key_from_hex(text)
        except ValueError as e:
            raise KeyRequiredError(f"key file {path}: {e}") from None
    text = os.environ.get(env, "").strip()
    if not text:
        return None
    try:
        return key_from_hex(text)
    except ValueError as e:
        raise KeyRequiredError(f"${env}: {e}") from None


def key_for_bind(*addresses: str, key: Optional[bytes] = None, key_file: Optional[str] = None) -> bytes:
    """The key to use for sockets bound at `addresses`.

    An explicit key wins, then `key_file`, then $DEPIO_KEY. Without any, loopback addresses get a fresh
    key for this run (handed to local workers through their environment); any other address refuses to
    start, because a key nobody configured cannot be shared safely with remote workers."""
    if key:
        if len(key) < 16:
            raise KeyRequiredError("the depio key is too short: use at least 16 bytes")
        return key
    loaded = load_key(key_file)
    if loaded is not None:
        return loaded
    exposed = [a for a in addresses if a and not is_loopback(a)]
    if exposed:
        raise KeyRequiredError(f"refusing to bind {', '.join(exposed)} without a key: that address is reachable "
                               f"from other machines and depio messages carry pickles (code). {MAKE_KEY_HINT}")
    return new_key()
