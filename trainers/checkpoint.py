"""Checkpoints that resume exactly: model, optimizer, scheduler, data position and every worker's RNG states.

Layout under a run directory::

    checkpoint/   latest state (HF model files + trainer_state.pt + fingerprint.json), replaced atomically
    best/         best model by the selection metric (validation loss or BLEU), HF format with the tokenizer beside it
    snapshots/    the models of the last ``keep_last`` validations (``step-NNNNNNN``), for checkpoint averaging
    metrics.jsonl one JSON object per logged event
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
FINGERPRINT_FILE = "fingerprint.json"
# What a training run writes under its directory (``clear_run`` removes exactly these, never the directory).
RUN_OUTPUTS = ("checkpoint", "checkpoint.tmp", "checkpoint.old", "best", "best.tmp", "best.old", "metrics.jsonl",
               "config.json", "snapshots", "averaged")


class CheckpointError(ValueError):
    """A run directory holds the state of another training configuration, or a checkpoint that does not fit."""


@dataclass
class Progress:
    """Where training stands; everything a resumed run needs besides the weights."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_valid: float = float("inf")  # validation loss of the best model (the lowest, when selecting by it)
    best_bleu: float | None = None  # valid BLEU of the best model, when it was measured
    best_step: int = 0
    bad_evals: int = 0  # consecutive evaluations without improvement (early stopping)
    elapsed_s: float = 0.0
    target_tokens: int = 0
    finished: str = ""  # why training ended ("" while it runs)
    history: list[dict] = field(default_factory=list)


def fingerprint(fields: dict) -> dict:
    """``{"hash": …, "fields": fields}`` for the config fields that change training (JSON values).

    Budget fields (max steps / minutes / epochs, evaluation and checkpoint cadence) stay out, so a run stopped
    by its budget continues when started again with a larger one.
    """
    flat = _flatten(fields)
    payload = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str)
    return {"hash": "sha256:" + hashlib.sha256(payload.encode()).hexdigest(), "fields": json.loads(payload)}


def _flatten(fields: dict, prefix: str = "") -> dict:
    """Nested dicts → dotted keys (``{"optim": {"lr": …}}`` → ``{"optim.lr": …}``), to name what differs."""
    flat = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def file_hash(path: Path) -> str:
    """Content hash of a file (streamed): a split regenerated under the same name is another input."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "…"


def _mismatch(run_dir: Path, what: str, saved: dict | None, current: dict) -> CheckpointError:
    if saved is None:
        detail = "it records no config fingerprint (written by an older version)"
    elif "fields" not in saved:
        detail = f"its config hash {saved['hash'][:19]}… is not this config's {current['hash'][:19]}…"
    else:
        old, new = saved.get("fields", {}), current["fields"]
        diffs = [f"{k}: {_short(old.get(k))} → {_short(new.get(k))}" for k in sorted(old.keys() | new.keys())
                 if old.get(k) != new.get(k)]
        detail = "these settings differ from the ones it was trained with:\n  " + "\n  ".join(
            diffs or ["(fields not recorded; config hash differs)"])
    return CheckpointError(f"{run_dir} holds the {what} of another training configuration; {detail}\n"
                           "Restore those settings to resume, choose another output directory, or start over "
                           "with --restart (restart=True), which discards this run.")


def check_resumable(run_dir: Path, current: dict) -> None:
    """Refuses ``run_dir`` when its checkpoint or results come from a config with another ``fingerprint``.

    Raises:
        CheckpointError: naming the settings that differ.
    """
    ckpt = run_dir / "checkpoint"
    if (ckpt / STATE_FILE).is_file():
        saved = json.loads((ckpt / FINGERPRINT_FILE).read_text()) if (ckpt / FINGERPRINT_FILE).is_file() else None
        if saved is None or saved.get("hash") != current["hash"]:
            raise _mismatch(run_dir, "checkpoint", saved, current)
    results = run_dir / "results.json"
    if results.is_file():
        saved_hash = json.loads(results.read_text()).get("config_hash")
        if saved_hash != current["hash"]:  # (a checkpoint, when there is one, matched: it cannot name the fields)
            raise _mismatch(run_dir, "results", None if saved_hash is None else {"hash": saved_hash}, current)


def clear_run(run_dir: Path, extra: tuple[str, ...] = ()) -> None:
    """Removes what a training run wrote under ``run_dir`` (``RUN_OUTPUTS`` + ``extra``), to start over."""
    for name in (*RUN_OUTPUTS, *extra):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _replace_dir(tmp: Path, final: Path) -> None:
    """Moves ``tmp`` to ``final``, replacing it; a crash leaves either the old or the new copy."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer_dir: Path | None, out: Path) -> None:
    """Saves an HF model (and copies its tokenizer files) to ``out`` atomically.

    Only tokenizer files are copied: ``tokenizer_dir`` may be a CTranslate2 teacher directory, whose
    ``model.bin`` beside the HF weights would make ``out`` look like (and fail as) a CTranslate2 model.
    """
    from pipeline.tokenizer import copy_tokenizer_files

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp)
    _replace_dir(tmp, out)


def save_snapshot(model, run_dir: Path, step: int, keep_last: int) -> None:
    """Keeps the model at ``step`` under ``snapshots/`` and drops all but the newest ``keep_last`` of them."""
    root = run_dir / "snapshots"
    save_model(model, None, root / f"step-{step:07d}")
    for old in snapshots(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def snapshots(run_dir: Path) -> list[Path]:
    """The snapshot directories of a run, oldest first."""
    root = run_dir / "snapshots"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))


def average_snapshots(run_dir: Path, last: int, out: Path, tokenizer_dir: Path | None = None) -> list[int]:
    """Writes the element-wise mean of the newest ``last`` snapshots' weights to ``out`` (an HF model directory).

    Averaging the last checkpoints of a run (Vaswani et al. 2017) smooths the noise of the final updates; it
    costs no training. Returns the averaged steps.

    Raises:
        CheckpointError: the run has fewer than ``last`` snapshots.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    chosen = snapshots(run_dir)[-last:]
    if len(chosen) < last or last < 1:
        raise CheckpointError(f"{run_dir} has {len(snapshots(run_dir))} snapshots; averaging needs {last} "
                              "(train with optim.keep_last ≥ that)")
    total = None
    for path in chosen:
        weights = load_file(path / "model.safetensors")
        total = ({k: v.double() for k, v in weights.items()} if total is None
                 else {k: total[k] + v.double() for k, v in weights.items()})
    model = AutoModelForSeq2SeqLM.from_pretrained(chosen[-1])
    mean = {k: (v / len(chosen)).to(torch.float32) for k, v in total.items()}
    missing, unexpected = model.load_state_dict(mean, strict=False)
    if unexpected or any("embed_positions" not in m and "lm_head" not in m and "embed_tokens" not in m
                         for m in missing):
        raise CheckpointError(f"snapshots of {run_dir} do not fit their model: {missing or unexpected}")
    model.tie_weights()
    save_model(model, tokenizer_dir, out)
    return [int(p.name.removeprefix("step-")) for p in chosen]


def rng_state() -> dict:
    """This process's random number generator states (torch CPU and CUDA, numpy, Python)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, progress: Progress, *, rng: list[dict],
                    fingerprint: dict | None = None) -> None:
    """Writes ``run_dir/checkpoint`` with the complete training state.

    Args:
        rng: ``rng_state()`` of every worker, indexed by rank (workers draw different dropout masks).
        fingerprint: of the config (``fingerprint()``); a resume with another one is refused.
    """
    out = run_dir / "checkpoint"
    tmp = out.with_name("checkpoint.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": asdict(progress),
            "rng": rng,
        },
        tmp / STATE_FILE,
    )
    if fingerprint is not None:
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2))
    _replace_dir(tmp, out)


def _load_weights(model, path: Path) -> None:
    """Loads ``path`` into ``model`` strictly: only keys the model ties or never saves may be absent."""
    from safetensors.torch import load_file

    try:
        result = model.load_state_dict(load_file(path), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path} does not fit this model: {exc}") from exc
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
    never_saved = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    missing = [k for k in result.missing_keys if k not in tied | never_saved]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit this model: missing {missing or 'nothing'}, "
                              f"unexpected {result.unexpected_keys or 'nothing'}")
    model.tie_weights()


def load_checkpoint(run_dir: Path, model, optimizer, scheduler, *, rank: int = 0, world_size: int = 1,
                    fingerprint: dict | None = None) -> Progress | None:
    """Restores the state saved by ``save_checkpoint``, with worker ``rank``'s RNG; None without a checkpoint.

    Raises:
        CheckpointError: the checkpoint was written for another config (``fingerprint``), by another number of
            workers, or its weights do not fit ``model``.
    """
    ckpt = run_dir / "checkpoint"
    if not (ckpt / STATE_FILE).is_file():
        return None
    if fingerprint is not None:
        check_resumable(run_dir, fingerprint)
    state = torch.load(ckpt / STATE_FILE, weights_only=False, map_location="cpu")  # the optimizer moves its state
    if len(state["rng"]) != world_size:
        raise CheckpointError(f"{ckpt} was written by {len(state['rng'])} workers; this run has {world_size}")
    _load_weights(model, ckpt / "model.safetensors")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"][rank])
    return Progress(**state["progress"])


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
