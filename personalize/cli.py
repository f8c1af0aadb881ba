"""The `personalize` command: argument parsing only; every command's work lives in its module.

Each subcommand module exposes `add_parser(subparsers)` which registers its flags and sets
`func` to a callable taking the parsed namespace. The error boundary (`run`): what a user can
cause (UserError, an OSError on their paths, a damaged file) is one line on stderr and exit 2;
anything else is a bug and keeps its traceback (PERSONALIZE_DEBUG=1 shows it for both).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys

from . import __version__
from .environment import check
from .errors import UserError
from .settings import apply_settings

# module (relative to the package) -> registers one or more subcommands
COMMAND_MODULES = [
    "personalize.commands.dreambooth",
    "personalize.commands.info",
    "personalize.commands.batch",
    "personalize.commands.evaluate",
    "personalize.commands.generate",
    "personalize.commands.app",
    "personalize.commands.presets",
    # -- further command modules register here --
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (usage is what `--help` is for) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # --config FILE / --preset NAME (personalize.settings): their values become this parser's defaults
        apply_settings(self, sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)


def one_line_parser(prog: str, description: str) -> OneLineParser:
    """A top-level parser whose subcommands' parsers are one-line parsers too."""
    parser = OneLineParser(prog=prog, description=description)
    parser.register("action", "parsers", _OneLineSubparsers)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' own warnings (optional kernels, hub notices), hidden by default")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = one_line_parser(
        "personalize", "DreamBooth personalization (LoRA or full) of compressed BK-SDM Stable Diffusion backbones.")
    parser.add_argument("--version", action="version", version=f"personalize {__version__}",
                        help="print the version and exit (`personalize env` lists the whole stack)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


class _OneLineSubparsers(argparse._SubParsersAction):
    def __init__(self, *args, **kwargs):
        kwargs["parser_class"] = OneLineParser
        super().__init__(*args, **kwargs)


def run(argv: list[str] | None, parser: argparse.ArgumentParser) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a bad flag (2): a return code in-process too
        return int(e.code or 0)
    try:
        # commands that only read files (backbones, subjects, env) set loads_models=False and stay fast
        if getattr(args, "loads_models", True):
            check()
            quiet_libraries(verbose=getattr(args, "verbose", False))
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - sorted below: only a user's errors become one line
        line = user_facing(e)
        if line is None:
            raise  # a bug: its traceback is what a bug report needs
        if os.environ.get("PERSONALIZE_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"error: {line}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


def user_facing(e: BaseException) -> str | None:
    """The one line for an error a user can cause and fix, or None for a bug.

    Ours (UserError); the OS refusing a path of theirs (read-only, missing, disk full: OSError);
    a damaged file of theirs (safetensors or JSON that does not decode). Nothing else."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError):
        what = e.strerror or str(e) or type(e).__name__
        if e.errno == errno.ENOSPC:
            what += "; free some space and rerun the same command (what was written is intact)"
        name = e.filename2 and f"{e.filename} -> {e.filename2}" or e.filename
        return f"{name}: {what}" if name else what
    if isinstance(e, json.JSONDecodeError):
        return f"a JSON file is damaged ({e.msg}, line {e.lineno}); rerun with PERSONALIZE_DEBUG=1 to see which"
    if type(e).__name__ == "SafetensorError":
        return f"a safetensors file is damaged ({str(e).splitlines()[0]})"
    return None


def main(argv: list[str] | None = None) -> int:
    return run(argv, build_parser())


# loggers of optional machinery a user cannot act on: bitsandbytes on CPU asks the `kernels` package
# (pulled in by transformers >= 5.25) for a hub kernel at import, which offline logs a trust-check
# skip and a load failure before anything of ours is printed
QUIET_LOGGERS = ("bitsandbytes", "kernels")


def quiet_libraries(verbose: bool = False) -> None:
    """Library chatter a CLI user cannot act on: bitsandbytes' optional-kernel notices on CPU,
    weight-loading progress bars, deprecation notices from transitive code; `verbose` (-v) keeps
    the libraries' warnings. Imports diffusers and transformers, so only commands that load models
    call it, before those imports."""
    import logging
    import warnings

    if verbose:
        return
    # diffusers/transformers chatter (torchvision fallbacks, kernels hub) is noise for a CLI user
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in QUIET_LOGGERS:  # set before the libraries import: their import-time notices too
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
    # several adapters in one pipeline is what `generate --adapter A --adapter B` is for
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
    # peft's BOFT tries to build a CUDA kernel on every layer; without it one butterfly factor is trained,
    # which is what --boft-butterfly-factor 1 asks (any other value is refused with its own line)
    warnings.filterwarnings("ignore", message=".*(Failed to load the CUDA extension|Setting boft_n_butterfly_factor).*")
    # a --rank-pattern names modules of the U-Net or of the text encoder; one matching neither is refused
    warnings.filterwarnings("ignore", message=".*(rank|alpha)_pattern keys did not match any targeted module.*")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass


if __name__ == "__main__":
    sys.exit(main())
