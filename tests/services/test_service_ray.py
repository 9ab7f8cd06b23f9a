"""The real thing: `distillery serve` (uvicorn) on a loopback port, a real local Ray head, real jobs.

One Ray head and one service process are shared by the module; jobs use the tiny CTranslate2 teacher.
Covered: submit over HTTP → succeeded → dataset readable; a job started with `ray job submit` shows up;
cancel a running job (CLI client); restart the service mid-job and see the job re-attached and finishing;
the embedded head starts with the service and stops with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml

from services.launcher import EmbeddedHead, free_port
from tests.services.conftest import AUTH, TOKEN

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (Linux /proc), with its command line."""
    parents: dict[int, int] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            parents[int(stat_file.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    found[child] = ""
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead
    except (OSError, IndexError):
        return False


class Service:
    """`python -m distillery.cli serve` in a subprocess; stop/start keep the state dir (a restart)."""

    def __init__(self, state: Path, store: Path, ray_address: str | None, ray_token: str | None) -> None:
        self.state, self.store, self.ray_address = state, store, ray_address
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Inputs (the corpora and the teacher) live in pytest's temporary directories: that is the root.
        roots = json.dumps([str(state.parents[1])])
        self.env = os.environ | {"DISTILLERY_TOKEN": TOKEN, "DISTILLERY_RECONCILE_INTERVAL_S": "0.5",
                                 "DISTILLERY_URL": self.url, "DISTILLERY_RAY_NUM_CPUS": "2",
                                 "DISTILLERY_CORPUS_ROOTS": roots, "DISTILLERY_MODEL_ROOTS": roots}
        if ray_token:
            self.env["DISTILLERY_RAY_TOKEN"] = ray_token
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "distillery.cli", "serve", "--port", str(self.port),
               "--state-dir", str(self.state), "--store", str(self.store)]
        if self.ray_address:
            cmd += ["--ray-address", self.ray_address]
        log = open(self.state.parent / f"{self.state.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up():
            assert self.proc.poll() is None, f"service exited with {self.proc.returncode}:\n{self.log_tail()}"
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout, "the service to answer /healthz")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=90)

    def log_tail(self) -> str:
        path = self.state.parent / f"{self.state.name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-40:]) if path.exists() else ""

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, headers=AUTH, timeout=30, **kw)

    def job(self, job_id: str) -> dict:
        r = self.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_state(self, job_id: str, states: set[str], timeout: float = 240, seen: list | None = None) -> dict:
        def reached():
            job = self.job(job_id)
            if seen is not None and (not seen or seen[-1] != job["state"]):
                seen.append(job["state"])
            return job if job["state"] in states else None

        try:
            return wait_for(reached, timeout, f"job {job_id} to become {states}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; job: {self.job(job_id)}\nservice log:\n{self.log_tail()}") from None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distillery.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = EmbeddedHead(tmp_path_factory.mktemp("ray-head"), num_cpus=2, cwd=ROOT)
    head.start()
    yield head
    head.stop()


@pytest.fixture(scope="module")
def service(ray_head, tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    svc = Service(root / "state", root / "datasets", ray_head.address, ray_head.token)
    svc.start()
    yield svc
    svc.stop()


def write_corpus(tiny_data: Path, out: Path, n: int) -> Path:
    import pyarrow.parquet as pq

    table = pq.read_table(tiny_data / "train.parquet").slice(0, n)
    lines = [f"{s}\t{t}" for s, t in zip(table["source"].to_pylist(), table["target"].to_pylist(), strict=True)]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def corpus(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """TSV corpora: 'small' (60 lines) for quick jobs, 'long' (400 lines) for jobs to cancel or outlive a restart."""
    root = tmp_path_factory.mktemp("corpus")
    return {"small": write_corpus(tiny_data, root / "small.tsv", 60),
            "long": write_corpus(tiny_data, root / "long.tsv", 400)}


def make_spec(corpus: dict[str, Path], teacher: Path, store: Path, dataset: str, *, slow: bool = False) -> dict:
    spec = {
        "corpus": {"path": str(corpus["long" if slow else "small"])},
        "teacher": {"model": str(teacher), "compute_type": "int8"},
        "targets": {"top_k": 4},
        "output": {"store": str(store), "dataset": dataset, "shard_size": 25},
        "resources": {"workers": 1, "threads_per_worker": 1},
    }
    if slow:  # the undertrained teacher never emits </s>: 20 shards × 20 examples × 500 steps ≈ 1–2 s per shard
        spec["decoding"] = {"mode": "greedy", "max_length": 500}
        spec["output"]["shard_size"] = 20
    return spec


@pytest.fixture(scope="module")
def finished(service, corpus, tiny_teacher, tmp_path_factory):
    """A small job submitted over HTTP and followed to the end, with the states it went through."""
    spec = make_spec(corpus, tiny_teacher["ct2_int8"], service.store, "tf-small")
    r = service.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    seen: list[str] = []
    job = service.wait_state(r.json()["id"], TERMINAL, seen=seen)
    spec_file = tmp_path_factory.mktemp("specs") / "tf-small.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    return {"location": r.headers["location"], "job": job, "seen": seen, "spec_file": spec_file}


def test_job_runs_to_succeeded_and_its_dataset_is_served(service, finished):
    job = finished["job"]
    assert job["state"] == "succeeded", f"{job}\n{service.log_tail()}"
    assert finished["location"] == f"/v1/jobs/{job['id']}"
    assert finished["seen"][-1] == "succeeded" and set(finished["seen"]) <= {"queued", "running", "succeeded"}
    assert job["started_at"] and job["finished_at"] and job["error"] is None
    p = job["progress"]
    assert p["shards_done"] == p["shards_total"] == 3 and p["percent"] == 100.0 and p["examples_done"] == 60
    dataset = service.get("/v1/datasets/tf-small").json()
    assert dataset["complete"] and dataset["examples"] == 60 and dataset["shards"] == 3
    assert dataset["manifest"]["counts"]["examples"] == 60 and dataset["manifest"]["dataset_hash"].startswith("sha256:")
    assert dataset["bytes_on_disk"] > dataset["bytes"] > 0
    # Datasets are private to the service's user (DISTILLERY_DATASET_UMASK, default 077), workers' shards too.
    files = list((service.store / "tf-small").iterdir())
    assert any(f.name.startswith("part-") for f in files)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
    assert stat.S_IMODE((service.store / "tf-small").stat().st_mode) == 0o700
    assert [d["name"] for d in service.get("/v1/datasets").json()["data"]] == ["tf-small"]
    assert 'distillery_jobs{state="succeeded"}' in service.get("/metrics").text
    listed = service.cli("jobs", "list", "--state", "succeeded")
    assert listed.returncode == 0 and job["id"] in listed.stdout


def test_job_started_with_ray_job_submit_shows_up(service, ray_head, finished):
    """The same spec again, through Ray's own CLI: every shard is reused, so it finishes fast."""
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head.token}
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "job", "submit", "--address", ray_head.address, "--submission-id", "raysubmit_direct1",
                    "--no-wait", "--", sys.executable, "-m", "pipeline", "run", str(finished["spec_file"])],
                   env=env, check=True, capture_output=True, timeout=120)
    wait_for(lambda: service.get("/v1/jobs/raysubmit_direct1").status_code == 200, 30, "discovery")
    job = service.wait_state("raysubmit_direct1", TERMINAL)
    assert job["origin"] == "ray" and job["dataset"] == "tf-small" and job["state"] == "succeeded", job
    assert job["progress"]["shards_skipped"] == 3


def test_cancel_running_job(service, corpus, tiny_teacher, tmp_path):
    spec_file = tmp_path / "slow.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec(corpus, tiny_teacher["ct2_int8"], service.store, "slow-cancel",
                                                  slow=True)))
    submitted = service.cli("jobs", "submit", str(spec_file))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    service.wait_state(job_id, {"running"} | TERMINAL)
    wait_for(lambda: (service.job(job_id)["progress"] or {}).get("shards_done", 0) >= 1, 180, "a first shard")
    cancelled = service.cli("jobs", "cancel", job_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stderr, cancelled.stderr
    assert service.cli("jobs", "cancel", job_id).returncode == 2  # already cancelled: 409 → exit 2
    time.sleep(3)  # the reconciler sees Ray's STOPPED; the state stays cancelled
    job = service.job(job_id)
    assert job["state"] == "cancelled" and job["finished_at"]
    dataset = service.store / "slow-cancel"
    assert not (dataset / "_manifest.json").exists()
    assert list(dataset.glob("part-*.parquet"))  # complete shards stay for a resume
    # The dataset says so too (the driver, stopped with SIGTERM, had written "failed" with error "15").
    wait_for(lambda: service.get("/v1/datasets/slow-cancel").json()["state"] == "cancelled", 30,
             f"the dataset to show cancelled: {service.get('/v1/datasets/slow-cancel').json()}")
    watch = service.cli("jobs", "status", job_id, "--watch")
    assert watch.returncode == 1  # --watch: 0 only for succeeded


def test_restart_mid_job_reattaches(service, corpus, tiny_teacher):
    spec = make_spec(corpus, tiny_teacher["ct2_int8"], service.store, "slow-restart", slow=True)
    job_id = service.post("/v1/jobs", json=spec).json()["id"]
    wait_for(lambda: (service.job(job_id)["progress"] or {}).get("shards_done", 0) >= 1, 180, "a first shard")
    assert service.job(job_id)["state"] == "running"
    service.stop()
    restarted = time.time()
    service.start()
    job = service.job(job_id)  # re-attached at startup, before the first request
    assert job["state"] == "running" and job["id"] == job_id, job
    job = service.wait_state(job_id, TERMINAL, timeout=300)
    assert job["state"] == "succeeded", f"{job}\n{service.log_tail()}"
    assert job["progress"]["percent"] == 100.0 and job["finished_at"] > job["started_at"]
    # It finished after the restart, so the new process tracked it to the end.
    assert datetime.fromisoformat(job["finished_at"]).timestamp() >= restarted
    assert (service.store / "slow-restart" / "_manifest.json").exists()
    watch = service.cli("jobs", "status", job_id, "--watch")
    assert watch.returncode == 0 and "succeeded" in watch.stdout


def test_embedded_head_starts_and_stops_with_the_service(tmp_path):
    svc = Service(tmp_path / "state", tmp_path / "datasets", ray_address=None, ray_token=None)
    svc.start(timeout=180)
    try:
        health = svc.get("/healthz").json()
        assert health["ray_embedded"] and health["ray_reachable"] and health["ray_address"].startswith("http://127.")
        assert stat.S_IMODE(os.stat(tmp_path / "state" / "ray_token").st_mode) == 0o600
        children = descendants(svc.proc.pid)
        assert any("ray start" in cmd or "gcs_server" in cmd for cmd in children.values()), children
    finally:
        svc.stop()

    wait_for(lambda: not any(alive(pid) for pid in children), 60, "the embedded head's processes to exit")


def test_unschedulable_job_is_refused_at_submission(service, corpus, tiny_teacher):
    """The head has 2 CPUs: a worker reserving 3 could never start; the service says so instead of waiting."""
    spec = make_spec(corpus, tiny_teacher["ct2_int8"], service.store, "too-big")
    spec["resources"]["threads_per_worker"] = 3
    r = service.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "resources", "threads_per_worker"] and "has 2" in error["msg"], error


def test_service_killed_with_sigkill_reattaches_to_its_head(tmp_path, corpus, tiny_teacher):
    """kill -9 of the service mid-job: the job finishes on the orphaned head; the restarted service re-attaches
    to that head (no second one), reports the job succeeded, and stops the head for good when it stops."""
    svc = Service(tmp_path / "state", tmp_path / "datasets", ray_address=None, ray_token=None)
    svc.start(timeout=180)
    record = tmp_path / "state" / "ray-head.json"
    head_processes = set(descendants(svc.proc.pid))  # the head and everything it runs
    try:
        head = json.loads(record.read_text())
        spec = make_spec(corpus, tiny_teacher["ct2_int8"], svc.store, "killed-service")
        r = svc.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        svc.proc.kill()  # SIGKILL: no shutdown, the head is orphaned
        svc.proc.wait()
        assert alive(head["pid"])
        wait_for(lambda: (svc.store / "killed-service" / "_manifest.json").exists(), 240,
                 "the job to finish on the orphaned head")
        svc.start(timeout=180)
        job = svc.wait_state(r.json()["id"], TERMINAL, timeout=60)
        assert job["state"] == "succeeded", f"{job}\n{svc.log_tail()}"
        assert json.loads(record.read_text()) == head  # the same head, re-attached
        assert svc.get("/healthz").json()["ray_address"] == head["address"]
        second = {pid: cmd for pid, cmd in descendants(svc.proc.pid).items() if "ray" in cmd}
        assert not second, second
    except BaseException:
        svc.stop()
        for pid in head_processes:  # e.g. an orphaned head nobody re-attached to: do not leave it running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        raise
    svc.stop()
    wait_for(lambda: not any(alive(pid) for pid in head_processes), 60, "the head's processes to exit")
    assert not record.exists() and not EmbeddedHead(tmp_path / "state").temp_dir.exists()
