"""Tests for pipeline.noise: seeded word-level noise."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.noise import NoiseSpec, noise_batch, noise_text, replay

WORDS = "the quick brown fox jumps over a lazy dog while seven red birds sing".split()


def corpus(n: int, seed: int = 0, length: tuple[int, int] = (4, 14)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*length))) for _ in range(n)]


def batch(n: int = 40) -> dict:
    return {
        "id": np.array([f"ex-{i}" for i in range(n)], dtype=object),
        "source": np.array(corpus(n, 1), dtype=object),
        "target": np.array(corpus(n, 2), dtype=object),
        "index": np.arange(n),
    }


MIXED = NoiseSpec(deletion=0.2, substitution=0.2, swap=0.2, seed=5)


def test_same_seed_same_output_across_calls_and_batch_orders():
    b = batch()
    first, second = noise_batch(b, MIXED, WORDS), noise_batch(b, MIXED, WORDS)
    for col in ("source", "noise"):
        assert list(first[col]) == list(second[col])
    perm = np.random.default_rng(0).permutation(len(b["id"]))
    shuffled = noise_batch({k: v[perm] for k, v in b.items()}, MIXED, WORDS)
    by_id = dict(zip(shuffled["id"], shuffled["source"], strict=True))
    assert [by_id[i] for i in b["id"]] == list(first["source"])
    # Half batches give the same rows too.
    halves = [
        noise_batch({k: v[s] for k, v in b.items()}, MIXED, WORDS)
        for s in (slice(0, 7), slice(7, None))
    ]
    assert list(halves[0]["source"]) + list(halves[1]["source"]) == list(first["source"])


def test_same_seed_same_output_in_another_process():
    text = "the quick brown fox jumps over a lazy dog"
    here = noise_text(text, example_id="id-9", side="source", spec=MIXED)
    code = (
        "import json; from pipeline.noise import NoiseSpec, noise_text; "
        f"s = NoiseSpec.model_validate_json('{MIXED.model_dump_json()}'); "
        f"print(json.dumps(noise_text({text!r}, example_id='id-9', side='source', spec=s)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str-hash salt
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == list(here)


def test_different_seed_or_side_gives_different_noise():
    texts = corpus(50)
    other = MIXED.model_copy(update={"seed": 6})
    a = [
        noise_text(t, example_id=str(i), side="source", spec=MIXED)[0] for i, t in enumerate(texts)
    ]
    b = [
        noise_text(t, example_id=str(i), side="source", spec=other)[0] for i, t in enumerate(texts)
    ]
    c = [
        noise_text(t, example_id=str(i), side="target", spec=MIXED)[0] for i, t in enumerate(texts)
    ]
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 25
    assert sum(x != y for x, y in zip(a, c, strict=True)) > 25


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_empirical_rates(p):
    texts = corpus(2000, length=(10, 10))  # long enough that the keep-one rule never fires
    vocab = [f"w{i}" for i in range(100)]  # disjoint from WORDS: every draw is a real change
    for kind in ("deletion", "substitution"):
        spec = NoiseSpec(**{kind: p}, seed=1)
        n_ops = sum(
            len(noise_text(t, example_id=str(i), side="source", spec=spec, vocab=vocab)[1])
            for i, t in enumerate(texts)
        )
        assert n_ops / 20_000 == pytest.approx(p, abs=0.02), kind  # ~6 standard errors


def test_never_empty():
    spec = NoiseSpec(deletion=0.99, seed=3)
    for i, text in enumerate(corpus(300, length=(1, 3))):
        noised, ops = noise_text(text, example_id=str(i), side="source", spec=spec)
        assert noised.split(), (text, ops)
        assert len(noised.split()) == len(text.split()) - len(ops)


def test_deletion_ops_match_the_diff():
    spec = NoiseSpec(deletion=0.3, seed=2)
    for i, text in enumerate(corpus(200)):
        noised, ops = noise_text(text, example_id=str(i), side="source", spec=spec)
        dropped = {op[1] for op in ops}
        assert all(op[0] == "delete" for op in ops)
        assert noised.split() == [w for j, w in enumerate(text.split()) if j not in dropped]


def test_substitution_ops_match_the_diff():
    spec = NoiseSpec(substitution=0.3, seed=2)
    for i, text in enumerate(corpus(200)):
        noised, ops = noise_text(text, example_id=str(i), side="source", spec=spec, vocab=WORDS)
        before, after = text.split(), noised.split()
        changed = [[j, b] for j, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        assert [[op[1], op[2]] for op in ops] == changed
        assert all(op[0] == "sub" and op[2] in WORDS for op in ops)


def test_swap_ops_match_the_diff():
    spec = NoiseSpec(swap=0.4, seed=2)
    seen = 0
    for i, text in enumerate(corpus(200)):
        noised, ops = noise_text(text, example_id=str(i), side="source", spec=spec)
        expect = text.split()
        used: set[int] = set()
        for name, a, b in ops:
            assert name == "swap" and b == a + 1 and not {a, b} & used  # adjacent, disjoint
            used |= {a, b}
            expect[a], expect[b] = expect[b], expect[a]
        assert noised.split() == expect
        seen += len(ops)
    assert seen > 100


def test_mixed_ops_replay_to_the_noised_text():
    for i, text in enumerate(corpus(300)):
        noised, ops = noise_text(text, example_id=str(i), side="source", spec=MIXED, vocab=WORDS)
        assert replay(text, ops) == noised
    assert replay("a  b", []) == "a  b"  # untouched text keeps its spacing


def test_substitution_falls_back_to_sentence_words():
    spec = NoiseSpec(substitution=0.5, seed=0)
    for i, text in enumerate(corpus(100)):
        _, ops = noise_text(text, example_id=str(i), side="source", spec=spec, vocab=())
        assert all(op[2] in text.split() for op in ops)


def test_noise_batch_columns():
    b = batch(10)
    off = noise_batch(b, NoiseSpec(), WORDS)
    assert list(off["noise"]) == [""] * 10 and off["source"] is b["source"]
    spec = NoiseSpec(deletion=0.3, apply_to="both", seed=1)
    out = noise_batch(b, spec, {"source": WORDS, "target": WORDS})
    assert isinstance(out["source"], np.ndarray) and list(out["index"]) == list(range(10))
    for k in range(10):
        record = json.loads(out["noise"][k])
        assert set(record) == {"source", "target"}
        for side in ("source", "target"):
            assert replay(b[side][k], record[side]) == out[side][k]
    assert "," in out["noise"][0] and ", " not in out["noise"][0]  # compact JSON
    as_lists = noise_batch({k: list(v) for k, v in b.items()}, spec, WORDS)
    assert isinstance(as_lists["source"], list) and as_lists["source"] == list(out["source"])
    target_only = noise_batch(b, spec.model_copy(update={"apply_to": "target"}), WORDS)
    assert list(target_only["source"]) == list(b["source"])
    assert list(target_only["target"]) == list(out["target"])


def test_spec_validation_and_enabled():
    assert not NoiseSpec().enabled
    assert NoiseSpec(swap=0.1).enabled
    with pytest.raises(ValidationError, match=r"deletion\n.*less than 1"):
        NoiseSpec(deletion=1.0)
    with pytest.raises(ValidationError, match=r"swap\n.*greater than or equal to 0"):
        NoiseSpec(swap=-0.1)
    with pytest.raises(ValidationError, match=r"typo\n.*Extra inputs are not permitted"):
        NoiseSpec(typo=0.1)
    with pytest.raises(ValidationError, match=r"apply_to"):
        NoiseSpec(apply_to="middle")
