"""The service's API schemas (pydantic): job state machine, job and dataset views, list envelopes.

The request body of ``POST /v1/jobs`` is the pipeline's own :class:`pipeline.spec.JobSpec` — the job spec
lives in exactly one module, and the service does not restate it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from pipeline.dataset import Manifest, Progress, ProgressState


class JobState(StrEnum):
    """Lifecycle of a job: ``queued → running → succeeded | failed | cancelled``, ``queued → cancelled``.

    ``queued → failed`` also exists: a job that could not be submitted, or whose driver died before it
    started. Terminal states are final.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    def can_become(self, target: JobState) -> bool:
        return target in TRANSITIONS[self]


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change the state machine does not allow (e.g. leaving a terminal state)."""


class JobProgress(Progress):
    """The job's ``_progress.json`` (:class:`pipeline.dataset.Progress`, the one model of that file) plus the
    rates a client shows."""

    percent: float = Field(0.0, description="examples done / examples total, 0–100")
    examples_per_s: float = Field(0.0, description="examples per second in this run")

    @classmethod
    def from_progress(cls, progress: Progress) -> JobProgress:
        total, done = progress.examples_total, progress.examples_done
        # examples_done counts reused shards too; this run's share is estimated from the shard counts.
        run_shards = progress.shards_done - progress.shards_skipped
        new = done if not progress.shards_skipped else total * run_shards / max(progress.shards_total, 1)
        return cls(**dict(progress), percent=round(100.0 * done / total, 1) if total else 0.0,
                   examples_per_s=round(new / progress.elapsed_s, 2) if progress.elapsed_s > 0 else 0.0)


class JobPublic(BaseModel):
    """One job as the API shows it."""

    id: str
    state: JobState
    origin: str = Field(description="'service' (submitted here) or 'ray' (found in Ray's job list)")
    dataset: str | None = Field(None, description="output dataset name, when the spec is known")
    store: str | None = Field(None, description="output store root, when the spec is known")
    submission_id: str = Field(description="Ray job submission id")
    entrypoint: str = ""
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = Field(None, description="why it failed, one line (redacted for anonymous readers)")
    log_tail: str | None = Field(None, description="last lines of the driver log, on failure; authenticated "
                                                   "readers only")
    progress: JobProgress | None = None
    spec: dict[str, Any] | None = None


class JobList(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="jobs matching the filter, all pages")
    limit: int
    offset: int


class DatasetSummary(BaseModel):
    """A dataset directory in a store."""

    name: str
    store: str
    complete: bool = Field(description="its _manifest.json exists (written last)")
    state: ProgressState | None = Field(None, description="state in _progress.json")
    examples: int | None = None
    rows: int | None = None
    target_tokens: int | None = None
    bytes: int | None = None
    shards: int | None = None
    dataset_hash: str | None = None
    problem: str | None = Field(None, description="why its _manifest.json or _progress.json cannot be read")


class DatasetList(BaseModel):
    data: list[DatasetSummary]
    count: int


class DatasetDetail(DatasetSummary):
    manifest: Manifest | None = Field(None, description="the whole _manifest.json, when complete")
    progress: JobProgress | None = None
    files: int = Field(0, description="files in the dataset directory")
    bytes_on_disk: int = 0


class Health(BaseModel):
    status: str
    ray_address: str | None
    ray_embedded: bool
    ray_reachable: bool
    jobs_active: int
