"""The errors a user can cause and fix: bad options, data, model or adapter files, run directories.

Every one of them derives from `JsdrError`, so the command-line entry points turn each into one line
on stderr and a non-zero exit code, while a bug (any other exception) keeps its traceback.
"""


class JsdrError(Exception):
    """An expected failure whose message names the file, row, field or option and what is wrong."""


class RunError(JsdrError):
    """A run cannot start or go on as asked (run directory in use, resume mismatch, diverged training)."""
