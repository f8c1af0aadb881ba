"""Settings from a file: `--config FILE.toml` and `--preset NAME` on any command that has them.

A settings file is flat TOML whose keys are the command's flag names (`lora-alpha` or
`lora_alpha`). Its values become the parser's defaults (`parser.set_defaults`), so the command
line overrides them; the order is: the flags' own defaults < the preset < --config < the command
line. Each value is checked as argparse checks the flag (its type, its choices); an unknown key or
a wrong type is one line naming the key and the file (exit 2, via `parser.error`).

Presets are TOML files of the package (personalize/presets/NAME.toml) read by the same reader;
their one extra key, `about`, says what the preset is for. Every DreamBooth run writes its resolved
settings to `config.toml` in the run dir (`write_settings`), so `--config runs/.../config.toml`
repeats it. Standard library only (tomllib, Python >= 3.11): parsing stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
from pathlib import Path

from .fileio import write_text
from .flags import config_fields, flag_names

CONFIG_TOML = "config.toml"  # a run's resolved settings, beside its run.json
PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "bk-sdm"
ABOUT = "about"  # a preset's description, not a setting
CONFIG_FLAG, PRESET_FLAG = "--config", "--preset"
CONFIG_DEST, PRESET_DEST = "settings_file", "settings_preset"


class SettingsError(ValueError):
    """A settings file that cannot be used: its one line names the file (and the key)."""


def read_toml(path: Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise SettingsError(f"{path}: {e.strerror or e}") from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_preset(name: str) -> tuple[str, dict]:
    """(what the preset is for, its settings)."""
    path = PRESETS_DIR / f"{name}.toml"
    if name not in preset_names():
        raise SettingsError(f"{PRESET_FLAG} {name}: no such preset (presets: {', '.join(preset_names())})")
    values = read_toml(path)
    return str(values.pop(ABOUT, "")), values


# -- writing: flat scalars and lists, None omitted -------------------------------------------------

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else "nan" if math.isnan(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # a PATTERN=VALUE flag (--rank-pattern): its command-line text
        return _toml_value(",".join(f"{k}={x}" for k, x in v.items()))
    raise TypeError(f"no TOML form for {type(v).__name__}")


def to_toml(values: dict, header: str = "") -> str:
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None and v != {}]
    return "\n".join(lines) + "\n"


def settings_of(obj, skip=frozenset()) -> dict:
    """Flag name -> value of each flag-backed field of dataclass instance `obj` (nested ones
    flattened), as a settings file spells it: `--random-crop` (an inverted bool) holds the flag's
    value, not the field's."""
    out, flat = {}, _flat_values(obj)
    for _owner, f, _tp in config_fields(type(obj)):
        names = flag_names(f)
        if not names or f.name in skip:
            continue
        value = flat[f.name]
        out[names[-1].lstrip("-")] = (not value) if f.metadata.get("invert") else value
    return out


def _flat_values(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out.update(_flat_values(v) if dataclasses.is_dataclass(v) else {f.name: v})
    return out


def write_settings(path: Path, values: dict, header: str = "") -> Path:
    return write_text(path, to_toml(values, header))


# -- reading into a parser ---------------------------------------------------------------------------

def add_settings_flags(parser, presets: bool = False) -> None:
    """--config (and, for training commands, --preset) on `parser`."""
    parser.add_argument(CONFIG_FLAG, dest=CONFIG_DEST, default=None, metavar="FILE.toml",
                        help="read settings from a TOML file whose keys are this command's flags (lora-alpha = 8); "
                             "flags on the command line override it; every run writes its own as config.toml")
    if presets:
        parser.add_argument(PRESET_FLAG, dest=PRESET_DEST, default=DEFAULT_PRESET, metavar="NAME",
                            help=f"start from a preset's settings (`personalize presets` lists them; default: "
                                 f"{DEFAULT_PRESET}, the recipe); --config and the command line override it")


def _given(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag X` / `flag=X` in argv (before a bare `--`)."""
    found = None
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(flag + "="):
            found = a[len(flag) + 1:]
    return found


def apply_settings(parser, argv: list[str]) -> None:
    """Set `parser`'s defaults from the preset and --config named in `argv` (see the module doc);
    a bad file or key is `parser.error` (one line, exit 2)."""
    dests = {a.dest for a in parser._actions}
    try:
        if PRESET_DEST in dests:
            name = _given(argv, PRESET_FLAG) or DEFAULT_PRESET
            _about, values = read_preset(name)
            parser.set_defaults(**convert(parser, values, f"preset {name} ({PRESETS_DIR / name}.toml)"))
        path = _given(argv, CONFIG_FLAG) if CONFIG_DEST in dests else None
        if path:
            parser.set_defaults(**convert(parser, read_toml(Path(path)), path))
    except SettingsError as e:
        parser.error(str(e))


NOT_SETTINGS = {CONFIG_DEST, PRESET_DEST, "help", "version"}


def convert(parser, values: dict, source: str) -> dict:
    """dest -> value for each key of a settings file, checked as the command line is checked."""
    actions = parser._option_string_actions
    out = {}
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or action.dest in NOT_SETTINGS:
            raise SettingsError(f"{source}: unknown key {key!r} (not a flag of {parser.prog})")
        out[action.dest] = _checked(action, flag, key, value, source)
        action.required = False  # a required flag the file gives (--subject) is given
    return out


def _checked(action, flag: str, key, value, source: str):
    def wrong(what: str):
        shown = _toml_value(value) if _tomlable(value) else repr(value)
        return SettingsError(f"{source}: {key} = {shown}: {what}")

    if isinstance(value, dict):
        if getattr(action.type, "__name__", "") != "patterns":
            raise wrong("a table; settings files are flat (key = value)")
        value = ",".join(f"{k}={x}" for k, x in value.items())  # an inline table of a PATTERN=VALUE flag
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        if not isinstance(value, bool):
            raise wrong("expected true or false")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value if not flag.startswith("--no-") else not value
        return action.const if value else action.default
    many = action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction)
    items = value if isinstance(value, list) and many else [value]
    if isinstance(value, list) and not many:  # a comma-list flag takes a TOML list as its items
        items = [",".join(str(x) for x in value)]
    parsed = []
    for item in items:
        if isinstance(item, (bool, dict, list)):
            raise wrong("expected " + ("a string" if action.type in (None, str) else getattr(
                action.type, "__name__", "a value")))
        text = str(item)
        try:
            v = action.type(text) if action.type is not None else text
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise wrong(str(e) or f"not a valid {getattr(action.type, '__name__', 'value')}") from None
        if action.choices is not None and v not in action.choices:
            raise wrong(f"not one of {', '.join(map(str, action.choices))}")
        parsed.append(v)
    return parsed if many else parsed[0]


def _tomlable(v) -> bool:
    try:
        _toml_value(v)
        return True
    except TypeError:
        return False
