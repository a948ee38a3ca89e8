"""The errors a user can cause and fix: bad options, data, model or adapter files, run directories.

Every one of them derives from `JsdrError`, so the command-line entry points turn each into one line
on stderr and a non-zero exit code (`error_line`), while a bug (any other exception) keeps its
traceback. Each class names its kind of error and its exit code.
"""


class JsdrError(Exception):
    """An expected failure whose message names the file, row, field or option and what is wrong."""

    kind = "jsdr"
    exit_code = 1


class RunError(JsdrError):
    """A run cannot start or go on as asked (run directory in use, resume mismatch, diverged training)."""

    kind = "run"


def error_line(prog: str, e: BaseException) -> tuple[str, int]:
    """(one line for stderr, exit code) of an expected failure (a JsdrError or an OSError):
    `prog: <kind> error: <message on one line>`."""
    kind, code = (e.kind, e.exit_code) if isinstance(e, JsdrError) else ("I/O", 1)
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"{prog}: {kind} error: {msg}", code
