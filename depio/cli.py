"""`depio`: the command line (keys, versions; pools come with `depio pool`)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import protocol as P

EXAMPLES = """examples:
  depio key ~/.depio/cluster.key      write a new protocol key (mode 600) for non-loopback use
  depio info                           versions that workers and pipelines must share
  depio-worker --help                  the worker that runs tasks on compute nodes
"""


def _cmd_key(args: argparse.Namespace) -> int:
    path = os.path.expanduser(args.file)
    if os.path.exists(path) and not args.force:
        print(f"depio: {path} exists; pass --force to replace it", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(P.new_key().hex() + "\n")
    os.chmod(path, 0o600)
    print(f"wrote a new key to {path} (mode 600)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__
    print(f"depio {__version__}")
    for k, v in P.runtime_signature().items():
        print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="depio", description="depio: run research pipelines like make.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    k = sub.add_parser("key", help="write a new protocol key file (mode 600)")
    k.add_argument("file", help="where to write it")
    k.add_argument("--force", action="store_true", help="replace an existing file")
    k.set_defaults(func=_cmd_key)
    i = sub.add_parser("info", help="show versions (protocol, Python, cloudpickle)")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (OSError, ValueError) as e:
        print(f"depio: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
