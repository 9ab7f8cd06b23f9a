"""The API bearer token: from configuration, or generated once into ``<state_dir>/token`` (mode 0600)."""

from __future__ import annotations

import hmac
import os
import secrets
import sys
from pathlib import Path

from services.config import TOKEN_FILE, Settings


def load_or_create_token(settings: Settings) -> str:
    """The configured token, else the token file's, else a new one written there and printed once."""
    if settings.token is not None and settings.token.get_secret_value():
        return settings.token.get_secret_value()
    path = settings.state_path / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if not token:
            raise RuntimeError(f"token file {path} is empty; delete it to generate a new token") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"distillery: generated API token (stored in {path}, mode 0600; shown only now):\n  {token}",
          file=sys.stderr, flush=True)
    return token


def secure_state_dir(settings: Settings) -> None:
    """Make the state dir 0700 and the default SQLite database 0600 (SQLite gives its -wal/-shm files the same)."""
    state = settings.state_path
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)
    if settings.database_url is None:
        db = state / "jobs.db"
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
        for path in (db, db.with_name("jobs.db-wal"), db.with_name("jobs.db-shm")):
            if path.exists():
                path.chmod(0o600)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new or existing file readable by this user only (0600), in a 0700 directory."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        f.write(text)


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison."""
    return hmac.compare_digest(given.encode(), expected.encode())
