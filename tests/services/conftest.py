"""Fixtures of the service tests: settings on a temporary state dir, a stand-in for Ray, an in-process app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.config import Settings
from services.launcher import RayJob
from services.main import create_app

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeLauncher:
    """Records what the service asks of Ray; tests set ``jobs[sid].status`` to play Ray's part.

    A stand-in, not a mock of convenience: the fast API tests need Ray states a real cluster cannot be made
    to produce on demand (Ray down at submit, a job Ray forgot, a failure with a given log tail) and must
    not start real jobs for hundreds of schemathesis cases. The real path — a Ray head, the job server,
    `ray job submit`, cancel and restart — is covered end to end in test_service_ray.py.
    """

    address = "http://ray.invalid:8265"

    def __init__(self) -> None:
        self.ray_jobs: dict[str, RayJob] = {}
        self.logs: dict[str, str] = {}
        self.fail_submit = False
        self.node_cpus = 2.0  # the largest node's CPUs, as Ray's state API would report them

    def entrypoint(self, spec_path: Path) -> str:
        return f"python -m pipeline run {spec_path}"

    def submit(self, *, job_id: str, spec_path: Path) -> str:
        if self.fail_submit:
            raise ConnectionError("Ray is down")
        self.ray_jobs[job_id] = RayJob(job_id, "PENDING", self.entrypoint(spec_path), None, time.time(), None)
        return job_id

    def stop(self, submission_id: str) -> bool:
        job = self.ray_jobs[submission_id]
        if job.status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return False
        job.status = "STOPPED"
        return True

    def logs_tail(self, submission_id: str, lines: int) -> str:
        return "\n".join(self.logs.get(submission_id, "").splitlines()[-lines:])

    def max_node_cpus(self) -> float | None:
        return self.node_cpus

    def jobs(self) -> dict[str, RayJob]:
        return dict(self.ray_jobs)

    def reachable(self) -> bool:
        return True


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = {"state_dir": tmp_path / "state", "token": TOKEN, "store": str(tmp_path / "datasets"),
              "corpus_roots": [tmp_path / "corpora"], "model_roots": [tmp_path / "models"],
              "reconcile_interval_s": 3600.0} | overrides  # tests call reconciler.sync() themselves
    return Settings(**values)


@pytest.fixture
def fake_ray() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings, fake_ray) -> Iterator[TestClient]:
    with TestClient(create_app(settings, launcher=fake_ray)) as c:
        yield c


def spec_body(store: str | Path, dataset: str = "ds", **sections) -> dict:
    """A valid job spec body; nothing runs it in the fast tests, so the paths need not exist.

    Its corpus and model lie under the roots :func:`make_settings` configures next to the store.
    """
    root = Path(store).parent
    body = {
        "corpus": {"path": str(root / "corpora" / "corpus.tsv")},
        "teacher": {"model": str(root / "models" / "teacher-ct2")},
        "targets": {"top_k": 4},
        "output": {"store": str(store), "dataset": dataset, "shard_size": 25},
        "resources": {"workers": 1, "threads_per_worker": 1},
    }
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value}
    return body
