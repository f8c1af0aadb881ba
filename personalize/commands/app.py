"""`personalize app`: flags -> personalize.app (the local web app)."""

from __future__ import annotations

from pathlib import Path

from ..app import check_settings, create, exposure_note, launch_kwargs, parse_auth
from ..argtypes import number
from ..defaults import ADAPTER_METHOD_NAMES
from ..extras import require_extra


def _app(args) -> int:
    auth = parse_auth(args.auth)
    require_extra("app", "personalize app")
    check_settings([*ADAPTER_METHOD_NAMES, "full"], args.train_preset, args.train_config)
    note = exposure_note(args.host, args.port, args.share, auth)
    if note:
        print(note)
    app, demo = create(args.workspace, preset=args.train_preset, config=args.train_config)
    print(f"workspace: {app.ws.root}")
    try:
        demo.launch(**launch_kwargs(app, args.host, args.port, args.share, auth))
    finally:
        app.jobs.shutdown()  # a training still running stops at a checkpoint: Resume finds it
    return 0


def add_parser(sub) -> None:
    text = "a local web app (Gradio): train, generate, browse, evaluate and export runs in a browser"
    p = sub.add_parser("app", help=text, description=text + ". Needs the app extra: pip install -e \".[app]\".")
    p.add_argument("--workspace", type=Path, default=Path("personalize-workspace"),
                   help="the folder the app writes everything into (default ./personalize-workspace)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number(int, 1, 65535), default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--train-preset", default=None, metavar="NAME",
                   help="settings of every run the app starts, as `personalize lora --preset NAME` (personalize presets); "
                        "the page's own fields override it")
    p.add_argument("--train-config", type=Path, default=None, metavar="FILE.toml",
                   help="settings of every run the app starts, as `personalize lora --config FILE.toml` (e.g. ema = true, "
                        "pivotal = true, prior = \"base-prediction\"); after --train-preset; the page's fields override it")
    # the app checks the stack itself when a job starts (in the worker); start-up stays fast
    p.set_defaults(func=_app, loads_models=False)
