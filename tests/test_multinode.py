"""A real two-node run on this machine (`make multinode`): two `ray start` nodes of 1 CPU each, an S3 server
on loopback, the job service in front of the cluster.

A distillation job submitted over HTTP writes to s3:// with one teacher actor on each node (the sidecars name
the node of every shard); a student trains with 2 Ray Train workers, one per node, reading the dataset from S3;
and a job whose second node is killed mid-job (its whole process group, SIGKILL) and replaced by a fresh node
still finishes with the dataset hash of the undisturbed run. The student's run goes through Ray Train's storage
on S3 (`storage:`), so the driver's `out` is written by the driver alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.dataset import Manifest, Sidecar
from pipeline.storage import Store
from tests.cluster import LocalCluster
from tests.conftest import make_bucket
from tests.services.test_service_ray import TERMINAL, Service, wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 50  # 1,400 training pairs: 28 shards, so a node can die with many still to do
# Greedy to a fixed length: the few-step teacher never emits </s>, so every shard costs the same (about 1 s):
# long enough for a node to die mid-job.
DECODING = {"mode": "greedy", "max_length": 300}


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """Head + one worker node, 1 CPU each; started after the S3 server, so the nodes inherit its credentials."""
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), num_cpus=1, cwd=ROOT)
    try:
        c.start(workers=1)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def store_uri(s3_endpoint) -> str:
    return f"s3://{make_bucket(s3_endpoint)}/datasets"


@pytest.fixture(scope="module")
def service(cluster, store_uri, tmp_path_factory):
    root = tmp_path_factory.mktemp("mn-service")
    svc = Service(root / "state", store_uri, cluster.dashboard, ray_token=cluster.token)
    svc.start()
    yield svc
    svc.stop()


def job_spec(tiny_data: Path, teacher: Path, store_uri: str, endpoint: str, dataset: str) -> dict:
    return {"corpus": {"path": str(tiny_data / "train.parquet"), "id_column": "id"},
            "teacher": {"model": str(teacher), "compute_type": "int8"},
            "decoding": DECODING, "targets": {"top_k": 8},
            "output": {"store": store_uri, "dataset": dataset, "shard_size": SHARD_SIZE, "s3_endpoint": endpoint},
            "resources": {"workers": 2, "threads_per_worker": 1}}


def sidecars(store: Store, manifest: Manifest) -> list[Sidecar]:
    return [Sidecar.read(store, manifest.dataset, s.shard) for s in manifest.shards]


@pytest.fixture(scope="module")
def undisturbed(service, cluster, tiny_data, tiny_teacher, store_uri, s3_endpoint) -> dict:
    """A job submitted over HTTP to the two-node cluster and followed to the end."""
    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    r = service.post("/v1/jobs", json=job_spec(tiny_data, tiny_teacher["ct2_int8"], store_uri, s3_endpoint, "tf-2n"))
    assert r.status_code == 201, r.text
    job = service.wait_state(r.json()["id"], TERMINAL, timeout=240)
    assert job["state"] == "succeeded", f"{job}\n{service.log_tail()}"
    store = Store.from_uri(store_uri, endpoint_override=s3_endpoint)
    manifest = Manifest.read(store, "tf-2n")
    return {"job": job, "store": store, "manifest": manifest, "nodes": nodes}


def test_job_through_the_service_runs_on_both_nodes(undisturbed):
    manifest, store = undisturbed["manifest"], undisturbed["store"]
    assert manifest is not None and manifest.counts.examples == 1400 and len(manifest.shards) == 28
    written_by = [meta.node_id for meta in sidecars(store, manifest)]
    assert None not in written_by
    assert set(written_by) == undisturbed["nodes"] and len(undisturbed["nodes"]) == 2  # both nodes wrote shards
    assert undisturbed["job"]["progress"]["shards_done"] == 28


def test_student_trains_with_a_worker_on_each_node_reading_s3(undisturbed, cluster, tiny_data, tiny_tokenizer,
                                                               store_uri, s3_endpoint, tmp_path):
    # The run goes through Ray Train's storage on S3: no disk is shared between the driver and the workers' nodes.
    config = {"dataset": {"store": store_uri, "name": "tf-2n", "s3_endpoint": s3_endpoint},
              "storage": store_uri.replace("/datasets", "/runs"), "storage_s3_endpoint": s3_endpoint,
              "valid": str(tiny_data / "valid.parquet"), "tokenizer": str(tiny_tokenizer.path),
              "out": str(tmp_path / "student"), "size": "tiny", "loss": {"name": "token"},
              "workers": 2, "threads_per_worker": 1,
              "optim": {"max_steps": 6, "eval_every": 3, "warmup_steps": 2, "max_tokens": 1000, "log_every": 2}}
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "distillery.cli", "train", str(path), "--address",
                           cluster.gcs_address], cwd=ROOT, env=cluster.driver_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert results["steps"] == 6 and results["train_rows"] == 1400
    workers = results["worker_nodes"]
    assert len(workers) == 2 and set(workers) == undisturbed["nodes"], workers  # rank 0 and rank 1 on different nodes
    reports = Store.from_uri(config["storage"], endpoint_override=s3_endpoint).list("")
    assert any(e.path.endswith("checkpoint/model.safetensors") for e in reports)  # the run went through S3


def test_worker_node_killed_mid_job_gives_the_same_dataset(undisturbed, service, cluster, tiny_data, tiny_teacher,
                                                           store_uri, s3_endpoint):
    spec = job_spec(tiny_data, tiny_teacher["ct2_int8"], store_uri, s3_endpoint, "tf-2n-killed")
    head = next(n["node_id"] for n in cluster.alive_nodes() if n.get("is_head_node"))
    (second,) = undisturbed["nodes"] - {head}
    job_id = service.post("/v1/jobs", json=spec).json()["id"]
    store = undisturbed["store"]

    def writers() -> set[str]:  # the nodes named by the sidecars written so far
        return {store.read_json(e.path).get("node_id") for e in store.list("tf-2n-killed", suffix=".json")
                if e.path.rsplit("/", 1)[-1].startswith("_part-")}

    wait_for(lambda: second in writers(), 180, "a shard written by the second node")
    cluster.workers[0].kill()  # the second node's raylet, object store and teacher actor, all at once
    assert service.job(job_id)["state"] == "running"  # killed mid-job, not after it
    cluster.wait_nodes(1, timeout=60)  # the head has declared it dead
    # A fresh node takes its place, as KubeRay or the autoscaler would start one: Ray restarts the lost actor
    # there and retries its shard (the head's one CPU is taken by the other actor).
    new = cluster.add_node()
    job = service.wait_state(job_id, TERMINAL, timeout=240)
    assert job["state"] == "succeeded", f"{job}\n{service.log_tail()}"
    manifest = Manifest.read(store, "tf-2n-killed")
    assert manifest.dataset_hash == undisturbed["manifest"].dataset_hash
    # Every shard was written by a node of this cluster. Which ones is Ray's choice: the dead node's finished
    # shards are normally kept, and its in-flight shard is retried on the head's actor or on the new node's.
    nodes = {n["node_id"] for n in cluster.alive_nodes()}
    assert {meta.node_id for meta in sidecars(store, manifest)} <= undisturbed["nodes"] | nodes
    assert len(nodes) == 2 and new.proc.poll() is None
