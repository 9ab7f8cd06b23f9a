"""Training losses. Every loss takes student logits ``[B, T, V]`` (float32 softmax) and ignores padding.

More KD losses (token / sentence / hybrid / divergences) join this module with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.batching import IGNORE


def nll(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy with optional label smoothing.

    ``L = -(1-ε) log p(y) - ε/V Σ_v log p(v)``, averaged over non-padding positions.

    Args:
        logits: ``[B, T, V]`` unnormalised scores.
        labels: ``[B, T]`` target ids, ``IGNORE`` on padding.
        label_smoothing: ε in ``[0, 1)``.
    """
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        labels.flatten(),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


def marian_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Student forward pass; drops the last vocabulary column (``<pad>``), which is never a target and
    which CTranslate2 removes from the model, so training and inference share one support."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch["decoder_attention_mask"],
    )
    return out.logits[..., :-1]
