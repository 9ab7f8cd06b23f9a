"""Token-budget batching and padding for encoder-decoder training.

Batches group examples of similar length (less padding) under a budget of padded tokens, and their order
is a pure function of (seed, epoch), so a resumed run can skip exactly the batches already seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    return _batches(np.asarray(lengths), max_tokens, np.random.default_rng([seed, epoch]), shuffle)


def _batches(lengths: np.ndarray, max_tokens: int, rng: np.random.Generator, shuffle: bool) -> list[np.ndarray]:
    # Random tie-breaking among equal lengths keeps batches varied across epochs.
    tiebreak = rng.random(len(lengths)) if shuffle else np.arange(len(lengths))
    order = np.lexsort((tiebreak, lengths))
    batches = [np.asarray(c) for c in budget_chunks(order, lengths, max_tokens)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def windowed_token_batches(
    lengths: np.ndarray, groups: np.ndarray, *, window: int, max_tokens: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """``token_batches`` shuffled within windows of whole row groups, so a reader holds one window at a time.

    A shuffle over the whole corpus would make every batch touch rows of ~batch-size different row groups:
    a streaming reader would decode a row group per row. Instead the row groups are shuffled, packed in that
    order into windows of at most ``window`` rows (a larger group is a window of its own), and each window is
    batched and shuffled on its own; its batches come one window after the other. A corpus of at most
    ``window`` rows is one window, and its plan is exactly ``token_batches``.

    Args:
        lengths: ``[N]`` per-row cost in tokens, rows in corpus order.
        groups: ``[G]`` rows per row group, consecutive (``groups.sum() == N``; empty groups allowed).
        window: rows per window (the reader's memory bound).
        max_tokens, seed, epoch: as for ``token_batches``; the plan is a pure function of them.

    Returns:
        Index arrays into ``lengths``, one per batch.
    """
    lengths, groups = np.asarray(lengths), np.asarray(groups, dtype=np.int64)
    if len(lengths) <= window:
        return token_batches(lengths, max_tokens=max_tokens, seed=seed, epoch=epoch)
    starts = np.concatenate([[0], np.cumsum(groups)])
    windows: list[list[int]] = [[]]
    size = 0
    for g in np.random.default_rng([seed, epoch]).permutation(len(groups)):
        if windows[-1] and size + groups[g] > window:
            windows.append([])
            size = 0
        windows[-1].append(int(g))
        size += int(groups[g])
    plan = []
    for w, members in enumerate(windows):
        rows = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in members])
        rng = np.random.default_rng([seed, epoch, w])
        plan += [rows[b] for b in _batches(lengths[rows], max_tokens, rng, shuffle=True)]
    return plan


class PlannedBatches(Sequence):
    """An epoch's batches built one at a time, when asked for: holding them all would hold the epoch's data."""

    def __init__(self, plan: list[np.ndarray], build: Callable[[np.ndarray], dict]):
        """
        Args:
            plan: row indices per batch (``token_batches``).
            build: row indices → the batch's tensors.
        """
        self.plan, self.build = plan, build

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.build(p) for p in self.plan[i]]
        return self.build(self.plan[i])


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
