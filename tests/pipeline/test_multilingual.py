"""A multilingual (M2M100-style) teacher: language tokens from the spec, distributions after the forced one.

A tiny, randomly initialised M2M100 with a tokenizer built here (no downloads) is converted by CTranslate2's
own ``TransformersConverter`` and distilled through ``TeacherWorker``; every stored distribution must equal a
torch forward of the same weights with the source language token prepended and the target one forced.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.ct2 import TeacherError
from pipeline.spec import JobSpec
from pipeline.worker import TeacherWorker

K = 4
SRC_LANG, TGT_LANG = "__de__", "__en__"
MAX_LEN = 12


@pytest.fixture(scope="module")
def m2m(tiny_data, tmp_path_factory) -> dict:
    """HF dir (weights + tokenizer), CT2 dir, torch model and tokenizer of a 1+1-layer d32 M2M100."""
    import ctranslate2
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, processors, trainers
    from transformers import M2M100Config, M2M100ForConditionalGeneration, PreTrainedTokenizerFast

    from pipeline.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("m2m")
    train = pq.read_table(tiny_data / "train.parquet").slice(0, 300)
    raw = RawTokenizer(models.Unigram())
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    # M2M100's id layout: <s> 0, <pad> 1, </s> 2, <unk> 3, pieces, then the language tokens
    raw.train_from_iterator(train["source"].to_pylist() + train["target"].to_pylist(),
                            trainers.UnigramTrainer(vocab_size=200, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                    unk_token="<unk>", show_progress=False))
    raw.add_special_tokens([SRC_LANG, TGT_LANG])
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=[SRC_LANG, TGT_LANG])
    assert [fast.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    torch.manual_seed(0)
    config = M2M100Config(vocab_size=len(fast), d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
                          init_std=0.3,  # far from uniform, so the top-k order is not a matter of rounding
                          pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    model = M2M100ForConditionalGeneration(config).eval()
    model.save_pretrained(out / "hf")
    fast.save_pretrained(out / "hf")
    ctranslate2.converters.TransformersConverter(str(out / "hf")).convert(str(out / "ct2"), quantization="float32")
    return {"hf": out / "hf", "ct2": out / "ct2", "model": model, "tok": Tokenizer.load(out / "hf")}


@pytest.fixture(scope="module")
def examples(tiny_data) -> pa.Table:
    return pq.read_table(tiny_data / "valid.parquet").slice(0, 6)


def make_spec(m2m, tmp_path, **decoding) -> JobSpec:
    return JobSpec.model_validate({
        "corpus": {"path": "unused.parquet"},
        "teacher": {"model": str(m2m["ct2"]), "tokenizer": str(m2m["hf"]), "compute_type": "float32",
                    "source_prefix": [SRC_LANG], "target_prefix": [TGT_LANG]},
        "decoding": {"max_length": MAX_LEN, **decoding},
        "targets": {"top_k": K},
        "output": {"store": str(tmp_path), "dataset": "d"},
        "resources": {"threads_per_worker": 1, "batch_tokens": 100},
    })


def torch_logprobs(m2m, source_ids: list[int], hyp_ids: list[int]) -> torch.Tensor:
    """``[len(hyp), V]`` log-probs of each hyp token, the language tokens forced as M2M100 expects:
    encoder ``[src_lang] + source``, decoder ``</s> tgt_lang`` + hyp; the forced position is dropped."""
    tok = m2m["tok"].token_to_id
    encoder = torch.tensor([[tok[SRC_LANG]] + source_ids])
    decoder = torch.tensor([[2, tok[TGT_LANG]] + hyp_ids[:-1]])
    with torch.no_grad():
        logits = m2m["model"](input_ids=encoder, decoder_input_ids=decoder).logits[0]
    return torch.log_softmax(logits.double(), -1)[1:]


def assert_rows_match_torch(table: pa.Table, m2m) -> None:
    for row in table.to_pylist():
        ref = torch_logprobs(m2m, row["source_ids"], row["hyp_ids"])
        values, _ = ref.topk(K, -1)
        got = np.array(row["topk_logprobs"], dtype=np.float64)
        assert got.shape == (len(row["hyp_ids"]), K)
        np.testing.assert_allclose(got, values.numpy(), rtol=1e-3, atol=2e-3)  # float16 storage
        got_ids = torch.tensor(row["topk_ids"])
        np.testing.assert_allclose(ref.gather(1, got_ids).numpy(), values.numpy(), rtol=1e-3, atol=1e-3)
        assert row["score"] == pytest.approx(ref.gather(1, torch.tensor(row["hyp_ids"])[:, None]).sum().item(),
                                             abs=1e-3)


def test_the_converted_teacher_is_peaked(m2m, examples):
    src = m2m["tok"].encode_source(examples["source"].to_pylist())
    tgt = m2m["tok"].encode_target(examples["target"].to_pylist())
    top1 = torch.cat([torch_logprobs(m2m, s, t).max(-1).values for s, t in zip(src, tgt, strict=True)]).exp()
    assert top1.mean() > 10 / len(m2m["tok"].tokens)  # a uniform model would make the check meaningless


def test_teacher_forcing_stores_the_distributions_after_the_language_token(m2m, examples, tmp_path):
    table = TeacherWorker(make_spec(m2m, tmp_path)).distill(examples)
    tok = m2m["tok"]
    refs = [r[:MAX_LEN] for r in tok.encode_target(examples["target"].to_pylist())]
    assert table["hyp_ids"].to_pylist() == refs  # the forced __en__ is not a stored position
    assert table["source_ids"].to_pylist() == tok.encode_source(examples["source"].to_pylist())  # nor __de__
    assert_rows_match_torch(table, m2m)


def test_greedy_decodes_after_the_forced_language_token(m2m, examples, tmp_path):
    table = TeacherWorker(make_spec(m2m, tmp_path, mode="greedy")).distill(examples)
    tok = m2m["tok"]
    for row in table.to_pylist():  # plain argmax decoding in torch, language tokens forced
        out: list[int] = []
        while len(out) < MAX_LEN and (not out or out[-1] != tok.eos_id):
            out.append(int(torch_logprobs(m2m, row["source_ids"], out + [tok.eos_id])[len(out)].argmax()))
        assert row["hyp_ids"] == out
    assert_rows_match_torch(table, m2m)


def test_language_tokens_outside_the_vocabulary_are_refused(m2m, tmp_path):
    spec = make_spec(m2m, tmp_path)
    spec.teacher.target_prefix = ["__xx__"]
    with pytest.raises(TeacherError, match="teacher.target_prefix '__xx__': not in the teacher's vocabulary"):
        TeacherWorker(spec)
