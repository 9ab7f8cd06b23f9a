"""Peak memory of a student-training worker at 1× and 10× the corpus size: it should stay flat (goal ≤ 1.2).

    .venv/bin/python bench/trainer_memory.py [--rows 60000] [--steps 40] [--workers 1]

The 1× dataset is written here as synthetic shards that pass ``pipeline.schema.check``: real token ids (the
bundled Bible's sentence pairs, tokenized, as a teacher-forcing job stores them) with a synthetic top-8 (the
label first, sorted log-probs, the tail computed as the pipeline computes it). The 10× dataset lists the same
shard files ten times (hard links, so no extra disk) under a manifest of its own. Each size trains a ``tiny``
token-KD student for ``--steps`` steps through ``trainers.student.train_student`` (Ray Train) in a fresh process;
every worker reports its peak RSS (``ru_maxrss``) in ``metrics.jsonl``'s ``memory`` record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import WORK

HERE = WORK / "trainer-memory"
K = 8
SHARD_ROWS = 2000


def tokenizer():
    from pipeline.bundled import BUNDLED_CORPUS
    from pipeline.tokenizer import Tokenizer, train_tokenizer

    path = HERE / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        table = pq.read_table(BUNDLED_CORPUS).slice(0, 5000)
        train_tokenizer(table["de"].to_pylist() + table["en"].to_pylist(), path, vocab_size=1000)
    return Tokenizer.load(path)


def shard(tok, sources: list[str], targets: list[str], first: int) -> pa.Table:
    """One teacher-forcing shard: the pairs' real ids, a synthetic top-k whose best entry is the label."""
    from pipeline import schema

    src, tgt = tok.encode_source(sources), tok.encode_target(targets)
    lengths = np.array([len(t) for t in tgt])
    labels = np.concatenate([np.asarray(t) for t in tgt])
    rng = np.random.default_rng(first)
    ids = np.concatenate([labels[:, None], rng.integers(0, len(tok) - 1, (len(labels), K - 1))], axis=1)
    logprobs = -np.sort(rng.exponential(2.0, (len(labels), K)), axis=1) - 0.05
    topk_ids, topk_lp = schema.topk_arrays(ids, logprobs, lengths)
    n, ids_type = len(sources), pa.list_(pa.int32())
    scores = np.add.reduceat(logprobs[:, 0], np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    table = pa.table({
        "id": pa.array([str(first + i) for i in range(n)]), "index": pa.array(range(first, first + n), pa.int64()),
        "source": sources, "target": targets, "source_ids": pa.array(src, ids_type),
        "target_ids": pa.array(tgt, ids_type), "hyp_rank": pa.array(np.zeros(n, np.int16)),
        "hyp_kind": pa.array(["reference"] * n), "hyp_text": targets, "hyp_ids": pa.array(tgt, ids_type),
        "score": pa.array(scores.astype(np.float32)), "topk_ids": topk_ids, "topk_logprobs": topk_lp,
        "tail_logprob": schema.list_array(pa.array(schema.tail_logprob(logprobs).astype(np.float16)), lengths),
        "noise": pa.array([""] * n)}, schema=schema.shard_schema(K))
    schema.check(table, top_k=K, vocab_size=len(tok))
    return table


def write_manifest(store, name: str, tok, entries: list) -> None:
    from pipeline.dataset import Counts, Manifest, TeacherInfo, TokenizerInfo
    from pipeline.run import sha256_bytes

    Manifest(schema_version=1, spec_version=1, dataset=name, created_at=datetime.now(UTC).isoformat(),
             spec={"synthetic": "bench/trainer_memory.py"}, fingerprint=name,
             teacher=TeacherInfo(model="synthetic", hash="sha256:0", compute_type="none"),
             tokenizer=TokenizerInfo(path=str(tok.path), vocab_hash=tok.vocab_hash), top_k=K,
             counts=Counts(records_read=sum(e.examples for e in entries), examples=sum(e.examples for e in entries),
                           rows=sum(e.rows for e in entries), target_tokens=sum(e.target_tokens for e in entries),
                           bytes=sum(e.bytes for e in entries), rejected={}),
             shards=entries, dataset_hash=sha256_bytes("".join(f"{e.name}:{e.sha256}\n" for e in entries).encode()),
             versions={"pyarrow": pa.__version__}).write(store, name)


def datasets(rows: int) -> None:
    """``x1`` (``rows`` synthetic rows in shards of 2,000) and ``x10`` (its shards listed ten times)."""
    from pipeline.bundled import BUNDLED_CORPUS
    from pipeline.dataset import ShardEntry, shard_file
    from pipeline.run import sha256_bytes
    from pipeline.storage import Store

    tok = tokenizer()
    store = Store.from_uri(str(HERE / "datasets"))
    if store.exists(f"x1-{rows}/_manifest.json") and store.exists(f"x10-{rows}/_manifest.json"):
        return
    corpus = pq.read_table(BUNDLED_CORPUS)
    pq.write_table(pa.table({"source": corpus["de"].slice(30000, 100), "target": corpus["en"].slice(30000, 100)}),
                   HERE / "valid.parquet")
    entries = []
    for i, first in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - first)
        at = [(first + j) % 30000 for j in range(n)]  # the first 30,000 pairs, repeated for larger sizes
        table = shard(tok, corpus["de"].take(at).to_pylist(), corpus["en"].take(at).to_pylist(), first)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        store.write_bytes_atomic(f"x1-{rows}/{shard_file(i)}", data)
        entries.append(ShardEntry(name=shard_file(i), shard=i, first_index=first, last_index=first + n - 1,
                                  examples=n, rows=n, target_tokens=_target_tokens(table), bytes=len(data),
                                  sha256=sha256_bytes(data)))
    write_manifest(store, f"x1-{rows}", tok, entries)
    ten = []
    for copy in range(10):
        for e in entries:
            i = copy * len(entries) + e.shard
            target = HERE / "datasets" / f"x10-{rows}" / shard_file(i)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(HERE / "datasets" / f"x1-{rows}" / e.name, target)
            ten.append(e.model_copy(update={"name": shard_file(i), "shard": i}))
    write_manifest(store, f"x10-{rows}", tok, ten)


def _target_tokens(table: pa.Table) -> int:
    import pyarrow.compute as pc

    return pc.sum(pc.list_value_length(table["hyp_ids"])).as_py()


def child(name: str, steps: int, workers: int) -> None:
    from distillery.cli import quiet_libraries
    from pipeline.run import peak_rss_mb
    from trainers.loop import OptimConfig
    from trainers.losses import LossConfig
    from trainers.student import DatasetRef, StudentConfig, train_student

    quiet_libraries()
    out = HERE / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = StudentConfig(dataset=DatasetRef(store=str(HERE / "datasets"), name=name), valid=HERE / "valid.parquet",
                        tokenizer=HERE / "tokenizer", out=out, size="tiny", loss=LossConfig(name="token"),
                        workers=workers, threads_per_worker=max(1, 2 // workers),
                        optim=OptimConfig(max_steps=steps, eval_every=10 * steps, max_tokens=3000, warmup_steps=10))
    results = train_student(cfg)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = [e for e in events if e["event"] == "memory"][-1]["peak_rss_mb"]
    print(json.dumps({"dataset": name, "rows": results["train_rows"], "workers_peak_mb": memory,
                      "driver_peak_mb": peak_rss_mb(), "steps": results["steps"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=60_000, help="rows of the 1× dataset")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.workers)
    HERE.mkdir(parents=True, exist_ok=True)
    datasets(args.rows)
    results = []
    for name in (f"x1-{args.rows}", f"x10-{args.rows}"):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--workers",
                              str(args.workers)], check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"student tiny, token KD, top-{K}, {args.workers} worker(s), {args.steps} steps, shards of {SHARD_ROWS:,} "
          "rows, shuffle_window 50,000")
    print(f"{'dataset':>14} {'rows':>10} {'worker peak MB':>16} {'driver peak MB':>15}")
    for r in results:
        print(f"{r['dataset']:>14} {r['rows']:>10,} {max(r['workers_peak_mb']):>16,.0f} {r['driver_peak_mb']:>15,.0f}")
    one, ten = (max(r["workers_peak_mb"]) for r in results)
    print(f"worker peak 10× ÷ 1×: {ten / one:.2f} (goal ≤ 1.2)")


if __name__ == "__main__":
    main()
