"""One exit-status policy for every command (``distillery …`` and ``python -m pipeline``).

* 0 — done.
* 2 — invalid input: the spec, a config, a corpus, a model or tokenizer directory, a path. Refused before any
  work starts, with ``error: …`` on stderr and nothing written.
* 1 — failed mid-run (a worker died, shards did not complete, a bug): ``error: …`` and no traceback; re-run
  to resume. ``DISTILLERY_DEBUG=1`` re-raises instead, traceback included.

Errors of invalid input derive from :class:`InputError` (a ``ValueError``) or are pydantic ``ValidationError``,
``FileNotFoundError``, ``PermissionError`` or a plain ``ValueError`` raised while checking inputs; a failure
during the run is wrapped in :class:`RunError` by the job driver, whatever its type.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class InputError(ValueError):
    """Invalid input, found before any work started (exit status 2)."""


class RunError(RuntimeError):
    """A failure after work started (exit status 1); the input was fine, a re-run resumes."""

    prefix = "job failed: "  # what ``message`` puts before it; a subclass whose message says it all sets ""


def exit_code(exc: BaseException) -> int:
    """The exit status an exception ends a command with (see the module docstring)."""
    from pydantic import ValidationError

    if isinstance(exc, RunError):
        return EXIT_FAILED
    if isinstance(exc, ValidationError | ValueError | FileNotFoundError | PermissionError | NotADirectoryError):
        return EXIT_INVALID
    return EXIT_FAILED


def message(exc: BaseException) -> str:
    """What follows ``error:``: the project's own messages as they are, anything else with its type."""
    from pydantic import ValidationError

    from pipeline.config import format_validation_error

    if isinstance(exc, ValidationError):
        return f"invalid settings:\n{format_validation_error(exc)}"
    if isinstance(exc, RunError):
        cause = exc.__cause__
        detail = f" ({type(cause).__name__}: {_last_line(cause)})" if cause and str(cause) != str(exc) else ""
        return f"{exc.prefix}{exc}{detail}"
    if exit_code(exc) == EXIT_INVALID:
        return str(exc)
    return f"failed: {type(exc).__name__}: {_last_line(exc)}"


def _last_line(exc: BaseException) -> str:
    """Ray wraps worker errors in multi-line tracebacks; the last non-empty line names the cause."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def report(exc: BaseException, *, file: TextIO | None = None) -> int:
    """Prints ``error: …`` for ``exc`` and returns its exit status; re-raises under ``DISTILLERY_DEBUG=1``."""
    if os.environ.get("DISTILLERY_DEBUG") == "1":
        raise exc
    print(f"error: {message(exc)}", file=file or sys.stderr, flush=True)
    return exit_code(exc)
