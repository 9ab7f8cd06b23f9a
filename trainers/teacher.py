"""Teacher training: a Marian model trained with label-smoothed cross-entropy on a parallel corpus.

Real users usually bring their own teacher (an OPUS-MT model converted to CTranslate2); this recipe exists
for the demo and the tests, and for users who want a domain teacher of their own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.tokenizer import Tokenizer, copy_tokenizer_files
from trainers.batching import seq2seq_batch, token_batches
from trainers.checkpoint import Progress, check_resumable, clear_run, file_hash, fingerprint
from trainers.loop import OptimConfig, fit
from trainers.losses import marian_logits, nll
from trainers.models import ModelSize, build_marian, count_parameters, resolve_size


class TeacherConfig(BaseModel):
    """Everything ``distillery teacher train`` needs; loadable from YAML/JSON."""

    model_config = ConfigDict(extra="forbid")

    train: Path = Field(description="Parquet with `source` and `target` columns (the train split)")
    valid: Path = Field(description="Parquet with `source` and `target` columns (the valid split)")
    tokenizer: Path = Field(description="tokenizer directory shared by teacher and students")
    out: Path = Field(description="run directory: checkpoint/, best/, metrics.jsonl")
    size: str | ModelSize = "small"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    max_source_tokens: int = Field(256, gt=0, description="longer examples are truncated")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores")
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    optim: OptimConfig = OptimConfig()

    @field_validator("size")
    @classmethod
    def _fixed_width(cls, size: str | ModelSize) -> str | ModelSize:
        if resolve_size(size).ffn_gates is not None:
            raise ValueError("ffn_gates (a learned FFN width) is for students; a teacher trains a fixed shape")
        return size

    @field_validator("optim")
    @classmethod
    def _loss_selection(cls, optim: OptimConfig) -> OptimConfig:
        if optim.select_by != "valid_loss":
            raise ValueError("the teacher selects its best model by valid_loss (valid_bleu is for students)")
        return optim


def load_pairs(path: Path, tokenizer: Tokenizer, max_len: int) -> tuple[list, list]:
    """Tokenizes a split; over-long sequences are truncated (keeping the final ``</s>``)."""
    table = pq.read_table(path, columns=["source", "target"])
    src = tokenizer.encode_source(table.column("source").to_pylist())
    tgt = tokenizer.encode_target(table.column("target").to_pylist())
    cut = [s if len(s) <= max_len else s[: max_len - 1] + [tokenizer.eos_id] for s in src]
    cut_t = [t if len(t) <= max_len else t[: max_len - 1] + [tokenizer.eos_id] for t in tgt]
    return cut, cut_t


def make_batches(src, tgt, *, pad_id, max_tokens, seed, epoch, shuffle) -> list[dict]:
    lengths = np.fromiter((max(len(s), len(t)) for s, t in zip(src, tgt, strict=True)), dtype=np.int64)
    return [
        seq2seq_batch([src[i] for i in idx], [tgt[i] for i in idx], pad_id=pad_id)
        for idx in token_batches(lengths, max_tokens=max_tokens, seed=seed, epoch=epoch, shuffle=shuffle)
    ]


def training_fingerprint(cfg: TeacherConfig, tokenizer: Tokenizer) -> dict:
    """``checkpoint.fingerprint`` of what changes the teacher's training (data by content; no budgets)."""
    return fingerprint({
        "train": file_hash(cfg.train), "valid": file_hash(cfg.valid), "tokenizer": tokenizer.vocab_hash,
        "size": resolve_size(cfg.size).model_dump(), "label_smoothing": cfg.label_smoothing,
        "max_source_tokens": cfg.max_source_tokens, "optim": cfg.optim.trajectory_fields(),
    })


def train_teacher(cfg: TeacherConfig, *, progress_bar: bool = True, restart: bool = False) -> Progress:
    """Trains (or resumes) a teacher; the best model ends up in ``cfg.out / "best"``.

    Args:
        restart: discard what ``cfg.out`` holds and start over (otherwise a run of another training
            configuration there is refused).

    Raises:
        CheckpointError: ``cfg.out`` holds a run whose training settings differ (they are named).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    fp = training_fingerprint(cfg, tokenizer)
    if restart:
        clear_run(cfg.out, extra=("model_info.json",))
    check_resumable(cfg.out, fp)  # before config.json is overwritten
    src, tgt = load_pairs(cfg.train, tokenizer, cfg.max_source_tokens)
    vsrc, vtgt = load_pairs(cfg.valid, tokenizer, cfg.max_source_tokens)
    if not src or not vsrc:
        raise ValueError(f"empty training or validation split ({len(src)} / {len(vsrc)} pairs)")
    torch.manual_seed(cfg.optim.seed)
    model = build_marian(cfg.size, vocab_size=len(tokenizer), pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    (cfg.out / "model_info.json").write_text(
        json.dumps({"parameters": count_parameters(model), "train_pairs": len(src), "valid_pairs": len(vsrc)})
    )
    pad_id, opt = tokenizer.pad_id, cfg.optim

    def loss_fn(model, batch):
        n_tokens = int((batch["labels"] != -100).sum())
        return nll(marian_logits(model, batch), batch["labels"], label_smoothing=cfg.label_smoothing), n_tokens

    valid = make_batches(vsrc, vtgt, pad_id=pad_id, max_tokens=opt.max_tokens, seed=0, epoch=0, shuffle=False)
    return fit(
        model,
        train_batches=lambda epoch: make_batches(
            src, tgt, pad_id=pad_id, max_tokens=opt.max_tokens, seed=opt.seed, epoch=epoch, shuffle=True
        ),
        valid_batches=valid,
        loss_fn=loss_fn,
        cfg=opt,
        run_dir=cfg.out,
        tokenizer_dir=cfg.tokenizer,
        progress_bar=progress_bar,
        device=resolve_device(cfg.device),
        fingerprint=fp,
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first GPU when torch sees one, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no GPU")
    return device


def package_teacher(run: Path, out: Path, *, test: Path, average: int = 0, recipe: Path | None = None,
                    command: str = "", threads: int = 2) -> dict:
    """Turns a teacher run into a shippable CTranslate2 int8 directory with its tokenizer, scores and README.

    The model is the average of the run's last ``average`` snapshots (``optim.keep_last``), or with
    ``average=0`` its ``best/`` model (its latest ``checkpoint/`` while no validation has picked one). It is
    scored on ``test`` (sacrebleu BLEU/chrF, beam 4) and timed (sentences/s with ``threads``); ``model_info.json``
    and ``README.md`` record the numbers, the training config, the command and the commit that produced it.

    Returns:
        What ``model_info.json`` holds.
    """
    import datetime
    import platform
    import subprocess

    from pipeline.evaluate import score, translate
    from trainers.checkpoint import average_snapshots
    from trainers.export import export_ct2

    run, out = Path(run), Path(out)
    cfg = TeacherConfig.model_validate_json((run / "config.json").read_text())
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [e for e in events if e["event"] == "train"][-1]
    if average:
        steps = average_snapshots(run, average, run / "averaged", tokenizer_dir=cfg.tokenizer)
        source, what = run / "averaged", f"the average of the snapshots at steps {', '.join(map(str, steps))}"
    elif (run / "best").is_dir():
        source, what = run / "best", "the best model by validation loss"
    else:
        progress = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["progress"]
        trained = {"step": progress["step"], "elapsed_s": progress["elapsed_s"]}
        source, what = run / "checkpoint", f"the latest checkpoint (step {trained['step']}; no validation yet)"
    tmp = out.with_name(out.name + ".tmp")
    export_ct2(source, tmp, quantization="int8")
    copy_tokenizer_files(cfg.tokenizer, tmp)  # the checkpoint holds none; best/ and averaged/ the same files
    table = pq.read_table(test, columns=["source", "target"])
    speed: dict = {}
    tokenizer = Tokenizer.load(tmp)
    hyps = translate(tmp, tokenizer, table["source"].to_pylist(), beam_size=4, threads=threads, speed=speed)
    scores = score(hyps, table["target"].to_pylist())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    info = {
        "parameters": json.loads((run / "model_info.json").read_text())["parameters"],
        "steps": trained["step"], "train_hours": round(trained["elapsed_s"] / 3600, 2), "model": what,
        "bleu": scores.bleu, "chrf": scores.chrf, "bleu_signature": scores.bleu_signature,
        "test": str(test), "test_sentences": scores.sentences, "speed": speed,
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {cfg.threads or 'all'}",
        "commit": commit, "packaged_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (tmp / "model_info.json").write_text(json.dumps(info, indent=2) + "\n")
    config = recipe.read_text() if recipe else cfg.model_dump_json(indent=2)
    (tmp / "README.md").write_text(TEACHER_README.format(
        **info, command=command or "see the recipe", config=config.strip(), size=cfg.size,
        train_pairs=json.loads((run / "model_info.json").read_text()).get("train_pairs", "?"),
        mb=sum(p.stat().st_size for p in tmp.iterdir()) / 1e6, sps=speed["sentences_per_s"],
        threads=speed["threads"]))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


TEACHER_README = """# The shipped de→en teacher

A Marian transformer (`{size}`, {parameters:,} parameters) trained by this project on the bundled Bible corpus,
converted to CTranslate2 int8 ({mb:.1f} MB with its tokenizer). Written by `distillery teacher package`;
`make teacher` rebuilds it from scratch (it resumes, so it may span several sessions).

| | |
|---|---|
| test BLEU / chrF | **{bleu:.2f}** / {chrf:.2f} ({test_sentences:,} held-out verses, beam 4, CT2 int8) |
| BLEU signature | `{bleu_signature}` |
| decoding speed | {sps:.1f} sentences/s, CT2 int8 beam 4, {threads} threads |
| model | {model} |
| training | {steps:,} steps, {train_hours} h on {hardware} |
| training data | {train_pairs:,} pairs: the bundled train split and the Schlachter edition of the same verses |
| commit | `{commit}` |
| packaged | {packaged_at} |

The test chapters are unseen in every edition (`pipeline.bundled.build_teacher_corpus`).

## Command

```
{command}
```

## Training config (`recipes/teacher-bible-de-en.yaml`)

```yaml
{config}
```
"""
