"""CTranslate2 → Hugging Face for Marian (trainers/ct2_back.py, `distillery teacher to-hf`).

Tiny Marian models are built here with every weight random (biases and layer norms too, so a swapped mapping shows),
converted by CTranslate2's own converter and back; the original Hugging Face model is the reference for the weights,
CTranslate2's own teacher-forced scores (``trainers.parity``) for the function.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distillery.cli import app
from trainers.ct2_back import BackConversionError, ct2_to_marian, read_model_bin, save_back
from trainers.export import export_ct2
from trainers.parity import EXACT, QUANTIZED, TOLERANCES, ParityError, check_parity

TEACHER = Path(__file__).resolve().parents[2] / "teachers" / "bible-de-en"
POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def build_source(tok, out: Path, *, opus_like: bool):
    """A tiny Marian checkpoint with random weights everywhere (biases, norms and the output bias too) but the <pad>
    row and its bias (CTranslate2 drops them); ``opus_like``: swish, unscaled embeddings and a decoder of another
    depth and FFN width than the encoder (not another head count: CTranslate2's converter writes the encoder's for
    both, ``TransformerSpec.from_config``)."""
    from transformers import MarianMTModel

    from trainers.checkpoint import save_model
    from trainers.models import build_marian

    torch.manual_seed(3)
    model = build_marian("tiny", vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id)
    if opus_like:
        model.config.update({"activation_function": "swish", "scale_embedding": False, "decoder_layers": 1,
                             "decoder_ffn_dim": 96})
        model = MarianMTModel(model.config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # matrices are random already; biases start at zero and norms at one
                param.add_(torch.randn_like(param) * 0.1)
        model.get_input_embeddings().weight[tok.pad_id] = 0
        model.final_logits_bias.normal_(0, 0.5)
        model.final_logits_bias[0, tok.pad_id] = 0
    save_model(model, tok.path, out)
    return out


@pytest.fixture(scope="module")
def sources(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct2_back")
    return {kind: build_source(tiny_tokenizer, root / kind, opus_like=kind == "opus")
            for kind in ("ours", "opus")}


def reference(hf_dir: Path):
    from transformers import MarianMTModel

    return MarianMTModel.from_pretrained(str(hf_dir), dtype="float32").eval()


def quantized(key: str, value: torch.Tensor) -> bool:
    """The weights CTranslate2 quantizes: linear weights and the embedding (biases, norms, positions stay)."""
    return value.ndim == 2 and key not in POSITIONS and key != "final_logits_bias"


@pytest.mark.parametrize("kind", ["ours", "opus"])
def test_float32_round_trip_gives_back_the_same_model(sources, kind, tmp_path):
    ct2 = export_ct2(sources[kind], tmp_path / "ct2", quantization="float32", check=False)
    original, back = reference(sources[kind]), ct2_to_marian(ct2)
    for field in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                  "encoder_ffn_dim", "decoder_ffn_dim", "activation_function", "scale_embedding", "vocab_size",
                  "pad_token_id", "eos_token_id", "decoder_start_token_id", "max_position_embeddings"):
        assert getattr(back.config, field) == getattr(original.config, field), field
    want, got = original.state_dict(), back.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    src = torch.randint(0, original.config.pad_token_id, (3, 11))
    tgt = torch.randint(0, original.config.pad_token_id, (3, 7))
    with torch.no_grad():
        assert torch.equal(back(input_ids=src, decoder_input_ids=tgt).logits,
                           original(input_ids=src, decoder_input_ids=tgt).logits)
    checks = []
    save_back(ct2, tmp_path / "hf", on_check=checks.append)  # and CTranslate2 agrees: one exact check
    (exact,) = checks
    assert exact.tier == EXACT and exact.max_abs < 1e-4, exact.summary()


def fused_amax(state: dict, key: str) -> torch.Tensor:
    """The largest |weight| of the CTranslate2 matrix ``key`` is part of: q|k|v and the cross-attention's k|v are
    one fused matrix there, and int16 scales a matrix as a whole."""
    for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("encoder_attn.k_proj",
                                                                                  "encoder_attn.v_proj")):
        if any(part in key for part in group):
            return max(state[key.replace(part, other)].abs().max() for part in group if part in key
                       for other in group)
    return state[key].abs().max()


@pytest.mark.parametrize("quantization", ["int8", "int16"])
def test_quantized_weights_come_back_within_half_a_step_and_pass_the_check(sources, quantization, tmp_path):
    ct2 = export_ct2(sources["ours"], tmp_path / "ct2", quantization=quantization, check=False)
    checks = []
    save_back(ct2, tmp_path / "hf", on_check=checks.append)
    want, got = reference(sources["ours"]).state_dict(), reference(tmp_path / "hf").state_dict()
    for key, orig in want.items():
        if not quantized(key, orig):
            assert torch.equal(got[key], orig), key
            continue
        amax = orig.abs().amax(dim=1, keepdim=True) if quantization == "int8" else fused_amax(want, key)
        step = amax / 127 if quantization == "int8" else amax / 2**10  # ctranslate2/specs/model_spec.py, _quantize
        err = (got[key] - orig).abs()
        assert bool((err <= 0.5001 * step).all()), key  # rounding to the nearest step, per row for int8
        assert err.max() > 0, key  # and rounded it is
    # CTranslate2 run in float32 computes the dequantized weights exactly; at its own compute type, rounding shows
    exact, measured = checks
    assert exact.tier == EXACT and exact.compute_type == "float32" and exact.max_abs < 1e-4, exact.summary()
    assert measured.compute_type != "float32" and not measured.judged  # int16 may run as int8 (CPU support)
    assert measured.mean_abs > 10 * exact.mean_abs
    judged = check_parity(ct2, tmp_path / "hf")  # as `teacher check` judges it
    assert judged.passed and judged.tier == QUANTIZED, judged.summary()


@pytest.mark.parametrize("quantization, dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_weights_come_back_exactly_rounded(sources, quantization, dtype, tmp_path):
    """Every weight is stored rounded, the positions too; transformers recomputes those (the source's exact ones)."""
    ct2 = export_ct2(sources["ours"], tmp_path / "ct2", quantization=quantization, check=False)
    checks = []
    save_back(ct2, tmp_path / "hf", on_check=checks.append)
    want, got = reference(sources["ours"]).state_dict(), reference(tmp_path / "hf").state_dict()
    for key, orig in want.items():
        assert torch.equal(got[key], orig if key in POSITIONS else orig.to(dtype).float()), key
    (result,) = checks  # a CPU runs half-precision weights in float32: one check, judged as quantized
    assert result.passed and result.compute_type == "float32" and result.tier == QUANTIZED
    assert 0 < result.max_abs < 0.01, result.summary()  # the positions' rounding, nothing else


# --- refusals --------------------------------------------------------------------------------------------------

def write_model_bin(path: Path, name: str, revision: int, variables: dict, aliases: dict, version: int = 6) -> None:
    """model.bin as ctranslate2/specs/model_spec.py ``_serialize`` writes it."""
    types = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
             np.dtype("float16"): 4}

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = [struct.pack("<I", version), string(name), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for var, value in variables.items():
        out += [string(var), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape),
                struct.pack("<BI", types[value.dtype], value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [string(alias) + string(target) for alias, target in aliases.items()]
    path.write_bytes(b"".join(out))


@pytest.fixture(scope="module")
def int8_model(sources, tmp_path_factory) -> Path:
    return export_ct2(sources["ours"], tmp_path_factory.mktemp("int8") / "ct2", quantization="int8", check=False)


def test_reader_reads_every_byte(int8_model, tmp_path):
    name, revision, variables, aliases = read_model_bin(int8_model / "model.bin")
    assert (name, revision) == ("TransformerSpec", 7)
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight",  # tied: stored once
                       "encoder/embeddings_0/weight": "decoder/embeddings/weight",
                       "encoder/position_encodings/encodings": "decoder/position_encodings/encodings"}
    assert variables["decoder/embeddings/weight"].dtype == np.int8
    write_model_bin(tmp_path / "model.bin", name, revision, variables, aliases)
    assert (tmp_path / "model.bin").read_bytes() == (int8_model / "model.bin").read_bytes()


def altered(model: Path, out: Path, change) -> Path:
    """A copy of ``model`` whose model.bin is rewritten with ``change(name, revision, variables, aliases)``."""
    shutil.copytree(model, out)
    fields = list(read_model_bin(model / "model.bin"))
    change(fields)
    write_model_bin(out / "model.bin", *fields)
    return out


def add_gate(fields) -> None:  # a gated FFN's extra projection: CTranslate2 runs it, a MarianMTModel cannot
    fields[2]["decoder/layer_0/ffn/linear_0_noact/weight"] = np.ones((256, 64), np.float32)


def drop_norm(fields) -> None:
    del fields[2]["decoder/layer_1/attention/layer_norm/gamma"]


def pre_norm(fields) -> None:
    fields[2]["encoder/pre_norm"] = np.array(1, np.int8)


def another_spec(fields) -> None:
    fields[0] = "TransformerDecoderModelSpec"


def untied(fields) -> None:
    fields[2]["decoder/projection/weight"] = fields[2]["decoder/embeddings/weight"].copy()
    fields[2]["decoder/projection/weight_scale"] = fields[2]["decoder/embeddings/weight_scale"].copy()
    del fields[3]["decoder/projection/weight"]


@pytest.mark.parametrize("change, message", [
    (add_gate, "1 variable(s) a MarianMTModel has no place for: decoder/layer_0/ffn/linear_0_noact/weight"),
    (drop_norm, "has no variable decoder/layer_1/attention/layer_norm/gamma"),
    (pre_norm, "cannot be represented exactly as a MarianMTModel: a pre-norm encoder"),
    (another_spec, "is a TransformerDecoderModelSpec (revision 7); a Marian model is a TransformerSpec"),
    (untied, "not one matrix"),
])
def test_what_marian_cannot_hold_is_refused_by_name(int8_model, tmp_path, change, message):
    with pytest.raises(BackConversionError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
        ct2_to_marian(altered(int8_model, tmp_path / "bad", change))


def test_unreadable_files_are_refused_with_a_reason(int8_model, tmp_path):
    model = shutil.copytree(int8_model, tmp_path / "bad")
    data = (int8_model / "model.bin").read_bytes()
    (model / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(BackConversionError, match=r"model.bin is truncated: \d+ more bytes needed at offset"):
        ct2_to_marian(model)
    code, out = invoke("teacher", "to-hf", model, "--out", tmp_path / "hf")
    assert code == 2 and "error:" in out and "is truncated" in out and "Traceback" not in out, out
    assert not (tmp_path / "hf").exists()
    for out in (model, tmp_path):  # the CTranslate2 model itself is never replaced
        code, text = invoke("teacher", "to-hf", model, "--out", out)
        assert code == 2 and "would replace the CTranslate2 model" in text, text
    (model / "model.bin").write_bytes(struct.pack("<I", 5) + data[4:])
    with pytest.raises(BackConversionError, match="binary version 5; this reader knows 6"):
        ct2_to_marian(model)
    (model / "model.bin").write_bytes(data + b"\0")
    with pytest.raises(BackConversionError, match="1 bytes after the last alias"):
        ct2_to_marian(model)


# --- the command and the shipped teacher ----------------------------------------------------------------------

def test_cli_converts_checks_and_on_a_mismatch_writes_nothing(int8_model, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    code, text = invoke("teacher", "to-hf", int8_model, "--out", out)
    assert code == 0, text
    assert "(float32; weights float32+int8)" in text and "(tolerance, exact: max 0.02" in text  # the judged run
    assert "(int8_float32; weights float32+int8)" in text and "not judged" in text  # the measured one
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert check_parity(int8_model, out).passed  # what `teacher check` would say

    import trainers.ct2_back as ct2_back

    convert = ct2_back.ct2_to_marian

    def wrong(ct2_dir):  # a mapping error: 8 of the last FFN output biases shifted
        model = convert(ct2_dir)
        with torch.no_grad():
            model.model.decoder.layers[1].fc2.bias[:8] += 1.0
        return model

    monkeypatch.setattr(ct2_back, "ct2_to_marian", wrong)
    code, text = invoke("teacher", "to-hf", int8_model, "--out", out)
    assert code == 1 and "error: mismatch: CTranslate2's log-probs differ" in text and "Traceback" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left ...
    assert check_parity(int8_model, out).passed  # ... and the earlier output as it was
    with pytest.raises(ParityError):
        save_back(int8_model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_shipped_teacher_converts_back_and_matches_its_scores(tmp_path):
    """teachers/bible-de-en (int8, d_model 256, 4+4 layers, FFN 1024): the float32 model it holds, in torch."""
    checks = []
    out = save_back(TEACHER, tmp_path / "hf", on_check=checks.append)
    exact, measured = checks
    config = reference(out).config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_ffn_dim,
            config.vocab_size) == (256, 4, 4, 1024, 8000)
    assert exact.tier == EXACT and exact.max_abs < 1e-3, exact.summary()
    assert measured.compute_type == "int8_float32"
    assert measured.max_abs < TOLERANCES[QUANTIZED].max_abs and measured.mean_abs < TOLERANCES[QUANTIZED].mean_abs
    print(f"\nshipped teacher, HF float32 vs CT2 float32: max {exact.max_abs:.2e}, mean {exact.mean_abs:.2e}; "
          f"vs CT2 int8: max {measured.max_abs:.4f}, mean {measured.mean_abs:.4f} nats/token")
