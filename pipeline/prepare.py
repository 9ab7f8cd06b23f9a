"""Corpus → validated, split Parquet files: the input of tokenizer and teacher training.

Output directory::

    train.parquet valid.parquet test.parquet   columns id, index, source, target
    rejects.jsonl                              one line per rejected record, with its reason
    prepare.json                               counts per split and per reject reason
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.corpus import CorpusSpec, FilterSpec, read_corpus
from pipeline.errors import InputError
from pipeline.split import SplitSpec, split_corpus

SPLITS = ("train", "valid", "test")
REPORT = "prepare.json"


@dataclass(frozen=True)
class Prepared:
    out: Path
    counts: dict[str, int]
    total: int
    rejected: dict[str, int]
    duplicates: dict[str, int] = field(default_factory=dict)  # pairs, sources, merged_groups (see split_corpus)

    def path(self, split: str) -> Path:
        return self.out / f"{split}.parquet"


def prepare(corpus: CorpusSpec, split: SplitSpec, out: Path, *, filters: FilterSpec | None = None) -> Prepared:
    """Reads, validates and splits ``corpus`` into ``out``.

    Everything is written to a temporary directory first and moved into ``out`` at the end, the report last:
    a refused corpus leaves no ``out`` behind, and a complete report means complete splits.

    Raises:
        CorpusError: the corpus cannot be read; InputError: no usable pairs.
    """
    with tempfile.TemporaryDirectory(prefix="distillery-prepare-") as tmp:
        staging = Path(tmp)
        result = read_corpus(corpus, filters or FilterSpec(), rejects_path=staging / "rejects.jsonl")
        if result.kept == 0:
            raise InputError(f"no usable pairs in {corpus.path}: {result.summary()}")
        parts = split_corpus(result.table, split)
        for name in SPLITS:
            pq.write_table(parts.parts[name], staging / f"{name}.parquet", compression="zstd")
        report = {
            "corpus": corpus.model_dump(mode="json"),
            "split": split.model_dump(mode="json"),
            "total": result.total,
            "rejected": result.rejected,
            "counts": {name: parts.parts[name].num_rows for name in SPLITS},
            # Repeats are kept (unless filters.dedupe), but never on two sides of a split.
            "duplicates": {"pairs": parts.duplicate_pairs, "sources": parts.duplicate_sources,
                           "merged_groups": parts.merged_groups},
        }
        (staging / REPORT).write_text(json.dumps(report, indent=2))
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT).unlink(missing_ok=True)  # an interrupted move never leaves an old report over new splits
        for name in ["rejects.jsonl", *(f"{s}.parquet" for s in SPLITS), REPORT]:
            shutil.move(staging / name, out / name)
    return Prepared(out=out, counts=report["counts"], total=result.total, rejected=result.rejected,
                    duplicates=report["duplicates"])


def load_prepared(out: Path) -> Prepared | None:
    """The result of an earlier ``prepare`` into ``out``, or None if it did not finish."""
    report = out / REPORT
    if not report.is_file() or not all((out / f"{s}.parquet").is_file() for s in SPLITS):
        return None
    data = json.loads(report.read_text())
    return Prepared(out=out, counts=data["counts"], total=data["total"], rejected=data["rejected"],
                    duplicates=data.get("duplicates", {}))
