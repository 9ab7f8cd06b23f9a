"""Corpus → validated, split Parquet files: the input of tokenizer and teacher training.

Output directory::

    train.parquet valid.parquet test.parquet   columns id, index, source, target
    rejects.jsonl                              one line per rejected record, with its reason
    prepare.json                               counts per split and per reject reason
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.corpus import CorpusSpec, FilterSpec, read_corpus
from pipeline.split import SplitSpec, split_table

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Prepared:
    out: Path
    counts: dict[str, int]
    total: int
    rejected: dict[str, int]

    def path(self, split: str) -> Path:
        return self.out / f"{split}.parquet"


def prepare(corpus: CorpusSpec, split: SplitSpec, out: Path, *, filters: FilterSpec | None = None) -> Prepared:
    """Reads, validates and splits ``corpus`` into ``out``; the report is written last."""
    out.mkdir(parents=True, exist_ok=True)
    result = read_corpus(corpus, filters or FilterSpec(), rejects_path=out / "rejects.jsonl")
    if result.kept == 0:
        raise ValueError(f"no usable pairs in {corpus.path}: {result.summary()}")
    parts = split_table(result.table, split)
    for name in SPLITS:
        pq.write_table(parts[name], out / f"{name}.parquet", compression="zstd")
    report = {
        "corpus": corpus.model_dump(mode="json"),
        "split": split.model_dump(mode="json"),
        "total": result.total,
        "rejected": result.rejected,
        "counts": {name: parts[name].num_rows for name in SPLITS},
    }
    (out / "prepare.json").write_text(json.dumps(report, indent=2))
    return Prepared(out=out, counts=report["counts"], total=result.total, rejected=result.rejected)


def load_prepared(out: Path) -> Prepared | None:
    """The result of an earlier ``prepare`` into ``out``, or None if it did not finish."""
    report = out / "prepare.json"
    if not report.is_file() or not all((out / f"{s}.parquet").is_file() for s in SPLITS):
        return None
    data = json.loads(report.read_text())
    return Prepared(out=out, counts=data["counts"], total=data["total"], rejected=data["rejected"])
