"""What anonymous readers see of a job: no driver log, and no host addresses or file paths in its messages.

Reads are open (``GET`` needs no token), but a driver's log and error name cluster addresses and install
paths. Authenticated readers see everything; anonymous ones get :func:`public_view`.
"""

from __future__ import annotations

import re

from services.models import JobPublic

_PATTERNS = [
    (re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S+"), "<url>"),
    (re.compile(r"\[?(?:[0-9A-Fa-f]{1,4}:){3,7}[0-9A-Fa-f]{1,4}\]?(?::\d+)?"), "<address>"),  # IPv6
    (re.compile(r"\[?[0-9A-Fa-f:]*::[0-9A-Fa-f:]*\]?(?::\d+)?"), "<address>"),  # IPv6 with ::
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<address>"),  # IPv4[:port]
    (re.compile(r"(?<![\w.~/-])~?/[\w.@+~-]+(?:/[\w.@+~-]*)*"), "<path>"),  # absolute or ~ paths
]


def redact(text: str | None) -> str | None:
    """``text`` with URLs, IP addresses and absolute paths replaced by placeholders."""
    if text is None:
        return None
    for pattern, placeholder in _PATTERNS:
        text = pattern.sub(placeholder, text)
    return text


def public_view(job: JobPublic) -> JobPublic:
    """The job as an anonymous reader sees it: no log tail, error and entrypoint redacted."""
    return job.model_copy(update={"log_tail": None, "error": redact(job.error),
                                  "entrypoint": redact(job.entrypoint) or ""})
