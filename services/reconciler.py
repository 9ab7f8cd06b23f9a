"""Keeps job records in step with Ray and with the jobs' progress files.

One :meth:`Reconciler.sync` (every ~1 s from the app's lifespan):

1. lists Ray's submitted jobs; one whose entrypoint is ``python -m pipeline run SPEC`` and that has no
   record yet (started with ``ray job submit``) is recorded, its dataset read from SPEC when readable;
2. moves every active record to the state Ray reports (``PENDING`` → queued, ``RUNNING`` → running,
   ``SUCCEEDED`` / ``FAILED`` / ``STOPPED`` → succeeded / failed / cancelled), keeping the driver's log
   tail and last ``error:`` line on failure; a record Ray does not know (the cluster was restarted, the
   service was killed with its embedded head) succeeded if its dataset's manifest was written after the job
   was created, and failed otherwise;
3. copies each active job's ``_progress.json`` into its record;
4. once Ray has ended a failed or cancelled job (so its driver writes no more), sets the state its
   ``_progress.json`` was left in (``running`` after a SIGKILL, ``failed`` with error ``15`` after the
   SIGTERM of a cancel) to the job's real one, so the dataset tells the truth too.

Restarting the service therefore re-attaches to running jobs by submission id, with nothing to replay.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline.dataset import Manifest, Progress, ProgressState, valid_name
from services import catalog
from services.config import Settings, normalize_store
from services.launcher import RayJob, RayLauncher, pipeline_spec_path
from services.models import IllegalTransition, JobPublic, JobState
from services.store import DatasetBusy, JobStore, now

FINALIZE_WINDOW_S = 3600.0  # how long after a job ended its progress file is still corrected

log = logging.getLogger("distillery.services")

RAY_STATES = {"PENDING": JobState.QUEUED, "RUNNING": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
              "FAILED": JobState.FAILED, "STOPPED": JobState.CANCELLED}


def _stamp(value: datetime) -> str:
    """The pipeline's timestamps (UTC, ISO, seconds) in a form that compares as text."""
    return value.astimezone(UTC).isoformat(timespec="seconds")[:19]


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
        for job in self.store.finished_since(now() - timedelta(seconds=FINALIZE_WINDOW_S)):
            rj = ray_jobs.get(job.submission_id)
            if rj is None or RAY_STATES.get(rj.status, JobState.RUNNING).is_terminal():
                self.finalize_progress(job)

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
            record = {"id": sid, "submission_id": sid, "origin": "ray", "entrypoint": rj.entrypoint, "spec": spec,
                      "created_at": _time(rj.start_time)}
            try:
                try:
                    job = self.store.create(**record, dataset=output.get("dataset"), store=with_store)
                except DatasetBusy:  # another active job writes that dataset: record it, without a dataset
                    job = self.store.create(**record)
            except Exception:  # created concurrently (e.g. by a request): nothing to do
                continue
            log.info("discovered Ray job %s (dataset %s)", sid, job.dataset)
            self.sync_job(job, rj)

    def sync_job(self, job: JobPublic, rj: RayJob | None) -> None:
        if rj is None:
            age = (now() - job.created_at).total_seconds()
            if self._manifest_written(job):  # it finished while nobody watched (service and head killed)
                if job.state == JobState.QUEUED:
                    self._move(job, JobState.RUNNING)
                self._progress(job)
                self._move(job, JobState.SUCCEEDED)
            elif job.state == JobState.RUNNING or age > self.settings.lost_after_s:
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

    def _dataset_store(self, job: JobPublic):
        endpoint = ((job.spec or {}).get("output") or {}).get("s3_endpoint")
        return catalog.open_store(job.store, endpoint)

    def _read(self, job: JobPublic, model: type[Manifest] | type[Progress]) -> Manifest | Progress | None:
        """The job's dataset's manifest or progress file if it was written during this job (not by an earlier
        run), else None (also when missing or unreadable)."""
        if not (job.store and job.dataset):
            return None
        try:
            data = model.read(self._dataset_store(job), job.dataset)
        except Exception:
            return None
        if data is None:
            return None
        stamp = data.updated_at if isinstance(data, Progress) else data.created_at
        return data if stamp[:19] >= _stamp(job.created_at) else None

    def _manifest_written(self, job: JobPublic) -> bool:
        return self._read(job, Manifest) is not None

    def finalize_progress(self, job: JobPublic) -> None:
        """Make the dataset's progress file say how the job really ended (failed or cancelled)."""
        if job.state not in (JobState.FAILED, JobState.CANCELLED):
            return
        progress = self._read(job, Progress)
        if progress is None or progress.state in (job.state.value, ProgressState.SUCCEEDED):
            return
        if job.store and job.dataset and self.store.active_writer(job.store, job.dataset):
            return  # a newer job writes this dataset now: its progress file is not ours to change
        error = job.error or ("cancelled" if job.state == JobState.CANCELLED else "failed")
        progress = progress.model_copy(update={"state": ProgressState(job.state.value), "error": error,
                                               "updated_at": now().isoformat(timespec="seconds")})
        try:
            store = self._dataset_store(job)
            progress.write(store, job.dataset)
            if store.uri.startswith("file://"):  # written by the service: give it the jobs' file mode
                os.chmod(store.join(f"{job.dataset}/{Progress.FILE}"), 0o666 & ~int(self.settings.dataset_umask, 8))
        except Exception as exc:
            log.warning("cannot correct the progress file of %s: %s", job.id, exc)
            return
        log.info("job %s: %s/%s marked %s", job.id, job.dataset, Progress.FILE, job.state.value)

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
