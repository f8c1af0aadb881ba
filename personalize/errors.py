"""User-facing errors: one line, exit code 2, no traceback (the CLI catches them)."""


class UserError(Exception):
    """Bad input or a missing resource the user can fix. The message is shown as-is."""

    exit_code = 2
