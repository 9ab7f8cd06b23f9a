"""Checkpoints that resume exactly: model, optimizer, scheduler, data position and RNG states.

Layout under a run directory::

    checkpoint/   latest state (HF model files + trainer_state.pt), replaced atomically
    best/         best model by the selection metric (validation loss or BLEU), HF format with the tokenizer beside it
    metrics.jsonl one JSON object per logged event
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


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


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, progress: Progress) -> None:
    """Writes ``run_dir/checkpoint`` with the complete training state."""
    out = run_dir / "checkpoint"
    tmp = out.with_name("checkpoint.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": asdict(progress),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        },
        tmp / STATE_FILE,
    )
    _replace_dir(tmp, out)


def load_checkpoint(run_dir: Path, model, optimizer, scheduler) -> Progress | None:
    """Restores the state saved by ``save_checkpoint``; None when there is no checkpoint."""
    ckpt = run_dir / "checkpoint"
    if not (ckpt / STATE_FILE).is_file():
        return None
    from safetensors.torch import load_file

    model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    model.tie_weights()
    state = torch.load(ckpt / STATE_FILE, weights_only=False, map_location="cpu")  # the optimizer moves its state
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return Progress(**state["progress"])


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
