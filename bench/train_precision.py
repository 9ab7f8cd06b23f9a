"""Mixed precision in the training loop: fp32 vs bf16 autocast, side by side on one device.

    .venv/bin/python bench/train_precision.py [--device auto] [--size base] [--steps 200] [--max-tokens 8192]

Trains the same Marian (same seed, same batches) twice through ``trainers.loop.fit`` — once in fp32, once with
``precision="bf16"`` — and prints training tokens/s of each, their ratio, and the validation loss each reached,
so the speed-up is shown next to what it costs in accuracy. bf16 pays off on GPUs with bf16 tensor cores; on
most CPUs it is emulated and slower, which is why ``precision="auto"`` keeps CPUs in fp32.
"""

from __future__ import annotations

import argparse
import json

from common import WORK, bench_tokenizer, corpus_file


def run(tokenizer, *, device: str, size: str, steps: int, max_tokens: int, precision: str) -> dict:
    import shutil

    from trainers.loop import OptimConfig
    from trainers.teacher import TeacherConfig, train_teacher

    out = WORK / f"precision-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TeacherConfig(
        train=corpus_file(20000), valid=corpus_file(300), tokenizer=tokenizer, out=out, size=size,
        device=device,
        optim=OptimConfig(max_steps=steps, eval_every=steps, checkpoint_every=steps, warmup_steps=steps // 4,
                          lr=1e-3, max_tokens=max_tokens, log_every=max(steps // 10, 1), precision=precision),
    )
    state = train_teacher(cfg, progress_bar=False)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    # The rate between the first and the last record: leaves out step 1 (CUDA context, kernel selection).
    first, last = train[0], train[-1]
    return {"tok_s": (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]),
            "valid_loss": state.best_valid, "steps": state.step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="base")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8192)
    args = parser.parse_args()

    import torch

    from trainers.teacher import resolve_device

    tokenizer = bench_tokenizer()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    r = {p: run(tokenizer, device=str(device), size=args.size, steps=args.steps, max_tokens=args.max_tokens,
                precision=p) for p in ("fp32", "bf16")}
    print(f"Marian '{args.size}', {args.steps} steps of ≤{args.max_tokens} tokens on {name}")
    for p, v in r.items():
        print(f"  {p}: {v['tok_s']:,.0f} target tok/s, valid loss {v['valid_loss']:.4f}")
    print(f"bf16 ÷ fp32 training throughput: {r['bf16']['tok_s'] / r['fp32']['tok_s']:.2f}; valid loss "
          f"difference {r['bf16']['valid_loss'] - r['fp32']['valid_loss']:+.5f}")
    (WORK / "train_precision.json").write_text(json.dumps({"device": name, "args": vars(args), **r}, indent=2))


if __name__ == "__main__":
    main()
