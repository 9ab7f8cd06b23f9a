"""The distillation job driver: corpus → Ray Data actor pool of TeacherWorkers → shards → manifest.

The unit of work is a **shard**: a fixed range of corpus rows (``shard_size`` examples), so shard *i* always
holds the same examples and a retried or re-run shard rewrites the same file. Ray Data maps shard
descriptors through ``TeacherWorker`` actors; each actor reads its examples from the object store, writes
its shard atomically (temp name → rename) plus a small ``.json`` sidecar, and returns only that metadata:
the driver never holds logits or shard data. The manifest is written last, from the sidecars.

The dataset layout and the files written next to the shards (sidecars, ``_job.json``, ``_progress.json``,
``_manifest.json``) are typed, versioned models in :mod:`pipeline.dataset`.
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
from pipeline.corpus import CorpusResult, read_corpus
from pipeline.ct2 import check_model_dir, check_prefix_tokens, check_vocabulary, model_hash
from pipeline.dataset import (
    REJECTS,
    Counts,
    JobRecord,
    Manifest,
    Progress,
    ProgressState,
    Sidecar,
    TeacherInfo,
    TokenizerInfo,
    shard_file,
)
from pipeline.device import actor_resources, plan_device
from pipeline.errors import InputError, RunError
from pipeline.evaluate import teacher_warning
from pipeline.spec import JobSpec
from pipeline.storage import Store
from pipeline.tokenizer import Tokenizer

NOISE_VOCAB_SIZE = 20000  # most frequent words per side used for substitution noise


class JobError(InputError):
    """The job cannot run (bad inputs, a dataset made from other inputs, …); nothing was written."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _node_id() -> str | None:
    """The Ray node this process runs on (which node of a cluster wrote a shard), None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _fingerprint(spec: JobSpec, teacher: str, vocab: str, corpus: pa.Table, device: str = "cpu") -> str:
    """Identity of everything that determines shard content (not resources or the output place)."""
    payload = spec.model_dump(mode="json", exclude={"resources", "output"})
    payload["output"] = {"shard_size": spec.output.shard_size}
    for name in ("model", "tokenizer", "device", "device_index"):
        payload["teacher"].pop(name)
    for name in ("source_prefix", "target_prefix"):  # only when set: older jobs keep their fingerprint
        if not payload["teacher"][name]:
            payload["teacher"].pop(name)
    if device != "cpu":  # CUDA kernels round differently; CPU jobs keep the fingerprint they had before devices
        payload["teacher"]["device"] = device
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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class ShardFailure:
    """What a worker returns for a shard it could not write: the error travels back as data, so the driver
    ends the job with one clear message instead of Ray's tracebacks."""

    shard: int
    error: str

    def to_json(self) -> str:
        return json.dumps({"shard": self.shard, "error": self.error})

    @staticmethod
    def from_json(text: str) -> ShardFailure | None:
        data = json.loads(text)
        return ShardFailure(data["shard"], data["error"]) if "error" in data else None


class ShardWriter:
    """Ray Data callable: shard descriptors → (distil, write shard + sidecar) → metadata rows."""

    def __init__(self, spec_json: str, examples_ref: list, vocab: dict, device: str = "cpu"):
        import ray

        from pipeline.worker import TeacherWorker

        self.spec = JobSpec.model_validate_json(spec_json)
        # The ref is wrapped in a list so Ray hands it over unresolved; resolve once per actor.
        self.examples = ray.get(examples_ref[0]) if isinstance(examples_ref[0], ray.ObjectRef) else examples_ref[0]
        self.vocab = vocab
        # An error here or in a shard travels back as data ({"shard", "error"}): the driver ends the job with one
        # clear message, where a raised exception would make Ray log tracebacks and retry the actor forever.
        self.failure = ""
        try:
            self.worker = TeacherWorker(self.spec, device=device)
            self.store = Store.from_uri(self.spec.output.store, endpoint_override=self.spec.output.s3_endpoint)
        except Exception as exc:
            self.failure = _describe(exc)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"shard": [], "meta": []}
        for shard in batch["shard"]:
            try:
                meta = ShardFailure(int(shard), self.failure) if self.failure else self.write_shard(int(shard))
            except Exception as exc:
                meta = ShardFailure(int(shard), _describe(exc))
            out["shard"].append(int(shard))
            out["meta"].append(meta.to_json() if isinstance(meta, ShardFailure) else meta.model_dump_json())
        return out

    def write_shard(self, shard: int) -> Sidecar:
        from pipeline.worker import cut_rows, shard_seed

        size = self.spec.output.shard_size
        examples = self.examples.slice(shard * size, size)
        started = time.monotonic()
        table = self.worker.distill(examples, vocab=self.vocab, seed=shard_seed(self.spec.decoding.seed, shard))
        schema.check(table, top_k=self.spec.targets.top_k)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        directory = self.spec.output.dataset
        self.store.write_bytes_atomic(f"{directory}/{shard_file(shard)}", data)
        meta = Sidecar(
            name=shard_file(shard),
            shard=shard,
            first_index=int(examples.column("index")[0].as_py()),
            last_index=int(examples.column("index")[-1].as_py()),
            examples=examples.num_rows,
            rows=table.num_rows,
            target_tokens=int(sum(len(x) for x in table.column("hyp_ids").to_pylist())),
            cut_at_max_length=cut_rows(table, self.worker.eos),
            bytes=len(data),
            sha256=sha256_bytes(data),
            seconds=round(time.monotonic() - started, 3),
            pid=os.getpid(),
            peak_rss_mb=peak_rss_mb(),
            node_id=_node_id(),
        )
        meta.write(self.store, directory)  # after the shard: marks it complete
        return meta


def _complete_shards(store: Store, directory: str, n_shards: int,
                     expected_examples: Callable[[int], int]) -> dict[int, Sidecar]:
    """Sidecars of shards that are complete and whose bytes still match their recorded hash."""
    done = {}
    for i in range(n_shards):
        meta = Sidecar.read(store, directory, i)
        if meta is None or meta.shard != i or not store.exists(f"{directory}/{shard_file(i)}"):
            continue
        data = store.read_bytes(f"{directory}/{shard_file(i)}")
        if meta.sha256 == sha256_bytes(data) and meta.examples == expected_examples(i):
            done[i] = meta
    return done


# Ray's notices that every run would print although nothing is wrong: the C++ core worker logs at ERROR that
# actor-pool actors (max_restarts -1) get constructor arguments from the object store (ray-project/ray#53727:
# Ray Data's own DataContext), the auth module warns that token authentication is on (as it should be), and
# Ray Data logs its executor's start and end. Set RAY_BACKEND_LOG_LEVEL yourself to see the C++ logs again.
QUIET_RAY_ENV = {"RAY_BACKEND_LOG_LEVEL": "fatal"}
QUIET_RAY_LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray.data")


def init_ray(address: str | None = None) -> None:
    """Connects to ``address``/``RAY_ADDRESS``, or starts an embedded local Ray (the default), quietly."""
    import logging

    import ray

    if ray.is_initialized():
        return
    import ray.data  # noqa: F401  (it configures its loggers on import: quiet them after that)

    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        # "local" always starts a fresh instance: a bare ray.init() would try to join whatever cluster
        # /tmp/ray/ray_current_cluster names, even a dead one, and hang.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)


@dataclass(frozen=True)
class JobPlan:
    """Everything checked before a job writes anything: the validated inputs and their identities."""

    corpus: CorpusResult
    rejects: bytes  # the _rejects.jsonl content
    teacher_hash: str
    vocab_hash: str
    fingerprint: str
    warnings: tuple[str, ...] = ()  # e.g. a teacher scored below its copy baseline; printed, never fatal
    device: str = "cpu"  # teacher.device resolved (auto → cpu | cuda): what every worker loads the teacher on


def plan_job(spec: JobSpec, *, address: str | None = None) -> JobPlan:
    """Checks every input a job needs, in the driver, and writes nothing.

    Args:
        spec: the job.
        address: the Ray cluster the job will join (default ``RAY_ADDRESS``): there a ``cuda`` teacher runs on
            the cluster's GPU nodes, so this machine need not have one.

    Raises:
        JobError, TeacherError, TokenizerError, CorpusError (all ``InputError``): the job cannot run.
    """
    check_model_dir(spec.teacher.model)  # before the tokenizer, which defaults to the same directory
    t = spec.teacher
    device = plan_device(t.device, t.device_index, t.compute_type, spec.resources.gpus_per_worker, address=address)
    tokenizer = Tokenizer.load(spec.tokenizer_dir)
    vocab_hash = check_vocabulary(tokenizer, spec.teacher.model)
    check_prefix_tokens(tokenizer, t.source_prefix, t.target_prefix)
    if spec.targets.top_k > len(tokenizer.tokens):
        raise JobError(f"targets.top_k {spec.targets.top_k} exceeds the teacher's vocabulary "
                       f"({len(tokenizer.tokens)} tokens in {spec.teacher.model})")
    teacher_hash = model_hash(spec.teacher.model)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = read_corpus(spec.corpus, spec.filters, rejects_path=Path(tmp) / "rejects.jsonl")
        rejects = (Path(tmp) / "rejects.jsonl").read_bytes()
    if corpus.kept == 0:
        raise JobError(f"empty corpus: {corpus.summary()}")
    fingerprint = _fingerprint(spec, teacher_hash, vocab_hash, corpus.table, device)
    store = Store.from_uri(spec.output.store, endpoint_override=spec.output.s3_endpoint)
    directory = spec.output.dataset
    previous = JobRecord.read(store, directory)
    if previous is not None and previous.fingerprint != fingerprint:
        raise JobError(f"dataset {directory!r} already exists in {spec.output.store} and was made from "
                       "other inputs (spec, teacher, tokenizer or corpus); choose another dataset name")
    warnings = tuple(w for w in [teacher_warning(spec.teacher.model)] if w)
    return JobPlan(corpus, rejects, teacher_hash, vocab_hash, fingerprint, warnings, device)


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    plan: JobPlan | None = None,
) -> Manifest:
    """Runs (or resumes) a distillation job and returns its manifest.

    Args:
        spec: the job.
        address: Ray address (default: ``RAY_ADDRESS`` or an embedded local Ray).
        on_progress: called after every progress update.
        plan: the result of ``plan_job(spec)`` when the caller checked the inputs first.

    Raises:
        InputError (JobError, TeacherError, TokenizerError, CorpusError): before anything is written.
        RunError: the job failed after it started writing; a re-run resumes it.
    """
    plan = plan or plan_job(spec, address=address)
    store = Store.from_uri(spec.output.store, endpoint_override=spec.output.s3_endpoint)
    directory = spec.output.dataset
    corpus, teacher_hash, vocab_hash, fingerprint = plan.corpus, plan.teacher_hash, plan.vocab_hash, plan.fingerprint
    JobRecord(fingerprint=fingerprint, spec=spec.model_dump(mode="json")).write(store, directory)
    store.write_bytes_atomic(f"{directory}/{REJECTS}", plan.rejects)
    store.cleanup_temp(directory)

    size, kept = spec.output.shard_size, corpus.kept
    n_shards = math.ceil(kept / size)
    expected = lambda i: min(size, kept - i * size)  # noqa: E731
    done = _complete_shards(store, directory, n_shards, expected)
    todo = [i for i in range(n_shards) if i not in done]
    progress = Progress(state=ProgressState.RUNNING, shards_total=n_shards, shards_done=len(done),
                        shards_skipped=len(done), examples_total=kept,
                        examples_done=sum(m.examples for m in done.values()))
    started = time.monotonic()

    def publish(state: ProgressState | None = None, error: str = "") -> None:
        progress.state = state or progress.state
        progress.error = error
        progress.elapsed_s = round(time.monotonic() - started, 2)
        progress.tokens_per_s = round(progress.target_tokens_done / max(progress.elapsed_s, 1e-9), 1)
        new_done = progress.shards_done - progress.shards_skipped
        remaining = n_shards - progress.shards_done
        progress.eta_s = round(progress.elapsed_s / new_done * remaining, 1) if new_done else None
        progress.updated_at = datetime.now(UTC).isoformat(timespec="seconds")
        progress.write(store, directory)
        if on_progress:
            on_progress(progress)

    publish()
    failed: dict[int, str] = {}  # shard -> the error a worker reported
    try:
        if todo:
            for meta in _distill_shards(spec, corpus.table, todo, address=address, device=plan.device):
                if isinstance(meta, ShardFailure):
                    failed[meta.shard] = meta.error
                    continue
                done[meta.shard] = meta
                progress.shards_done += 1
                progress.examples_done += meta.examples
                progress.rows_done += meta.rows
                progress.target_tokens_done += meta.target_tokens
                progress.bytes_written += meta.bytes
                publish()
        if failed:
            first = min(failed)
            raise RunError(f"{len(failed)} of {len(todo)} shards failed (complete shards are kept; a re-run resumes); "
                           f"shard {first}: {failed[first]}")
        missing = [i for i in range(n_shards) if i not in done]
        if missing:
            raise RunError(f"shards {missing} did not complete")
        manifest = _manifest(spec, done, n_shards, corpus, teacher_hash, vocab_hash, fingerprint, plan.device)
        manifest.write(store, directory)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        publish(ProgressState.INTERRUPTED if interrupted else ProgressState.FAILED, error=str(exc)[:2000])
        if isinstance(exc, Exception) and not isinstance(exc, RunError):
            # The inputs were checked: whatever fails now (even a ValueError from a worker) is a run failure.
            raise RunError(f"{type(exc).__name__} while distilling") from exc
        raise
    publish(ProgressState.SUCCEEDED)
    return manifest


def _distill_shards(spec: JobSpec, corpus: pa.Table, todo: list[int], *, address: str | None, device: str = "cpu"):
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
        **actor_resources(device=device, threads_per_worker=spec.resources.threads_per_worker,
                          gpus_per_worker=spec.resources.gpus_per_worker),
        fn_constructor_kwargs={"spec_json": spec.model_dump_json(), "device": device, "examples_ref": [examples_ref],
                               "vocab": _noise_vocab(corpus, spec)},
        # Ray Data restarts a killed actor and retries its shard (max_restarts / max_task_retries
        # default to -1 for actor pools); a retried shard rewrites the same file, so retries are safe.
    )
    for row in ds.iter_rows():
        yield ShardFailure.from_json(row["meta"]) or Sidecar.model_validate_json(row["meta"])


def _manifest(spec, done, n_shards, corpus, teacher_hash, vocab_hash, fingerprint, device) -> Manifest:
    import ctranslate2

    from pipeline.spec import SPEC_VERSION

    shards = [done[i].entry() for i in range(n_shards)]
    dataset_hash = sha256_bytes("".join(f"{s.name}:{s.sha256}\n" for s in shards).encode())
    return Manifest(
        schema_version=schema.SCHEMA_VERSION,
        spec_version=SPEC_VERSION,
        dataset=spec.output.dataset,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        spec=spec.model_dump(mode="json"),
        fingerprint=fingerprint,
        teacher=TeacherInfo(model=spec.teacher.model, hash=teacher_hash, compute_type=spec.teacher.compute_type,
                            device=device),
        tokenizer=TokenizerInfo(path=spec.tokenizer_dir, vocab_hash=vocab_hash),
        top_k=spec.targets.top_k,
        counts=Counts(
            records_read=corpus.total,
            examples=corpus.kept,
            rows=sum(s.rows for s in shards),
            target_tokens=sum(s.target_tokens for s in shards),
            cut_at_max_length=sum(s.cut_at_max_length for s in shards),
            bytes=sum(s.bytes for s in shards),
            rejected=corpus.rejected,
        ),
        shards=shards,
        dataset_hash=dataset_hash,
        versions={"ctranslate2": ctranslate2.__version__, "pyarrow": pa.__version__},
    )
