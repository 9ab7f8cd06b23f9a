"""Seeded word-level noise (deletion, substitution, swap) to control data complexity.

Every decision for an example is drawn from an RNG seeded by
``(spec.seed, example id, side)`` through SHA-256, so the noise an example gets
is the same in any process, on any machine and in any batch order.

Operations are recorded against the *original* word positions (0-based, words
split on whitespace), so :func:`replay` can rebuild the noised text:

- ``["delete", i]``: word ``i`` was dropped;
- ``["sub", i, word]``: word ``i`` was replaced by ``word``;
- ``["swap", i, j]``: the words at ``i`` and ``j`` (adjacent among the words
  kept, ``i < j``) traded places.

Substitution happens before the swap, so a swapped word may be a substitute.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Side = Literal["source", "target"]
# A per-word probability; 1 is excluded because it would delete every word.
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


class NoiseSpec(BaseModel):
    """What noise to apply, where, and with which seed."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    deletion: Rate = 0.0
    substitution: Rate = 0.0
    swap: Rate = 0.0
    apply_to: Literal["source", "target", "both"] = "source"
    seed: int = 0

    @property
    def enabled(self) -> bool:
        """Whether any rate is non-zero."""
        return self.deletion > 0 or self.substitution > 0 or self.swap > 0

    @property
    def sides(self) -> tuple[Side, ...]:
        """The columns noise is applied to."""
        return ("source", "target") if self.apply_to == "both" else (self.apply_to,)


def example_rng(seed: int, example_id: str, side: str) -> np.random.Generator:
    """An RNG that depends only on its arguments (never on Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}\x1f{example_id}\x1f{side}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def noise_text(
    text: str, *, example_id: str, side: str, spec: NoiseSpec, vocab: Sequence[str] = ()
) -> tuple[str, list[list[Any]]]:
    """Noise one sentence.

    Args:
        text: The sentence; words are whitespace-separated.
        example_id: Stable example id (part of the RNG seed).
        side: ``"source"`` or ``"target"`` (part of the RNG seed).
        spec: Rates and seed.
        vocab: Words to substitute from (the noised corpus side); when empty,
            a substitute is another word of the same sentence.

    Returns:
        The noised text (words joined by single spaces; ``text`` unchanged when
        nothing was applied) and the operations applied, in the module's format.
    """
    words = text.split()
    n = len(words)
    if not spec.enabled or n == 0:
        return text, []
    # Fixed draws per word (delete, substitute, pick, swap): each decision
    # depends only on its own draw, and only raw floats are used because
    # numpy keeps those stable across versions, unlike integers()/choice().
    u = example_rng(spec.seed, example_id, side).random((n, 4))
    keep = u[:, 0] >= spec.deletion
    if not keep.any():  # never empty: keep the word with the largest draw
        keep[int(np.argmax(u[:, 0]))] = True
    ops: list[list[Any]] = [["delete", int(i)] for i in np.flatnonzero(~keep)]

    out = list(words)
    pool = vocab if len(vocab) else words
    for i in np.flatnonzero(keep & (u[:, 1] < spec.substitution)):
        word = str(pool[int(u[i, 2] * len(pool))])
        if word != words[i]:  # a no-op substitution would hide in the diff
            out[i] = word
            ops.append(["sub", int(i), word])

    kept = np.flatnonzero(keep)
    a = 0
    while a < len(kept) - 1:  # non-overlapping: a swapped pair is skipped past
        i, j = int(kept[a]), int(kept[a + 1])
        if u[i, 3] < spec.swap and out[i] != out[j]:
            out[i], out[j] = out[j], out[i]
            ops.append(["swap", i, j])
            a += 2
        else:
            a += 1
    if not ops:
        return text, []
    return " ".join(out[i] for i in kept), ops


def replay(text: str, ops: Sequence[Sequence[Any]]) -> str:
    """Rebuild the noised text from the original and its recorded operations."""
    words = text.split()
    keep = [True] * len(words)
    for op in ops:  # recorded order: deletes, subs, then swaps
        if op[0] == "delete":
            keep[op[1]] = False
        elif op[0] == "sub":
            words[op[1]] = op[2]
        elif op[0] == "swap":
            words[op[1]], words[op[2]] = words[op[2]], words[op[1]]
        else:
            raise ValueError(f"unknown noise operation {op[0]!r}")
    return " ".join(w for w, k in zip(words, keep, strict=True) if k) if ops else text


def noise_batch(
    batch: dict[str, Any],
    spec: NoiseSpec,
    vocab: Sequence[str] | Mapping[str, Sequence[str]] = (),
) -> dict[str, Any]:
    """Noise a Ray-Data-style batch (columns ``id``, ``source``, ``target``).

    Args:
        batch: Column name -> numpy array or list; other columns pass through.
        spec: Rates, sides and seed.
        vocab: Substitution words, either one sequence or one per side
            (``{"source": [...], "target": [...]}``).

    Returns:
        A new dict: the noised side columns (same container kind as given) and
        a ``noise`` column of compact JSON (``{"source":[...]}`` per example),
        ``""`` everywhere when the spec is disabled.
    """
    out = dict(batch)
    n = len(batch["id"])
    if not spec.enabled:
        out["noise"] = _like(batch["id"], [""] * n)
        return out
    ids = [str(i) for i in batch["id"]]
    records: list[dict[str, list]] = [{} for _ in range(n)]
    for side in spec.sides:
        side_vocab = vocab.get(side, ()) if isinstance(vocab, Mapping) else vocab
        texts = []
        for k, (example_id, text) in enumerate(zip(ids, batch[side], strict=True)):
            noised, ops = noise_text(
                str(text), example_id=example_id, side=side, spec=spec, vocab=side_vocab
            )
            texts.append(noised)
            records[k][side] = ops
        out[side] = _like(batch[side], texts)
    out["noise"] = _like(batch["id"], [json.dumps(r, separators=(",", ":")) for r in records])
    return out


def _like(template: Any, values: list[str]) -> Any:
    """Return ``values`` as a numpy object array when ``template`` is one."""
    return np.array(values, dtype=object) if isinstance(template, np.ndarray) else values
