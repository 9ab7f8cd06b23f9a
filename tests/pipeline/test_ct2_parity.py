"""CTranslate2 teacher-forced log-probs must equal a torch forward of the same weights."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.ct2 import TeacherError, check_vocabulary, load_translator, model_hash


@pytest.fixture(scope="module")
def torch_reference(tiny_teacher, tiny_tokenizer, tiny_data):
    """Sources, references and the torch log-probs at every reference position (pad column dropped)."""
    from transformers import MarianMTModel

    from trainers.batching import seq2seq_batch
    from trainers.losses import marian_logits

    table = pq.read_table(tiny_data / "valid.parquet").slice(0, 12)
    src = tiny_tokenizer.encode_source(table.column("source").to_pylist())
    tgt = tiny_tokenizer.encode_target(table.column("target").to_pylist())
    model = MarianMTModel.from_pretrained(tiny_teacher["hf"]).eval()
    with torch.no_grad():
        logits = marian_logits(model, seq2seq_batch(src, tgt, pad_id=tiny_tokenizer.pad_id))
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return src, tgt, [logprobs[i, : len(t)] for i, t in enumerate(tgt)]


def test_model_is_peaked_enough_for_a_meaningful_check(torch_reference):
    _, _, logprobs = torch_reference
    top1 = torch.cat([lp.max(-1).values for lp in logprobs]).exp().mean()
    assert top1 > 20 / 600  # far from the uniform 1/600 of an untrained model


def test_score_batch_matches_torch(tiny_teacher, tiny_tokenizer, torch_reference):
    src, tgt, logprobs = torch_reference
    translator = load_translator(tiny_teacher["ct2_f32"], compute_type="float32")
    results = translator.score_batch(
        [tiny_tokenizer.ids_to_tokens(s) for s in src], [tiny_tokenizer.ids_to_tokens(t[:-1]) for t in tgt]
    )
    for res, t, lp in zip(results, tgt, logprobs, strict=True):
        expected = lp.gather(1, torch.tensor(t)[:, None])[:, 0].numpy()
        assert len(res.log_probs) == len(t)  # one per reference token, the final </s> included
        np.testing.assert_allclose(res.log_probs, expected, atol=2e-4)


def test_prefix_logits_match_torch_at_every_position(tiny_teacher, tiny_tokenizer, torch_reference):
    src, tgt, logprobs = torch_reference
    translator = load_translator(tiny_teacher["ct2_f32"], compute_type="float32")
    results = translator.translate_batch(
        [tiny_tokenizer.ids_to_tokens(s) for s in src],
        target_prefix=[tiny_tokenizer.ids_to_tokens(t[:-1]) for t in tgt],
        beam_size=1,
        return_logits_vocab=True,
        max_decoding_length=max(len(t) for t in tgt),
        min_decoding_length=0,  # otherwise CT2 masks </s> at step 0 in the returned logits
    )
    for res, t, lp in zip(results, tgt, logprobs, strict=True):
        ct2 = torch.stack([torch.as_tensor(np.asarray(x)) for x in res.logits[0][: len(t)]]).double()
        assert ct2.shape == lp.shape
        torch.testing.assert_close(torch.log_softmax(ct2, -1), lp, atol=2e-4, rtol=0)


def test_int8_teacher_stays_close(tiny_teacher, tiny_tokenizer, torch_reference):
    src, tgt, logprobs = torch_reference
    translator = load_translator(tiny_teacher["ct2_int8"], compute_type="int8")
    results = translator.score_batch(
        [tiny_tokenizer.ids_to_tokens(s) for s in src], [tiny_tokenizer.ids_to_tokens(t[:-1]) for t in tgt]
    )
    ct2 = np.concatenate([r.log_probs for r in results])
    pairs = zip(tgt, logprobs, strict=True)
    ref = np.concatenate([lp.gather(1, torch.tensor(t)[:, None])[:, 0].numpy() for t, lp in pairs])
    assert np.abs(ct2 - ref).mean() < 0.05


def test_vocabulary_check(tiny_teacher, tiny_tokenizer, tmp_path):
    assert check_vocabulary(tiny_tokenizer, tiny_teacher["ct2_f32"]) == tiny_tokenizer.vocab_hash
    from pipeline.tokenizer import train_tokenizer

    other = train_tokenizer(["ganz andere Wörter hier", "completely different words"] * 50, tmp_path / "o",
                            vocab_size=60)
    with pytest.raises(TeacherError, match="does not match"):
        check_vocabulary(other, tiny_teacher["ct2_f32"])


def test_missing_or_bogus_model_dir(tmp_path):
    with pytest.raises(TeacherError, match="not found"):
        load_translator(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(TeacherError, match="no model.bin"):
        model_hash(tmp_path / "m")
    (tmp_path / "m" / "model.bin").write_bytes(b"garbage")
    with pytest.raises(TeacherError, match="cannot load"):
        load_translator(tmp_path / "m")


def test_model_hash_tracks_weights(tiny_teacher, tmp_path):
    """Same weights exported again → same hash; one weight nudged → another; a score recorded next to the
    model (``distillery eval``) is not part of its identity."""
    import shutil

    from transformers import MarianMTModel

    from pipeline.ct2 import EVAL_RECORD
    from trainers.export import export_ct2

    reference = model_hash(tiny_teacher["ct2_f32"])
    assert model_hash(export_ct2(tiny_teacher["hf"], tmp_path / "again", quantization="float32")) == reference
    assert model_hash(tiny_teacher["ct2_int8"]) != reference

    model = MarianMTModel.from_pretrained(tiny_teacher["hf"])
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.bias[0] += 1e-3
    shutil.copytree(tiny_teacher["hf"], tmp_path / "nudged")
    model.save_pretrained(tmp_path / "nudged")
    assert model_hash(export_ct2(tmp_path / "nudged", tmp_path / "nudged-ct2", quantization="float32")) != reference

    (tmp_path / "again" / EVAL_RECORD).write_text('{"model": {"bleu": 1.0}}')
    assert model_hash(tmp_path / "again") == reference
