"""Errors a user can cause and fix.

The CLI prints an `InputError` as one line (no traceback) and exits with code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: names the input and says what was expected."""
