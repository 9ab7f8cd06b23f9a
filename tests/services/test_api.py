"""The API against an in-process app with a stand-in for Ray: auth, validation, state machine, reconciling,
datasets and path traversal, limits, metrics. The real-Ray end-to-end tests are in test_service_ray.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.dataset import (
    Counts,
    JobRecord,
    Manifest,
    Progress,
    ShardEntry,
    TeacherInfo,
    TokenizerInfo,
    shard_file,
)
from pipeline.storage import Store
from services.launcher import RayJob, pipeline_spec_path
from services.main import create_app
from services.models import IllegalTransition, JobState
from services.store import JobStore
from tests.services.conftest import AUTH, make_settings, spec_body

ROOT = Path(__file__).resolve().parents[2]


def submit(client, settings, **kwargs):
    return client.post("/v1/jobs", json=spec_body(settings.default_store, **kwargs), headers=AUTH)


def test_importing_the_service_pulls_in_neither_torch_nor_ctranslate2():
    code = ("import sys, services.main, services.launcher, distillery.cli; services.main.create_app(); "
            "from ray.job_submission import JobSubmissionClient; "
            "print(sorted(m for m in ('torch', 'ctranslate2', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("method,path", [("post", "/v1/jobs"), ("post", "/v1/jobs/job-x/cancel")])
def test_state_changing_endpoints_need_the_token(client, settings, method, path):
    body = spec_body(settings.default_store)
    missing = client.request(method, path, json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.request(method, path, json=body, headers={"Authorization": "Basic dXNlcjpwdw=="}).status_code == 401
    assert client.request(method, path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/v1/jobs").status_code == 200  # reads are open


def test_submit_records_the_job_writes_its_spec_and_launches_it(client, settings, fake_ray):
    r = submit(client, settings)
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["origin"] == "service" and job["dataset"] == "ds"
    assert job["store"] == settings.default_store and job["submission_id"] == job["id"]
    spec_file = settings.specs_dir / f"{job['id']}.json"
    assert json.loads(spec_file.read_text())["output"]["dataset"] == "ds"
    assert pipeline_spec_path(fake_ray.ray_jobs[job["id"]].entrypoint) == str(spec_file)
    assert client.get(f"/v1/jobs/{job['id']}").json()["spec"]["targets"]["top_k"] == 4
    page = client.get("/v1/jobs", params={"state": "queued"}).json()
    assert page["count"] == 1 and page["data"][0]["id"] == job["id"]
    assert client.get("/v1/jobs", params={"state": "running"}).json()["count"] == 0
    # A second job writing the same dataset while the first is active is refused.
    assert submit(client, settings).status_code == 409


@pytest.mark.parametrize("change,where", [
    (lambda b: b.update(bogus=1), "bogus"),
    (lambda b: b["output"].update(dataset="../etc"), "output.dataset"),
    (lambda b: b["decoding"].update(mode="greedy", num_hypotheses=3) if "decoding" in b
     else b.update(decoding={"mode": "greedy", "num_hypotheses": 3}), "decoding"),
    (lambda b: b.pop("teacher"), "teacher"),
    (lambda b: b["output"].update(store="/etc"), "output.store"),
    (lambda b: b["output"].update(store="s3://[broken"), "output.store"),
])
def test_bad_specs_get_422_with_field_errors(client, settings, change, where):
    body = spec_body(settings.default_store)
    change(body)
    r = client.post("/v1/jobs", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    locs = [".".join(str(p) for p in e["loc"][1:]) for e in r.json()["detail"]]
    assert any(loc.startswith(where) for loc in locs), locs
    assert client.get("/v1/jobs").json()["count"] == 0


def test_body_that_is_not_json_or_too_large(client, settings):
    assert client.post("/v1/jobs", content=b"{not json", headers=AUTH | {"content-type": "application/json"}
                       ).status_code == 422
    big = spec_body(settings.default_store, corpus={"path": "x" * (settings.max_body_bytes + 10)})
    assert client.post("/v1/jobs", json=big, headers=AUTH).status_code == 413

    def chunks():  # no content-length: the limit applies to what is streamed
        for _ in range(settings.max_body_bytes // 1000 + 2):
            yield b" " * 1000

    assert client.post("/v1/jobs", content=chunks(), headers=AUTH).status_code == 413


@pytest.mark.parametrize("job_id", ["job-doesnotexist", "..", "%2e%2e", "a" * 300])
def test_unknown_jobs_are_404(client, job_id):
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 404


def test_submission_failure_is_503_and_recorded(client, settings, fake_ray):
    fake_ray.fail_submit = True
    r = submit(client, settings)
    assert r.status_code == 503 and "Ray" in r.json()["detail"]
    [job] = client.get("/v1/jobs").json()["data"]
    assert job["state"] == "failed" and "Ray is down" in job["error"]


def write_progress(settings, dataset: str, **fields) -> None:
    """The progress file as the pipeline writes it: through its one model."""
    from datetime import UTC, datetime

    data = {"state": "running", "shards_total": 4, "shards_done": 1, "shards_skipped": 0, "examples_total": 100,
            "examples_done": 25, "rows_done": 25, "target_tokens_done": 500, "bytes_written": 1000,
            "elapsed_s": 5.0, "tokens_per_s": 100.0, "eta_s": 15.0, "error": "",
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds")} | fields
    Progress(**data).write(Store.from_uri(settings.default_store), dataset)


def test_reconciler_follows_ray_and_the_progress_file(client, settings, fake_ray):
    reconciler = client.app.state.reconciler
    job_id = submit(client, settings).json()["id"]
    reconciler.sync()
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
    fake_ray.ray_jobs[job_id].status = "RUNNING"
    write_progress(settings, "ds")
    reconciler.sync()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "running" and job["started_at"]
    assert job["progress"]["shards_done"] == 1 and job["progress"]["percent"] == 25.0
    assert job["progress"]["examples_per_s"] == 5.0 and job["progress"]["eta_s"] == 15.0
    metrics = client.get("/metrics").text
    assert 'distillery_jobs{state="running"} 1.0' in metrics
    assert "distillery_examples_per_second 5.0" in metrics
    write_progress(settings, "ds", state="succeeded", shards_done=4, examples_done=100)
    fake_ray.ray_jobs[job_id].status = "SUCCEEDED"
    reconciler.sync()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["finished_at"] and job["progress"]["percent"] == 100.0
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 409


def test_failed_job_keeps_error_and_log_tail(client, settings, fake_ray):
    reconciler = client.app.state.reconciler
    job_id = submit(client, settings).json()["id"]
    fake_ray.ray_jobs[job_id].status = "FAILED"  # between two syncs: queued → running → failed
    fake_ray.ray_jobs[job_id].message = "Job entrypoint command failed with exit code 2"
    fake_ray.logs[job_id] = "loading\nerror: teacher model directory not found: /models/teacher-ct2\n"
    reconciler.sync()
    job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert job["state"] == "failed" and job["started_at"] and job["finished_at"]
    assert job["error"] == "teacher model directory not found: /models/teacher-ct2"
    assert "loading" in job["log_tail"]


def test_cancel_and_jobs_lost_by_ray(client, settings, fake_ray):
    reconciler = client.app.state.reconciler
    first = submit(client, settings, dataset="a").json()["id"]
    r = client.post(f"/v1/jobs/{first}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert fake_ray.ray_jobs[first].status == "STOPPED"
    reconciler.sync()  # Ray's STOPPED agrees; nothing moves
    assert client.get(f"/v1/jobs/{first}").json()["state"] == "cancelled"
    assert client.post(f"/v1/jobs/{first}/cancel", headers=AUTH).status_code == 409
    # A job Ray finished just before the cancel arrived keeps its real outcome.
    second = submit(client, settings, dataset="b").json()["id"]
    fake_ray.ray_jobs[second].status = "SUCCEEDED"
    r = client.post(f"/v1/jobs/{second}/cancel", headers=AUTH)
    assert r.status_code == 409 and client.get(f"/v1/jobs/{second}").json()["state"] == "succeeded"
    # A running job the cluster no longer knows (head restarted) fails with a hint to resubmit.
    third = submit(client, settings, dataset="c").json()["id"]
    fake_ray.ray_jobs[third].status = "RUNNING"
    reconciler.sync()
    del fake_ray.ray_jobs[third]
    reconciler.sync()
    job = client.get(f"/v1/jobs/{third}").json()
    assert job["state"] == "failed" and "submit it again" in job["error"]


def test_state_machine(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create(id="j1", submission_id="j1", origin="service")
    with pytest.raises(IllegalTransition):
        store.transition("j1", JobState.SUCCEEDED)  # queued → succeeded skips running
    assert store.transition("j1", JobState.RUNNING).started_at is not None
    assert store.transition("j1", JobState.SUCCEEDED).state == JobState.SUCCEEDED
    for target in JobState:
        with pytest.raises(IllegalTransition):
            store.transition("j1", target)  # terminal is final
    store.create(id="j2", submission_id="j2", origin="service")
    assert store.transition("j2", JobState.CANCELLED).finished_at is not None
    assert store.counts_by_state()[JobState.SUCCEEDED] == 1 and store.counts_by_state()[JobState.QUEUED] == 0
    store.close()
    reopened = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")  # records survive a restart
    assert reopened.get("j1").state == JobState.SUCCEEDED and reopened.get("j1").created_at.tzinfo is not None


def test_discovers_jobs_submitted_directly_to_ray(client, settings, fake_ray, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(spec_body(settings.default_store, dataset="direct")))
    fake_ray.ray_jobs["raysubmit_abc123"] = RayJob(
        "raysubmit_abc123", "RUNNING", f"python -m pipeline run {spec} --address auto", None, 1.7e9, None)
    fake_ray.ray_jobs["raysubmit_other"] = RayJob("raysubmit_other", "RUNNING", "python train.py", None, 1.7e9, None)
    fake_ray.ray_jobs["raysubmit_nospec"] = RayJob(
        "raysubmit_nospec", "SUCCEEDED", "python -m pipeline run /missing.yaml", None, 1.7e9, 1.7e9 + 5)
    client.app.state.reconciler.sync()
    jobs = {j["id"]: j for j in client.get("/v1/jobs").json()["data"]}
    assert set(jobs) == {"raysubmit_abc123", "raysubmit_nospec"}
    found = jobs["raysubmit_abc123"]
    assert found["origin"] == "ray" and found["state"] == "running" and found["dataset"] == "direct"
    assert found["store"] == settings.default_store
    assert jobs["raysubmit_nospec"]["state"] == "succeeded" and jobs["raysubmit_nospec"]["dataset"] is None


@pytest.mark.parametrize("entrypoint,spec", [
    ("python -m pipeline run spec.yaml", "spec.yaml"),
    ("/venv/bin/python -m pipeline run --address http://h:8265 '/a b/s.json'", "/a b/s.json"),
    ("RAY_X=1 python -u -m pipeline run s.yaml --address auto", "s.yaml"),
    ("python -m pipeline.other run s.yaml", None),
    ("python train.py", None),
    ("python -m pipeline run 'unbalanced", None),
])
def test_entrypoint_parsing(entrypoint, spec):
    assert pipeline_spec_path(entrypoint) == spec


def write_manifest(root: Path, name: str, *, created_at: str = "2026-01-01T00:00:00+00:00") -> None:
    """A one-shard manifest as the pipeline writes it (through pipeline.dataset)."""
    spec = spec_body(str(root), dataset=name)
    shard = ShardEntry(name=shard_file(0), shard=0, first_index=0, last_index=9, examples=10, rows=20,
                       target_tokens=300, bytes=100, sha256="sha256:abc")
    Manifest(schema_version=1, spec_version=1, dataset=name, created_at=created_at, spec=spec,
             fingerprint="sha256:fp", teacher=TeacherInfo(model="/t", hash="sha256:t", compute_type="int8"),
             tokenizer=TokenizerInfo(path="/t", vocab_hash="sha256:v"), top_k=4,
             counts=Counts(records_read=10, examples=10, rows=20, target_tokens=300, bytes=100, rejected={}),
             shards=[shard], dataset_hash="sha256:abc", versions={}).write(Store.from_uri(str(root)), name)


def make_dataset(root: Path, name: str, *, complete: bool) -> None:
    """A dataset directory whose files are built through the pipeline's models (pipeline.dataset)."""
    store = Store.from_uri(str(root))
    store.write_bytes_atomic(f"{name}/{shard_file(0)}", b"x" * 100)
    JobRecord(fingerprint="sha256:fp", spec=spec_body(str(root), dataset=name)).write(store, name)
    Progress(state="succeeded" if complete else "running", shards_total=1, shards_done=int(complete),
             examples_total=10, examples_done=10 * complete).write(store, name)
    if complete:
        write_manifest(root, name)


def test_datasets_listing_and_detail(client, settings):
    root = Path(settings.default_store)
    make_dataset(root, "done", complete=True)
    make_dataset(root, "partial", complete=False)
    (root / "not-a-dataset").mkdir()
    listing = client.get("/v1/datasets").json()
    assert [d["name"] for d in listing["data"]] == ["done", "partial"]
    done = client.get("/v1/datasets/done").json()
    assert done["complete"] and done["examples"] == 10 and done["rows"] == 20 and done["shards"] == 1
    assert done["manifest"]["dataset_hash"] == "sha256:abc" and done["files"] == 4
    partial = client.get("/v1/datasets/partial").json()
    assert not partial["complete"] and partial["state"] == "running" and partial["progress"]["percent"] == 0
    assert client.get("/v1/datasets/nope").status_code == 404
    assert client.get("/v1/datasets/not-a-dataset").status_code == 404
    assert client.get("/v1/datasets", params={"store": "/etc"}).status_code == 422


def test_path_traversal_never_reads_outside_the_store(client, settings, tmp_path):
    # A complete-looking dataset right outside the store root, and a secret next to it.
    make_dataset(tmp_path, "outside", complete=True)
    (tmp_path / "secret.txt").write_text("top secret")
    attempts = ["..", "%2e%2e", "..%2Foutside", "%2e%2e%2foutside", "..%252Foutside", "..%5Coutside",
                ".%2e/outside", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "..%00", "...", ".hidden"]
    for name in attempts:
        r = client.get(f"/v1/datasets/{name}")
        assert r.status_code in (404, 422), (name, r.status_code, r.text)
        assert "outside" not in r.text.replace(name, "") or r.status_code == 422
    r = client.get("/v1/datasets/outside", params={"store": str(tmp_path)})
    assert r.status_code == 422  # not an allowed store
    assert client.get("/v1/datasets/../secret.txt").status_code == 404


def test_token_is_generated_once_with_0600(tmp_path, fake_ray, capfd):
    settings = make_settings(tmp_path, token=None)
    with TestClient(create_app(settings, launcher=fake_ray)) as c:
        token = (settings.state_path / "token").read_text().strip()
        assert c.post("/v1/jobs/job-x/cancel", headers={"Authorization": f"Bearer {token}"}).status_code == 404
    assert stat.S_IMODE(os.stat(settings.state_path / "token").st_mode) == 0o600
    assert token in capfd.readouterr().err
    with TestClient(create_app(make_settings(tmp_path, token=None), launcher=fake_ray)):
        assert (settings.state_path / "token").read_text().strip() == token
    assert token not in capfd.readouterr().err  # printed only when generated


def test_healthz(client):
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "ray_address": "http://ray.invalid:8265", "ray_embedded": False,
                      "ray_reachable": True, "jobs_active": 0}


# Names a client could use to reach a directory other than the one it names (or one a person cannot tell apart).
BAD_NAMES = ["abc\n", "abc\r", "a/b", "..", "", "x" * 129, "аbc", "ａbc"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_dataset_names_in_a_body_get_422(client, settings, name):
    r = submit(client, settings, dataset=name)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "output", "dataset"]]
    assert client.get("/v1/jobs").json()["count"] == 0
    assert not any(Path(settings.default_store).glob("*")) if Path(settings.default_store).exists() else True


def test_a_directory_with_a_newline_in_its_name_is_never_served(client, settings):
    root = Path(settings.default_store)
    make_dataset(root, "abc", complete=True)
    (root / "abc").rename(root / "abc\n")  # e.g. written by an older version that accepted the name
    assert client.get("/v1/datasets").json()["count"] == 0
    for path in ("abc%0A", "abc%0D", "abc%0D%0A"):
        assert client.get(f"/v1/datasets/{path}").status_code == 422


def test_job_ids_are_matched_whole(client, settings, fake_ray, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(spec_body(settings.default_store, dataset="direct")))
    fake_ray.ray_jobs["raysubmit_x\n"] = RayJob("raysubmit_x\n", "RUNNING", f"python -m pipeline run {spec}",
                                                 None, 1.7e9, None)
    client.app.state.reconciler.sync()
    assert client.get("/v1/jobs").json()["count"] == 0  # not recorded under a name no route could reach
    job_id = submit(client, settings).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert client.get(f"/v1/jobs/{job_id}%0A").status_code == 404
    assert client.post(f"/v1/jobs/{job_id}%0A/cancel", headers=AUTH).status_code == 404


def test_dataset_files_of_an_unknown_version_are_reported_not_misread(client, settings, fake_ray):
    root = Path(settings.default_store)
    make_dataset(root, "future", complete=True)
    manifest = json.loads((root / "future" / "_manifest.json").read_text())
    (root / "future" / "_manifest.json").write_text(json.dumps(manifest | {"manifest_version": 2}))
    detail = client.get("/v1/datasets/future").json()
    assert not detail["complete"] and detail["manifest"] is None
    assert "manifest_version 2" in detail["problem"] and "reads version 1" in detail["problem"]
    [summary] = client.get("/v1/datasets").json()["data"]
    assert summary["name"] == "future" and "manifest_version 2" in summary["problem"]
    # A progress file the service cannot read does not overwrite what the job last showed.
    job_id = submit(client, settings, dataset="soon").json()["id"]
    fake_ray.ray_jobs[job_id].status = "RUNNING"
    write_progress(settings, "soon", shards_done=2, examples_done=50)
    client.app.state.reconciler.sync()
    assert client.get(f"/v1/jobs/{job_id}").json()["progress"]["shards_done"] == 2
    progress = json.loads((root / "soon" / "_progress.json").read_text())
    (root / "soon" / "_progress.json").write_text(json.dumps(progress | {"progress_version": 2, "shards_done": 3}))
    client.app.state.reconciler.sync()
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "running" and job["progress"]["shards_done"] == 2
    assert "progress_version 2" in client.get("/v1/datasets/soon").json()["problem"]


def test_openapi_documents_the_manifest_and_progress_models(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    detail = schemas["DatasetDetail"]["properties"]
    assert "$ref" in json.dumps(detail["manifest"]) and "Manifest" in json.dumps(detail["manifest"])
    manifest = set(schemas["Manifest"]["properties"])
    assert {"manifest_version", "counts", "shards", "dataset_hash", "tokenizer"} <= manifest
    assert {"progress_version", "state", "shards_done", "percent"} <= set(schemas["JobProgress"]["properties"])


@pytest.mark.parametrize("body", [
    b"not json at all",
    b'{"corpus": ' + b"[" * 5000,
    json.dumps({"corpus": {"path": "x" * 5000}}).encode(),
])
def test_anonymous_clients_get_401_before_their_body_is_read(client, settings, body):
    """Authentication comes first: neither a malformed nor an oversized body tells an anonymous client more."""
    huge = body + b" " * settings.max_body_bytes
    for content in (body, huge):
        r = client.post("/v1/jobs", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (len(content), r.text)
        wrong = client.post("/v1/jobs", content=content, headers={"content-type": "application/json",
                                                                   "Authorization": "Bearer wrong"})
        assert wrong.status_code == 403, wrong.text
    assert client.post("/v1/jobs", content=huge, headers=AUTH).status_code == 413
    assert client.get("/v1/jobs").json()["count"] == 0


def test_openapi_documents_every_error_status(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"400", "401", "403", "409", "413", "422", "503"} <= set(paths["/v1/jobs"]["post"]["responses"])
    assert {"401", "403", "404", "409", "413"} <= set(paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"])
    assert "413" in paths["/v1/jobs/{job_id}"]["get"]["responses"]


@pytest.mark.parametrize("section,field,literal", [
    ("targets", "top_k", "NaN"), ("output", "shard_size", "Infinity"), ("resources", "workers", "-Infinity"),
    ("decoding", "top_p", "NaN"), ("decoding", "top_p", "1e309"), ("resources", "batch_tokens", "-1e309"),
])
def test_non_finite_numbers_get_a_readable_422(client, settings, section, field, literal):
    """Python's json reads NaN, Infinity and 1e309 (→ inf); the error body must still be valid JSON."""
    body = spec_body(settings.default_store)
    body.setdefault(section, {})[field] = "__HERE__"
    raw = json.dumps(body).replace('"__HERE__"', literal)
    r = client.post("/v1/jobs", content=raw.encode(), headers=AUTH | {"content-type": "application/json"})
    assert r.status_code == 422, r.text
    errors = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {r.text}"))
    [error] = [e for e in errors["detail"] if e["loc"][1:] == [section, field]]
    assert error["msg"] and error["input"] in ("NaN", "Infinity", "-Infinity"), error
    assert client.get("/v1/jobs").json()["count"] == 0


def test_simultaneous_submissions_of_one_dataset_create_exactly_one_job(client, settings):
    """The 409 check is atomic in the database: N threads POST the same dataset at once, exactly one wins."""
    import threading

    n, barrier, codes = 8, threading.Barrier(8), []
    body = spec_body(settings.default_store, dataset="race")

    def post():
        barrier.wait()
        codes.append(client.post("/v1/jobs", json=body, headers=AUTH).status_code)

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] + [409] * (n - 1), codes
    [job] = client.get("/v1/jobs").json()["data"]
    assert sorted(p.name for p in settings.specs_dir.iterdir()) == [f"{job['id']}.json"]  # no spec left by losers
    # Once it ended, the dataset may be written again.
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
    assert client.post("/v1/jobs", json=body, headers=AUTH).status_code == 201


def _refused(client, body, field: str) -> str:
    r = client.post("/v1/jobs", json=body, headers=AUTH)
    assert r.status_code == 422, (field, r.text)
    [error] = [e for e in r.json()["detail"] if ".".join(map(str, e["loc"][1:])) == field]
    return error["msg"]


def test_jobs_read_inputs_only_from_the_configured_roots(client, settings, tmp_path):
    """No spec submitted over HTTP can make a job read the token, the database or any file outside the roots."""
    corpora, models, state = tmp_path / "corpora", tmp_path / "models", settings.state_path
    corpora.mkdir(exist_ok=True)
    (corpora / "ok.tsv").write_text("a\tb\n")
    (corpora / "passwd").symlink_to("/etc/passwd")  # a symlink inside a root, pointing outside
    (corpora / "token").symlink_to(state / "token")
    (corpora / "state").symlink_to(state)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")

    def text_corpus(path: str, target: str | None = None) -> dict:
        return spec_body(settings.default_store, corpus={"path": path, "target_path": target or path,
                                                         "format": "text"})

    outside = ["/etc/passwd", str(state / "token"), str(state / "jobs.db"), str(corpora / "passwd"),
               str(corpora / "token"), str(corpora / "state" / "token"), str(corpora / ".." / "secret.txt"),
               f"{corpora}/../state/token", "../../../../../etc/passwd", str(secret), str(tmp_path),
               f"{corpora}/ok.tsv\x00", "~/.ssh/id_rsa"]
    for path in outside:
        assert "corpus paths must lie under one of" in _refused(client, text_corpus(path), "corpus.path"), path
        assert _refused(client, text_corpus(str(corpora / "ok.tsv"), path), "corpus.target_path")
    for field in ("model", "tokenizer"):
        for path in ("/", str(state), str(corpora), f"{models}/../state"):
            assert "DISTILLERY_MODEL_ROOTS" in _refused(
                client, spec_body(settings.default_store, teacher={field: path}), f"teacher.{field}")
    assert client.get("/v1/jobs").json()["count"] == 0 and not settings.specs_dir.exists()

    # Inside the roots: accepted, and the job is handed the resolved absolute paths it was checked with.
    (models / "t").mkdir(parents=True)
    (models / "link").symlink_to(models / "t")
    body = spec_body(settings.default_store, corpus={"path": str(corpora / "sub" / ".." / "ok.tsv")},
                     teacher={"model": str(models / "link")})
    r = client.post("/v1/jobs", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    spec = json.loads((settings.specs_dir / f"{r.json()['id']}.json").read_text())
    assert spec["corpus"]["path"] == os.path.realpath(corpora / "ok.tsv")
    assert spec["teacher"]["model"] == os.path.realpath(models / "t")


def test_the_state_dir_is_never_a_root(tmp_path, fake_ray):
    settings = make_settings(tmp_path, corpus_roots=[tmp_path / "state"], model_roots=["/"])
    with TestClient(create_app(settings, launcher=fake_ray)) as client:
        state = settings.state_path
        body = spec_body(settings.default_store, corpus={"path": str(state / "token"), "format": "tsv"})
        assert _refused(client, body, "corpus.path")
        body = spec_body(settings.default_store, teacher={"model": str(state / "specs")})
        assert _refused(client, body, "teacher.model")
        assert _refused(client, spec_body(settings.default_store, corpus={"path": "/etc/passwd"}), "corpus.path")


def test_state_dir_database_and_spec_files_are_private(tmp_path, fake_ray):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, launcher=fake_ray)) as client:
        job = client.post("/v1/jobs", json=spec_body(settings.default_store), headers=AUTH).json()
        mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
        assert mode(state) == 0o700
        files = [p for p in state.glob("jobs.db*")] + [settings.specs_dir / f"{job['id']}.json"]
        assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
        assert mode(settings.specs_dir) == 0o700


def test_dataset_umask_reaches_the_writing_process(tmp_path):
    """The service hands DISTILLERY_UMASK to its jobs; the pipeline applies it before it writes a local store."""
    code = ("from pipeline.storage import Store; s = Store.from_uri(r'%s'); "
            "s.write_json_atomic('ds/_progress.json', {}); s.write_bytes_atomic('ds/part-00000.parquet', b'x')"
            % (tmp_path / "store"))
    env = os.environ | {"DISTILLERY_UMASK": "077"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    ds = tmp_path / "store" / "ds"
    assert stat.S_IMODE(ds.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in ds.iterdir()} == {
        "_progress.json": 0o600, "part-00000.parquet": 0o600}


def test_error_is_one_line_and_only_token_holders_see_the_log(client, settings, fake_ray):
    reconciler = client.app.state.reconciler
    job_id = submit(client, settings).json()["id"]
    fake_ray.ray_jobs[job_id].status = "FAILED"  # killed: no `error:` line, Ray's message quotes the log
    log_text = ("Traceback (most recent call last):\n  File \"/opt/venv/lib/python3.11/site-packages/ray/x.py\"\n"
                "ConnectionError: GCS at 10.1.2.3:6379 (http://head.internal:8265) unreachable\n")
    fake_ray.ray_jobs[job_id].message = "Job entrypoint command failed with exit code 1, last logs:\n" + log_text
    fake_ray.logs[job_id] = log_text
    reconciler.sync()
    full = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert full["error"] == "Job entrypoint command failed with exit code 1, last logs:"
    assert "10.1.2.3:6379" in full["log_tail"] and "/opt/venv" in full["log_tail"]
    for anonymous in (client.get(f"/v1/jobs/{job_id}"), client.get("/v1/jobs"),
                      client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer wrong"})):
        text = anonymous.text
        assert anonymous.status_code == 200 and "log_tail" in text
        for secret in ("10.1.2.3", "head.internal", "/opt/venv", "site-packages", str(settings.specs_dir)):
            assert secret not in text, (secret, text)
    assert client.get(f"/v1/jobs/{job_id}").json()["log_tail"] is None


def _dataset_state(client, name: str) -> tuple[str | None, dict]:
    detail = client.get(f"/v1/datasets/{name}").json()
    progress = json.loads((Path(client.app.state.settings.default_store) / name / "_progress.json").read_text())
    return detail["state"], progress


def test_progress_file_tells_how_the_job_ended(client, settings, fake_ray):
    """A killed driver leaves "running", a cancelled one "failed"/"15": the reconciler sets the real end."""
    reconciler = client.app.state.reconciler
    killed = submit(client, settings, dataset="killed").json()["id"]
    fake_ray.ray_jobs[killed].status = "RUNNING"
    write_progress(settings, "killed")
    reconciler.sync()
    fake_ray.ray_jobs[killed].status = "FAILED"  # SIGKILL: the driver wrote nothing more
    fake_ray.ray_jobs[killed].message = "Job entrypoint command failed with exit code -9"
    reconciler.sync()
    state, progress = _dataset_state(client, "killed")
    assert state == "failed" and progress["error"] == "Job entrypoint command failed with exit code -9"
    assert progress["shards_done"] == 1  # the rest of the file is kept

    cancelled = submit(client, settings, dataset="cancelled").json()["id"]
    fake_ray.ray_jobs[cancelled].status = "RUNNING"
    write_progress(settings, "cancelled")
    reconciler.sync()
    assert client.post(f"/v1/jobs/{cancelled}/cancel", headers=AUTH).json()["state"] == "cancelled"
    write_progress(settings, "cancelled", state="failed", error="15")  # what the driver writes on SIGTERM
    reconciler.sync()
    state, progress = _dataset_state(client, "cancelled")
    assert state == "cancelled" and progress["error"] == "cancelled", progress
    # A later job writing the same dataset owns the file again: nothing is changed under it.
    again = submit(client, settings, dataset="cancelled").json()["id"]
    write_progress(settings, "cancelled", state="running")
    reconciler.sync()
    assert _dataset_state(client, "cancelled")[0] == "running"
    assert client.get(f"/v1/jobs/{again}").json()["state"] == "queued"


def test_a_job_whose_manifest_was_written_succeeded_even_if_ray_forgot_it(client, settings, fake_ray):
    """After a restart with a new head, Ray knows no job: the manifest, written last, says it finished."""
    from datetime import UTC, datetime, timedelta

    reconciler = client.app.state.reconciler
    done, lost = (submit(client, settings, dataset=d).json()["id"] for d in ("done", "lost"))
    for job_id, dataset in ((done, "done"), (lost, "lost")):
        fake_ray.ray_jobs[job_id].status = "RUNNING"
        write_progress(settings, dataset)
    reconciler.sync()
    stamp = lambda dt: dt.isoformat(timespec="seconds")  # noqa: E731
    root = Path(settings.default_store)
    write_manifest(root, "done", created_at=stamp(datetime.now(UTC)))
    # An older manifest (from an earlier run of the same dataset) does not count.
    write_manifest(root, "lost", created_at=stamp(datetime.now(UTC) - timedelta(hours=1)))
    fake_ray.ray_jobs.clear()
    reconciler.sync()
    assert client.get(f"/v1/jobs/{done}").json()["state"] == "succeeded"
    lost_job = client.get(f"/v1/jobs/{lost}").json()
    assert lost_job["state"] == "failed" and "submit it again" in lost_job["error"]
    assert _dataset_state(client, "lost")[0] == "failed"


def test_serve_refuses_a_busy_port_before_starting_anything(tmp_path):
    """The port is bound first: a busy one is `error:` and exit 2, with no Ray head started and no token made."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
        out = subprocess.run([sys.executable, "-m", "distillery.cli", "serve", "--port", str(port),
                              "--state-dir", str(tmp_path / "state")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "state" / "ray-head.log").exists() and not (tmp_path / "state" / "token").exists()


def test_jobs_the_cluster_can_never_schedule_are_refused(client, settings, fake_ray):
    fake_ray.node_cpus = 2.0
    msg = _refused(client, spec_body(settings.default_store, resources={"threads_per_worker": 3}),
                   "resources.threads_per_worker")
    assert "largest node of the Ray cluster has 2" in msg and "never be scheduled" in msg
    assert client.get("/v1/jobs").json()["count"] == 0 and not fake_ray.ray_jobs
    # More workers than CPUs in all only queue: accepted.
    body = spec_body(settings.default_store, resources={"threads_per_worker": 2, "workers": 8})
    assert client.post("/v1/jobs", json=body, headers=AUTH).status_code == 201
