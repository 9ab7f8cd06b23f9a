"""Teacher training: a Marian model trained with label-smoothed cross-entropy on a parallel corpus.

Real users usually bring their own teacher (an OPUS-MT model converted to CTranslate2); this recipe exists
for the demo and the tests, and for users who want a domain teacher of their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.tokenizer import Tokenizer
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
