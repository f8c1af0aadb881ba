"""The `personalize` command: argument parsing only; every command's work lives in its module.

Each subcommand module exposes `add_parser(subparsers)` which registers its flags and sets
`func` to a callable taking the parsed namespace. UserError -> one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

# module (relative to the package) -> registers one or more subcommands
COMMAND_MODULES = [
    "personalize.commands.dreambooth",
    "personalize.commands.info",
    "personalize.commands.batch",
    "personalize.commands.evaluate",
    "personalize.commands.generate",
    # -- further command modules register here --
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="personalize",
        description="DreamBooth personalization (LoRA or full) of compressed BK-SDM Stable Diffusion backbones.",
    )
    parser.add_argument("--version", action="version", version=f"personalize {__version__}",
                        help="print the version and exit (`personalize env` lists the whole stack)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def run(argv: list[str] | None, parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    try:
        # commands that only read files (backbones, subjects, env) set loads_models=False and stay fast
        if getattr(args, "loads_models", True):
            from .environment import check

            check()
            quiet_libraries()
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(argv, build_parser())


def quiet_libraries() -> None:
    """Library chatter a CLI user cannot act on: bitsandbytes' optional-kernel notice on CPU,
    weight-loading progress bars, deprecation notices from transitive code. Imports diffusers and
    transformers, so only commands that load models call it."""
    import logging
    import warnings

    # diffusers/transformers chatter (torchvision fallbacks, kernels hub) is noise for a CLI user
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
    # several adapters in one pipeline is what `generate --adapter A --adapter B` is for
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass


if __name__ == "__main__":
    sys.exit(main())
