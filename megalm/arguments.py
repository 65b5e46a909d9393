"""Command-line flags derived from the configuration dataclasses.

Every field of the dataclasses in `megalm.config` becomes one flag: ``num_layers`` -> ``--num-layers``,
with the field's type, default and ``help``. Booleans that default to False are ``store_true``
switches; booleans that default to True need an explicit negative ``flag`` in their metadata
(``--disable-bias-linear``). Parsing is strict: an unknown flag stops the program with a message
naming it and the closest known flags.

``--help`` reads like Megatron-LM's: flags in groups by concern (a field's ``group``, else its
dataclass's usual group), each value named by its kind (``--num-layers N``, ``--lr X``, ``--save DIR``,
``--normalization {LayerNorm,RMSNorm}``) and its default stated once, never for a switch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from typing import Optional, Sequence

from megalm.config import SECTIONS, Config, ConfigError

# The value's name in --help by its type; a text field names its value in metadata (PATH, DIR...).
_METAVARS = {int: "N", float: "X"}

# The --help group of a field that does not name one.
_SECTION_GROUPS = {"model": "architecture", "parallel": "parallelism", "optim": "optimizer",
                   "train": "training", "data": "data"}


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _flag_fields(klass) -> list:
    """The fields of `klass` that are flags (derived values are not)."""
    return [f for f in dataclasses.fields(klass) if not f.metadata.get("derived")]


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _base_type(annotation):
    """int for `int` and `Optional[int]`; also resolves string annotations."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Optional": Optional, "Union": typing.Union, "List": typing.List, "list": list})  # noqa: S307 (our own source)
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0]
    return annotation


def _argparse_type(parse):
    """`parse`, with its ConfigError turned into argparse's error (reported with the flag's name)."""
    def convert(text):
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (so callers decide how to exit) and suggests flag names."""

    def error(self, message):
        if "unrecognized arguments" in message:
            unknown = message.split(":", 1)[1].split()
            known = [s for a in self._actions for s in a.option_strings]
            hints = []
            for u in unknown:
                if u.startswith("-"):
                    close = difflib.get_close_matches(u.split("=")[0], known, n=3)
                    hints.append(f"{u}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ConfigError("unknown flag(s): " + "; ".join(hints or unknown) +
                              ". Run with --help for the list of flags.")
        raise ConfigError(message)


def _help(f: dataclasses.Field, switch: bool) -> str:
    """The field's help with its default added once: not for a switch (its help says what it
    does), nor for a default of nothing (the help says what happens then), nor when the help
    already states it."""
    text, default = f.metadata["help"], _default(f)
    if switch or default is None or default == [] or "default:" in text:
        return text
    return f"{text} (default: {str(default).replace('%', '%%')})"


def _argument(section: str, f: dataclasses.Field) -> dict:
    """add_argument's keywords for field `f`. argparse holds no default (SUPPRESS): a flag not given
    stays out of the namespace and the dataclass's default applies, so defaults live in one place
    and no help formatter adds them a second time."""
    kind = _base_type(f.type)
    switch = kind is bool and "type" not in f.metadata
    kwargs = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS, help=_help(f, switch))
    if switch:
        kwargs["action"] = "store_false" if _default(f) else "store_true"
        return kwargs
    if "type" in f.metadata:
        kwargs["type"] = _argparse_type(f.metadata["type"])
    elif kind is list:
        kwargs["nargs"] = "+"
    else:
        kwargs["type"] = kind
    if "choices" in f.metadata:  # argparse shows them as {a,b,c}
        kwargs["choices"] = f.metadata["choices"]
    else:
        kwargs["metavar"] = f.metadata.get("metavar") or _METAVARS.get(kind, "TEXT")
    return kwargs


# The sections whose flags every entry point takes; posttrain_gpt.py adds "posttrain".
COMMON_SECTIONS = ("model", "parallel", "optim", "train", "data")


def build_parser(description: str = "megalm", extra: Optional[callable] = None,
                 sections: Sequence[str] = COMMON_SECTIONS) -> argparse.ArgumentParser:
    """The parser for the flags of `sections` (the others keep their defaults). `extra(parser)` may
    add tool-specific flags."""
    # The usage line would list every flag (~60 lines); the groups below say it better.
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     allow_abbrev=False, usage="%(prog)s [FLAGS]")
    groups = {}  # in the order of their first flag
    for section in sections:
        for f in _flag_fields(SECTIONS[section]):
            title = f.metadata.get("group", _SECTION_GROUPS.get(section, section))
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            groups[title].add_argument(_flag_name(f), **_argument(section, f))
    if extra is not None:
        extra(parser)
    return parser


def config_from_namespace(ns: argparse.Namespace) -> Config:
    sections = {name: {} for name in SECTIONS}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = value
    return Config(**{name: SECTIONS[name](**values) for name, values in sections.items()})


def parse_args(argv: Optional[Sequence[str]] = None, extra: Optional[callable] = None,
               description: str = "megalm", sections: Sequence[str] = COMMON_SECTIONS):
    """Parse flags into a Config (not yet validated) and the namespace (for `extra` flags)."""
    parser = build_parser(description, extra, sections)
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return config_from_namespace(ns), ns


def config_to_argv(config: Config) -> list:
    """The flags that reproduce `config` (used in logs and tests)."""
    argv = []
    for section, klass in SECTIONS.items():
        obj = getattr(config, section)
        for f in _flag_fields(klass):
            value = getattr(obj, f.name)
            if value == _default(f) or value is None:
                continue
            if "type" in f.metadata:  # parsed from one string
                argv += [_flag_name(f), str(value).replace(" ", "")]
            elif isinstance(value, bool):
                argv.append(_flag_name(f))
            elif isinstance(value, list):
                argv += [_flag_name(f)] + [str(v) for v in value]
            else:
                argv += [_flag_name(f), str(value)]
    return argv
