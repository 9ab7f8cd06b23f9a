"""Training-step cost of the online losses (issue #13 §2): what a step of each method in the okd grid costs.

    .venv/bin/python bench/online_step.py [--steps 6] [--student tiny] [--threads 1] [--max-tokens 3000]

The teacher is the shipped one (``teachers/bible-de-en``, converted back to torch as the okd grid does, into
``work/bench/``); the student a fresh preset; the batches the bundled corpus's verses, packed to ``--max-tokens``
target tokens like the grid's. One run times, side by side on the same batches:

- ``token``: forward KL to the cached top-8 (computed once beforehand from the same teacher, as shards hold it);
- ``okd``: the teacher with LoRA modules runs forward and backward beside the student, loss ``KL + anchor·NLL_T``;
  once with ``trainers.losses``' fused full-vocabulary KL and once with the same KL through plain autograd;
- ``on_policy``: the student samples each batch's targets, then the frozen teacher scores them (every batch
  sampled; the grid samples half its batches, so its average step is the mean of this and an unsampled one,
  also printed);
- sampling alone: one batch sampled by transformers' multinomial and by ``InverseCdfSampler``.

Ratios to the ``token`` step are what the okd grid's cost comment (``experiments/okd.yaml``) quotes.
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from common import ROOT, WORK, Timer

TEACHER = ROOT / "teachers" / "bible-de-en"
K = 8


def batches(tok, *, count: int, max_tokens: int) -> list[dict]:
    """``count`` reference batches of about ``max_tokens`` target tokens (sorted by length, like the planner)."""
    from pipeline.bundled import BUNDLED_CORPUS
    from trainers.batching import seq2seq_batch

    table = pq.read_table(BUNDLED_CORPUS).slice(0, 4000)
    src = tok.encode_source(table["de"].to_pylist())
    tgt = tok.encode_target(table["en"].to_pylist())
    order = sorted(range(len(src)), key=lambda i: len(tgt[i]))
    out = []
    for j in range(count):  # spread over the length range
        rows, at = [], (j + 1) * len(order) // (count + 2)
        while (len(rows) + 1) * len(tgt[order[at + len(rows)]]) <= max_tokens:
            rows.append(order[at + len(rows)])
        out.append(seq2seq_batch([src[i] for i in rows], [tgt[i] for i in rows], pad_id=tok.pad_id))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--student", default="tiny")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a grid student has 1)")
    parser.add_argument("--max-tokens", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from distillery.cli import quiet_libraries

    quiet_libraries()
    from pipeline.evaluate import decode_limit
    from pipeline.tokenizer import Tokenizer
    from trainers.ct2_back import save_back
    from trainers.losses import LossConfig, MarianForward, compute_loss, marian_logits
    from trainers.models import build_marian
    from trainers.online import InverseCdfSampler, OnlineTeacher, anchor_loss, sample_targets

    hf = WORK / "shipped-teacher-hf"
    if not (hf / "model.safetensors").is_file():
        save_back(TEACHER, hf, check=False)
    tok = Tokenizer.load(hf)
    data = batches(tok, count=args.steps + 1, max_tokens=args.max_tokens)
    tokens = sum(int((b["labels"] != -100).sum()) for b in data[1:])

    frozen = OnlineTeacher(hf, LossConfig(name="on_policy"), tokenizer=tok, device=torch.device("cpu"))
    with torch.no_grad():  # what a shard holds: the teacher's top-k along the reference
        for b in data:
            logprobs = torch.log_softmax(marian_logits(frozen.model, b).float(), -1)
            b["topk_logprobs"], b["topk_ids"] = logprobs.topk(K, -1)
            b["tail_logprob"] = torch.log1p(-b["topk_logprobs"].exp().sum(-1).clamp(max=1 - 1e-6))

    def plain_kl(logits, batch):  # the KL the fused one replaces, through autograd
        log_p = F.log_softmax(batch["teacher_logits"].float(), -1)
        log_q = F.log_softmax(logits.float(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return torch.where(batch["labels"] != -100, kl, 0.0).sum()

    def method(name: str, *, fused: bool = True, sample: bool = False):
        torch.manual_seed(0)
        student = build_marian(args.student, vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id)
        cfg = LossConfig(name=name)
        online = OnlineTeacher(hf, cfg, tokenizer=tok, device=torch.device("cpu")) if name != "token" else None
        if online is not None and online.trainable:
            student.online_modules = online.modules()
        model = MarianForward(student)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(batch: dict) -> None:
            if sample:
                limit = decode_limit(batch["input_ids"].shape[1], length_ratio=2.0, max_length=256)
                batch = sample_targets(student, batch, pad_id=tok.pad_id, eos_id=tok.eos_id, max_new_tokens=limit)
            if online is not None:
                batch = batch | {"teacher_logits": online.logits(batch)}
            logits, _ = model(batch)
            loss = compute_loss(cfg, logits, batch, reduction="sum") if fused else plain_kl(logits, batch)
            if name == "okd":
                loss = loss + cfg.anchor * anchor_loss(batch["teacher_logits"], batch["labels"])
            optimizer.zero_grad()
            (loss / int((batch["labels"] != -100).sum())).backward()
            optimizer.step()

        step(data[0])  # warm-up
        with Timer() as t:
            for b in data[1:]:
                step(b)
        return t.seconds / args.steps

    runs = {"token": method("token"), "okd": method("okd"), "okd, plain-autograd KL": method("okd", fused=False),
            "on_policy, batch sampled": method("on_policy", sample=True),
            "on_policy, batch not sampled": method("on_policy")}
    runs["on_policy, the grid's half"] = (runs["on_policy, batch sampled"] + runs["on_policy, batch not sampled"]) / 2

    # Sampling alone: transformers' multinomial (an exponential variate per vocabulary entry) vs InverseCdfSampler.
    torch.manual_seed(0)
    student = build_marian(args.student, vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id).eval()
    b = data[1]
    common = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "num_beams": 1,
              "max_new_tokens": decode_limit(b["input_ids"].shape[1], length_ratio=2.0, max_length=256),
              "suppress_tokens": [tok.pad_id]}
    ways = {"multinomial": {"do_sample": True, "top_k": 0, "top_p": 1.0},
            "inverse CDF": {"do_sample": False, "logits_processor": [InverseCdfSampler()]}}
    sampling = {}
    with torch.no_grad():
        for _ in range(2):  # the first round warms up
            for way, options in ways.items():
                with Timer() as t:
                    out = student.generate(**common, **options)
                sampling[way] = t.seconds
    print(f"{args.steps} steps of ~{tokens // args.steps:,} reference target tokens, student '{args.student}', "
          f"teacher {TEACHER.name} (torch, float32), {args.threads} thread(s)")
    for label, seconds in runs.items():
        print(f"{label:<30} {seconds * 1000:8.1f} ms/step  {seconds / runs['token']:5.2f}× token")
    print(f"okd: fused KL ÷ plain-autograd KL step time {runs['okd'] / runs['okd, plain-autograd KL']:.2f}")
    print(f"sampling one batch ({b['input_ids'].shape[0]} sources, {out.shape[1] - 1} steps): transformers' "
          f"multinomial {sampling['multinomial']:.2f} s, inverse CDF {sampling['inverse CDF']:.2f} s "
          f"({sampling['multinomial'] / sampling['inverse CDF']:.2f}×)")


if __name__ == "__main__":
    main()
