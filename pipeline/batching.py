"""Cutting length-sorted examples into batches under a padded-token budget (decoding and training)."""

from __future__ import annotations

from collections.abc import Sequence


def budget_chunks(order: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Cuts ``order`` (indices sorted by ascending length) into consecutive chunks whose padded size
    ``len(chunk) * longest`` stays within ``budget``; an example over the budget gets a chunk of its own.

    Args:
        order: example indices, ascending by ``lengths``.
        lengths: per-example cost in tokens, indexed by example.
        budget: padded tokens per chunk.
    """
    chunks, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and lengths[order[end]] * (end + 1 - start) <= budget:
            end += 1
        chunks.append([int(i) for i in order[start:end]])
        start = end
    return chunks
