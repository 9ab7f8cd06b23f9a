"""Tests for pipeline.schema: the shard contract."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.schema import SchemaError, check, infer_top_k, shard_schema, validate

K = 4
VOCAB = 50


def _dense(lengths: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids / log-probs (N_positions, K) from real softmaxes over VOCAB."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(int(lengths.sum()), VOCAB)) * 3
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ids = np.argsort(-logp, axis=1)[:, :K].astype(np.int32)
    return ids, np.take_along_axis(logp, ids, axis=1)


def make_table(n_rows: int = 6, seed: int = 0) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """A valid shard built only through the schema helpers."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, size=n_rows)
    ids, logp = _dense(lengths, seed)
    topk_ids, topk_lp = schema.topk_arrays(ids, logp, lengths)
    hyp_flat = ids[:, 0]
    hyp_ids = schema.list_array(hyp_flat, lengths)
    score = np.add.reduceat(logp[:, 0], np.r_[0, np.cumsum(lengths)[:-1]]).astype(np.float32)
    cols = {
        "id": [f"ex{i}" for i in range(n_rows)],
        "index": np.arange(n_rows, dtype=np.int64),
        "source": ["a b c"] * n_rows,
        "target": ["x y"] * n_rows,
        "source_ids": [[1, 2, 3, 0]] * n_rows,
        "target_ids": [[4, 5, 0]] * n_rows,
        "hyp_rank": np.arange(n_rows, dtype=np.int16) % 2,
        "hyp_kind": ["reference", "greedy", "beam", "sample", "beam", "beam"][:n_rows],
        "hyp_text": ["h"] * n_rows,
        "hyp_ids": hyp_ids,
        "score": score,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lp,
        "tail_logprob": schema.list_array(schema.tail_logprob(logp).astype(np.float16), lengths),
        "noise": [""] * n_rows,
    }
    sch = shard_schema(K)
    table = pa.Table.from_arrays([pa.array(cols[f.name], f.type) for f in sch], schema=sch)
    return table, ids, logp


def _replace(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(name).with_type(array.type), array)


def test_valid_table_passes():
    table, _, _ = make_table()
    assert validate(table) == []
    assert validate(table, top_k=K, vocab_size=VOCAB) == []
    assert validate(table.slice(2, 3)) == []  # slices keep list offsets straight
    assert validate(pa.concat_tables([table, table.slice(1)])) == []  # several chunks
    check(table, top_k=K)


def test_schema_shape_and_version():
    sch = shard_schema(K)
    assert sch.metadata[b"distillery.schema_version"] == str(schema.SCHEMA_VERSION).encode()
    assert infer_top_k(sch) == K
    assert shard_schema(K) is shard_schema(K)  # cached
    assert not any(f.nullable for f in sch)
    with pytest.raises(ValueError, match="top_k"):
        shard_schema(0)
    with pytest.raises(SchemaError, match="topk_ids"):
        infer_top_k(pa.schema([("id", pa.string())]))


def test_structural_defects_reported_together():
    table, _, _ = make_table()
    table = table.drop_columns(["noise", "hyp_text"]).append_column("extra", pa.array([1] * 6))
    table = _replace(table, "score", pc.cast(table["score"], pa.float64()))
    table = table.replace_schema_metadata({})
    problems = "\n".join(validate(table))
    assert "missing columns: hyp_text, noise" in problems
    assert "unexpected columns: extra" in problems
    assert "column score has type double" in problems
    assert "schema_version is missing" in problems
    with pytest.raises(SchemaError) as err:
        check(table)
    assert str(err.value).count("\n- ") == 4


def test_wrong_top_k_is_a_type_problem():
    table, _, _ = make_table()
    problems = validate(table, top_k=K + 1)
    assert any("topk_ids has type" in p for p in problems)
    assert any("topk_logprobs has type" in p for p in problems)


def test_value_defects_reported_together():
    table, ids, logp = make_table()
    lengths = pc.list_value_length(table["hyp_ids"]).to_numpy()
    # Row 1: tail_logprob one entry short.
    short = lengths.copy()
    short[1] -= 1
    tail = np.zeros(short.sum(), dtype=np.float16) - 1
    table = _replace(table, "tail_logprob", schema.list_array(tail, short))
    table = _replace(table, "hyp_rank", pa.array([0, -1, 0, 0, -2, 0], pa.int16()))
    table = _replace(table, "hyp_kind", pa.array(["reference", "nbest"] + ["beam"] * 4))
    table = _replace(table, "score", pa.array([0.5, np.nan, -1, -1, -1, -1], pa.float32()))
    bad_ids, bad_lp = ids.copy(), logp.copy()
    bad_ids[0, 1] = VOCAB + 3
    bad_ids[1, 0] = -7
    bad_lp[0, 3] = 0.25  # positive, and larger than the entries before it
    bad_lp[2, 3] = np.nan
    topk_ids, topk_lp = schema.topk_arrays(bad_ids, bad_lp, lengths)
    table = _replace(_replace(table, "topk_ids", topk_ids), "topk_logprobs", topk_lp)
    table = _replace(table, "source_ids", pa.array([[1, None]] * 6, pa.list_(pa.int32())))

    problems = validate(table, vocab_size=VOCAB)
    text = "\n".join(problems)
    assert "1 row(s) where len(tail_logprob) != len(hyp_ids) (rows 1)" in text
    assert "2 row(s) with negative hyp_rank (rows 1, 4)" in text
    assert "1 row(s) with hyp_kind not in" in text
    assert "2 row(s) with score > 0 or NaN (rows 0, 1)" in text
    assert "topk_ids: 2 token id(s) outside [0, 50)" in text
    assert "topk_logprobs: 2 value(s) > 0 or NaN" in text
    assert "topk_logprobs: 1 position(s) not sorted" in text
    assert "column source_ids has 6 null(s)" in text
    assert len(problems) == 8
    # Without vocab_size only the negative id counts.
    assert "topk_ids: 1 token id(s) outside [0, inf)" in validate(table)


def test_list_array_rejects_wrong_lengths():
    with pytest.raises(ValueError, match="lengths sum to 3"):
        schema.list_array(np.zeros(4, np.float16), np.array([1, 2]))
    with pytest.raises(ValueError, match="must both be"):
        schema.topk_arrays(np.zeros((3, 2)), np.zeros((3, 3)), np.array([3]))


def test_parquet_opens_in_pyarrow_dataset_and_duckdb(tmp_path):
    table, ids, logp = make_table(n_rows=6, seed=3)
    path = tmp_path / "part-00000.parquet"
    pq.write_table(table, path)

    read = ds.dataset(path, format="parquet").to_table()
    assert read.schema.metadata[b"distillery.schema_version"] == b"1"
    assert validate(read, top_k=K, vocab_size=VOCAB) == []
    assert infer_top_k(read.schema) == K
    got_ids = read["topk_ids"].combine_chunks().flatten().flatten().to_numpy()
    np.testing.assert_array_equal(got_ids.reshape(-1, K), ids)

    rows = duckdb.sql(
        f"select topk_ids, topk_logprobs, tail_logprob from read_parquet('{path}') order by index"
    ).fetchall()
    duck_ids = np.array([pos for row in rows for pos in row[0]], dtype=np.int32)
    duck_lp = np.array([pos for row in rows for pos in row[1]], dtype=np.float32)
    np.testing.assert_array_equal(duck_ids, ids)
    # float16 -> float32 is exact, so DuckDB must return the stored halves bit for bit.
    np.testing.assert_array_equal(duck_lp, logp.astype(np.float16).astype(np.float32))
    duck_tail = np.array([t for row in rows for t in row[2]], dtype=np.float32)
    np.testing.assert_array_equal(duck_tail, schema.tail_logprob(logp).astype(np.float16))


def test_tail_logprob_matches_float64_reference():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(200, VOCAB)) * rng.uniform(0.1, 8, size=(200, 1))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-logp, axis=1)
    top = np.take_along_axis(logp, order[:, :K], axis=1)
    rest = np.take_along_axis(logp, order[:, K:], axis=1)
    want = np.log(np.exp(rest).sum(axis=1))  # the mass outside, summed directly
    got = schema.tail_logprob(top)
    assert got.dtype == np.float32 and got.shape == (200,)
    mask = want > schema.TAIL_FLOOR
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_tail_logprob_edges():
    # All mass inside the top k -> floor, not -inf; tiny mass inside -> ~0.
    one_hot = np.array([[0.0, -np.inf, -np.inf]])
    assert schema.tail_logprob(one_hot)[0] == schema.TAIL_FLOOR
    tiny = np.full((1, 3), -40.0)
    assert schema.tail_logprob(tiny)[0] == pytest.approx(-3 * np.exp(-40.0), abs=1e-12)
    # 1 - 1e-9 of the mass inside: naive float32 1 - sum(exp) would give 0 or garbage.
    near = np.array([[np.log1p(-1e-9)]], dtype=np.float64)
    assert schema.tail_logprob(near)[0] == pytest.approx(np.log(1e-9), rel=1e-6)
