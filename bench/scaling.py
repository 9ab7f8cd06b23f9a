"""Distillation throughput on 1 node vs 2 nodes, and a measured model projecting a cluster's throughput.

    .venv/bin/python bench/scaling.py [--sentences 3000] [--max-length 32] [--store-mb 64]
                                      [--gpu-tokens-per-s 10000] [--gpu-workers 32] [--ray-env KEY=VALUE ...]

Two real Ray clusters on this machine (``tests/cluster.py``: ``ray start`` processes, 1 CPU per node) run the
same greedy job (the bench teacher, the same sentences, 1 worker × 1 thread per node) one after the other:
  (a) 2 nodes ÷ 1 node, whole job (goal ≥ 1.8) and per-worker steady state, beside this machine's own ceiling
      for two 1-thread decoders (raw CTranslate2, 2 translators × 1 thread ÷ 1 × 1 thread);
  (b) the model: cluster tokens/s = min(tokens/s per worker × workers, store write rate ÷ bytes per token),
      with tokens/s per worker and bytes per token from (a)'s jobs, and the write rate of a local-disk store and
      of an S3 server on loopback (moto) measured by writing shard-sized objects through ``pipeline.storage``;
  (c) that model projected to a GPU cluster whose per-worker rate is an assumption (``--gpu-tokens-per-s``);
  (d) where the machine's CPU went during each job: CPU-seconds per kind of process (the distill workers, Ray's
      daemons, the driver), sampled with psutil, so a loss in (a) can be put on the process that took the cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from common import ROOT, WORK, Timer, corpus_file, setup

sys.path.insert(0, str(ROOT))  # tests.cluster: the same local cluster the multi-node test runs
# Read when ray.data is imported: start work once every actor is up, so a late node does not lose its share.
os.environ.setdefault("RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S", "300")
# Read when ray is imported: this driver joins clusters that run with token authentication (tests/cluster.py).
TOKEN = secrets.token_hex(32)
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})

SHARD_SIZE = 250  # small enough that each node gets several shards of the 1-node job's sentences


def job_spec(paths, corpus: Path, *, workers: int, max_length: int, name: str):
    from pipeline.spec import JobSpec

    return JobSpec.model_validate({
        "corpus": {"path": str(corpus)},
        "teacher": {"model": str(paths["ct2"]), "tokenizer": str(paths["tokenizer"]), "compute_type": "int8"},
        "decoding": {"mode": "greedy", "max_length": max_length},
        "targets": {"top_k": 8},
        "output": {"store": str(WORK / "datasets"), "dataset": name, "shard_size": SHARD_SIZE},
        "resources": {"workers": workers, "threads_per_worker": 1},
    })


def process_kind(proc) -> str:
    """A readable kind for a process of a local Ray cluster (or this driver), from its name and command line."""
    if proc.pid == os.getpid():
        return "driver (this bench)"
    try:
        name, cmd = proc.name(), " ".join(proc.cmdline())
    except Exception:
        return "other"
    if name.startswith("ray::") or "default_worker.py" in cmd:
        return "Ray workers (" + (name.split("::", 1)[1].split(".")[0] if "::" in name else "idle") + ")"
    for key, kind in (("gcs_server", "GCS"), ("raylet", "raylets"), ("dashboard/agent", "dashboard agents"),
                      ("runtime_env/agent", "runtime-env agents"), ("dashboard.py", "dashboard"),
                      ("log_monitor", "log monitors"), ("monitor.py", "autoscaler monitor"),
                      ("ray start", "ray start (CLI)")):
        if key in cmd:
            return kind
    return "other"


class CpuSampler:
    """CPU-seconds per process kind over a ``with`` block, every process on this machine, sampled every
    ``every`` s. Each increment goes to the process's kind at that sample (a Ray worker is ``IDLE`` until it
    becomes an actor); a process that exits between samples loses at most ``every`` s of its CPU."""

    def __init__(self, every: float = 0.5):
        import psutil

        self.psutil, self.every = psutil, every
        self.last: dict[int, float] = {}
        self.by_kind: dict[str, float] = {}
        self._stop = threading.Event()

    def _sample(self, count: bool = True) -> None:
        for proc in self.psutil.process_iter():
            try:
                t = proc.cpu_times()
                kind = process_kind(proc)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
            cpu = t.user + t.system
            if count:  # a process first seen inside the block counts from 0
                self.by_kind[kind] = self.by_kind.get(kind, 0.0) + cpu - self.last.get(proc.pid, 0.0)
            self.last[proc.pid] = cpu

    def __enter__(self):
        self._sample(count=False)
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self.t0


def distill_on_nodes(paths, corpus: Path, *, nodes: int, max_length: int, ray_env: dict[str, str]) -> dict:
    """The job on a fresh ``nodes``-node cluster (1 CPU each, one worker per node, ``ray_env`` in every node's
    environment); its rates and shards."""
    import ray

    from pipeline.dataset import Sidecar
    from pipeline.run import run_job
    from pipeline.storage import Store
    from tests.cluster import LocalCluster

    spec = job_spec(paths, corpus, workers=nodes, max_length=max_length, name=f"scaling-{nodes}n")
    shutil.rmtree(WORK / "datasets" / spec.output.dataset, ignore_errors=True)
    cluster = LocalCluster(WORK / "cluster-logs" / f"{nodes}n", num_cpus=1, cwd=ROOT, token=TOKEN, env=ray_env)
    try:
        cluster.start(workers=nodes - 1)
        with Timer() as t, CpuSampler() as cpu:
            manifest = run_job(spec, address=cluster.gcs_address)
        ray.shutdown()
    finally:
        cluster.stop()
    store = Store.from_uri(spec.output.store)
    metas = [Sidecar.read(store, spec.output.dataset, s.shard) for s in manifest.shards]
    per_node: dict[str, list[float]] = {}
    for m in metas:
        tokens, seconds = per_node.setdefault(m.node_id, [0.0, 0.0])
        per_node[m.node_id] = [tokens + m.target_tokens, seconds + m.seconds]
    tokens = manifest.counts.target_tokens
    return {"nodes": len(per_node), "tokens": tokens, "seconds": t.seconds, "job_tok_s": tokens / t.seconds,
            # steady state: each worker's tokens over the seconds it spent on its shards, summed over workers
            "worker_tok_s": sum(tk / s for tk, s in per_node.values()),
            "per_worker_tok_s": sum(tk / s for tk, s in per_node.values()) / len(per_node),
            "bytes_per_token": manifest.counts.bytes / tokens,
            "shard_bytes": manifest.counts.bytes / len(manifest.shards),
            "shards_per_node": sorted(sum(1 for m in metas if m.node_id == n) for n in per_node),
            "cpu_seconds": cpu.by_kind, "cpu_wall": cpu.seconds}


def machine_ceiling(paths, corpus: Path, *, max_length: int) -> float:
    """What this machine gives two 1-thread decoders at once: raw CTranslate2 greedy (with the full logits the
    pipeline's greedy pass asks for), 2 translators × 1 thread in parallel ÷ 1 translator × 1 thread, same
    sentences. Two nodes cannot beat it: it is the cores' own scaling (shared caches, memory bandwidth)."""
    import pyarrow.parquet as pq

    from pipeline.ct2 import load_translator
    from pipeline.tokenizer import Tokenizer

    tok = Tokenizer.load(paths["tokenizer"])
    sources = [tok.ids_to_tokens(ids) for ids in tok.encode_source(pq.read_table(corpus)["source"].to_pylist())]
    rates = []
    for replicas in (1, 2):
        translator = load_translator(paths["ct2"], compute_type="int8", intra_threads=1, inter_threads=replicas)
        with Timer() as t:
            results = translator.translate_batch(sources, beam_size=1, max_batch_size=4096, batch_type="tokens",
                                                 max_decoding_length=max_length, min_decoding_length=0,
                                                 return_logits_vocab=True)
        rates.append(sum(min(len(r.hypotheses[0]) + 1, max_length) for r in results) / t.seconds)
        del translator
    return rates[1] / rates[0]


def write_rate(store, *, object_bytes: int, total_bytes: int) -> float:
    """MB/s of ``write_bytes_atomic`` (temp name → rename, what a worker does per shard), one writer."""
    data = os.urandom(object_bytes)  # incompressible, like zstd-compressed Parquet
    n = max(1, total_bytes // object_bytes)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with Timer() as t:
        for i in range(n):
            store.write_bytes_atomic(f"{prefix}/part-{i:05d}.parquet", data)
    return n * object_bytes / t.seconds / 1e6


def store_rates(*, object_bytes: int, total_bytes: int) -> dict[str, float]:
    """Write rates of a local-disk store and of a moto S3 server on loopback."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from pipeline.storage import Store

    rates = {}
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        rates["local disk"] = write_rate(Store.from_uri(tmp), object_bytes=object_bytes, total_bytes=total_bytes)
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(key, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        pafs.S3FileSystem(scheme="http", endpoint_override=f"{host}:{port}", region="us-east-1",
                          allow_bucket_creation=True).create_dir("bench")
        store = Store.from_uri("s3://bench/datasets", endpoint_override=f"http://{host}:{port}")
        rates["S3 (moto, loopback)"] = write_rate(store, object_bytes=object_bytes, total_bytes=total_bytes)
    finally:
        server.stop()
    return rates


def cluster_tokens_per_s(per_worker: float, workers: int, write_mb_s: float, bytes_per_token: float) -> float:
    """The model: workers add up until the store's write bandwidth caps them."""
    return min(per_worker * workers, write_mb_s * 1e6 / bytes_per_token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--store-mb", type=int, default=64, help="MB written per store to measure its write rate")
    parser.add_argument("--gpu-tokens-per-s", type=float, default=10_000.0,
                        help="ASSUMED distill rate of one GPU worker (not measured here: no GPU)")
    parser.add_argument("--gpu-workers", type=int, default=32, help="e.g. 8 nodes × 4 GPUs, one worker per GPU")
    parser.add_argument("--s3-mb-s", type=float, default=1000.0,
                        help="ASSUMED aggregate write bandwidth of the cluster's S3 store (MB/s)")
    parser.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of every Ray node, e.g. RAY_enable_worker_prestart=0 (repeatable): to "
                             "measure what a Ray setting does to the two-node ratio")
    args = parser.parse_args()
    bad = [item for item in args.ray_env if "=" not in item]
    if bad:
        parser.error(f"--ray-env takes KEY=VALUE, got {bad[0]!r}")
    ray_env = dict(item.split("=", 1) for item in args.ray_env)

    paths = setup()
    corpus = corpus_file(args.sentences)
    one = distill_on_nodes(paths, corpus, nodes=1, max_length=args.max_length, ray_env=ray_env)
    two = distill_on_nodes(paths, corpus, nodes=2, max_length=args.max_length, ray_env=ray_env)
    if ray_env:
        print("Ray nodes ran with " + " ".join(f"{k}={v}" for k, v in ray_env.items()))
    print(f"{args.sentences} sentences, greedy, top-8, shards of {SHARD_SIZE}, {one['tokens']:,} target tokens")
    for name, r in (("1 node ", one), ("2 nodes", two)):
        print(f"  {name}: whole job {r['job_tok_s']:,.0f} tok/s ({r['seconds']:.1f} s), workers' steady state "
              f"{r['worker_tok_s']:,.0f} tok/s ({r['per_worker_tok_s']:,.0f} per worker), shards per node "
              f"{r['shards_per_node']}")
    ceiling = machine_ceiling(paths, corpus, max_length=args.max_length)
    whole, steady = two["job_tok_s"] / one["job_tok_s"], two["worker_tok_s"] / one["worker_tok_s"]
    print(f"(a) 2 nodes ÷ 1 node: whole job {whole:.2f}× (goal ≥ 1.8), steady state {steady:.2f}×; this machine's "
          f"ceiling for two 1-thread decoders (raw CT2, 2 × 1 thread ÷ 1 × 1 thread) {ceiling:.2f}×: the cluster "
          f"reaches {whole / ceiling:.0%} of it (whole job), {steady / ceiling:.0%} (steady state)")

    print(f"(d) CPU-seconds during each job, by process (this machine has {os.cpu_count()} cores):")
    kinds = sorted(set(one["cpu_seconds"]) | set(two["cpu_seconds"]),
                   key=lambda k: -(one["cpu_seconds"].get(k, 0) + two["cpu_seconds"].get(k, 0)))
    for name, r in (("1 node ", one), ("2 nodes", two)):
        used = sum(r["cpu_seconds"].values())
        print(f"    {name}: {used:,.1f} CPU-s in {r['cpu_wall']:.1f} s = {used / r['cpu_wall']:.2f} cores busy")
    for kind in kinds:
        a, b = one["cpu_seconds"].get(kind, 0.0), two["cpu_seconds"].get(kind, 0.0)
        if max(a, b) >= 0.5:
            print(f"      {kind:<32} {a:7.1f} CPU-s ({a / one['cpu_wall']:.2f} cores)   "
                  f"{b:7.1f} CPU-s ({b / two['cpu_wall']:.2f} cores)")

    bpt = two["bytes_per_token"]
    rates = store_rates(object_bytes=int(two["shard_bytes"]), total_bytes=args.store_mb * 1_000_000)
    per_worker = one["per_worker_tok_s"]
    print(f"(b) model inputs: {per_worker:,.0f} tok/s per CPU worker (1 thread), {bpt:.1f} bytes per target token, "
          f"objects of {two['shard_bytes'] / 1e3:,.0f} kB")
    for name, mb_s in rates.items():
        cap = mb_s * 1e6 / bpt
        print(f"    store {name}: {mb_s:,.1f} MB/s → caps a cluster at {cap:,.0f} tok/s "
              f"= {cap / per_worker:,.0f} such workers")
    predicted = cluster_tokens_per_s(per_worker, 2, rates["local disk"], bpt)
    print(f"    the model's 2-node prediction {predicted:,.0f} tok/s vs measured steady state "
          f"{two['worker_tok_s']:,.0f} ({two['worker_tok_s'] / predicted:.2f})")
    gpu = cluster_tokens_per_s(args.gpu_tokens_per_s, args.gpu_workers, args.s3_mb_s, bpt)
    storage_cap = args.s3_mb_s * 1e6 / bpt
    print(f"(c) projection: {args.gpu_workers} GPU workers × {args.gpu_tokens_per_s:,.0f} tok/s (assumed) = "
          f"{args.gpu_tokens_per_s * args.gpu_workers:,.0f} tok/s; S3 at {args.s3_mb_s:,.0f} MB/s (assumed) caps at "
          f"{storage_cap:,.0f} tok/s → {gpu:,.0f} tok/s = {gpu * 3600 / 1e9:.2f} B target tokens per hour "
          f"({'compute' if gpu < storage_cap else 'storage'}-bound; {bpt * gpu / 1e6:,.1f} MB/s written)")


if __name__ == "__main__":
    main()
