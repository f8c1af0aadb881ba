"""`personalize presets`: the settings presets (`--preset NAME`) of the training commands."""

from __future__ import annotations

from ..settings import DEFAULT_PRESET, preset_names, read_preset, to_toml


def _presets(args) -> int:
    for name in preset_names():
        about, values = read_preset(name)
        print(f"{name}{' (default)' if name == DEFAULT_PRESET else ''}: {about}")
        body = to_toml(values).strip() if values else "(the flags' own defaults)"
        print("\n".join("    " + line for line in body.splitlines()))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the settings presets of the training commands (--preset NAME)",
                       description="Each preset is a settings file of the package (personalize/presets/NAME.toml); "
                                   "`--preset NAME` starts from it, --config FILE and the command line override it.")
    p.set_defaults(func=_presets, loads_models=False)
