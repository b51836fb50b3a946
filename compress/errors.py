"""Errors meant for users: one clear line (what, where, what to do); the CLI exits 2 on them."""


class UserError(Exception):
    """Bad input from the user: a path, a file, a recipe key. Exit code 2, no traceback."""


class GateFailed(Exception):
    """A quality gate of the recipe failed (the report is still written). Exit code 1."""
