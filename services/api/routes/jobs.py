"""``/v1/jobs``: submit a job spec, list and inspect jobs, cancel one."""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import APIRouter, HTTPException, Query, Response, status

from pipeline.dataset import valid_name
from pipeline.spec import JobSpec
from services.api.responses import AUTH, BODY, NOT_FOUND, Problem
from services.config import normalize_store
from services.deps import Authenticated, Authorized, LauncherDep, ReconcilerDep, SettingsDep, StoreDep
from services.inputs import confine_inputs
from services.models import IllegalTransition, JobList, JobPublic, JobState
from services.redact import public_view
from services.security import write_private
from services.store import DatasetBusy, JobNotFound

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("distillery.services")


def _field_error(loc: list[str], msg: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors."""
    return HTTPException(422, [{"type": "value_error", "loc": ["body", *loc], "msg": msg}])


def _job(store: StoreDep, job_id: str) -> JobPublic:
    if not valid_name(job_id):  # job ids follow the dataset-name rule; anything else cannot exist
        raise HTTPException(404, f"no job {job_id!r}")
    try:
        return store.get(job_id)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id!r}") from None


def _check_schedulable(spec: JobSpec, launcher: LauncherDep) -> None:
    """422 for a job the cluster can never run: each teacher actor reserves ``threads_per_worker`` CPUs on one
    node. (More workers than CPUs in all only queue; that is slower, not impossible.)"""
    try:
        cpus = launcher.max_node_cpus()
    except Exception:  # the cluster cannot tell: let the job try
        cpus = None
    threads = spec.resources.threads_per_worker
    if cpus is not None and threads > cpus:
        raise _field_error(["resources", "threads_per_worker"],
                           f"each worker reserves {threads} CPUs on one node, but the largest node of the Ray "
                           f"cluster has {cpus:g}: the job could never be scheduled; use at most {int(cpus)}")


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[Authorized],
             responses={**AUTH, **BODY, 409: {"model": Problem, "description": "a job already writes that dataset"},
                        503: {"model": Problem, "description": "Ray cluster unavailable"}})
def submit_job(spec: JobSpec, response: Response, settings: SettingsDep, store: StoreDep,
               launcher: LauncherDep) -> JobPublic:
    """Validate a job spec and launch ``python -m pipeline run SPEC`` on Ray."""
    output = normalize_store(spec.output.store)
    if output not in settings.stores:
        raise _field_error(["output", "store"], f"store {spec.output.store!r} is not served here; "
                                                f"use one of: {', '.join(settings.stores)}")
    data = spec.model_dump(mode="json")
    data["output"]["store"] = output
    if errors := confine_inputs(data, settings):
        raise HTTPException(422, errors)
    _check_schedulable(spec, launcher)
    job_id = f"job-{uuid.uuid4().hex[:16]}"
    path = settings.specs_dir / f"{job_id}.json"
    try:  # the database decides atomically which of simultaneous submissions of one dataset wins
        job = store.create(id=job_id, submission_id=job_id, origin="service", entrypoint=launcher.entrypoint(path),
                           spec=data, dataset=spec.output.dataset, store=output)
    except DatasetBusy:
        busy = store.active_writer(output, spec.output.dataset) or "another job"
        raise HTTPException(409, f"{busy} is already writing dataset {spec.output.dataset!r}") from None
    write_private(path, json.dumps(data, indent=2))
    try:
        launcher.submit(job_id=job_id, spec_path=path)
    except Exception as exc:
        log.exception("submitting %s failed", job_id)
        store.transition(job_id, JobState.FAILED, error=f"could not submit to Ray: {exc}"[:2000])
        raise HTTPException(503, f"could not submit the job to Ray at {launcher.address}: {exc}") from exc
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return job


@router.get("")
def list_jobs(store: StoreDep, authenticated: Authenticated, state: JobState | None = None,
              limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=1_000_000_000)) -> JobList:
    """Jobs newest first; ``state`` filters, ``limit``/``offset`` paginate. Anonymous readers: as in ``GET /{id}``."""
    jobs, count = store.list(state=state, limit=limit, offset=offset)
    jobs = jobs if authenticated else [public_view(j) for j in jobs]
    return JobList(data=jobs, count=count, limit=limit, offset=offset)


@router.get("/{job_id}", responses=NOT_FOUND)
def get_job(job_id: str, store: StoreDep, authenticated: Authenticated) -> JobPublic:
    """State, progress, timestamps, error (one line) and the driver's log tail of one job.

    The log tail is shown to authenticated readers only; anonymous ones see the error and entrypoint with
    URLs, addresses and paths redacted.
    """
    job = _job(store, job_id)
    return job if authenticated else public_view(job)


@router.post("/{job_id}/cancel", dependencies=[Authorized],
             responses={**AUTH, **NOT_FOUND, 409: {"model": Problem, "description": "the job has already finished"},
                        503: {"model": Problem, "description": "Ray did not answer"}})
def cancel_job(job_id: str, store: StoreDep, launcher: LauncherDep, reconciler: ReconcilerDep) -> JobPublic:
    """Stop the Ray job. Complete shards stay (a new job with the same spec resumes); no manifest is written."""
    job = _job(store, job_id)
    if job.state.is_terminal():
        raise HTTPException(409, f"job {job_id} is already {job.state.value}")
    try:
        stopped = launcher.stop(job.submission_id)
    except Exception as exc:  # unknown to Ray (never submitted, cluster gone): nothing left to stop
        log.warning("stopping %s: %s", job_id, exc)
        stopped = True
    if not stopped:  # it finished meanwhile: record how
        try:
            rj = launcher.jobs().get(job.submission_id)
        except Exception as exc:
            raise HTTPException(503, f"Ray at {launcher.address} did not answer: {exc}") from exc
        reconciler.sync_job(job, rj)
        job = store.get(job_id)
        if job.state.is_terminal():
            raise HTTPException(409, f"job {job_id} is already {job.state.value}")
    try:
        return store.transition(job_id, JobState.CANCELLED)
    except IllegalTransition as exc:
        raise HTTPException(409, str(exc)) from exc
