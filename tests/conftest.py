"""Shared fixtures: a small real corpus (the bundled Bible), a tokenizer trained on it, and a tiny Marian
teacher trained for a few steps and exported to CTranslate2. Built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
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
