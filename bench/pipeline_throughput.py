"""Pipeline throughput, measured side by side in one run on the same model, sentences and cores.

    .venv/bin/python bench/pipeline_throughput.py [--sentences 2000] [--max-length 32] [--hf-sentences 200]
                                                  [--greedy-only]

Prints:
  (a) distill job target tokens/s ÷ raw CTranslate2 ``translate_batch`` tokens/s, greedy (top-k 8 stored)
      and beam 4 (n-best 1, top-k 8 from the second teacher-forced pass);
  (b) distill ÷ Hugging Face ``generate`` on the same weights, next to raw CT2 ÷ ``generate``;
  (c) 2 workers × 1 thread vs 1 worker × 2 threads (greedy);
  (d) bytes per target token on disk.
"Job" rates count the whole job (Ray start, actor start, model load, writes); "worker" rates count the
seconds the workers spent on their shards, i.e. the steady state a long job converges to.
"""

from __future__ import annotations

import argparse
import json

import pyarrow.parquet as pq
from common import WORK, Timer, corpus_file, measure_job, setup

THREADS = 2  # the cores of this machine; every system gets the same
SHARD_SIZE = 500


def raw_ct2(paths, sources: list[list[str]], *, beam: int, max_length: int, replicas: int = 1,
            logits: bool = False) -> float:
    """Target tokens/s of plain ``translate_batch`` (int8, same token budget as the pipeline); ``replicas``
    translators run batches in parallel (``inter_threads``), sharing the cores between them. ``logits``
    also asks for the full-vocabulary logits of every step, as the pipeline's greedy pass must."""
    from pipeline.ct2 import load_translator

    translator = load_translator(paths["ct2"], compute_type="int8", intra_threads=THREADS // replicas,
                                 inter_threads=replicas)
    with Timer() as t:
        results = translator.translate_batch(sources, beam_size=beam, max_batch_size=4096, batch_type="tokens",
                                             max_decoding_length=max_length, min_decoding_length=0,
                                             return_logits_vocab=logits)
    tokens = sum(min(len(r.hypotheses[0]) + 1, max_length) for r in results)
    return tokens / t.seconds


def hf_generate(paths, texts: list[str], *, beam: int, max_length: int) -> float:
    import torch
    from transformers import MarianMTModel

    from pipeline.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    tok = Tokenizer.load(paths["tokenizer"])
    model = MarianMTModel.from_pretrained(paths["hf"]).eval()
    ids = tok.encode_source(texts)
    tokens, seconds = 0, 0.0
    for start in range(0, len(ids), 32):
        batch = ids[start:start + 32]
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([x + [tok.pad_id] * (width - len(x)) for x in batch])
        with torch.no_grad(), Timer() as t:
            out = model.generate(input_ids=input_ids, attention_mask=(input_ids != tok.pad_id).long(), num_beams=beam,
                                 do_sample=False, max_new_tokens=max_length, min_new_tokens=0)
        seconds += t.seconds
        tokens += int((out[:, 1:] != tok.pad_id).sum())  # generated tokens, </s> included
    return tokens / seconds


def job_spec(paths, corpus, *, mode: str, workers: int, threads: int, max_length: int, name: str):
    from pipeline.spec import JobSpec

    decoding = {"mode": mode, "max_length": max_length} | ({"beam_size": 4} if mode == "beam" else {})
    return JobSpec.model_validate({
        "corpus": {"path": str(corpus)},
        "teacher": {"model": str(paths["ct2"]), "tokenizer": str(paths["tokenizer"]), "compute_type": "int8"},
        "decoding": decoding,
        "targets": {"top_k": 8},
        "output": {"store": str(WORK / "datasets"), "dataset": name, "shard_size": SHARD_SIZE},
        "resources": {"workers": workers, "threads_per_worker": threads, "batch_tokens": 4096},
    })


def distill(paths, corpus, **kw) -> dict:
    return measure_job(job_spec(paths, corpus, **kw))


def in_process(paths, corpus, *, max_length: int) -> float:
    """Target tokens/s of ``TeacherWorker.distill`` called shard by shard in this process: decode, top-k and
    the shard's Arrow table, without Ray, Parquet writes or hashing."""
    import pyarrow.compute as pc

    from pipeline.corpus import read_corpus
    from pipeline.worker import TeacherWorker

    spec = job_spec(paths, corpus, mode="greedy", workers=1, threads=THREADS, max_length=max_length, name="in-process")
    worker = TeacherWorker(spec)
    examples = read_corpus(spec.corpus, spec.filters).table  # the examples a job distils, filters applied
    n = examples.num_rows
    tokens = 0
    with Timer() as t:
        for start in range(0, n, SHARD_SIZE):
            shard = worker.distill(examples.slice(start, SHARD_SIZE))
            tokens += pc.sum(pc.list_value_length(shard["hyp_ids"])).as_py()
    return tokens / t.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--hf-sentences", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=32, help="target tokens per sentence (cap)")
    parser.add_argument("--greedy-only", action="store_true", help="only (a) and (c) for greedy: a quick A/B")
    args = parser.parse_args()

    from pipeline.run import init_ray
    from pipeline.tokenizer import Tokenizer

    paths = setup()
    corpus = corpus_file(args.sentences)
    texts = pq.read_table(corpus)["source"].to_pylist()
    tok = Tokenizer.load(paths["tokenizer"])
    sources = [tok.ids_to_tokens(ids) for ids in tok.encode_source(texts)]
    init_ray()
    L = args.max_length
    r = {
        "raw_greedy": raw_ct2(paths, sources, beam=1, max_length=L),
        "raw_greedy_2x1": raw_ct2(paths, sources, beam=1, max_length=L, replicas=2),
        "raw_greedy_logits": raw_ct2(paths, sources, beam=1, max_length=L, logits=True),
        "in_process_greedy": in_process(paths, corpus, max_length=L),
        "greedy_1x2": distill(paths, corpus, mode="greedy", workers=1, threads=2, max_length=L, name="g1x2"),
        "greedy_2x1": distill(paths, corpus, mode="greedy", workers=2, threads=1, max_length=L, name="g2x1"),
    }
    g, g2 = r["greedy_1x2"], r["greedy_2x1"]
    lines = [
        f"{args.sentences} sentences, ≤{L} target tokens, 6+6 d512 Marian, CT2 int8, {THREADS} threads",
        f"raw CT2 translate_batch: greedy {r['raw_greedy']:,.0f} tok/s (1 × 2 threads), "
        f"{r['raw_greedy_2x1']:,.0f} tok/s (2 replicas × 1 thread)",
        f"distill greedy top-8:    job {g['job_tok_s']:,.0f} tok/s, workers {g['worker_tok_s']:,.0f} tok/s",
        "(a) distill ÷ raw CT2:   greedy job {:.2f} / workers {:.2f} (goal ≥ 0.90)".format(
            g["job_tok_s"] / r["raw_greedy"], g["worker_tok_s"] / r["raw_greedy"]),
        "    where the gap is, ÷ raw CT2: raw CT2 returning every step's logits {:.2f} (the greedy ceiling); "
        "TeacherWorker in-process (decode + top-k + Arrow, no Ray or writes) {:.2f}".format(
            r["raw_greedy_logits"] / r["raw_greedy"], r["in_process_greedy"] / r["raw_greedy"]),
        "(c) 2 workers × 1 thread ÷ 1 worker × 2 threads: job {:.2f}, workers {:.2f}".format(
            g2["job_tok_s"] / g["job_tok_s"], g2["worker_tok_s"] / g["worker_tok_s"]),
        "    best vs best, greedy: distill 2 workers × 1 thread {:,.0f} tok/s (job) / {:,.0f} (workers) ÷ raw CT2 "
        "2 replicas × 1 thread {:,.0f} tok/s = {:.2f} / {:.2f}".format(
            g2["job_tok_s"], g2["worker_tok_s"], r["raw_greedy_2x1"], g2["job_tok_s"] / r["raw_greedy_2x1"],
            g2["worker_tok_s"] / r["raw_greedy_2x1"]),
    ]
    if not args.greedy_only:
        r |= {
            "raw_beam4": raw_ct2(paths, sources, beam=4, max_length=L),
            "hf_greedy": hf_generate(paths, texts[: args.hf_sentences], beam=1, max_length=L),
            "hf_beam4": hf_generate(paths, texts[: args.hf_sentences], beam=4, max_length=L),
            "beam4_1x2": distill(paths, corpus, mode="beam", workers=1, threads=2, max_length=L, name="b1x2"),
        }
        b = r["beam4_1x2"]
        lines += [
            f"raw CT2 beam 4: {r['raw_beam4']:,.0f} tok/s; HF generate (float32): greedy {r['hf_greedy']:,.0f} "
            f"tok/s, beam 4 {r['hf_beam4']:,.0f} tok/s",
            f"distill beam 4 top-8:    job {b['job_tok_s']:,.0f} tok/s, workers {b['worker_tok_s']:,.0f} tok/s",
            "(a) distill ÷ raw CT2:   beam 4 job {:.2f} / workers {:.2f} (goal ≥ 0.65)".format(
                b["job_tok_s"] / r["raw_beam4"], b["worker_tok_s"] / r["raw_beam4"]),
            "(b) ÷ HF generate:       greedy distill {:.2f} vs raw CT2 {:.2f} (1 × 2 threads), {:.2f} vs {:.2f} "
            "(2 × 1: distill workers, raw replicas); beam 4 distill {:.2f} vs raw CT2 {:.2f}".format(
                g["worker_tok_s"] / r["hf_greedy"], r["raw_greedy"] / r["hf_greedy"],
                g2["worker_tok_s"] / r["hf_greedy"], r["raw_greedy_2x1"] / r["hf_greedy"],
                b["worker_tok_s"] / r["hf_beam4"], r["raw_beam4"] / r["hf_beam4"]),
            f"(d) bytes per target token on disk (zstd): greedy {g['bytes_per_token']:.1f}, beam 4 "
            f"{b['bytes_per_token']:.1f}",
        ]
    print("\n".join(lines))
    (WORK / "pipeline_throughput.json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
