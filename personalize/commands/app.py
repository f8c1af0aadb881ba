"""`personalize app`: flags -> personalize.app (the local web app)."""

from __future__ import annotations

from pathlib import Path

from ..app import create, exposure_note, launch_kwargs, parse_auth
from ..argtypes import number
from ..extras import require_extra


def _app(args) -> int:
    auth = parse_auth(args.auth)
    require_extra("app", "personalize app")
    note = exposure_note(args.host, args.port, args.share, auth)
    if note:
        print(note)
    app, demo = create(args.workspace)
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
    # the app checks the stack itself when a job starts (in the worker); start-up stays fast
    p.set_defaults(func=_app, loads_models=False)
