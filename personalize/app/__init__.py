"""`personalize app`: a local web app (Gradio) over the same library code as the CLI.

- `workspace`: the folder everything is written to, and the checks that keep it there;
- `jobs`: one long job at a time (training in a worker process, with progress and Cancel);
- `worker`: the training process (`dreambooth.train_subject`);
- `page`: the page (Train, Generate, Runs tabs), each control wired to its handler;
- `handlers`: what the controls call (`App`): the CLI's own code behind each of them.

Gradio is an optional extra (`pip install -e ".[app]"`); nothing here imports it at module level.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .handlers import App, check_settings
from .page import build

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth: expected user:password")
    return user, password


def exposure_note(host: str, port: int, share: bool, auth) -> str | None:
    """The line a user must see before the app is reachable from elsewhere without a password."""
    if auth is not None or (host in LOCAL_HOSTS and not share):
        return None
    where = ("anyone with its public gradio.live link" if share else
             f"anyone who can reach port {port} of this machine (bound to {host})")
    return (f"note: the app has no authentication: {where} can train, generate and read the workspace; "
            f"pass --auth user:pass to require a login")


def create(workspace: Path, train_defaults: dict | None = None, max_photo_mb: float | None = None,
           preset: str | None = None, config: Path | None = None):
    """(App, gr.Blocks) for `workspace`, queued (one long job at a time), not launched. Gradio's
    upload cache is put inside the workspace, so the app writes nowhere else. `preset`/`config`:
    the settings of every run the app starts (App.settings_fields)."""
    app = App(workspace, train_defaults, max_photo_mb, preset, config)
    app.ws.gradio_cache.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(app.ws.gradio_cache)
    demo = build(app)
    demo.queue(default_concurrency_limit=1)
    return app, demo


def launch_kwargs(app, host: str, port: int, share: bool, auth) -> dict:
    # gradio refuses a bigger upload before it is stored; check_photos says the same for any that got in
    return dict(server_name=host, server_port=port, share=share, auth=auth, allowed_paths=[str(app.ws.root)],
                max_file_size=int(app.ws.max_photo_mb * 2**20), show_error=True, quiet=False)
