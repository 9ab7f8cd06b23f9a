"""Token-budget batching and padding for encoder-decoder training.

Batches group examples of similar length (less padding) under a budget of padded tokens, and their order
is a pure function of (seed, epoch), so a resumed run can skip exactly the batches already seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.batching import budget_chunks

IGNORE = -100  # label value ignored by every loss


def token_batches(
    lengths: np.ndarray, *, max_tokens: int, seed: int, epoch: int, shuffle: bool = True
) -> list[np.ndarray]:
    """Splits example indices into batches of at most ``max_tokens`` padded tokens.

    Args:
        lengths: ``[N]`` per-example cost in tokens (e.g. max of source and target length).
        max_tokens: budget for ``batch_size * longest_example``; one over-long example still gets a
            batch of its own rather than being dropped.
        seed, epoch: the batch order is a pure function of both.
        shuffle: shuffle within length buckets and the batch order (off for validation).

    Returns:
        Index arrays, one per batch.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    # Random tie-breaking among equal lengths keeps batches varied across epochs.
    tiebreak = rng.random(len(lengths)) if shuffle else np.arange(len(lengths))
    order = np.lexsort((tiebreak, lengths))
    batches = [np.asarray(c) for c in budget_chunks(order, lengths, max_tokens)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """``[B, T]`` int64 tensor, right-padded with ``value``."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def seq2seq_batch(
    sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *, pad_id: int
) -> dict[str, torch.Tensor]:
    """Model inputs for teacher forcing on ``targets``.

    Marian starts decoding from ``pad_id``: ``decoder_input_ids = [pad] + target[:-1]``.

    Returns:
        ``input_ids``/``attention_mask`` ``[B, S]``, ``decoder_input_ids``/``labels``/
        ``decoder_attention_mask`` ``[B, T]``; labels are ``IGNORE`` on padding.
    """
    input_ids = pad(sources, pad_id)
    labels = pad(targets, IGNORE)
    decoder_input_ids = torch.full_like(labels, pad_id)
    decoder_input_ids[:, 1:] = labels[:, :-1].clamp(min=0)
    decoder_input_ids[:, 1:][labels[:, :-1] == IGNORE] = pad_id
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad_id).long(),
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": (labels != IGNORE).long(),
        "labels": labels,
    }
