"""GPU teacher throughput, measured side by side in one run on the same model and sentences.

    .venv/bin/python bench/gpu_teacher.py [--device cuda] [--sentences 20000] [--cpu-sentences 1000]
                                          [--max-length 64] [--compute-type int8_float16] [--workers-per-gpu 2]

Prints one JSON object:
  (a) distill job target tokens/s ÷ raw CTranslate2 ``translate_batch`` tokens/s on the GPU, greedy (top-k 8
      stored) and beam 4 (n-best 1, top-k 8 from the second teacher-forced pass) — the pipeline's overhead;
  (b) raw CTranslate2 on the GPU ÷ raw CTranslate2 int8 on every CPU core of the same machine, greedy and
      beam 4, on the same ``--cpu-sentences`` sentences;
  (c) a parity check of the GPU path: top-k log-probs of a teacher-forced ``TeacherWorker`` on CUDA vs on the
      CPU (both float32), so the CUDA array interface → torch → top-k path is proven before its speed counts.
The teacher is bench/common.py's random 6+6 d512 Marian. On a machine without a CUDA device it says so and
exits 0 without measuring anything. Not run in this project yet (no GPU was available).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pyarrow.parquet as pq
from common import WORK, Timer, corpus_file, measure_job, setup

TOP_K = 8


def raw_ct2(paths, sources, *, device: str, compute_type: str, beam: int, max_length: int, batch_tokens: int,
            threads: int = 1, logits: bool = False) -> float:
    """Target tokens/s of plain ``translate_batch`` under the pipeline's token budget (one translator)."""
    from pipeline.ct2 import load_translator

    translator = load_translator(paths["ct2"], compute_type=compute_type, intra_threads=threads, device=device)
    translator.translate_batch(sources[:64], beam_size=beam, max_decoding_length=8)  # warm-up (CUDA context)
    with Timer() as t:
        results = translator.translate_batch(sources, beam_size=beam, max_batch_size=batch_tokens, batch_type="tokens",
                                             max_decoding_length=max_length, min_decoding_length=0,
                                             return_logits_vocab=logits)
    tokens = sum(min(len(r.hypotheses[0]) + 1, max_length) for r in results)
    return tokens / t.seconds


def job_spec(paths, corpus, *, mode: str, args, name: str, device: str = "cuda", compute_type: str | None = None):
    from pipeline.spec import JobSpec

    gpus = args.gpus * args.workers_per_gpu
    decoding = {"mode": mode, "max_length": args.max_length} | ({"beam_size": 4} if mode == "beam" else {})
    cuda = device == "cuda"
    return JobSpec.model_validate({
        "corpus": {"path": str(corpus)},
        "teacher": {"model": str(paths["ct2"]), "tokenizer": str(paths["tokenizer"]), "device": device,
                    "compute_type": compute_type or (args.compute_type if cuda else "int8")},
        "decoding": decoding,
        "targets": {"top_k": TOP_K},
        "output": {"store": str(WORK / "datasets"), "dataset": name, "shard_size": args.shard_size},
        "resources": {"workers": gpus if cuda else 1, "threads_per_worker": 1, "batch_tokens": args.batch_tokens,
                      "gpus_per_worker": 1 / args.workers_per_gpu if cuda else 0},
    })


def distill(paths, corpus, *, mode: str, args) -> dict:
    return measure_job(job_spec(paths, corpus, mode=mode, args=args, name=f"gpu-{mode}"))


def parity(paths, corpus, args, n: int = 64) -> dict:
    """Teacher-forced top-k on CUDA vs CPU, float32 on both: the GPU reduction must give the CPU's numbers."""
    import numpy as np

    from pipeline.corpus import read_corpus
    from pipeline.worker import TeacherWorker

    tables = {}
    for device in ("cuda", "cpu"):
        spec = job_spec(paths, corpus, mode="teacher_forcing", args=args, name="parity", device=device,
                        compute_type="float32")
        examples = read_corpus(spec.corpus, spec.filters).table.slice(0, n)
        tables[device] = TeacherWorker(spec, device=device).distill(examples)
    lp = {d: np.concatenate([np.array(x, dtype=np.float32) for x in t["topk_logprobs"].to_pylist()])
          for d, t in tables.items()}
    ids = {d: np.concatenate([np.array(x) for x in t["topk_ids"].to_pylist()]) for d, t in tables.items()}
    return {"positions": int(len(lp["cpu"])), "max_abs_logprob_diff": float(np.abs(lp["cuda"] - lp["cpu"]).max()),
            "top1_agreement": float((ids["cuda"][:, 0] == ids["cpu"][:, 0]).mean()),
            "score_max_abs_diff": float(np.abs(np.array(tables["cuda"]["score"]) -
                                               np.array(tables["cpu"]["score"])).max())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cuda"], default="cuda", help="the device under test")
    parser.add_argument("--sentences", type=int, default=20000, help="sentences of the GPU runs (a) and (c)")
    parser.add_argument("--cpu-sentences", type=int, default=1000, help="sentences of the CPU ÷ GPU comparison (b)")
    parser.add_argument("--max-length", type=int, default=64, help="target tokens per sentence (cap)")
    parser.add_argument("--compute-type", default="int8_float16")
    parser.add_argument("--workers-per-gpu", type=int, default=2, help="actors per GPU: gpus_per_worker = 1 / this")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--shard-size", type=int, default=2000)
    args = parser.parse_args()

    from pipeline.device import cuda_device_count

    args.gpus = cuda_device_count()
    if args.gpus == 0:
        print("no CUDA device visible to CTranslate2 on this machine: nothing measured "
              "(run bench/gpu_teacher.py on a GPU machine)")
        sys.exit(0)
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: CTranslate2 sees a GPU but torch has no CUDA (a CPU build): the top-k reduction runs in "
                 "torch; install a CUDA build (deploy/docker/Dockerfile.cuda)")
    import ctranslate2

    from pipeline.run import init_ray
    from pipeline.tokenizer import Tokenizer

    paths = setup()
    corpus = corpus_file(args.sentences)
    texts = pq.read_table(corpus)["source"].to_pylist()
    tok = Tokenizer.load(paths["tokenizer"])
    sources = [tok.ids_to_tokens(ids) for ids in tok.encode_source(texts)]
    init_ray()
    L, B, ct = args.max_length, args.batch_tokens, args.compute_type
    gpu = dict(device="cuda", compute_type=ct, max_length=L, batch_tokens=B)
    cpu = dict(device="cpu", compute_type="int8", max_length=L, batch_tokens=4096, threads=os.cpu_count())
    few = sources[: args.cpu_sentences]
    r = {"parity": parity(paths, corpus, args)}
    r |= {
        "raw_gpu_greedy": raw_ct2(paths, sources, beam=1, **gpu),
        "raw_gpu_greedy_logits": raw_ct2(paths, sources, beam=1, logits=True, **gpu),
        "raw_gpu_beam4": raw_ct2(paths, sources, beam=4, **gpu),
        "distill_greedy": distill(paths, corpus, mode="greedy", args=args),
        "distill_beam4": distill(paths, corpus, mode="beam", args=args),
        "raw_gpu_greedy_few": raw_ct2(paths, few, beam=1, **gpu),
        "raw_gpu_beam4_few": raw_ct2(paths, few, beam=4, **gpu),
        "raw_cpu_greedy_few": raw_ct2(paths, few, beam=1, **cpu),
        "raw_cpu_beam4_few": raw_ct2(paths, few, beam=4, **cpu),
    }
    r["ratios"] = {
        "distill_over_raw_greedy": r["distill_greedy"]["job_tok_s"] / r["raw_gpu_greedy"],
        "distill_worker_over_raw_greedy": r["distill_greedy"]["worker_tok_s"] / r["raw_gpu_greedy"],
        "distill_over_raw_beam4": r["distill_beam4"]["job_tok_s"] / r["raw_gpu_beam4"],
        "distill_worker_over_raw_beam4": r["distill_beam4"]["worker_tok_s"] / r["raw_gpu_beam4"],
        "raw_gpu_over_cpu_greedy": r["raw_gpu_greedy_few"] / r["raw_cpu_greedy_few"],
        "raw_gpu_over_cpu_beam4": r["raw_gpu_beam4_few"] / r["raw_cpu_beam4_few"],
    }
    r["machine"] = {"gpus": args.gpus, "gpu": torch.cuda.get_device_name(0),
                    "cpu_cores": os.cpu_count(), "ctranslate2": ctranslate2.__version__, "compute_type": ct,
                    "workers_per_gpu": args.workers_per_gpu, "sentences": args.sentences,
                    "cpu_sentences": args.cpu_sentences, "max_length": L}
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
