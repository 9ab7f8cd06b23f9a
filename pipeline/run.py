"""The distillation job driver: corpus → Ray Data actor pool of TeacherWorkers → shards → manifest.

The unit of work is a **shard**: a fixed range of corpus rows (``shard_size`` examples), so shard *i* always
holds the same examples and a retried or re-run shard rewrites the same file. Ray Data maps shard
descriptors through ``TeacherWorker`` actors; each actor reads its examples from the object store, writes
its shard atomically (temp name → rename) plus a small ``.json`` sidecar, and returns only that metadata:
the driver never holds logits or shard data. The manifest is written last, from the sidecars.

Dataset layout under ``<store>/<dataset>/``::

    part-00000.parquet    shard rows (see pipeline.schema)
    _part-00000.json      sidecar: rows, positions, bytes, sha256, index range
    _job.json             spec + fingerprint of the inputs (a re-run must match it)
    _rejects.jsonl        corpus records rejected, with line and reason
    _progress.json        shards done/total, rates, ETA — for any reader (the service)
    _manifest.json        written last: the dataset is complete and valid

Every file but the shards starts with ``_``, which pyarrow.dataset, Spark and Hive skip, so the dataset
directory opens as it is in any Parquet reader.
"""


from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.corpus import read_corpus
from pipeline.ct2 import check_model_dir, check_vocabulary, model_hash
from pipeline.spec import JobSpec
from pipeline.storage import Store
from pipeline.tokenizer import Tokenizer

MANIFEST = "_manifest.json"
PROGRESS = "_progress.json"
JOB = "_job.json"
REJECTS = "_rejects.jsonl"
NOISE_VOCAB_SIZE = 20000  # most frequent words per side used for substitution noise


class JobError(ValueError):
    """The job cannot run (bad inputs, a dataset made from other inputs, …); nothing was written."""


@dataclass
class Progress:
    """What ``_progress.json`` holds; written by the driver after every shard."""

    state: str
    shards_total: int
    shards_done: int = 0
    shards_skipped: int = 0
    examples_total: int = 0
    examples_done: int = 0
    rows_done: int = 0
    target_tokens_done: int = 0
    bytes_written: int = 0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    eta_s: float | None = None
    error: str = ""
    updated_at: str = ""


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def shard_name(i: int) -> str:
    return f"part-{i:05d}"


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _fingerprint(spec: JobSpec, teacher: str, vocab: str, corpus: pa.Table) -> str:
    """Identity of everything that determines shard content (not resources or the output place)."""
    payload = spec.model_dump(mode="json", exclude={"resources", "output"})
    payload["output"] = {"shard_size": spec.output.shard_size}
    payload["teacher"].pop("model"), payload["teacher"].pop("tokenizer")
    digest = hashlib.sha256()  # incremental: never one copy of the whole corpus in memory
    for col in ("id", "source", "target"):
        for chunk in corpus.column(col).chunks:
            for value in chunk.to_pylist():
                digest.update(value.encode() + b"\0")
    payload["corpus"] = digest.hexdigest()
    payload |= {"teacher_hash": teacher, "vocab_hash": vocab}
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())


def _noise_vocab(corpus: pa.Table, spec: JobSpec) -> dict[str, list[str]]:
    if not spec.noise.enabled or spec.noise.substitution == 0:
        return {}
    vocab = {}
    for side in spec.noise.sides:
        counts = Counter(w for text in corpus.column(side).to_pylist() for w in text.split())
        vocab[side] = [w for w, _ in counts.most_common(NOISE_VOCAB_SIZE)]
    return vocab


class ShardWriter:
    """Ray Data callable: shard descriptors → (distil, write shard + sidecar) → metadata rows."""

    def __init__(self, spec_json: str, examples_ref: list, vocab: dict):
        import ray

        from pipeline.worker import TeacherWorker

        self.spec = JobSpec.model_validate_json(spec_json)
        # The ref is wrapped in a list so Ray hands it over unresolved; resolve once per actor.
        self.examples = ray.get(examples_ref[0]) if isinstance(examples_ref[0], ray.ObjectRef) else examples_ref[0]
        self.vocab = vocab
        self.worker = TeacherWorker(self.spec)
        self.store = Store.from_uri(self.spec.output.store, endpoint_override=self.spec.output.s3_endpoint)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"shard": [], "meta": []}
        for shard in batch["shard"]:
            meta = self.write_shard(int(shard))
            out["shard"].append(int(shard))
            out["meta"].append(json.dumps(meta))
        return out

    def write_shard(self, shard: int) -> dict:
        from pipeline.worker import cut_rows, shard_seed

        size, name = self.spec.output.shard_size, shard_name(shard)
        examples = self.examples.slice(shard * size, size)
        started = time.monotonic()
        table = self.worker.distill(examples, vocab=self.vocab, seed=shard_seed(self.spec.decoding.seed, shard))
        schema.check(table, top_k=self.spec.targets.top_k)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        directory = self.spec.output.dataset
        self.store.write_bytes_atomic(f"{directory}/{name}.parquet", data)
        meta = {
            "name": f"{name}.parquet",
            "shard": shard,
            "first_index": int(examples.column("index")[0].as_py()),
            "last_index": int(examples.column("index")[-1].as_py()),
            "examples": examples.num_rows,
            "rows": table.num_rows,
            "target_tokens": int(sum(len(x) for x in table.column("hyp_ids").to_pylist())),
            "cut_at_max_length": cut_rows(table, self.worker.eos),
            "bytes": len(data),
            "sha256": sha256_bytes(data),
            "seconds": round(time.monotonic() - started, 3),
            "pid": os.getpid(),
            "peak_rss_mb": peak_rss_mb(),
        }
        self.store.write_json_atomic(f"{directory}/_{name}.json", meta)  # after the shard: marks it complete
        return meta


def _complete_shards(store: Store, directory: str, n_shards: int, expected_examples: Callable[[int], int]) -> dict:
    """Sidecars of shards that are complete and whose bytes still match their recorded hash."""
    done = {}
    for i in range(n_shards):
        name = shard_name(i)
        if not (store.exists(f"{directory}/_{name}.json") and store.exists(f"{directory}/{name}.parquet")):
            continue
        meta = store.read_json(f"{directory}/_{name}.json")
        data = store.read_bytes(f"{directory}/{name}.parquet")
        if meta.get("sha256") == sha256_bytes(data) and meta.get("examples") == expected_examples(i):
            done[i] = meta
    return done


def init_ray(address: str | None = None) -> None:
    """Connects to ``address``/``RAY_ADDRESS``, or starts an embedded local Ray (the default)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        # "local" always starts a fresh instance: a bare ray.init() would try to join whatever cluster
        # /tmp/ray/ray_current_cluster names, even a dead one, and hang.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict:
    """Runs (or resumes) a distillation job and returns its manifest.

    Raises:
        JobError, TeacherError, TokenizerError, CorpusError: before anything is written.
    """
    store = Store.from_uri(spec.output.store, endpoint_override=spec.output.s3_endpoint)
    directory = spec.output.dataset
    check_model_dir(spec.teacher.model)  # before the tokenizer, which defaults to the same directory
    tokenizer = Tokenizer.load(spec.tokenizer_dir)
    vocab_hash = check_vocabulary(tokenizer, spec.teacher.model)
    teacher_hash = model_hash(spec.teacher.model)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = read_corpus(spec.corpus, spec.filters, rejects_path=Path(tmp) / "rejects.jsonl")
        rejects = (Path(tmp) / "rejects.jsonl").read_bytes()
    if corpus.kept == 0:
        raise JobError(f"empty corpus: {corpus.summary()}")
    fingerprint = _fingerprint(spec, teacher_hash, vocab_hash, corpus.table)
    if store.exists(f"{directory}/{JOB}"):
        previous = store.read_json(f"{directory}/{JOB}")
        if previous.get("fingerprint") != fingerprint:
            raise JobError(f"dataset {directory!r} already exists in {spec.output.store} and was made from "
                           "other inputs (spec, teacher, tokenizer or corpus); choose another dataset name")
    store.write_json_atomic(f"{directory}/{JOB}", {"fingerprint": fingerprint, "spec": spec.model_dump(mode="json")})
    store.write_bytes_atomic(f"{directory}/{REJECTS}", rejects)
    store.cleanup_temp(directory)

    size, kept = spec.output.shard_size, corpus.kept
    n_shards = math.ceil(kept / size)
    expected = lambda i: min(size, kept - i * size)  # noqa: E731
    done = _complete_shards(store, directory, n_shards, expected)
    todo = [i for i in range(n_shards) if i not in done]
    progress = Progress(state="running", shards_total=n_shards, shards_done=len(done), shards_skipped=len(done),
                        examples_total=kept, examples_done=sum(m["examples"] for m in done.values()))
    started = time.monotonic()

    def publish(state: str | None = None, error: str = "") -> None:
        progress.state = state or progress.state
        progress.error = error
        progress.elapsed_s = round(time.monotonic() - started, 2)
        progress.tokens_per_s = round(progress.target_tokens_done / max(progress.elapsed_s, 1e-9), 1)
        new_done = progress.shards_done - progress.shards_skipped
        remaining = n_shards - progress.shards_done
        progress.eta_s = round(progress.elapsed_s / new_done * remaining, 1) if new_done else None
        progress.updated_at = datetime.now(UTC).isoformat(timespec="seconds")
        store.write_json_atomic(f"{directory}/{PROGRESS}", progress.__dict__)
        if on_progress:
            on_progress(progress)

    publish()
    try:
        if todo:
            for meta in _distill_shards(spec, corpus.table, todo, address=address):
                done[meta["shard"]] = meta
                progress.shards_done += 1
                progress.examples_done += meta["examples"]
                progress.rows_done += meta["rows"]
                progress.target_tokens_done += meta["target_tokens"]
                progress.bytes_written += meta["bytes"]
                publish()
        missing = [i for i in range(n_shards) if i not in done]
        if missing:
            raise JobError(f"shards {missing} did not complete")
        manifest = _manifest(spec, done, n_shards, corpus, teacher_hash, vocab_hash, fingerprint)
        store.write_json_atomic(f"{directory}/{MANIFEST}", manifest)
    except BaseException as exc:
        publish("failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted", error=str(exc)[:2000])
        raise
    publish("succeeded")
    return manifest


def _distill_shards(spec: JobSpec, corpus: pa.Table, todo: list[int], *, address: str | None):
    """Yields shard metadata as the actor pool finishes shards (order not guaranteed)."""
    import ray

    init_ray(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    examples_ref = ray.put(corpus)
    ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        ShardWriter,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(spec.resources.workers, len(todo))),
        num_cpus=spec.resources.threads_per_worker,
        fn_constructor_kwargs={"spec_json": spec.model_dump_json(), "examples_ref": [examples_ref],
                               "vocab": _noise_vocab(corpus, spec)},
        # Ray Data restarts a killed actor and retries its shard (max_restarts / max_task_retries
        # default to -1 for actor pools); a retried shard rewrites the same file, so retries are safe.
    )
    for row in ds.iter_rows():
        yield json.loads(row["meta"])


def _manifest(spec, done, n_shards, corpus, teacher_hash, vocab_hash, fingerprint) -> dict:
    import ctranslate2

    from pipeline.spec import SPEC_VERSION

    # pid, seconds and memory describe one execution, not the data: keep them out of the manifest.
    run_only = ("pid", "seconds", "peak_rss_mb")
    shards = [{k: v for k, v in done[i].items() if k not in run_only} for i in range(n_shards)]
    dataset_hash = sha256_bytes("".join(f"{s['name']}:{s['sha256']}\n" for s in shards).encode())
    return {
        "manifest_version": schema.MANIFEST_VERSION,
        "schema_version": schema.SCHEMA_VERSION,
        "spec_version": SPEC_VERSION,
        "dataset": spec.output.dataset,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "spec": spec.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "teacher": {"model": spec.teacher.model, "hash": teacher_hash, "compute_type": spec.teacher.compute_type},
        "tokenizer": {"path": spec.tokenizer_dir, "vocab_hash": vocab_hash},
        "top_k": spec.targets.top_k,
        "counts": {
            "records_read": corpus.total,
            "examples": corpus.kept,
            "rows": sum(s["rows"] for s in shards),
            "target_tokens": sum(s["target_tokens"] for s in shards),
            "cut_at_max_length": sum(s.get("cut_at_max_length", 0) for s in shards),  # rows, see decoding.max_length
            "bytes": sum(s["bytes"] for s in shards),
            "rejected": corpus.rejected,
        },
        "shards": shards,
        "dataset_hash": dataset_hash,
        "versions": {"ctranslate2": ctranslate2.__version__, "pyarrow": pa.__version__},
    }
