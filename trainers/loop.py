"""The training loop: AdamW, warmup schedule, clipping, periodic validation, early stopping, resume.

The loop is loss-agnostic: ``loss_fn(model, batch) -> (loss, n_target_tokens)``; the teacher passes
label-smoothed NLL, students pass a KD loss. The same loop runs on one process or on each Ray Train worker:
with ``dist`` set, each worker gets its slice of every global batch (the caller normalises its loss by the
step's global token count), validation sums are all-reduced so every worker takes the same early-stopping
decision, and only rank 0 writes checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from trainers.checkpoint import (
    Progress,
    append_metrics,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_model,
    save_snapshot,
)

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Dist:
    """This process's place among the training workers (``torch.distributed`` is initialised by Ray Train)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        """Sums ``values`` over all workers (identity on one worker)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_gather(self, obj) -> list:
        """``obj`` of every worker, indexed by rank (any picklable value)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper and a forward adapter (``trainers.losses.MarianForward``),
    or the model itself."""
    model = getattr(model, "module", model)
    return getattr(model, "unwrapped", model)


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
    select_by: Literal["valid_loss", "valid_bleu"] = Field(
        "valid_loss", description="the validation metric that picks best/ and drives early stopping; valid_bleu "
        "(higher is better) is measured by students at every validation, not by the teacher")
    checkpoint_every: int = Field(500, gt=0, description="steps between resumable checkpoints")
    log_every: int = Field(50, gt=0, description="steps between training-loss records in metrics.jsonl")
    keep_last: int = Field(0, ge=0, description="keep the model of the last N validations under snapshots/ "
                           "(for checkpoint averaging); 0 keeps none")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 elsewhere; bf16 forces it (CPU too)")
    seed: int = 0

    def trajectory_fields(self) -> dict:
        """The settings that change the trained weights or the selected model: all but the budget and cadence
        fields (``BUDGET_FIELDS``), so a run stopped by its budget continues under a larger one. A cosine
        schedule decays over the whole budget, so there max_steps / max_epochs change the trajectory too."""
        budget = BUDGET_FIELDS - ({"max_steps", "max_epochs"} if self.schedule == "cosine" else set())
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in budget}


# How long to train and how often to look (validation draws no random numbers); patience is a stopping rule.
BUDGET_FIELDS = frozenset({"max_epochs", "max_steps", "max_minutes", "eval_every", "patience", "checkpoint_every",
                           "log_every", "keep_last"})


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    bf16 keeps fp32's exponent range, so unlike fp16 it needs no loss scaling. "auto" turns it on only on
    CUDA devices with bf16 support: on most CPUs bf16 matmuls are emulated and slower than fp32.
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors on ``device`` (other values as they are)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors and scalars do not. A parameter with an ``lr_scale`` attribute (set by the
    module that owns it, e.g. ``trainers.gates.UncertaintyGate``) learns at ``lr_scale × lr`` in a group of its
    own, which the schedule scales like the others; a model without one has the same two groups as always."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for p in model.parameters():
        groups.setdefault((p.ndim >= 2, float(getattr(p, "lr_scale", 1.0))), []).append(p)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
         for (decay, scale), params in groups.items()],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )


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
def evaluate_loss(model, batches: Iterable[dict], loss_fn: LossFn, dist: Dist = Dist(),
                  device: torch.device = CPU, amp: torch.dtype | None = None) -> float:
    """Token-weighted mean of the per-batch mean ``loss_fn`` over ``batches`` on all workers (dropout off)."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        with _autocast(device, amp):  # no DDP hooks below: workers may hold different batch counts
            loss, n = loss_fn(unwrap(model), to_device(batch, device))
        total += loss.item() * n
        tokens += n
    model.train()
    total, tokens = dist.all_sum(total, tokens)
    return total / max(tokens, 1)


def _budget_left(state: Progress, cfg: OptimConfig) -> bool:
    """Whether ``cfg``'s limits allow more training than ``state`` has done."""
    return (state.epoch < cfg.max_epochs and (cfg.max_steps is None or state.step < cfg.max_steps)
            and (cfg.max_minutes is None or state.elapsed_s < cfg.max_minutes * 60))


def _improved(record: dict, state: Progress, select_by: str) -> bool:
    """Whether the validation ``record`` beats the best model so far on the ``select_by`` metric."""
    if select_by not in record:
        raise ValueError(f"select_by={select_by!r}, but this validation did not measure it (students measure "
                         "valid_bleu; the teacher selects by valid_loss)")
    if select_by == "valid_bleu":
        return state.best_bleu is None or record["valid_bleu"] > state.best_bleu
    return record["valid_loss"] < state.best_valid


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def fit(
    model: torch.nn.Module,
    *,
    train_batches: Callable[[int], Sequence[dict]],
    valid_batches: list[dict],
    loss_fn: LossFn,
    cfg: OptimConfig,
    run_dir: Path,
    tokenizer_dir: Path | None = None,
    progress_bar: bool = True,
    valid_loss_fn: LossFn | None = None,
    dist: Dist = Dist(),
    on_validate: Callable[[dict], None] | None = None,
    device: torch.device = CPU,
    fingerprint: dict | None = None,
    on_checkpoint: Callable[[Progress], None] | None = None,
) -> Progress:
    """Trains ``model`` until max epochs/steps/minutes or early stopping; resumes from ``run_dir``.

    Args:
        train_batches: ``epoch -> batches``; must be a pure function of the epoch so that a resumed
            run sees the same batches in the same order. Any sequence: a lazy one (``PlannedBatches``)
            builds each batch when the loop reaches it, so an epoch's batches are never all in memory.
        valid_batches: fixed validation batches.
        run_dir: receives ``checkpoint/``, ``best/`` and ``metrics.jsonl``.
        tokenizer_dir: copied into ``best/`` so the best model is self-contained.
        valid_loss_fn: validation loss (default ``loss_fn``); students validate with NLL on references.
        dist: rank and world size when several workers train together.
        on_validate: called with each validation record (e.g. to log gate values or report to Ray); setting
            ``record["selectable"] = False`` keeps that model out of best/ and out of early stopping's count.
        device: where the model already is (or is moved to) and where batches are moved; with
            ``cfg.precision`` it decides autocast (``autocast_dtype``).
        fingerprint: ``checkpoint.fingerprint()`` of the config fields that change training; stored in every
            checkpoint, and a checkpoint with another one is refused (``CheckpointError``) instead of resumed.
        on_checkpoint: called on every worker after each checkpoint is written (e.g. to report ``run_dir`` to
            Ray Train's storage); every worker calls it at the same steps.

    Returns:
        Final progress; ``progress.finished`` says why training stopped.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model.to(device)
    amp = autocast_dtype(cfg.precision, device)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(train_batches(0))
    total = cfg.max_steps or steps_per_epoch * cfg.max_epochs
    scheduler = make_schedule(optimizer, cfg, total)
    state = load_checkpoint(run_dir, unwrap(model), optimizer, scheduler, rank=dist.rank,
                            world_size=dist.world_size, fingerprint=fingerprint) or Progress()
    if state.finished and state.finished != "early_stopping" and _budget_left(state, cfg):
        state.finished = ""  # a run that hit its budget continues when re-run with a larger one
    if state.finished:
        return state

    model.train()
    # Off a terminal (CI logs, `ray job logs`) a redraw is a new line: print every 30 s instead.
    bar = tqdm(total=total, initial=state.step, disable=not (progress_bar and dist.is_main), unit="step",
               dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    started = time.monotonic() - state.elapsed_s

    def validate() -> bool:
        """Validates, keeps the best model by ``cfg.select_by``; returns True when early stopping triggers."""
        valid = evaluate_loss(model, valid_batches, valid_loss_fn or loss_fn, dist, device, amp)
        record = {"event": "valid", "step": state.step, "epoch": state.epoch, "valid_loss": valid,
                  "elapsed_s": round(state.elapsed_s, 1)}
        if on_validate:
            on_validate(record)  # may add metrics, e.g. valid_bleu: it must come before the selection
        if not record.get("selectable", True):
            pass  # not yet the model it will be (a gated student before its budget): neither best nor patience
        elif _improved(record, state, cfg.select_by):
            state.best_valid, state.best_bleu, state.best_step, state.bad_evals = (
                valid, record.get("valid_bleu"), state.step, 0)
            if dist.is_main:
                save_model(unwrap(model), tokenizer_dir, run_dir / "best")
        else:
            state.bad_evals += 1
        if cfg.keep_last and dist.is_main:
            save_snapshot(unwrap(model), run_dir, state.step, cfg.keep_last)
        best_value = state.best_bleu if cfg.select_by == "valid_bleu" else state.best_valid
        record |= {"best_step": state.best_step, "best_by": cfg.select_by, "best_value": best_value}
        state.history.append(record)
        if dist.is_main:
            append_metrics(run_dir, record)
        bar.set_postfix(valid=f"{valid:.3f}", best_step=state.best_step)
        return state.bad_evals >= cfg.patience

    cached: tuple[int, Sequence[dict]] = (-1, [])
    while not state.finished:
        if cached[0] != state.epoch:
            cached = (state.epoch, train_batches(state.epoch))
        batches = cached[1]
        for i in range(state.batch_in_epoch, len(batches)):
            batch = batches[i]  # a lazy sequence builds it only now (students: fetched from the shards)
            with _autocast(device, amp):
                loss, n_tokens = loss_fn(model, to_device(batch, device))
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
            if (state.step % cfg.log_every == 0 or state.step == 1) and dist.is_main:
                rate = state.target_tokens / max(state.elapsed_s, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
                append_metrics(run_dir, {"event": "train", "step": state.step, "loss": loss.item(),
                                         "lr": scheduler.get_last_lr()[0],
                                         "grad_norm": float(grad_norm), "tokens_per_s": rate,
                                         "tokens": state.target_tokens, "elapsed_s": round(state.elapsed_s, 3)})
            if state.step % cfg.eval_every == 0 and validate():
                state.finished = "early_stopping"
            elif cfg.max_steps and state.step >= cfg.max_steps:
                state.finished = "max_steps"
            elif cfg.max_minutes and dist.all_sum(state.elapsed_s >= cfg.max_minutes * 60)[0] > 0:
                state.finished = "max_minutes"  # any worker out of time stops all of them together
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
        rng = dist.all_gather(rng_state())  # every worker's own: they draw different dropout masks
        if dist.is_main:
            save_checkpoint(run_dir, unwrap(model), optimizer, scheduler, state, rng=rng, fingerprint=fingerprint)
        if on_checkpoint:
            on_checkpoint(state)
    bar.close()
    if state.best_step == 0 and state.history:  # no validation was selectable: best/ is the last model
        last = state.history[-1]
        state.best_valid, state.best_bleu, state.best_step = last["valid_loss"], last.get("valid_bleu"), last["step"]
        if dist.is_main:
            save_model(unwrap(model), tokenizer_dir, run_dir / "best")
    if dist.is_main:
        append_metrics(run_dir, {"event": "finished", "reason": state.finished, "step": state.step,
                                 "best_step": state.best_step, "best_valid": state.best_valid,
                                 "best_bleu": state.best_bleu, "elapsed_s": state.elapsed_s})
    return state
