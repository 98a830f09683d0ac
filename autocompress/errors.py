"""The one exception type for bad user input: the CLI prints its message on one line, exits 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (spec, file, budget, search space): message says what and how to fix."""
