"""The flax-resnet command: parity, convert, inspect, train, predict.

Each subcommand lives in its own module with ``register(subparsers)``;
heavy imports (torch, orbax) happen inside the command, not here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flax_resnet import __version__

SUBCOMMANDS = ("parity.cli", "flax_resnet.io_cli", "flax_resnet.train_cli", "flax_resnet.predict")

# The torch this project is built and tested against (the README's set-up pins it; any torch >= 2.1 reads files).
TORCH_INSTALL = "pip install torch==2.13.0"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The one help layout of every subcommand: descriptions and epilogs as written, each option's default shown.

    Options whose default is ``None`` or ``False`` say their default in words (or have none worth showing).
    """

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "%(default)" not in text and "(default" not in text and not quiet and action.option_strings:
            text += " (default: %(default)s)"
        return text


def add_command(subparsers: argparse._SubParsersAction, name: str, help: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand's parser, in the one help layout (``HelpFormatter``)."""
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``PROG: error: ...``, exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # Subparsers inherit the parser class, so every subcommand reports errors the same way.
    parser = _Parser(
        prog="flax-resnet",
        description="Flax ResNets numerically interchangeable with PyTorch: check parity, convert and inspect "
        "checkpoints, train, and classify images. 'flax-resnet COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
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
    except BrokenPipeError:  # stdout closed early (`| head`): no error; nothing more to say
        _quiet_stdout()
        return 0
    except (UsageError, OSError, ValueError) as e:  # OSError: missing, unreadable, unwritable, disk full
        msg = " ".join(str(e).split())
        print(f"flax-resnet {args.command}: error: {msg}", file=sys.stderr)
        if argv is None:  # the real command line: the error line is the last word (see _silence_stderr)
            _silence_stderr()
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT; writers leave nothing behind
        print(f"flax-resnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional dependency; the project's own modules are bugs
        if (e.name or "").split(".")[0] in ("flax_resnet", "parity", "torch_ref"):
            raise
        if e.name == "torch":
            msg = f"this needs PyTorch: {TORCH_INSTALL} (the CPU wheel the project is tested with)"
        elif str(e).startswith("No module named"):
            msg = f"this needs the {e.name} module, which is not installed"
        else:  # our own messages say what to install
            msg = " ".join(str(e).split())
        print(f"flax-resnet {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _quiet_stdout() -> None:
    """Points stdout at /dev/null so the interpreter's final flush does not fail again on the closed pipe."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (tests capture it)
        pass


def _silence_stderr() -> None:
    """Sends the rest of this process's stderr to /dev/null.

    After a failed Orbax restore, tensorstore's threads still finish their
    reads and print "Event loop is closed" tracebacks at exit, below the
    one error line that says what went wrong.
    """
    import os

    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


if __name__ == "__main__":
    sys.exit(main())
