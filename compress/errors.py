"""Errors meant for users: one clear line (what, where, what to do); the CLI exits 2 on them."""


class UserError(Exception):
    """Bad input from the user: a path, a file, a recipe key. Exit code 2, no traceback."""


class GateFailed(Exception):
    """A quality gate of the recipe failed (the report is still written). Exit code 1."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` of a foreign exception, for a one-line UserError."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}" if text else type(exc).__name__
