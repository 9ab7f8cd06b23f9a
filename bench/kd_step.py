"""KD training-step cost: cached top-k (from shards) vs an online teacher forward, and reader vs step speed.

    .venv/bin/python bench/kd_step.py [--sentences 512] [--steps 10] [--student mini] [--threads 2]

Teacher: the benchmark's 6+6 d512 Marian (torch, float32 for the online path); student: a smaller preset.
Both paths train the student with token-level KD (KL to the teacher's top-8); the online path must first run
the teacher forward and take its top-k, which the offline path reads from the distilled shards instead.
A third step, the same loss written with plain autograd (full logits sliced to drop ``<pad>``, then
``log_softmax(·).gather``), measures what ``trainers.losses``' fused output layer saves.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import torch
from common import WORK, Timer, corpus_file, setup

THREADS = 2
K = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--student", default="mini")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads of the student steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import MarianMTModel

    from pipeline.run import run_job
    from pipeline.spec import JobSpec
    from pipeline.tokenizer import Tokenizer
    from trainers.data import DistilledDataset, collate
    from trainers.losses import marian_logits, token_kd
    from trainers.models import build_marian

    paths = setup()
    tok = Tokenizer.load(paths["tokenizer"])
    name = "kd-step"
    shutil.rmtree(WORK / "datasets" / name, ignore_errors=True)
    run_job(JobSpec.model_validate({
        "corpus": {"path": str(corpus_file(args.sentences))},
        "teacher": {"model": str(paths["ct2"]), "tokenizer": str(paths["tokenizer"]), "compute_type": "float32"},
        "targets": {"top_k": K},
        "output": {"store": str(WORK / "datasets"), "dataset": name, "shard_size": 256},
        "resources": {"workers": 1, "threads_per_worker": THREADS},
    }))
    data = DistilledDataset(str(WORK / "datasets"), name, tokenizer=tok)
    plan = data.plan(max_tokens=2048, seed=0, epoch=0)[: args.steps]

    with Timer() as read:
        batches = [collate(data.fetch(b), np.arange(len(b)), pad_id=tok.pad_id,
                           global_tokens=int(data.target_tokens[b].sum())) for b in plan]
    tokens = sum(int(b["global_tokens"]) for b in batches)

    teacher = MarianMTModel.from_pretrained(paths["hf"]).eval()
    torch.manual_seed(0)
    student = build_marian(args.student, vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step(batch: dict) -> None:
        loss = token_kd(marian_logits(student, batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def plain(batch: dict) -> None:  # the same loss through autograd: what the fused log_softmax_at replaces
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         decoder_input_ids=batch["decoder_input_ids"],
                         decoder_attention_mask=batch["decoder_attention_mask"]).logits[..., :-1]
        mask = batch["labels"] != -100
        log_p = torch.where(mask[..., None], batch["topk_logprobs"], 0.0).log_softmax(-1)
        log_q = torch.log_softmax(logits, -1).gather(-1, batch["topk_ids"])
        loss = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def online(batch: dict) -> None:
        with torch.no_grad():  # what cached top-k saves: the teacher forward and the top-k over V
            logprobs = torch.log_softmax(marian_logits(teacher, batch).float(), -1)
            values, ids = logprobs.topk(K, -1)
            tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-6))
        step(batch | {"topk_ids": ids, "topk_logprobs": values, "tail_logprob": tail})

    step(batches[0]), plain(batches[0]), online(batches[0])  # warm-up
    with Timer() as cached:
        for b in batches:
            step(b)
    with Timer() as autograd:
        for b in batches:
            plain(b)
    with Timer() as live:
        for b in batches:
            online(b)
    print(f"{len(batches)} steps, {tokens:,} target tokens, student '{args.student}', teacher 6+6 d512, "
          f"{args.threads} threads")
    for label, t in (("cached top-k", cached), ("online teacher", live)):
        print(f"step with {label:<15}     {t.seconds / len(batches) * 1000:7.1f} ms  ({tokens / t.seconds:,.0f} tok/s)")
    print(f"cached ÷ online speed-up:     {live.seconds / cached.seconds:.2f}× (goal ≥ 1.5×)")
    print(f"plain autograd step:          {autograd.seconds / len(batches) * 1000:7.1f} ms  "
          f"({tokens / autograd.seconds:,.0f} tok/s); fused ÷ plain speed-up {autograd.seconds / cached.seconds:.2f}×")
    print(f"reader (plan + fetch + collate):      {tokens / read.seconds:,.0f} tok/s = "
          f"{(tokens / read.seconds) / (tokens / cached.seconds):.1f}× the cached step's rate (must stay > 1)")


if __name__ == "__main__":
    main()
