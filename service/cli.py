"""The `digits` command: one entry point, one subcommand per job.

Serving subcommands live in `service`; the training ones (`train`, `evaluate`, `export`, `download`)
are discovered through the ``digits.commands`` entry-point group, so this package never imports
`training` (or torch) itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

from service import __version__

# Each serving subcommand is registered by a function that adds its parser and sets `func`.
Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _service_commands() -> list[Register]:
    # Imported here, not at module top, so `digits --help` stays fast and a broken optional
    # command cannot stop the others from working.
    from service import commands

    return commands.REGISTRARS


def _plugin_commands() -> list[Register]:
    found: list[Register] = []
    for entry in metadata.entry_points(group="digits.commands"):
        found.append(entry.load())
    return found


def build_parser() -> argparse.ArgumentParser:
    """The full `digits` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="digits",
        description="Handwritten-digit recognition: train LeNet-5, export to ONNX, serve it over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"digits {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _service_commands() + _plugin_commands():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `digits`; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code = func(args)
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
