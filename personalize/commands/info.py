"""`personalize backbones` and `personalize subjects`: what can be used, and what is on disk."""

from __future__ import annotations

import sys
from pathlib import Path

from ..backbones import BACKBONES, cache_root, is_pipeline_dir, local_snapshot, unet_param_count
from ..cost import fmt_macs, fmt_params, pipeline_cost, registry_cost
from ..environment import report
from ..errors import UserError
from ..subjects import data_dir, load_subjects, photos_present


def _console():
    """A terminal gets rich's own width; a pipe or file gets tables at their natural width
    (rich would fold them to 80 columns), so `personalize backbones | grep` sees whole rows."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=1000, no_color=True)


def _cost_dirs(values: list[str] | None) -> list[tuple[str, Path]]:
    """The pipeline dirs of `--cost DIR` (repeatable, each a comma list) as (as given, pipeline
    dir): any pipeline dir, a `distill prune` output, a `distill train` output (its student/)."""
    items = [x.strip() for v in values or [] for x in v.split(",") if x.strip()]
    if not items:
        return []  # plain `backbones` stays free of torch
    from ..sources import resolve_base  # loads torch

    dirs = []
    for item in items:
        p = Path(item).expanduser()
        if not p.is_dir():
            raise UserError(f"--cost {item}: {'not a directory' if p.exists() else 'no such directory'} "
                            f"(a pipeline directory: model_index.json, unet/, text_encoder/, vae/)")
        dirs.append((item, resolve_base(item, flag="--cost").path))
    return dirs


def _backbones(args) -> int:
    from rich.table import Table

    cost = args.cost is not None  # `--cost` alone: the registry rows; `--cost DIR`: those dirs too
    # every named dir is counted before anything is printed: a bad one is one line, not half a table
    dir_rows = [(name, path, pipeline_cost(path, 512)) for name, path in _cost_dirs(args.cost)]
    t = Table(title="backbones (--base)")
    # names must stay whole and copy-pasteable on narrow terminals; the rest may fold
    t.add_column("name", no_wrap=True, min_width=15)
    t.add_column("U-Net params", no_wrap=True)
    t.add_column("local", no_wrap=True)
    if cost:  # counted on the meta device (personalize.cost), 512 px
        for c in ("U-Net (counted)", "whole pipeline", "U-Net MACs/step", "VAE decode MACs"):
            t.add_column(c, no_wrap=True)
    t.add_column("hub id", overflow="fold")
    t.add_column("about", overflow="fold")
    for spec in BACKBONES.values():
        if spec.name == "tiny":
            path = cache_root() / "backbones" / "tiny-seed0-v1"
            path = path if is_pipeline_dir(path) else None
            where = "built in" + (" (cached)" if path else "")
        else:
            path = local_snapshot(spec.hub_id)
            where = "yes" if path else "no"
        # exact count from the local weights' headers when we have them, else the model card's figure
        count = unet_param_count(path) if path else None
        params = f"{count / 1e6:.1f}M" if count else (
            f"{spec.unet_params_card} (card)" if spec.unet_params_card else "?")
        c = (pipeline_cost(path, 512) if path else registry_cost(spec.name, 512)) if cost else None
        if params == "?" and c is not None:  # no weights here and no card figure: the counted one
            params = f"{c.unet_params / 1e6:.1f}M (counted)"
        extra = _cost_cells(c) if cost else []
        t.add_row(spec.name, params, where, *extra, spec.hub_id or "-", spec.description)
    for name, path, c in dir_rows:
        about = "`distill` output" if (path / "distill.json").is_file() else "pipeline directory"
        t.add_row(name, f"{c.unet_params / 1e6:.1f}M", "dir", *_cost_cells(c), "-", f"{about} ({path})")
    _console().print(t)
    return 0


def _cost_cells(c) -> list[str]:
    if c is None:
        return ["?"] * 4
    return [fmt_params(c.unet_params), fmt_params(c.pipeline_params), fmt_macs(c.unet_macs), fmt_macs(c.vae_decoder_macs)]


def _subjects(args) -> int:
    from rich.table import Table

    root, _ = data_dir(args.data_dir)
    t = Table(title=f"DreamBooth subjects (photos in {root})")
    for c in ("name", "class", "prompts", "photos"):
        t.add_column(c, no_wrap=True)
    for s in load_subjects().values():
        t.add_row(s.name, s.class_noun, s.kind, "yes" if photos_present(root, s.name) else "missing")
    _console().print(t)
    return 0


def _env(args) -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("backbones", help="list the backbones with U-Net sizes and local availability")
    p.add_argument("--cost", nargs="?", action="append", const="", metavar="DIR",
                   help="also count (meta device, no download) the parameters of U-Net and whole pipeline (text "
                        "encoder + U-Net + VAE decoder) and MACs per U-Net step and VAE decode at 512 px; with DIR "
                        "(repeatable, or a comma list) also of those pipeline dirs (`distill prune`/`train` outputs "
                        "included), from their configs")
    p.set_defaults(func=_backbones, loads_models=False)
    p = sub.add_parser("subjects", help="list the 30 DreamBooth subjects and whether their photos are present")
    p.add_argument("--data-dir", default=None, help="DreamBooth dataset/ folder (default $PERSONALIZE_DATA, "
                                                   "else ./data/dreambooth/dataset)")
    p.set_defaults(func=_subjects, loads_models=False)
    p = sub.add_parser("env", help="versions of the stack, the torch build, devices, and whether they are supported")
    p.set_defaults(func=_env, loads_models=False)
