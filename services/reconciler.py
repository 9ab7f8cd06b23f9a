"""Keeps job records in step with Ray and with the jobs' progress files.

One :meth:`Reconciler.sync` (every ~1 s from the app's lifespan):

1. lists Ray's submitted jobs; one whose entrypoint is ``python -m pipeline run SPEC`` and that has no
   record yet (started with ``ray job submit``) is recorded, its dataset read from SPEC when readable;
2. moves every active record to the state Ray reports (``PENDING`` → queued, ``RUNNING`` → running,
   ``SUCCEEDED`` / ``FAILED`` / ``STOPPED`` → succeeded / failed / cancelled), keeping the driver's log
   tail and last ``error:`` line on failure; a record Ray does not know (the cluster was restarted) fails;
3. copies each active job's ``_progress.json`` into its record.

Restarting the service therefore re-attaches to running jobs by submission id, with nothing to replay.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from pipeline.dataset import valid_name
from services import catalog
from services.config import Settings, normalize_store
from services.launcher import RayJob, RayLauncher, pipeline_spec_path
from services.models import IllegalTransition, JobPublic, JobState
from services.store import JobStore, now

log = logging.getLogger("distillery.services")

RAY_STATES = {"PENDING": JobState.QUEUED, "RUNNING": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
              "FAILED": JobState.FAILED, "STOPPED": JobState.CANCELLED}


def _time(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


def read_spec_file(path: str, *, max_bytes: int) -> dict | None:
    """A discovered job's spec (validated), or None when unreadable, too large or invalid."""
    from pipeline.config import load_config
    from pipeline.spec import JobSpec

    file = Path(path)
    try:
        if not file.is_file() or file.stat().st_size > max_bytes:
            return None
        return load_config(file, JobSpec).model_dump(mode="json")
    except (OSError, ValueError):
        return None


class Reconciler:
    """Syncs :class:`JobStore` records from a :class:`RayLauncher` and the dataset stores."""

    def __init__(self, store: JobStore, launcher: RayLauncher, settings: Settings) -> None:
        self.store, self.launcher, self.settings = store, launcher, settings
        self.ray_reachable = False

    def sync(self) -> None:
        try:
            ray_jobs = self.launcher.jobs()
        except Exception as exc:  # Ray down or restarting: keep the records as they are, try again later
            if self.ray_reachable:
                log.warning("cannot list Ray jobs at %s: %s", self.launcher.address, exc)
            self.ray_reachable = False
            return
        self.ray_reachable = True
        self.discover(ray_jobs)
        for job in self.store.active():
            self.sync_job(job, ray_jobs.get(job.submission_id))

    def discover(self, ray_jobs: dict[str, RayJob]) -> None:
        known = self.store.submission_ids()
        for sid, rj in ray_jobs.items():
            if sid in known or not valid_name(sid):  # job ids follow the dataset-name rule (full match)
                continue
            spec_path = pipeline_spec_path(rj.entrypoint)
            if spec_path is None:
                continue  # not a distillation job
            spec = read_spec_file(spec_path, max_bytes=self.settings.max_body_bytes)
            output = (spec or {}).get("output") or {}
            store = output.get("store")
            with_store = normalize_store(store) if store else None
            try:
                job = self.store.create(id=sid, submission_id=sid, origin="ray", entrypoint=rj.entrypoint,
                                        spec=spec, dataset=output.get("dataset"), store=with_store,
                                        created_at=_time(rj.start_time))
            except Exception:  # created concurrently (e.g. by a request): nothing to do
                continue
            log.info("discovered Ray job %s (dataset %s)", sid, job.dataset)
            self.sync_job(job, rj)

    def sync_job(self, job: JobPublic, rj: RayJob | None) -> None:
        if rj is None:
            age = (now() - job.created_at).total_seconds()
            if job.state == JobState.RUNNING or age > self.settings.lost_after_s:
                self._move(job, JobState.FAILED, error="Ray no longer knows this job (was the cluster restarted?); "
                                                       "submit it again to resume from its complete shards")
            return
        self._progress(job)
        target = RAY_STATES.get(rj.status, job.state)
        if target == job.state:
            return
        if job.state == JobState.QUEUED and target in (JobState.SUCCEEDED, JobState.FAILED):
            self._move(job, JobState.RUNNING, at=_time(rj.start_time))  # a short job ran between two syncs
        error = tail = None
        if target == JobState.FAILED:
            tail = self.launcher.logs_tail(job.submission_id, self.settings.log_tail_lines)
            errors = [line for line in tail.splitlines() if line.startswith("error:")]
            error = errors[-1].removeprefix("error:").strip() if errors else (rj.message or "job failed")[:2000]
        at = _time(rj.end_time) if target.is_terminal() else _time(rj.start_time)
        self._move(job, target, error=error, log_tail=tail, at=at)

    def _move(self, job: JobPublic, target: JobState, **kwargs) -> None:
        try:
            self.store.transition(job.id, target, **kwargs)
            log.info("job %s: %s -> %s", job.id, job.state.value, target.value)
        except IllegalTransition as exc:  # e.g. cancelled by a request meanwhile
            log.debug("%s", exc)

    def _progress(self, job: JobPublic) -> None:
        if not (job.store and job.dataset):
            return
        endpoint = ((job.spec or {}).get("output") or {}).get("s3_endpoint")
        try:
            progress = catalog.read_progress(catalog.open_store(job.store, endpoint), job.dataset)
        except Exception as exc:
            log.debug("progress of %s unreadable: %s", job.id, exc)
            return
        # A progress file older than the job belongs to an earlier run of the same dataset.
        created = job.created_at.astimezone(UTC).isoformat(timespec="seconds")[:19]
        if progress is not None and progress.updated_at[:19] >= created:
            self.store.set_progress(job.id, progress)
