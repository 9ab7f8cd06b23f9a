"""The parity check (trainers/parity.py), `distillery teacher check` and the checked `distillery export`: a correct
conversion passes in float32 and int8; a checkpoint with a trained decoder-start row, and a CTranslate2 model of
another checkpoint, are refused; --zero-pad-embedding fixes the first."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from distillery.cli import app
from pipeline.ct2 import model_hash
from tests.trainers.conftest import MARIAN_TOKENIZER_FILES, build_marian_checkpoint
from trainers.export import export_ct2
from trainers.parity import EXACT, QUANTIZED, SENTENCES, TOLERANCES, ParityError, check_parity

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")  # MarianTokenizer, loaded here


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def reference_tokens(tok_dir: Path, targets: list[str]) -> int:
    """Reference tokens counted with transformers' MarianTokenizer itself (``</s>`` included)."""
    from transformers import MarianTokenizer

    tok = MarianTokenizer.from_pretrained(str(tok_dir))
    return sum(len(ids) for ids in tok(text_target=targets)["input_ids"])


@pytest.fixture(scope="module")
def trained_start_row(opus_teacher, tmp_path_factory) -> dict:
    """The teacher with a non-zero decoder-start (<pad>) row, as a model fine-tuned with its full output layer gets
    it, and its CTranslate2 conversion made without a check (what ct2-transformers-converter gives)."""
    from transformers import MarianMTModel

    root = tmp_path_factory.mktemp("start_row")
    model = MarianMTModel.from_pretrained(opus_teacher["hf"])
    pad = model.config.decoder_start_token_id
    with torch.no_grad():  # large enough that the scores show it too; the weights give it away at any size
        model.get_decoder().embed_tokens.weight[pad] = model.get_decoder().embed_tokens.weight[7] * 40
    hf = root / "hf"
    model.save_pretrained(hf)
    for name in MARIAN_TOKENIZER_FILES:
        shutil.copy2(opus_teacher["tokenizer"] / name, hf / name)
    norm = float(model.get_decoder().embed_tokens.weight[pad].detach().double().norm())
    return {"hf": hf, "pad": pad, "norm": norm,
            "ct2": export_ct2(hf, root / "ct2-unchecked", quantization="float32", check=False)}


@pytest.mark.parametrize("ct2, tier", [("ct2_f32", EXACT), ("ct2_int8", QUANTIZED)])
def test_correct_conversion_passes(opus_teacher, ct2, tier):
    result = check_parity(opus_teacher[ct2], opus_teacher["hf"])
    assert result.passed, result.problems
    assert result.tier == tier and result.tolerance == TOLERANCES[tier]
    assert result.weights == ("float32" if tier == EXACT else "float32+int8")  # an int8 export keeps a few in float32
    assert result.sentences == len(SENTENCES)
    assert result.tokens == reference_tokens(opus_teacher["tokenizer"], [t for _, t in SENTENCES])
    assert result.start_row.token == "<pad>" and result.start_row.token_id == len(opus_teacher["vocab"]) - 1
    assert result.start_row.is_zero
    if tier == EXACT:
        assert result.max_abs < 1e-4  # only the summation order differs
    else:
        assert 1e-3 < result.mean_abs < TOLERANCES[QUANTIZED].mean_abs  # int8 shows, within its tolerance


def test_float16_weights_are_judged_as_quantized_though_a_cpu_runs_them_in_float32(opus_teacher, tmp_path):
    ct2 = export_ct2(opus_teacher["hf"], tmp_path / "f16", quantization="float16")
    result = check_parity(ct2, opus_teacher["hf"])
    assert result.passed and result.compute_type == "float32" and result.weights == "float16"
    assert result.tier == QUANTIZED and result.mean_abs > 1e-5  # rounded weights: not the float32 agreement


def test_sentences_longer_than_the_model_positions_are_cut(opus_teacher, tmp_path):
    """A student with short positions (``max_positions``) is checked on its export too: long pairs are cut."""
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(opus_teacher["hf"])
    model.config.max_position_embeddings = 12
    model = MarianMTModel(model.config)  # the same vocabulary with 12 positions
    with torch.no_grad():
        model.get_decoder().embed_tokens.weight[model.config.decoder_start_token_id] = 0
    model.save_pretrained(tmp_path / "hf")
    for name in MARIAN_TOKENIZER_FILES:
        shutil.copy2(opus_teacher["tokenizer"] / name, tmp_path / "hf" / name)
    ct2 = export_ct2(tmp_path / "hf", tmp_path / "ct2", quantization="float32")  # checks 8 pairs, most > 12 tokens
    result = check_parity(ct2, tmp_path / "hf")
    from transformers import MarianTokenizer

    lengths = [len(ids) for ids in MarianTokenizer.from_pretrained(str(opus_teacher["tokenizer"]))(
        text_target=[t for _, t in SENTENCES])["input_ids"]]
    assert max(lengths) > 12 and result.passed and result.tokens == sum(min(n, 12) for n in lengths)


def test_int8_compute_on_float32_weights_is_judged_as_quantized(opus_teacher):
    exact = check_parity(opus_teacher["ct2_f32"], opus_teacher["hf"])
    int8 = check_parity(opus_teacher["ct2_f32"], opus_teacher["hf"], compute_type="int8")
    assert int8.passed and int8.tier == QUANTIZED and int8.compute_type.startswith("int8")
    assert int8.mean_abs > 10 * exact.mean_abs


def test_trained_start_row_is_refused_with_the_diagnosis(trained_start_row):
    bad = trained_start_row
    result = check_parity(bad["ct2"], bad["hf"])
    assert not result.passed
    diagnosis = result.problems[0]
    for expected in (f"<pad> (id {bad['pad']})", f"L2 norm {bad['norm']:.4g}", "zero vector", "--zero-pad-embedding"):
        assert expected in diagnosis
    assert result.max_abs > 0.5  # the scores differ too (a float32 conversion, correct otherwise, agrees to 1e-5)


def test_ct2_decodes_from_zeros_so_the_zeroed_checkpoint_matches_it(trained_start_row, tmp_path):
    """The diagnosis is right: the unchecked conversion computes exactly the checkpoint with that row zeroed."""
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(trained_start_row["hf"])
    with torch.no_grad():
        model.get_decoder().embed_tokens.weight[trained_start_row["pad"]] = 0
    model.save_pretrained(tmp_path / "zeroed")
    for name in MARIAN_TOKENIZER_FILES:
        shutil.copy2(trained_start_row["hf"] / name, tmp_path / "zeroed" / name)
    result = check_parity(trained_start_row["ct2"], tmp_path / "zeroed")
    assert result.passed and result.max_abs < 1e-4


def test_export_refuses_it_and_zero_pad_embedding_fixes_it(trained_start_row, tmp_path):
    out = tmp_path / "ct2"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier export")
    with pytest.raises(ParityError, match="non-zero embedding row") as refused:
        export_ct2(trained_start_row["hf"], out, quantization="float32")
    assert "--zero-pad-embedding" in str(refused.value)
    # nothing written: no temporary directory left, the earlier output as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"] and sorted(p.name for p in out.iterdir()) == [
        "earlier.txt"]

    export_ct2(trained_start_row["hf"], out, quantization="float32", zero_pad_embedding=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]
    # CTranslate2 drops the row either way: the fix changes the reference, not the converted model ...
    assert model_hash(out) == model_hash(trained_start_row["ct2"])
    # ... and never the user's checkpoint.
    assert check_parity(out, trained_start_row["hf"]).start_row.norm == pytest.approx(trained_start_row["norm"])


def test_ct2_of_another_checkpoint_is_refused(opus_teacher, tmp_path):
    other = build_marian_checkpoint(opus_teacher["tokenizer"], tmp_path / "other", seed=1)  # same vocabulary
    ct2 = export_ct2(other, tmp_path / "other-ct2", quantization="int8")  # its own conversion is fine
    result = check_parity(ct2, opus_teacher["hf"])
    assert not result.passed and result.start_row.is_zero
    assert "differ from the Hugging Face model's" in result.problems[0]
    assert result.mean_abs > 5 * TOLERANCES[QUANTIZED].mean_abs


def test_ct2_with_another_vocabulary_is_refused(opus_teacher, tiny_tokenizer, tmp_path):
    from pipeline.tokenizer import copy_tokenizer_files
    from trainers.models import build_marian

    model = build_marian("tiny", vocab_size=len(tiny_tokenizer), pad_id=tiny_tokenizer.pad_id,
                         eos_id=tiny_tokenizer.eos_id)
    model.save_pretrained(tmp_path / "hf")
    copy_tokenizer_files(tiny_tokenizer.path, tmp_path / "hf")
    ct2 = export_ct2(tmp_path / "hf", tmp_path / "ct2", quantization="int8")
    result = check_parity(ct2, opus_teacher["hf"])
    assert not result.passed and "vocabularies differ" in result.problems[0]
    assert "not compared: the vocabularies differ" in result.summary()


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_sentences_from_a_file(opus_teacher, tmp_path, fmt):
    pairs = [("Guten Morgen.", "Good morning."), ("Das Haus ist alt.", "The house is old."),
             ("Wo ist der Bahnhof?", "Where is the station?")]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "tsv":
        path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    else:
        pq.write_table(pa.table({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]}), path)
    code, out = invoke("teacher", "check", opus_teacher["ct2_int8"], "--hf", opus_teacher["hf"], "--sentences", path)
    assert code == 0, out
    tokens = reference_tokens(opus_teacher["tokenizer"], [t for _, t in pairs])
    assert f"3 sentence pairs, {tokens} reference tokens" in out and "pass:" in out


def test_cli_exit_codes(opus_teacher, trained_start_row, tmp_path):
    code, out = invoke("teacher", "check", opus_teacher["ct2_int8"], "--hf", opus_teacher["hf"])
    assert code == 0 and "pass:" in out and "max " in out and "mean " in out, out

    code, out = invoke("teacher", "check", trained_start_row["ct2"], "--hf", trained_start_row["hf"])
    assert code == 1 and "error: mismatch: the decoder-start token <pad>" in out and "Traceback" not in out, out
    assert "job failed" not in out

    (tmp_path / "empty.tsv").write_text("")
    for args, expected in [
        ((tmp_path / "nowhere", "--hf", opus_teacher["hf"]), "teacher model directory not found"),
        ((opus_teacher["ct2_int8"], "--hf", tmp_path / "nowhere"), "is not a Hugging Face checkpoint"),
        ((opus_teacher["ct2_int8"], "--hf", opus_teacher["ct2_int8"]), "is not a Hugging Face checkpoint"),
        ((opus_teacher["ct2_int8"], "--hf", opus_teacher["hf"], "--sentences", tmp_path / "no.tsv"), "not found"),
        ((opus_teacher["ct2_int8"], "--hf", opus_teacher["hf"], "--sentences", tmp_path / "empty.tsv"), "no sentence"),
        ((opus_teacher["ct2_int8"], "--hf", opus_teacher["hf"], "--compute-type", "int3"), "unknown compute type"),
    ]:
        code, out = invoke("teacher", "check", *args)
        assert code == 2 and "error: " in out and expected in out and "Traceback" not in out, (args, out)
    usage = subprocess.run([sys.executable, "-m", "distillery.cli", "teacher", "check", str(opus_teacher["ct2_int8"])],
                           capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "error: Missing option '--hf'" in usage.stderr


def test_cli_export_refuses_writes_nothing_and_has_escapes(trained_start_row, tmp_path):
    out = tmp_path / "ct2"
    code, text = invoke("export", trained_start_row["hf"], "--out", out)
    assert code == 1 and "error: mismatch" in text and "--zero-pad-embedding" in text, text
    assert not any(tmp_path.iterdir())

    code, text = invoke("export", trained_start_row["hf"], "--out", out, "--zero-pad-embedding")
    assert code == 0 and "zero, as CTranslate2 assumes" in text, text
    assert (out / "model.bin").is_file()

    code, text = invoke("export", trained_start_row["hf"], "--out", tmp_path / "unchecked", "--no-check")
    assert code == 0 and "not checked: --no-check" in text, text
    assert (tmp_path / "unchecked" / "model.bin").is_file()


def test_int8_export_of_a_sharp_model_is_checked_in_float32_and_its_rounding_only_measured(opus_teacher, tmp_path):
    """A trained student's int8 rounding can exceed any fixed quantized tolerance (its distributions are sharp): the
    export proves the conversion on the float32 model, then reports the rounding gap instead of refusing it. Here the
    teacher's decoder output is scaled 30x (sharp logits, the same computation otherwise)."""
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(opus_teacher["hf"])
    with torch.no_grad():
        norm = model.get_decoder().layers[-1].final_layer_norm
        norm.weight *= 30
        norm.bias *= 30
    model.save_pretrained(tmp_path / "sharp")
    for name in MARIAN_TOKENIZER_FILES:
        shutil.copy2(opus_teacher["tokenizer"] / name, tmp_path / "sharp" / name)

    checks = []
    out = export_ct2(tmp_path / "sharp", tmp_path / "ct2", quantization="int8", on_check=checks.append)
    exact, rounded = checks
    assert exact.tier == EXACT and exact.passed and exact.max_abs < TOLERANCES[EXACT].max_abs
    assert rounded.tier == QUANTIZED and not rounded.judged and rounded.passed
    # the rounding gap is past the quantized tolerance, which refuses the same model when asked to judge it
    assert rounded.mean_abs > TOLERANCES[QUANTIZED].mean_abs
    judged = check_parity(out, tmp_path / "sharp")
    assert not judged.passed and judged.mean_abs == pytest.approx(rounded.mean_abs)
    assert "not judged" in rounded.summary() and sorted(p.name for p in tmp_path.iterdir()) == ["ct2", "sharp"]


def test_int8_export_refuses_a_wrong_conversion_through_its_float32_check(trained_start_row, tmp_path):
    with pytest.raises(ParityError, match="non-zero embedding row"):
        export_ct2(trained_start_row["hf"], tmp_path / "ct2", quantization="int8")
    assert list(tmp_path.iterdir()) == []  # neither the float32 check nor the int8 model left behind
