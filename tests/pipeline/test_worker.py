"""TeacherWorker on plain tables (no Ray): every decode mode against a torch forward of the same weights."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import schema
from pipeline.spec import JobSpec
from pipeline.worker import TeacherWorker

K = 8


@pytest.fixture(scope="module")
def examples(tiny_data) -> pa.Table:
    return pq.read_table(tiny_data / "valid.parquet").slice(0, 10)


@pytest.fixture(scope="module")
def torch_model(tiny_teacher):
    from transformers import MarianMTModel

    return MarianMTModel.from_pretrained(tiny_teacher["hf"]).eval()


def make_spec(tiny_teacher, tmp_path, **decoding) -> JobSpec:
    return JobSpec.model_validate({
        "corpus": {"path": "unused.parquet"},
        "teacher": {"model": str(tiny_teacher["ct2_f32"]), "compute_type": "float32"},
        "decoding": decoding,
        "targets": {"top_k": K},
        "output": {"store": str(tmp_path), "dataset": "d"},
        "resources": {"threads_per_worker": 1, "batch_tokens": 200},  # several sub-batches
    })


def torch_logprobs(model, pad_id, src: list[int], hyp: list[int]) -> torch.Tensor:
    """``[len(hyp), V-1]`` float64 log-probs of a teacher-forced torch forward (pad column dropped)."""
    from trainers.batching import seq2seq_batch
    from trainers.losses import marian_logits

    with torch.no_grad():
        logits = marian_logits(model, seq2seq_batch([src], [hyp], pad_id=pad_id))[0]
    return torch.log_softmax(logits.double(), -1)


def assert_rows_match_torch(table: pa.Table, model, pad_id: int) -> None:
    """top-k ids/log-probs, tail mass and score of every row equal the torch forward on its hyp_ids."""
    for row in table.to_pylist():
        ref = torch_logprobs(model, pad_id, row["source_ids"], row["hyp_ids"])
        values, _ = ref.topk(K, -1)
        got_lp = np.array(row["topk_logprobs"], dtype=np.float64)
        got_ids = np.array(row["topk_ids"])
        assert got_lp.shape == (len(row["hyp_ids"]), K)
        np.testing.assert_allclose(got_lp, values.numpy(), atol=2e-3)  # float16 storage
        # the stored ids carry the log-probs torch gives them (robust to near-ties in ordering)
        np.testing.assert_allclose(ref.gather(1, torch.tensor(got_ids)).numpy(), values.numpy(), atol=1e-3)
        tail = torch.log1p(-values.exp().sum(-1)).numpy()
        np.testing.assert_allclose(np.array(row["tail_logprob"], dtype=np.float64), tail, atol=5e-3)
        expected_score = ref.gather(1, torch.tensor(row["hyp_ids"])[:, None]).sum().item()
        assert row["score"] == pytest.approx(expected_score, abs=1e-3)


def test_teacher_forcing_rows_follow_the_reference(tiny_teacher, tiny_tokenizer, examples, torch_model, tmp_path):
    worker = TeacherWorker(make_spec(tiny_teacher, tmp_path))
    table = worker.distill(examples)
    assert schema.validate(table, top_k=K, vocab_size=len(tiny_tokenizer.tokens)) == []
    assert table.num_rows == examples.num_rows
    assert table.column("id").to_pylist() == examples.column("id").to_pylist()  # corpus order kept
    assert set(table.column("hyp_kind").to_pylist()) == {"reference"}
    assert table.column("hyp_ids").to_pylist() == tiny_tokenizer.encode_target(examples.column("target").to_pylist())
    assert table.column("noise").to_pylist() == [""] * examples.num_rows
    assert_rows_match_torch(table, torch_model, tiny_tokenizer.pad_id)


def test_teacher_forcing_cuts_references_at_max_length(tiny_teacher, tiny_tokenizer, examples, torch_model,
                                                      tmp_path):
    from pipeline.worker import cut_rows

    table = TeacherWorker(make_spec(tiny_teacher, tmp_path, max_length=12)).distill(examples)
    refs = tiny_tokenizer.encode_target(examples.column("target").to_pylist())
    assert table.num_rows == examples.num_rows  # cut, not dropped
    assert table.column("hyp_ids").to_pylist() == [r[:12] for r in refs]
    assert table.column("target_ids").to_pylist() == refs  # the reference itself stays whole
    assert cut_rows(table, tiny_tokenizer.eos_id) == sum(len(r) > 12 for r in refs) > 0
    assert_rows_match_torch(table, torch_model, tiny_tokenizer.pad_id)  # the kept positions are exact


def torch_greedy(model, src: list[int], pad_id: int, eos_id: int, max_len: int) -> list[int]:
    """Plain argmax decoding in torch, independent of CTranslate2."""
    out = []
    for _ in range(max_len):
        logprobs = torch_logprobs(model, pad_id, src, out + [eos_id])[len(out)]
        out.append(int(logprobs.argmax()))
        if out[-1] == eos_id:
            break
    return out


def test_greedy_hypotheses_and_distributions(tiny_teacher, tiny_tokenizer, examples, torch_model, tmp_path):
    spec = make_spec(tiny_teacher, tmp_path, mode="greedy", max_length=12)
    table = TeacherWorker(spec).distill(examples.slice(0, 4))
    assert table.num_rows == 4 and set(table.column("hyp_kind").to_pylist()) == {"greedy"}
    for row in table.to_pylist():
        expected = torch_greedy(torch_model, row["source_ids"], tiny_tokenizer.pad_id, tiny_tokenizer.eos_id, 12)
        assert row["hyp_ids"] == expected
    assert_rows_match_torch(table, torch_model, tiny_tokenizer.pad_id)


def test_beam_n_best_gets_a_second_teacher_forced_pass(tiny_teacher, tiny_tokenizer, examples, torch_model, tmp_path):
    spec = make_spec(tiny_teacher, tmp_path, mode="beam", beam_size=3, num_hypotheses=2, max_length=16)
    table = TeacherWorker(spec).distill(examples.slice(0, 5))
    assert table.num_rows == 10
    assert table.column("hyp_rank").to_pylist() == [0, 1] * 5
    for a, b in zip(table.to_pylist()[::2], table.to_pylist()[1::2], strict=True):
        assert a["id"] == b["id"] and a["hyp_ids"] != b["hyp_ids"]
    assert_rows_match_torch(table, torch_model, tiny_tokenizer.pad_id)


def test_sampling_is_seeded(tiny_teacher, tiny_tokenizer, examples, torch_model, tmp_path):
    spec = make_spec(tiny_teacher, tmp_path, mode="sample", num_hypotheses=3, max_length=10, temperature=1.5)
    worker = TeacherWorker(spec)
    first = worker.distill(examples.slice(0, 3), seed=7)
    again = worker.distill(examples.slice(0, 3), seed=7)
    other = worker.distill(examples.slice(0, 3), seed=8)
    assert first.num_rows == 9 and set(first.column("hyp_kind").to_pylist()) == {"sample"}
    assert first.column("hyp_ids").to_pylist() == again.column("hyp_ids").to_pylist()
    assert first.column("hyp_ids").to_pylist() != other.column("hyp_ids").to_pylist()
    assert_rows_match_torch(first, torch_model, tiny_tokenizer.pad_id)


def test_noise_is_applied_recorded_and_reproducible(tiny_teacher, examples, tmp_path):
    spec = make_spec(tiny_teacher, tmp_path)
    spec = spec.model_copy(update={"noise": spec.noise.model_copy(update={"deletion": 0.3, "seed": 3})})
    worker = TeacherWorker(spec)
    table = worker.distill(examples)
    assert table.column("noise").to_pylist() == worker.distill(examples).column("noise").to_pylist()
    noised, original = table.column("source").to_pylist(), examples.column("source").to_pylist()
    changed = [s != o for s, o in zip(noised, original, strict=True)]
    assert sum(changed) >= 5
    for noise, orig, new in zip(table.column("noise").to_pylist(), examples.column("source").to_pylist(),
                                table.column("source").to_pylist(), strict=True):
        deleted = [op[1] for op in json.loads(noise)["source"] if op[0] == "delete"]
        assert len(new.split()) == len(orig.split()) - len(deleted)


def test_top_k_larger_than_vocabulary_is_refused(tiny_teacher, tmp_path):
    spec = make_spec(tiny_teacher, tmp_path)
    spec = spec.model_copy(update={"targets": spec.targets.model_copy(update={"top_k": 100000})})
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        TeacherWorker(spec)
