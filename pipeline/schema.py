"""The shard schema: the one place any shard column or dtype is stated.

One row is one (example, hypothesis) pair. ``k`` (the number of teacher
log-probs kept per target position) is a parameter of the schema: build it with
:func:`shard_schema` and read it back with :func:`infer_top_k`.

| column | type | meaning |
| --- | --- | --- |
| `id` | `string` | stable example id |
| `index` | `int64` | example position in the corpus |
| `source` | `string` | source text (after noise, if any) |
| `target` | `string` | reference text (after noise, if any) |
| `source_ids` | `list<int32>` | source token ids, incl. final eos |
| `target_ids` | `list<int32>` | reference token ids, incl. final eos |
| `hyp_rank` | `int16` | 0 for references / 1-best; 0..n-1 for n-best, samples |
| `hyp_kind` | `string` | `reference`, `greedy`, `beam` or `sample` (1) |
| `hyp_text` | `string` | text of `hyp_ids` |
| `hyp_ids` | `list<int32>` | sequence the top-k is aligned with, ends with eos unless cut at max_length (2) |
| `score` | `float32` | sum of teacher log-probs of `hyp_ids` (≤ 0) |
| `topk_ids` | `list<fixed_size_list<int32, k>>` | per position: k best token ids, best first |
| `topk_logprobs` | `list<fixed_size_list<float16, k>>` | their log-probs, non-increasing |
| `tail_logprob` | `list<float16>` | per position: log of the mass outside the top k (3) |
| `noise` | `string` | JSON of the noise applied to the example (4) |

(1) the decode mode that produced the row's target side. (2) the reference ids
when teacher-forced (`hyp_kind == "reference"`), cut at `decoding.max_length` like
hypotheses; the hypothesis ids otherwise.
(3) ``log1p(-sum(exp(topk_logprobs)))`` from full-precision log-probs, floored
at ``TAIL_FLOOR`` (-30) when the top k hold ~all the mass.
(4) e.g. ``{"source":[["delete",3],["sub",5,"word"]]}``, see
:mod:`pipeline.noise`; ``""`` when no noise was configured.

No column is nullable. The schema metadata carries
``distillery.schema_version``. Per row, ``hyp_ids``, ``topk_ids``,
``topk_logprobs`` and ``tail_logprob`` have the same length.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1
VERSION_KEY = b"distillery.schema_version"
HYP_KINDS = ("reference", "greedy", "beam", "sample")
# log(mass outside top-k) when that mass is ~0; far below any real value yet
# well inside float16 range, so readers never see -inf.
TAIL_FLOOR = -30.0
# Columns whose values are token ids (checked against vocab_size).
ID_COLUMNS = ("source_ids", "target_ids", "hyp_ids", "topk_ids")
# Columns with one entry per position of hyp_ids.
ALIGNED_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logprob")


class SchemaError(ValueError):
    """A table does not match the shard schema; the message lists every problem."""


@functools.lru_cache(maxsize=16)
def shard_schema(top_k: int) -> pa.Schema:
    """Return the shard schema for ``top_k`` log-probs per position.

    Args:
        top_k: Number of teacher entries kept per target position (≥ 1).

    Returns:
        The Arrow schema, with ``distillery.schema_version`` metadata.

    Raises:
        ValueError: If ``top_k`` < 1.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ids = pa.list_(pa.int32())
    fields = [
        ("id", pa.string()),
        ("index", pa.int64()),
        ("source", pa.string()),
        ("target", pa.string()),
        ("source_ids", ids),
        ("target_ids", ids),
        ("hyp_rank", pa.int16()),
        ("hyp_kind", pa.string()),
        ("hyp_text", pa.string()),
        ("hyp_ids", ids),
        ("score", pa.float32()),
        ("topk_ids", pa.list_(pa.list_(pa.int32(), top_k))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float16(), top_k))),
        ("tail_logprob", pa.list_(pa.float16())),
        ("noise", pa.string()),
    ]
    return pa.schema(
        [pa.field(name, typ, nullable=False) for name, typ in fields],
        metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
    )


def _k_of(typ: pa.DataType) -> int | None:
    if pa.types.is_list(typ) and pa.types.is_fixed_size_list(typ.value_type):
        return typ.value_type.list_size
    return None


def infer_top_k(schema: pa.Schema) -> int:
    """Read ``k`` from the type of the ``topk_ids`` column.

    Raises:
        SchemaError: If ``topk_ids`` is absent or not ``list<fixed_size_list<…>>``.
    """
    k = _k_of(schema.field("topk_ids").type) if "topk_ids" in schema.names else None
    if k is None:
        raise SchemaError("cannot infer top_k: topk_ids missing or not list<fixed_size_list>")
    return k


def list_array(values: np.ndarray | pa.Array, lengths: np.ndarray) -> pa.ListArray:
    """Split flat per-position values into one list per row.

    Args:
        values: Flat values, shape (N_positions,) or an Arrow array of that length.
        lengths: Positions per row, shape (N_rows,); must sum to N_positions.
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != len(values):
        raise ValueError(f"lengths sum to {offsets[-1]}, but there are {len(values)} values")
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("more than 2**31 positions in one array; write smaller shards")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def topk_arrays(
    ids: np.ndarray, logprobs: np.ndarray, lengths: np.ndarray
) -> tuple[pa.ListArray, pa.ListArray]:
    """Build the ``topk_ids`` / ``topk_logprobs`` columns from dense numpy arrays.

    The flat buffers are wrapped, not copied, when ``ids`` is already
    C-contiguous int32 (``logprobs`` is cast to float16, which copies once).

    Args:
        ids: Top-k token ids, shape (N_positions, k), any integer dtype.
        logprobs: Their log-probs, shape (N_positions, k), any float dtype.
        lengths: Positions per row, shape (N_rows,); must sum to N_positions.

    Returns:
        ``(topk_ids, topk_logprobs)`` as ``list<fixed_size_list<…, k>>`` arrays.
    """
    if ids.ndim != 2 or ids.shape != logprobs.shape:
        raise ValueError(f"ids {ids.shape} and logprobs {logprobs.shape} must both be (N, k)")
    k = ids.shape[1]
    flat_ids = pa.array(np.ascontiguousarray(ids, dtype=np.int32).reshape(-1))
    flat_lp = pa.array(np.ascontiguousarray(logprobs, dtype=np.float16).reshape(-1))
    return (
        list_array(pa.FixedSizeListArray.from_arrays(flat_ids, k), lengths),
        list_array(pa.FixedSizeListArray.from_arrays(flat_lp, k), lengths),
    )


def tail_logprob(logprobs: np.ndarray) -> np.ndarray:
    """Log of the probability mass outside the top k, per position.

    ``log(1 - exp(logsumexp(topk)))`` in float64, floored at ``TAIL_FLOOR``;
    call it on the full-precision log-probs, before casting to float16.

    Args:
        logprobs: Top-k log-probs, shape (..., k).

    Returns:
        float32 array of shape (...,).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    top = lp.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    inside = (top + np.log(np.exp(lp - top).sum(axis=-1, keepdims=True)))[..., 0]
    inside = np.minimum(inside, 0.0)  # rounding can push the sum a hair above 1
    with np.errstate(divide="ignore"):
        # log(1 - e^x): log(-expm1(x)) is exact near x = 0, log1p(-e^x) for x << 0.
        out = np.where(inside > -np.log(2), np.log(-np.expm1(inside)), np.log1p(-np.exp(inside)))
    return np.maximum(out, TAIL_FLOOR).astype(np.float32)


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    """Type equality that ignores nested field names and nullability."""
    if pa.types.is_list(want) or pa.types.is_fixed_size_list(want):
        return (
            got.id == want.id  # list vs large_list vs fixed_size_list
            and getattr(got, "list_size", None) == getattr(want, "list_size", None)
            and _same_type(got.value_type, want.value_type)
        )
    return got == want


def _rows(mask: np.ndarray, what: str) -> str:
    bad = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in bad[:5]) + (", …" if len(bad) > 5 else "")
    return f"{len(bad)} row(s) {what} (rows {shown})"


def _levels(column: pa.Array) -> list[pa.Array]:
    """The column and each level of its nested lists, down to the leaf values."""
    levels = [column]
    while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
        column = column.flatten()  # honours slices, unlike .values
        levels.append(column)
    return levels


def _flat(column: pa.Array) -> np.ndarray:
    return _levels(column)[-1].to_numpy(zero_copy_only=False)


def validate(
    table: pa.Table, *, top_k: int | None = None, vocab_size: int | None = None
) -> list[str]:
    """List every way ``table`` breaks the shard schema (empty list: valid).

    Vectorised over the flattened lists; costs a few passes over the data.

    Args:
        table: The table to check.
        top_k: Expected ``k``; inferred from ``topk_ids`` when None.
        vocab_size: If given, token ids must lie in ``[0, vocab_size)``.
    """
    problems: list[str] = []
    if top_k is None:  # from whichever top-k column has a usable type
        sizes = [k for f in table.schema if f.name in ALIGNED_COLUMNS[:2] and (k := _k_of(f.type))]
        top_k = sizes[0] if sizes else 1
    want = shard_schema(top_k)
    meta = (table.schema.metadata or {}).get(VERSION_KEY)
    if meta != str(SCHEMA_VERSION).encode():
        got = meta.decode() if meta else "missing"
        problems.append(f"schema metadata {VERSION_KEY.decode()} is {got}, want {SCHEMA_VERSION}")
    if missing := [n for n in want.names if n not in table.schema.names]:
        problems.append(f"missing columns: {', '.join(missing)}")
    if extra := [n for n in table.schema.names if n not in want.names]:
        problems.append(f"unexpected columns: {', '.join(extra)}")

    cols: dict[str, pa.Array] = {}
    for field in want:
        if field.name not in table.schema.names:
            continue
        got = table.schema.field(field.name).type
        if not _same_type(got, field.type):
            problems.append(f"column {field.name} has type {got}, want {field.type}")
            continue
        col = table.column(field.name).combine_chunks()
        if nulls := sum(level.null_count for level in _levels(col)):
            problems.append(f"column {field.name} has {nulls} null(s)")
        else:  # value checks only on null-free columns
            cols[field.name] = col

    if "hyp_ids" in cols:
        n = pc.list_value_length(cols["hyp_ids"]).to_numpy(zero_copy_only=False)
        for name in ALIGNED_COLUMNS:
            if name in cols:
                m = pc.list_value_length(cols[name]).to_numpy(zero_copy_only=False)
                if (bad := n != m).any():
                    problems.append(_rows(bad, f"where len({name}) != len(hyp_ids)"))
    if "hyp_rank" in cols and (bad := cols["hyp_rank"].to_numpy(zero_copy_only=False) < 0).any():
        problems.append(_rows(bad, "with negative hyp_rank"))
    if "hyp_kind" in cols:
        ok = pc.is_in(cols["hyp_kind"], value_set=pa.array(HYP_KINDS))
        if (bad := ~ok.to_numpy(zero_copy_only=False)).any():
            problems.append(_rows(bad, f"with hyp_kind not in {HYP_KINDS}"))
    if "score" in cols:
        s = cols["score"].to_numpy(zero_copy_only=False)
        if (bad := np.isnan(s) | (s > 0)).any():
            problems.append(_rows(bad, "with score > 0 or NaN"))
    high = np.inf if vocab_size is None else vocab_size
    for name in (n for n in ID_COLUMNS if n in cols):
        if n_bad := ((ids := _flat(cols[name])) < 0).sum() + (ids >= high).sum():
            problems.append(f"{name}: {n_bad} token id(s) outside [0, {vocab_size or 'inf'})")
    for name in (n for n in ("topk_logprobs", "tail_logprob") if n in cols):
        if n_bad := (np.isnan(lp := _flat(cols[name])) | (lp > 0)).sum():
            problems.append(f"{name}: {n_bad} value(s) > 0 or NaN")
    if "topk_logprobs" in cols:
        lp = _flat(cols["topk_logprobs"]).reshape(-1, top_k).astype(np.float32)
        if (unsorted := (np.diff(lp, axis=1) > 0).any(axis=1)).any():
            problems.append(
                f"topk_logprobs: {unsorted.sum()} position(s) not sorted most likely first"
            )
    return problems


def check(table: pa.Table, **kwargs: int | None) -> None:
    """Raise :class:`SchemaError` listing every problem :func:`validate` finds.

    Args:
        table: The table to check.
        **kwargs: ``top_k`` / ``vocab_size``, as for :func:`validate`.
    """
    if problems := validate(table, **kwargs):
        raise SchemaError("shard does not match the schema:\n- " + "\n- ".join(problems))
