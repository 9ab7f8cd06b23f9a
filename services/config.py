"""Service settings, from ``DISTILLERY_*`` environment variables (pydantic-settings).

Everything the service writes lives under ``state_dir``: the job database (SQLite by default), the spec
files it hands to ``python -m pipeline run``, the API token file and, in embedded mode, the Ray head's
token and logs.
"""

from __future__ import annotations

import os
import sys
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STATE_DIR = Path.home() / ".distillery"
TOKEN_FILE = "token"  # the API token, 0600, under state_dir


def normalize_store(uri: str) -> str:
    """One spelling per store root: absolute local paths (``file://`` dropped), ``s3://`` without a trailing /."""
    try:
        parsed = urlparse(uri)
    except ValueError:  # e.g. an unbalanced '[': it names no store served here
        return uri
    if parsed.scheme == "s3":
        return uri.rstrip("/")
    if parsed.scheme == "file":
        uri = parsed.path
    return os.path.abspath(os.path.expanduser(uri))


def _real(path: Path) -> Path:
    """Absolute, ``~`` expanded, every symlink resolved."""
    return Path(os.path.realpath(path.expanduser()))


class Settings(BaseSettings):
    """Configuration of one service instance. Every field reads ``DISTILLERY_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", extra="ignore")

    state_dir: Path = Field(DEFAULT_STATE_DIR, description="database, spec files, token file, Ray head logs")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<state_dir>/jobs.db")
    ray_address: str | None = Field(
        None, description="Ray dashboard URL (http://HEAD:8265); unset: start an embedded local head")
    ray_token: SecretStr | None = Field(None, description="token of a Ray cluster with token auth (else Ray's lookup)")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded head (default: all)")
    token: SecretStr | None = Field(None, description="API bearer token; unset: generated into <state_dir>/token")
    store: str | None = Field(None, description="default dataset store; default <state_dir>/datasets")
    extra_stores: list[str] = Field(default_factory=list, description="more stores jobs may write to")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies (and spec files read) above: 413")
    python: str = Field(sys.executable, description="interpreter that runs `-m pipeline run` on the Ray cluster")
    reconcile_interval_s: float = Field(1.0, gt=0, description="seconds between syncs with Ray and progress files")
    lost_after_s: float = Field(30.0, ge=0, description="a queued job unknown to Ray this long is failed")
    log_tail_lines: int = Field(40, ge=1, le=1000, description="lines of driver log kept for failed jobs")
    corpus_roots: list[Path] = Field(
        default_factory=list,
        description="directories corpora of submitted jobs must lie in; default <state_dir>/corpora")
    model_roots: list[Path] = Field(
        default_factory=list,
        description="directories teacher models and tokenizers must lie in; default <state_dir>/models")
    dataset_umask: str = Field("077", pattern=r"^0?[0-7]{3}$",
                               description="umask of the jobs' writes to local stores (077: owner only, 022: world-"
                                           "readable datasets)")

    @cached_property
    def state_path(self) -> Path:
        return _real(self.state_dir)

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_path / 'jobs.db'}"

    @cached_property
    def default_store(self) -> str:
        return normalize_store(self.store or str(self.state_path / "datasets"))

    @cached_property
    def stores(self) -> list[str]:
        """The allow-list: jobs may write only here, and only these are listed under /v1/datasets."""
        out = [self.default_store]
        out += [s for s in map(normalize_store, self.extra_stores) if s not in out]
        return out

    @cached_property
    def corpus_root_paths(self) -> list[Path]:
        return [_real(p) for p in self.corpus_roots] or [self.state_path / "corpora"]

    @cached_property
    def model_root_paths(self) -> list[Path]:
        return [_real(p) for p in self.model_roots] or [self.state_path / "models"]

    @property
    def specs_dir(self) -> Path:
        return self.state_path / "specs"
