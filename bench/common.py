"""Shared setup for the benchmarks: a 6+6-layer d512 Marian teacher (int8) over the bundled corpus.

The weights are random (seeded): throughput does not depend on what the weights say, and every system in a
comparison decodes the same sentences to the same lengths. Built once under ``work/bench/`` and reused.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "work" / "bench"
VOCAB = 8000


def setup(work: Path = WORK) -> dict[str, Path]:
    """Tokenizer, HF checkpoint and CT2 int8 teacher of the 'base' preset (6+6, d512, 8k vocabulary)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from distillery.cli import quiet_libraries

    quiet_libraries()
    import torch

    from pipeline.tokenizer import Tokenizer
    from trainers.export import export_ct2
    from trainers.models import build_marian

    paths = {"tokenizer": bench_tokenizer(work), "hf": work / "teacher-hf", "ct2": work / "teacher-ct2"}
    tok = Tokenizer.load(paths["tokenizer"])
    if not (paths["ct2"] / "model.bin").is_file():
        torch.manual_seed(0)
        model = build_marian("base", vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id)
        model.save_pretrained(paths["hf"])
        tok.hf.save_pretrained(paths["hf"])
        export_ct2(paths["hf"], paths["ct2"], quantization="int8")
    return paths


def bench_tokenizer(work: Path = WORK) -> Path:
    """The benchmarks' shared Unigram tokenizer (8k) over the bundled corpus."""
    from pipeline.bundled import BUNDLED_CORPUS
    from pipeline.tokenizer import train_tokenizer

    path = work / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        table = pq.read_table(BUNDLED_CORPUS)
        train_tokenizer(table["de"].to_pylist() + table["en"].to_pylist(), path, vocab_size=VOCAB)
    return path


def corpus_file(n: int, work: Path = WORK) -> Path:
    """The first ``n`` German sentences of the bundled corpus as a Parquet corpus (source/target)."""
    from pipeline.bundled import BUNDLED_CORPUS

    path = work / f"corpus-{n}.parquet"
    if not path.is_file():
        table = pq.read_table(BUNDLED_CORPUS)
        reps = -(-n // table.num_rows)  # repeat the corpus for sizes beyond it
        src = (table["de"].to_pylist() * reps)[:n]
        tgt = (table["en"].to_pylist() * reps)[:n]
        pq.write_table(pa.table({"source": src, "target": tgt}), path)
    return path


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def measure_job(spec) -> dict:
    """Runs a distillation job from scratch and returns its throughput: whole job, and the workers' steady state
    (target tokens over the workers' summed shard time, divided by the workers running in parallel)."""
    import shutil

    from pipeline.dataset import Sidecar, sidecar_file
    from pipeline.run import run_job

    name = spec.output.dataset
    shutil.rmtree(Path(spec.output.store) / name, ignore_errors=True)
    with Timer() as t:
        manifest = run_job(spec)
    sidecars = [Sidecar.model_validate_json((Path(spec.output.store) / name / sidecar_file(s.shard)).read_text())
                for s in manifest.shards]
    tokens = manifest.counts.target_tokens
    busy = sum(s.seconds for s in sidecars) / spec.resources.workers
    return {"job_tok_s": tokens / t.seconds, "worker_tok_s": tokens / busy, "tokens": tokens,
            "bytes_per_token": manifest.counts.bytes / tokens, "seconds": t.seconds}
