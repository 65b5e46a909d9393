"""Shared plumbing of the data tools: flags from dataclass fields, and one-line errors (for a bad
flag too).

A boolean field that defaults to True becomes ``--no-NAME``; one that defaults to False,
``--NAME``; a list field takes several values (``--language zh en``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Callable


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a DataError: `run` prints it as one `error: ...` line (exit status
    2) instead of the whole usage text above argparse's own error line."""

    def error(self, message: str):
        from megalm.data.errors import DataError

        raise DataError(f"{message} (see {self.prog} --help)")


def option(default, help: str, **extra):
    """A dataclass field that is also a flag of a data tool (`help`, optional `choices`)."""
    metadata = {"help": help, **extra}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        if kind is bool:
            if default:
                group.add_argument(f"--no-{name}", dest=f.name, action="store_false",
                                   help=f"Switch off (on by default): {help_text[0].lower()}{help_text[1:]}")
            else:
                group.add_argument(f"--{name}", dest=f.name, action="store_true", help=help_text)
        elif isinstance(default, list):
            item = type(default[0]) if default else str
            group.add_argument(f"--{name}", dest=f.name, nargs="*", type=item, default=default,
                               help=f"{help_text} (default: {' '.join(map(str, default)) or 'none'})")
        else:
            item = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            group.add_argument(f"--{name}", dest=f.name, type=item, default=default,
                               choices=f.metadata.get("choices"), help=f"{help_text} (default: {default})")


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run(main: Callable[[], int]) -> None:
    """Run a tool's main: user errors (DataError, missing files) print one line, exit code 2."""
    from megalm.data.errors import DataError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        code = main()
    except (DataError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: no output was written under its final name", file=sys.stderr)
        code = 130
    sys.exit(code)
