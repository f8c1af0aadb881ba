"""Command-line flags from typed config dataclasses: the one flag generator of both CLIs
(`personalize lora/full/...` and `batch` from TrainConfig; `distill train` and `distill eval`
from their configs).

Each field is one flag, `--field-name`, typed by its annotation; a field without a default is a
required flag; a field whose type is a dataclass contributes its own fields in place. What the
annotation cannot say is in the field's metadata:

    steps: int = field(default=800, metadata={"help": "optimizer steps"})
    optimizer: str = field(default="adamw", metadata={"help": "...", "choices": OPTIMIZERS})

    help     required, also for a field without a flag: the flag's help, as argparse formats it
             (%(default)s allowed, a literal % as %%); " (default: X)" is added unless the text
             names its default itself (the word "default")
    choices  the library's own constant (a tuple, or a dict: its keys), never a copied list
    type     an argparse type (e.g. `argtypes.number(int, 1)`) instead of the annotation's
    flag     its spellings when not `--field-name` ("--data", ("-o", "--output")); None: no flag,
             the field keeps its default (or is given by the caller, as a command's name)
    invert   a bool whose flag turns it off (store_false), as `--random-crop` for center_crop=True
    group    the --help section (default: the caller's section for the field's dataclass)
    metavar  the value's name in --help (default: the flag's name, or {the,choices})

Types: bool is --x/--no-x (argparse.BooleanOptionalAction); `X | None` is X with default None;
`list[X]` is a comma-separated list; `Literal["a", "b"]` has those choices. Standard library only,
so that building a parser (and every `--help`) stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterator

METADATA_KEYS = frozenset({"help", "choices", "type", "flag", "invert", "group", "metavar"})


def scalar_type(tp):
    """`X | None` -> X; anything else as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def config_fields(cls) -> Iterator[tuple[type, dataclasses.Field, object]]:
    """(owning dataclass, field, type) of every leaf field of dataclass `cls`, the fields of a
    nested dataclass walked in place."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = scalar_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from config_fields(tp)
        else:
            yield cls, f, tp


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    """The field's flag spellings; () when it has none."""
    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    return () if flag is None else (flag,) if isinstance(flag, str) else tuple(flag)


def field_help(cls, f: dataclasses.Field) -> str:
    """The field's help text from its metadata; a field without one is a bug of its dataclass."""
    unknown = set(f.metadata) - METADATA_KEYS
    if unknown:
        raise TypeError(f"{cls.__name__}.{f.name}: unknown flag metadata {sorted(unknown)}")
    text = f.metadata.get("help")
    if not text:
        raise TypeError(f"{cls.__name__}.{f.name} has no help: give it field(metadata={{'help': ...}})")
    return text


def comma_list(item=str):
    """argparse type: 'a, b,c' -> [a, b, c] (empty items dropped)."""

    def parse(text: str) -> list:
        return [item(s.strip()) for s in text.split(",") if s.strip()]

    parse.__name__ = "list"
    return parse


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _with_default(text: str, default) -> str:
    if default in (None, "", dataclasses.MISSING) or re.search(r"\bdefault\b", text):
        return text
    return f"{text} (default: {_shown(default).replace('%', '%%')})"


def choices_of(f: dataclasses.Field, tp) -> list | None:
    """The field's allowed values: its metadata's constant, or its Literal's values."""
    if "choices" in f.metadata:
        return list(f.metadata["choices"])
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    return None


def add_flags(parser, cls, *, skip=frozenset(), groups: dict[str, str] | None = None,
              check_choices: bool = True) -> None:
    """One flag per leaf field of dataclass `cls` (see the module doc), minus the fields named in
    `skip`. `groups`: dataclass name -> --help section (None: every flag into `parser`, which may
    be an argument group); required flags stay in `parser`, above the sections. `check_choices`
    False: the choices are shown, and the dataclass's own validate() refuses other values (one
    message for every front-end that builds the config)."""
    sections = {}
    for owner, f, tp in config_fields(cls):
        text = field_help(owner, f)
        flags = flag_names(f)
        if not flags or f.name in skip:
            continue
        meta, default = f.metadata, _default(f)
        required = default is dataclasses.MISSING
        target = parser
        if groups is not None and not required:
            name = meta.get("group", groups.get(owner.__name__))
            if name is not None:
                target = sections.get(name) or sections.setdefault(name, parser.add_argument_group(name))
        kw = dict(dest=f.name)
        if tp is bool and meta.get("invert"):
            target.add_argument(*flags, action="store_false", default=default, help=text, **kw)
            continue
        if tp is bool:
            target.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default,
                                help=_with_default(text, default), **kw)
            continue
        choices = choices_of(f, tp)
        if typing.get_origin(tp) is typing.Literal:
            tp = type(choices[0])
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp) or (str,)
            tp = comma_list(item)
        kw["type"] = meta.get("type", tp)
        if choices is not None and check_choices:
            kw["choices"] = choices
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        elif choices is not None:
            kw["metavar"] = "{" + ",".join(str(c) for c in choices) + "}"
        else:  # named after the flag, not the field (--data DATA, --lora-targets LORA_TARGETS)
            kw["metavar"] = flags[-1].lstrip("-").replace("-", "_").upper()
        if required:
            target.add_argument(*flags, required=True, help=text, **kw)
        else:
            target.add_argument(*flags, default=default, help=_with_default(text, default), **kw)


def from_args(cls, args: argparse.Namespace, **overrides):
    """Dataclass `cls` from parsed flags: each field with a flag from the namespace where it is
    there (nested dataclasses built the same way), else its default; `overrides` win."""
    hints = typing.get_type_hints(cls)
    parsed = vars(args)
    values = {}
    for f in dataclasses.fields(cls):
        tp = scalar_type(hints[f.name])
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(tp):
            values[f.name] = from_args(tp, args)
        elif flag_names(f) and f.name in parsed:
            v = parsed[f.name]
            values[f.name] = list(v) if isinstance(v, list) else v  # never the parser's default object
    return cls(**values)
