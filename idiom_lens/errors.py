"""Errors a user can cause and fix.

The CLI prints an `InputError` as one line (no traceback) and exits with code 2, a
`FastPathError` as one line with code 3; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: names the input and says what was expected."""


class FastPathError(RuntimeError):
    """A fast path disagrees with a plain full forward (`idiom_lens.models.selfcheck`): a bug, or package
    versions it was not tested with. Never caught to carry on: the run stops and writes nothing."""
