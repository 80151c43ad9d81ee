"""The ``flax-resnet`` command: ``parity``, ``convert``, ``inspect``, ``train``.

Each subcommand lives in its own module with ``register(subparsers)``;
heavy imports (torch, orbax) happen inside the command, not here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("parity.cli", "flax_resnet.io_cli", "flax_resnet.train_cli")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``PROG: error: ...``, exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # Subparsers inherit the parser class, so every subcommand reports errors the same way.
    parser = _Parser(prog="flax-resnet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, OSError, ValueError) as e:  # OSError: missing, unreadable, unwritable, disk full
        msg = " ".join(str(e).split())
        print(f"flax-resnet {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
