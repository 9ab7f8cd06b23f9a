"""Shared fixtures: a small real corpus (the bundled Bible), a tokenizer trained on it, a tiny Marian
teacher trained for a few steps and exported to CTranslate2, and a local S3 server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUNDLED = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "bible-de-en.parquet"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """train/valid/test Parquet files (id, index, source, target) from the first Bible chapters."""
    out = tmp_path_factory.mktemp("tiny_data")
    table = pq.read_table(BUNDLED).slice(0, 1600)
    table = pa.table({"id": table["id"], "index": pa.array(range(table.num_rows), pa.int64()),
                      "source": table["de"], "target": table["en"]})
    pq.write_table(table.slice(0, 1400), out / "train.parquet")
    pq.write_table(table.slice(1400, 100), out / "valid.parquet")
    pq.write_table(table.slice(1500, 100), out / "test.parquet")
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_data, tmp_path_factory):
    from pipeline.tokenizer import train_tokenizer

    train = pq.read_table(tiny_data / "train.parquet")
    texts = train.column("source").to_pylist() + train.column("target").to_pylist()
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=600)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_data, tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A 'tiny' Marian trained for 60 steps (peaked enough distributions for parity checks)."""
    from trainers.export import export_ct2
    from trainers.loop import OptimConfig
    from trainers.teacher import TeacherConfig, train_teacher

    run = tmp_path_factory.mktemp("teacher")
    cfg = TeacherConfig(train=tiny_data / "train.parquet", valid=tiny_data / "valid.parquet",
                        tokenizer=tiny_tokenizer.path, out=run, size="tiny", threads=2,
                        optim=OptimConfig(max_steps=60, eval_every=30, warmup_steps=10, lr=3e-3,
                                          max_tokens=2048))
    train_teacher(cfg, progress_bar=False)
    return {
        "run": run,
        "hf": run / "best",
        "ct2_f32": export_ct2(run / "best", run / "ct2-float32", quantization="float32"),
        "ct2_int8": export_ct2(run / "best", run / "ct2-int8", quantization="int8"),
    }


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free local port, with dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never wait on instance metadata
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def make_bucket(endpoint: str) -> str:
    """A fresh bucket, so that tests never see each other's objects."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    host = endpoint.removeprefix("http://")
    admin = pafs.S3FileSystem(
        scheme="http", endpoint_override=host, region="us-east-1", allow_bucket_creation=True
    )
    admin.create_dir(name)
    return name


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole session (starting one costs seconds)."""
    import ray

    from pipeline.run import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_distilled(ray_local, tiny_data, tiny_teacher, tmp_path_factory) -> dict:
    """Two datasets distilled by the real pipeline from the tiny teacher over the tiny train split:
    teacher-forced top-8 along the references, and beam-4 2-best hypotheses with their own top-8."""
    from pipeline.run import run_job
    from pipeline.spec import JobSpec

    store = tmp_path_factory.mktemp("datasets")
    common = {
        "corpus": {"path": str(tiny_data / "train.parquet"), "id_column": "id"},
        "teacher": {"model": str(tiny_teacher["ct2_int8"])},
        "targets": {"top_k": 8},
        "resources": {"workers": 1, "threads_per_worker": 2},
    }
    out = {"store": str(store)}
    for name, decoding in {"tf": {"mode": "teacher_forcing"},
                           "beam": {"mode": "beam", "beam_size": 4, "num_hypotheses": 2, "max_length": 48}}.items():
        spec = JobSpec.model_validate(common | {"decoding": decoding,
                                                "output": {"store": str(store), "dataset": name, "shard_size": 500}})
        out[name] = run_job(spec)
    return out
