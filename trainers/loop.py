"""The training loop: AdamW, warmup schedule, clipping, periodic validation, early stopping, resume.

The loop is loss-agnostic: ``loss_fn(model, batch) -> (loss, n_target_tokens)``; the teacher passes
label-smoothed NLL, students pass a KD loss. It runs single-process; distributed training wraps the same
model in DDP before calling it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from trainers.checkpoint import (
    Progress,
    append_metrics,
    load_checkpoint,
    save_checkpoint,
    save_model,
)

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]


class OptimConfig(BaseModel):
    """Optimisation and stopping settings shared by every model this project trains."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(7e-4, gt=0, description="peak learning rate")
    warmup_steps: int = Field(400, ge=0, description="linear warmup, in optimizer steps")
    schedule: str = Field("inverse_sqrt", pattern="^(inverse_sqrt|cosine|constant)$")
    weight_decay: float = Field(0.01, ge=0)
    clip_norm: float = Field(1.0, gt=0, description="max global gradient norm")
    max_tokens: int = Field(4096, gt=0, description="padded tokens per batch")
    max_epochs: int = Field(20, gt=0)
    max_steps: int | None = Field(None, gt=0)
    max_minutes: float | None = Field(None, gt=0, description="wall-clock budget; stops cleanly")
    eval_every: int = Field(500, gt=0, description="validate every N steps (and each epoch end)")
    patience: int = Field(5, gt=0, description="evaluations without improvement before stopping")
    checkpoint_every: int = Field(500, gt=0, description="steps between resumable checkpoints")
    seed: int = 0


def make_schedule(optimizer, cfg: OptimConfig, total_steps: int):
    """LambdaLR for the configured schedule; ``total_steps`` matters only for cosine."""
    warmup = max(cfg.warmup_steps, 1)

    def factor(step: int) -> float:
        step = max(step, 1)
        if step < warmup:
            return step / warmup
        if cfg.schedule == "inverse_sqrt":
            return math.sqrt(warmup / step)
        if cfg.schedule == "cosine":
            progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[dict], loss_fn: LossFn) -> float:
    """Token-weighted mean loss over ``batches`` (dropout off)."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        loss, n = loss_fn(model, batch)
        total += loss.item() * n
        tokens += n
    model.train()
    return total / max(tokens, 1)


def fit(
    model: torch.nn.Module,
    *,
    train_batches: Callable[[int], list[dict]],
    valid_batches: list[dict],
    loss_fn: LossFn,
    cfg: OptimConfig,
    run_dir: Path,
    tokenizer_dir: Path | None = None,
    progress_bar: bool = True,
) -> Progress:
    """Trains ``model`` until max epochs/steps/minutes or early stopping; resumes from ``run_dir``.

    Args:
        train_batches: ``epoch -> batches``; must be a pure function of the epoch so that a resumed
            run sees the same batches in the same order.
        valid_batches: fixed validation batches.
        run_dir: receives ``checkpoint/``, ``best/`` and ``metrics.jsonl``.
        tokenizer_dir: copied into ``best/`` so the best model is self-contained.

    Returns:
        Final progress; ``progress.finished`` says why training stopped.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    steps_per_epoch = len(train_batches(0))
    total = cfg.max_steps or steps_per_epoch * cfg.max_epochs
    scheduler = make_schedule(optimizer, cfg, total)
    state = load_checkpoint(run_dir, model, optimizer, scheduler) or Progress()
    if state.finished:
        return state

    model.train()
    # Off a terminal (CI logs, `ray job logs`) a redraw is a new line: print every 30 s instead.
    bar = tqdm(total=total, initial=state.step, disable=not progress_bar, unit="step", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    started = time.monotonic() - state.elapsed_s

    def validate() -> bool:
        """Validates, keeps the best model; returns True when early stopping triggers."""
        valid = evaluate_loss(model, valid_batches, loss_fn)
        improved = valid < state.best_valid
        if improved:
            state.best_valid, state.best_step, state.bad_evals = valid, state.step, 0
            save_model(model, tokenizer_dir, run_dir / "best")
        else:
            state.bad_evals += 1
        record = {"event": "valid", "step": state.step, "epoch": state.epoch, "valid_loss": valid,
                  "best": state.best_valid, "elapsed_s": round(state.elapsed_s, 1)}
        state.history.append(record)
        append_metrics(run_dir, record)
        bar.set_postfix(valid=f"{valid:.3f}", best=f"{state.best_valid:.3f}")
        return state.bad_evals >= cfg.patience

    cached: tuple[int, list[dict]] = (-1, [])
    while not state.finished:
        if cached[0] != state.epoch:
            cached = (state.epoch, train_batches(state.epoch))
        batches = cached[1]
        for batch in batches[state.batch_in_epoch :]:
            loss, n_tokens = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.batch_in_epoch += 1
            state.target_tokens += n_tokens
            state.elapsed_s = time.monotonic() - started
            bar.update(1)
            if state.step % 50 == 0:
                rate = state.target_tokens / max(state.elapsed_s, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
                append_metrics(run_dir, {"event": "train", "step": state.step, "loss": loss.item(),
                                         "lr": scheduler.get_last_lr()[0],
                                         "grad_norm": float(grad_norm), "tokens_per_s": rate})
            if state.step % cfg.eval_every == 0 and validate():
                state.finished = "early_stopping"
            elif cfg.max_steps and state.step >= cfg.max_steps:
                state.finished = "max_steps"
            elif cfg.max_minutes and state.elapsed_s >= cfg.max_minutes * 60:
                state.finished = "max_minutes"
            if state.finished or state.step % cfg.checkpoint_every == 0:
                break
        else:  # epoch completed
            state.epoch += 1
            state.batch_in_epoch = 0
            if state.step % cfg.eval_every != 0 and validate():
                state.finished = "early_stopping"
            elif state.epoch >= cfg.max_epochs:
                state.finished = "max_epochs"
        if state.finished and (not state.history or state.history[-1]["step"] != state.step):
            validate()  # the steps since the last validation may hold the best model
        save_checkpoint(run_dir, model, optimizer, scheduler, state)
    bar.close()
    append_metrics(run_dir, {"event": "finished", "reason": state.finished, "step": state.step,
                             "best_valid": state.best_valid, "elapsed_s": state.elapsed_s})
    return state
