"""Peak memory of the driver and of a worker for a 1k- and a 10k-sentence job: both should stay flat.

    .venv/bin/python bench/pipeline_memory.py [--sizes 1000 10000] [--top-k 8]

Each size runs in a fresh process (peak RSS only grows within a process). The driver's peak is its own
``ru_maxrss``; a worker's is what it records in each shard sidecar. Workers reduce logits to top-k per
sub-batch and the driver only receives shard metadata, so neither should grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

from common import WORK, corpus_file, setup


def child(n: int, top_k: int) -> None:
    from pipeline.dataset import Sidecar, sidecar_file
    from pipeline.run import peak_rss_mb, run_job
    from pipeline.spec import JobSpec

    paths = setup()
    name = f"mem-{n}"
    shutil.rmtree(WORK / "datasets" / name, ignore_errors=True)
    spec = JobSpec.model_validate({
        "corpus": {"path": str(corpus_file(n))},
        "teacher": {"model": str(paths["ct2"]), "tokenizer": str(paths["tokenizer"])},
        "decoding": {"mode": "greedy", "max_length": 32},
        "targets": {"top_k": top_k},
        "output": {"store": str(WORK / "datasets"), "dataset": name, "shard_size": 500},
        "resources": {"workers": 1, "threads_per_worker": 2},
    })
    manifest = run_job(spec)
    workers = [Sidecar.model_validate_json((WORK / "datasets" / name / sidecar_file(s.shard)).read_text()).peak_rss_mb
               for s in manifest.shards]
    print(json.dumps({"sentences": n, "driver_peak_mb": peak_rss_mb(), "worker_peak_mb": max(workers),
                      "shards": len(workers), "target_tokens": manifest.counts.target_tokens}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.top_k)
    setup()
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--top-k", str(args.top_k)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"greedy, top-k {args.top_k}, 6+6 d512 Marian int8, shards of 500 sentences")
    print(f"{'sentences':>10} {'target tokens':>14} {'driver peak MB':>15} {'worker peak MB':>15}")
    for r in rows:
        print(f"{r['sentences']:>10,} {r['target_tokens']:>14,} {r['driver_peak_mb']:>15,.0f} "
              f"{r['worker_peak_mb']:>15,.0f}")
    first, last = rows[0], rows[-1]
    driver, worker = (last[k] / first[k] for k in ("driver_peak_mb", "worker_peak_mb"))
    print(f"growth {first['sentences']:,} → {last['sentences']:,}: driver ×{driver:.2f}, worker ×{worker:.2f}")


if __name__ == "__main__":
    main()
