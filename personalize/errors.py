"""User-facing errors: one line, exit code 2, no traceback (the CLI catches them); and the one form
of a non-fatal warning."""

import sys


class UserError(Exception):
    """Bad input or a missing resource the user can fix. The message is shown as-is."""

    exit_code = 2


def one_line(e: BaseException) -> str:
    """An exception as one short line, for a UserError's "why": its type and the first line of its
    message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__


def warn(what, why: str) -> None:
    """A non-fatal problem as one line on stderr, `warning: <what>: <why>` (what: the file, flag or
    field). Every command prints its warnings through this, so they read and grep alike."""
    print(f"warning: {what}: {why}", file=sys.stderr)
