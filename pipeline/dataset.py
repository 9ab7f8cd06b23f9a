"""The dataset contract: names, file layout, and the typed, versioned files a job writes next to its shards.

The driver (:mod:`pipeline.run`) writes these files; the service (:mod:`services.catalog`), the trainers
(:mod:`trainers.data`), the CLI, the demo and the benchmarks read them — all through the models below, never
by string keys. Layout under ``<store>/<dataset>/``::

    part-00000.parquet    shard rows (see pipeline.schema)
    _part-00000.json      Sidecar: the shard's counts, index range and sha256 (marks the shard complete)
    _job.json             JobRecord: spec + fingerprint of the inputs (a re-run must match it)
    _rejects.jsonl        corpus records rejected, with line and reason
    _progress.json        Progress: state, shards done/total, rates, ETA — rewritten after every shard
    _manifest.json        Manifest: written last, so the dataset is complete and valid

Every file but the shards starts with ``_``, which pyarrow.dataset, Spark and Hive skip, so the dataset
directory opens as it is in any Parquet reader.

Each file model carries its own version; a file of a version this code does not know is refused with a
clear error (:class:`DatasetFileError`) instead of being misread. This module imports only the standard
library and pydantic, so the service can use it without pulling in torch, CTranslate2 or Ray.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from pipeline.storage import Store

# Dataset names become directory names: ASCII letters and digits first (so never "." or ".." or a hidden
# file), then also '.', '_', '-'; at most 128. Always matched whole (fullmatch): `re.match` with `$` would
# accept a trailing newline.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "ASCII letters, digits, '.', '_', '-', starting with a letter or digit, at most 128 characters"

MANIFEST = "_manifest.json"
PROGRESS = "_progress.json"
JOB = "_job.json"
REJECTS = "_rejects.jsonl"


def valid_name(value: object) -> bool:
    """Whether ``value`` is a valid dataset name (also the rule for the service's job ids)."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def check_name(value: str) -> str:
    if not valid_name(value):
        shown = repr(value) if len(value) <= 64 else f"{value[:64]!r}… ({len(value)} characters)"
        raise ValueError(f"invalid dataset name {shown}: use {NAME_RULE}")
    return value


DatasetName = Annotated[str, AfterValidator(check_name)]


def shard_name(i: int) -> str:
    """Stem of shard ``i``'s files: ``part-00000`` → ``part-00000.parquet`` and ``_part-00000.json``."""
    return f"part-{i:05d}"


def shard_file(i: int) -> str:
    return f"{shard_name(i)}.parquet"


def sidecar_file(i: int) -> str:
    return f"_{shard_name(i)}.json"


class DatasetFileError(ValueError):
    """A dataset file is not what this code reads: unknown version, or fields missing or malformed."""


class _File(BaseModel):
    """A versioned JSON file of the layout. ``VERSION_FIELD`` names its version; newer ones are refused."""

    model_config = ConfigDict(extra="forbid")
    FILE: ClassVar[str]
    VERSION_FIELD: ClassVar[str]
    VERSION: ClassVar[int] = 1

    @model_validator(mode="before")
    @classmethod
    def _known_version(cls, data: Any) -> Any:
        # Checked before the fields, so a newer file gets this message rather than a list of field errors.
        if isinstance(data, dict):
            version = data.get(cls.VERSION_FIELD, cls.VERSION)
            if version != cls.VERSION:
                raise ValueError(f"{cls.FILE} has {cls.VERSION_FIELD} {version!r}; this distillery reads version "
                                 f"{cls.VERSION} (written by another distillery version?)")
        return data

    @classmethod
    def parse(cls, data: str | bytes, *, where: str = "") -> Self:
        """The file's content as a model; :class:`DatasetFileError` names the file and every problem."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            problems = "; ".join((f"{'.'.join(str(p) for p in e['loc'])}: " if e["loc"] else "")
                                 + e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise DatasetFileError(f"unreadable {where or cls.FILE}: {problems}") from None

    @classmethod
    def read(cls, store: Store, dataset: str) -> Self | None:
        """``<dataset>/<FILE>`` from ``store``, or None when it does not exist."""
        path = f"{dataset}/{cls.FILE}"
        if not store.exists(path):
            return None
        return cls.parse(store.read_bytes(path), where=store.join(path))

    def write(self, store: Store, dataset: str) -> None:
        """Atomically (temp name → rename), so a reader never sees half a file."""
        store.write_json_atomic(f"{dataset}/{self.FILE}", self.model_dump(mode="json"))


class ShardEntry(BaseModel):
    """One shard as the manifest lists it: what the data is, not how a run produced it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="file name, e.g. part-00000.parquet")
    shard: int = Field(ge=0, description="shard number i: corpus examples [i * shard_size, (i + 1) * shard_size)")
    first_index: int = Field(description="corpus index of the shard's first example")
    last_index: int = Field(description="corpus index of its last example")
    examples: int = Field(ge=0)
    rows: int = Field(ge=0, description="(example, hypothesis) rows")
    target_tokens: int = Field(ge=0, description="positions of hyp_ids, i.e. top-k entries per k")
    cut_at_max_length: int = Field(0, ge=0, description="rows cut at decoding.max_length")
    bytes: int = Field(ge=0, description="size of the Parquet file")
    sha256: str = Field(description="'sha256:' + hex digest of the Parquet file")


class Sidecar(ShardEntry):
    """``_part-XXXXX.json``: a shard's entry plus how this run made it; written after the shard, so a shard
    with a sidecar whose hash matches is complete. Unversioned: a sidecar that does not parse only means the
    shard is redone."""

    seconds: float = Field(description="wall time of the shard in its worker")
    pid: int = Field(description="the worker process")
    peak_rss_mb: float = Field(description="the worker's peak resident memory so far")
    node_id: str | None = Field(None, description="the Ray node that wrote the shard (None: written outside Ray)")

    @classmethod
    def read(cls, store: Store, dataset: str, i: int) -> Sidecar | None:
        """Shard ``i``'s sidecar, or None when missing or unreadable (the shard is then redone)."""
        path = f"{dataset}/{sidecar_file(i)}"
        if not store.exists(path):
            return None
        try:
            return cls.model_validate_json(store.read_bytes(path))
        except ValidationError:
            return None

    def write(self, store: Store, dataset: str) -> None:
        store.write_json_atomic(f"{dataset}/{sidecar_file(self.shard)}", self.model_dump(mode="json"))

    def entry(self) -> ShardEntry:
        """The manifest's view: pid, seconds, memory and node describe one execution, not the data."""
        return ShardEntry.model_validate(self.model_dump(include=set(ShardEntry.model_fields)))


class JobRecord(_File):
    """``_job.json``: written before any shard, so a re-run with other inputs is refused."""

    FILE = JOB
    VERSION_FIELD = "job_version"

    job_version: Literal[1] = 1
    fingerprint: str = Field(description="hash of everything that determines shard content")
    spec: dict[str, Any] = Field(description="the job spec as run (pipeline.spec.JobSpec, JSON)")


class ProgressState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # the driver was stopped (Ctrl-C)
    CANCELLED = "cancelled"  # set by the job service once Ray has stopped a cancelled job's driver


class Progress(_File):
    """``_progress.json``: rewritten by the driver after every shard; what the service follows."""

    FILE = PROGRESS
    VERSION_FIELD = "progress_version"

    progress_version: Literal[1] = 1
    state: ProgressState
    shards_total: int = Field(ge=0)
    shards_done: int = Field(0, ge=0)
    shards_skipped: int = Field(0, ge=0, description="complete shards reused from an earlier run")
    examples_total: int = Field(0, ge=0)
    examples_done: int = Field(0, ge=0)
    rows_done: int = Field(0, ge=0)
    target_tokens_done: int = Field(0, ge=0)
    bytes_written: int = Field(0, ge=0)
    elapsed_s: float = Field(0.0, description="seconds since this run started")
    tokens_per_s: float = Field(0.0, description="target tokens per second in this run")
    eta_s: float | None = Field(None, description="estimated seconds left; None before a shard of this run ends")
    error: str = Field("", description="why the job failed, when it did")
    updated_at: str = Field("", description="ISO 8601 UTC time of this update")


class Counts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records_read: int = Field(ge=0, description="corpus records read")
    examples: int = Field(ge=0, description="records kept (valid and not filtered)")
    rows: int = Field(ge=0)
    target_tokens: int = Field(ge=0)
    cut_at_max_length: int = Field(0, ge=0, description="rows cut at decoding.max_length (hypotheses and, in "
                                   "teacher_forcing, references)")
    bytes: int = Field(ge=0, description="bytes of all shards")
    rejected: dict[str, int] = Field(description="rejected records by reason")


class TeacherInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    hash: str = Field(description="'sha256:' over the model's weights and config")
    compute_type: str
    device: str = Field("cpu", description="where the teacher ran: cpu or cuda (teacher.device resolved)")


class TokenizerInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    vocab_hash: str = Field(description="sha256 over the ordered token list; students must have the same")


class Manifest(_File):
    """``_manifest.json``: written last; its presence means the dataset is complete."""

    FILE = MANIFEST
    VERSION_FIELD = "manifest_version"

    manifest_version: Literal[1] = 1
    schema_version: int = Field(description="shard schema version (pipeline.schema.SCHEMA_VERSION)")
    spec_version: int = Field(description="job spec version (pipeline.spec.SPEC_VERSION)")
    dataset: DatasetName
    created_at: str = Field(description="ISO 8601 UTC")
    spec: dict[str, Any] = Field(description="the job spec as run (pipeline.spec.JobSpec, JSON)")
    fingerprint: str = Field(description="hash of everything that determines shard content")
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    top_k: int = Field(ge=1, description="teacher log-probs per target position")
    counts: Counts
    shards: list[ShardEntry] = Field(description="every shard, in order")
    dataset_hash: str = Field(description="'sha256:' over the shards' names and hashes")
    versions: dict[str, str] = Field(description="library versions that wrote the dataset")
