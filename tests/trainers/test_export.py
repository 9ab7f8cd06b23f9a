import pytest

from pipeline.ct2 import model_vocabulary
from pipeline.evaluate import score, translate
from pipeline.tokenizer import Tokenizer
from trainers.export import ExportError, export_ct2


def test_export_is_self_contained_and_vocab_matches(tiny_teacher, tiny_tokenizer):
    ct2 = tiny_teacher["ct2_int8"]
    assert (ct2 / "model.bin").is_file()
    assert model_vocabulary(ct2) == tiny_tokenizer.tokens
    assert Tokenizer.load(ct2).vocab_hash == tiny_tokenizer.vocab_hash


def test_export_errors(tmp_path, tiny_teacher):
    with pytest.raises(ExportError, match="no config.json"):
        export_ct2(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="unknown quantization"):
        export_ct2(tiny_teacher["hf"], tmp_path / "out", quantization="int3")


def test_translate_is_in_input_order_and_scored(tiny_teacher, tiny_tokenizer):
    sources = ["Und Gott sprach: Es werde Licht!", "Im Anfang schuf Gott die Himmel und die Erde.", "Und"]
    # The degenerate tiny teacher always runs to the length cap (length_ratio × source length + 10); with one
    # sentence per chunk each output's length follows its own source, so the input order becomes observable.
    kwargs = {"beam_size": 2, "max_batch_tokens": 1, "length_ratio": 1.0}
    batch = translate(tiny_teacher["ct2_int8"], tiny_tokenizer, sources, **kwargs)
    one_by_one = [translate(tiny_teacher["ct2_int8"], tiny_tokenizer, [s], **kwargs)[0] for s in sources]
    assert batch == one_by_one and len(set(batch)) > 1


def test_score_against_sacrebleu_reference_values():
    refs = ["the cat sat on the mat", "there is a dog"]
    perfect = score(refs, refs)
    assert perfect.bleu == 100.0 and perfect.chrf == 100.0 and perfect.sentences == 2
    assert "nrefs:1" in perfect.bleu_signature and "tok:13a" in perfect.bleu_signature
    assert score(["a b c d", "x y z w"], refs).bleu < 5
    with pytest.raises(ValueError, match="hypotheses"):
        score(["one"], refs)
