"""CTranslate2 → Hugging Face for Marian models: a teacher shipped only as CTranslate2 (``teachers/bible-de-en``)
loaded back as a torch ``MarianMTModel``, for the work that needs the teacher in torch (Online KD, where it runs with
LoRA adapters).

It inverts CTranslate2's own Marian conversion (``MarianMTLoader`` in ``ctranslate2/converters/transformers.py``):
the fused q|k|v (self-attention) and k|v (cross-attention) projections are split again, int8 / int16 weights are
dequantized with their scales, and the ``<pad>`` row the converter drops is appended as zeros — CTranslate2 decodes
from a zero vector (``start_from_zero_embedding``), Hugging Face from that row, and our models keep it zero. Only what
a ``MarianMTModel`` computes exactly is accepted: every variable of ``model.bin`` must be used, every setting must be
one Marian has, and anything else is refused by name. A quantized model comes back as its dequantized weights: the
rounding stays, nothing else changes, so the result agrees with CTranslate2 run in float32 to float rounding (a
float16 / bfloat16 model stores its sinusoidal positions rounded too; transformers computes exact ones).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from trainers.parity import _BINARY_VERSIONS, _DTYPES, EXACT, ParityResult, check_parity, raise_on_mismatch

# What the CTranslate2 this project pins writes for a Marian model (``TransformerSpec.revision``); another revision
# may lay its variables out differently, so it is refused rather than guessed.
SPEC_NAME, SPEC_REVISION = "TransformerSpec", 7
# CTranslate2's Activation enum (specs/common_spec.py) → transformers' activation names.
ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "swish", 3: "gelu", 4: "quick_gelu"}
_NUMPY = {"float32": "<f4", "int8": "i1", "int16": "<i2", "int32": "<i4", "float16": "<f2", "bfloat16": "<u2"}
_POSITION_TOLERANCE = 1e-6  # float rounding of the same sinusoid; another encoding differs by ~1


class BackConversionError(InputError):
    """A CTranslate2 model that cannot be read, or that a ``MarianMTModel`` cannot represent exactly (exit 2)."""


class _Bytes:
    """A cursor over ``model.bin`` that names the file and the offset when the file ends early."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BackConversionError(f"{self.path} is truncated: {n} more bytes needed at offset {self.pos}, the "
                                      f"file has {len(self.data)} (a partial copy or download?)")
        chunk = self.data[self.pos: self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        try:
            if raw.endswith(b"\0"):
                return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            pass
        raise BackConversionError(f"{self.path}: malformed string before offset {self.pos}: not a CTranslate2 model")


def read_model_bin(path: str | Path) -> tuple[str, int, dict[str, np.ndarray], dict[str, str]]:
    """Parses a CTranslate2 ``model.bin`` (the format of ``ctranslate2/specs/model_spec.py``, ``_serialize``).

    Returns:
        The spec name, its revision, the variables by name as stored (bfloat16 widened to float32, exactly; scalars
        as 0-d arrays) and the aliases (alias → the variable it names: CTranslate2 stores equal tensors once).

    Raises:
        BackConversionError: a binary version this reader does not know, a truncated or malformed file.
    """
    path = Path(path)
    buf = _Bytes(path.read_bytes(), path)
    version = buf.unpack("I")
    if version not in _BINARY_VERSIONS:
        raise BackConversionError(f"{path}: CTranslate2 binary version {version}; this reader knows "
                                  f"{', '.join(map(str, _BINARY_VERSIONS))} (what the pinned CTranslate2 writes)")
    name, revision = buf.string(), buf.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(buf.unpack("I")):
        var = buf.string()
        dims = tuple(buf.unpack("I") for _ in range(buf.unpack("B")))
        type_id, size = buf.unpack("B"), buf.unpack("I")
        if type_id >= len(_DTYPES):
            raise BackConversionError(f"{path}: variable {var} has an unknown type id {type_id}")
        dtype = np.dtype(_NUMPY[_DTYPES[type_id]])
        if size != math.prod(dims) * dtype.itemsize:
            raise BackConversionError(f"{path}: variable {var} holds {size} bytes, its shape {dims} needs "
                                      f"{math.prod(dims) * dtype.itemsize}: not a CTranslate2 model")
        value = np.frombuffer(buf.take(size), dtype=dtype).reshape(dims)
        if _DTYPES[type_id] == "bfloat16":  # the top half of a float32: numpy has no bfloat16
            value = (value.astype("<u4") << 16).view("<f4")
        variables[var] = value.copy()
    aliases = {}
    for _ in range(buf.unpack("I")):
        alias = buf.string()
        aliases[alias] = buf.string()
    if buf.pos != len(buf.data):
        raise BackConversionError(f"{path}: {len(buf.data) - buf.pos} bytes after the last alias: not a "
                                  "CTranslate2 model this reader knows")
    return name, revision, variables, aliases


def dequantize(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float32 values: an int8 ``X`` with its per-row ``X_scale`` is ``X / scale[:, None]``, an int16 one with its
    scalar scale ``X / scale`` (the inverse of ``_quantize`` in ``ctranslate2/specs/model_spec.py``); the scales are
    used up. Float variables are widened; scalars (settings) are kept as they are.

    Raises:
        BackConversionError: an integer weight without its scale, or a scale of the wrong shape.
    """
    out = dict(variables)
    for name, value in variables.items():
        if value.ndim == 0 or (name.endswith("_scale") and name.removesuffix("_scale") in variables):
            continue
        if value.dtype in (np.int8, np.int16):
            scale = out.pop(name + "_scale", None)
            rows = (value.shape[0],) if value.dtype == np.int8 else ()
            if scale is None or scale.shape != rows:
                raise BackConversionError(f"{name} is {value.dtype} without a scale of shape {rows}: cannot "
                                          "dequantize it")
            scale = scale.astype(np.float32)
            out[name] = value.astype(np.float32) / (scale[:, None] if rows else scale)
        elif value.dtype.kind == "f":
            out[name] = value.astype(np.float32)
    return out


class _Variables:
    """The dequantized variables, aliases resolved, each marked when a Marian weight or setting uses it."""

    def __init__(self, values: dict[str, np.ndarray], aliases: dict[str, str], path: Path):
        self.values, self.aliases, self.path, self.used = values, aliases, path, set()

    def target(self, name: str) -> str:
        return self.aliases.get(name, name)

    def __contains__(self, name: str) -> bool:
        return self.target(name) in self.values

    def take(self, name: str) -> np.ndarray:
        if name not in self:
            raise BackConversionError(f"{self.path} has no variable {name}: not a Marian model converted by "
                                      "CTranslate2's transformers converter")
        self.used.update({name, self.target(name)})
        return self.values[self.target(name)]

    def setting(self, name: str, default=None):
        """A scalar setting as a Python number; ``default`` when the file lacks it (None: required)."""
        if default is not None and name not in self:
            return default
        value = self.take(name)
        if value.ndim != 0:
            raise BackConversionError(f"{self.path}: {name} should be a scalar setting, it has shape {value.shape}")
        return value.item()

    def unused(self) -> list[str]:
        return sorted(set(self.values) - self.used) + sorted(set(self.aliases) - self.used)


def ct2_to_marian(ct2_dir: str | Path, *, dropout: float = 0.1):
    """The float32 ``MarianMTModel`` a CTranslate2 Marian model was converted from (eval mode).

    Args:
        ct2_dir: CTranslate2 model directory (``model.bin``, ``config.json``, the shared vocabulary).
        dropout: the model's dropout for training (CTranslate2 does not store it); the default is the presets'
            (``trainers.models.ModelSize``).

    Raises:
        BackConversionError: another spec or revision, a setting Marian does not have (pre-norm, ALiBi, …),
            untied embeddings, a position encoding that is not Marian's sinusoid, a missing variable, or a variable
            left unused.
        TeacherError: not a CTranslate2 model directory.
    """
    import torch
    from transformers import MarianConfig, MarianMTModel

    from pipeline.ct2 import check_model_dir, model_vocabulary

    ct2_dir = check_model_dir(ct2_dir)
    path = ct2_dir / "model.bin"
    name, revision, raw, aliases = read_model_bin(path)
    if (name, revision) != (SPEC_NAME, SPEC_REVISION):
        raise BackConversionError(f"{path} is a {name} (revision {revision}); a Marian model is a {SPEC_NAME} "
                                  f"(revision {SPEC_REVISION}, what the pinned CTranslate2 writes)")
    ct2 = _Variables(dequantize(raw), aliases, path)
    settings = _ct2_settings(ct2, ct2_dir)
    vocab = model_vocabulary(ct2_dir)
    if "<pad>" in vocab:
        raise BackConversionError(f"{ct2_dir}: its vocabulary holds <pad>; a Marian conversion drops it (it is the "
                                  "last token, appended here again)")
    embedding = _tied_embedding(ct2, path)
    if embedding.shape[0] != len(vocab):
        raise BackConversionError(f"{path}: {embedding.shape[0]} embedding rows, {len(vocab)} vocabulary tokens")
    eos = settings["eos_token"]
    if eos not in vocab:
        raise BackConversionError(f"{ct2_dir}: its eos token {eos!r} is not in its vocabulary")
    d_model, pad = embedding.shape[1], len(vocab)  # <pad> goes last, as in OPUS-MT and our tokenizers
    layers = {side: _layer_count(ct2, side, path) for side in ("encoder", "decoder")}
    ffn = {side: {ct2.take(f"{side}/layer_{i}/ffn/linear_0/weight").shape[0] for i in range(layers[side])}
           for side in layers}
    if any(len(widths) > 1 for widths in ffn.values()):
        raise BackConversionError(f"{path}: the layers have different FFN widths {ffn} (a pruned student): a "
                                  "MarianMTModel has one width per stack")
    positions = ct2.take("encoder/position_encodings/encodings")
    config = MarianConfig(
        vocab_size=pad + 1,
        d_model=d_model,
        encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"],
        encoder_attention_heads=settings["encoder_heads"],
        decoder_attention_heads=settings["decoder_heads"],
        encoder_ffn_dim=ffn["encoder"].pop(),
        decoder_ffn_dim=ffn["decoder"].pop(),
        activation_function=settings["activation"],
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=positions.shape[0],
        pad_token_id=pad,
        eos_token_id=vocab.index(eos),
        decoder_start_token_id=pad,
        forced_eos_token_id=vocab.index(eos),
        scale_embedding=settings["scale_embedding"],
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )  # as trainers.models.build_marian builds ours
    model = MarianMTModel(config)
    state = model.state_dict()
    for side in ("encoder", "decoder"):
        _check_positions(ct2.take(f"{side}/position_encodings/encodings"),
                         state[f"model.{side}.embed_positions.weight"], f"{path}: {side}/position_encodings")
    weights = _marian_weights(ct2, layers, embedding)
    bias = ct2.take("decoder/projection/bias") if "decoder/projection/bias" in ct2 else np.zeros(pad, np.float32)
    weights["final_logits_bias"] = np.append(bias, np.float32(0))[None]  # the <pad> logit's bias: dropped, zero
    if unused := ct2.unused():
        raise BackConversionError(f"{path}: {len(unused)} variable(s) a MarianMTModel has no place for: "
                                  f"{', '.join(unused[:6])}{' …' if len(unused) > 6 else ''}")
    for key, value in weights.items():
        if state[key].shape != value.shape:
            raise BackConversionError(f"{path}: {key} would need shape {tuple(state[key].shape)}, the stored "
                                      f"weight has {value.shape}")
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    missing = set(state) - set(weights) - {f"model.{s}.embed_positions.weight" for s in layers}
    assert not missing, f"not mapped: {sorted(missing)}"  # a mapping bug, not an input error
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_positions(stored: np.ndarray, own, name: str) -> None:
    """Refuses position encodings that are not the sinusoid transformers computes for Marian (and does not save: a
    MarianMTModel always uses its own), as stored in float32 or rounded to float16 / bfloat16."""
    import torch

    if stored.shape == tuple(own.shape):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if np.abs(stored - own.to(dtype).float().numpy()).max() <= _POSITION_TOLERANCE:
                return
    raise BackConversionError(f"{name} are not Marian's sinusoid (the one transformers computes, {tuple(own.shape)}); "
                              "a MarianMTModel cannot hold them")


def _ct2_settings(ct2: _Variables, ct2_dir: Path) -> dict:
    """The settings a MarianConfig takes; refuses the ones a MarianMTModel does not have."""
    refuse = []
    config = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    if config.get("layer_norm_epsilon") not in (None, 1e-5):
        refuse.append(f"layer norm epsilon {config['layer_norm_epsilon']} (Marian's is 1e-05)")
    if config.get("multi_query_attention") or ct2.setting("encoder/multi_query_attention", 0):
        refuse.append("multi-query attention")
    activations = set()
    heads, scales = {}, set()
    for side in ("encoder", "decoder"):
        if ct2.setting(f"{side}/pre_norm"):
            refuse.append(f"a pre-norm {side} (a MarianMTModel is post-norm)")
        activations.add(ct2.setting(f"{side}/activation"))
        heads[side] = ct2.setting(f"{side}/num_heads")
        scales.add(ct2.setting(f"{side}/scale_embeddings"))
    ct2.setting("encoder/embeddings_merge", 0)  # how several source embeddings merge; Marian has one
    ct2.setting("decoder/alignment_layer", 0)  # which attention CTranslate2 returns as alignments: not scores
    ct2.setting("decoder/alignment_heads", 0)
    for flag in ("alibi", "alibi_use_positive_positions", "scale_alibi"):
        if ct2.setting(f"decoder/{flag}", 0):
            refuse.append(f"decoder/{flag}")
    if not ct2.setting("decoder/start_from_zero_embedding"):
        refuse.append("a decoder that starts from a token's embedding (Marian conversions start from zeros)")
    if len(activations) > 1 or not activations <= set(ACTIVATIONS):
        refuse.append(f"activation(s) {sorted(activations)} (CTranslate2's enum; Marian takes one of "
                      f"{', '.join(f'{k} {v}' for k, v in ACTIVATIONS.items())})")
    embeddings = ct2.take("decoder/embeddings/weight") if "decoder/embeddings/weight" in ct2 else None
    d_model = embeddings.shape[1] if embeddings is not None else 0
    if len(scales) > 1 or not scales <= {1.0, math.sqrt(d_model)}:
        refuse.append(f"embedding scale(s) {sorted(scales)} (Marian's: sqrt(d_model) = {math.sqrt(d_model):g}, "
                      "or 1)")
    if any(d_model % h for h in heads.values() if h):
        refuse.append(f"{heads} heads for d_model {d_model}")
    if refuse:
        raise BackConversionError(f"{ct2_dir} cannot be represented exactly as a MarianMTModel: {'; '.join(refuse)}")
    return {"activation": ACTIVATIONS[activations.pop()], "encoder_heads": heads["encoder"],
            "decoder_heads": heads["decoder"], "scale_embedding": scales.pop() != 1.0,
            "eos_token": config.get("eos_token", "</s>")}


def _tied_embedding(ct2: _Variables, path: Path) -> np.ndarray:
    """The one matrix a Marian model uses for source and target embeddings and the output layer."""
    names = ("encoder/embeddings_0/weight", "decoder/embeddings/weight", "decoder/projection/weight")
    for name in names:
        ct2.take(name)  # named when missing
    if len({ct2.target(name) for name in names}) != 1:
        raise BackConversionError(f"{path}: the source and target embeddings and the output layer are not one matrix "
                                  "(CTranslate2 stores equal tensors once); only tied Marian models (ours, OPUS-MT) "
                                  "are converted back")
    return ct2.take(names[0])


def _layer_count(ct2: _Variables, side: str, path: Path) -> int:
    found = {int(m.group(1)) for name in ct2.values if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    if not found or found != set(range(len(found))):
        raise BackConversionError(f"{path}: {side} layers {sorted(found)}; expected layer_0 … layer_N")
    return len(found)


def _marian_weights(ct2: _Variables, layers: dict[str, int], embedding: np.ndarray) -> dict[str, np.ndarray]:
    """Every Marian weight but the positions, by its state-dict name."""
    rows = np.concatenate([embedding, np.zeros((1, embedding.shape[1]), np.float32)])  # the <pad> row
    out = {key: rows for key in ("model.shared.weight", "model.encoder.embed_tokens.weight",
                                 "model.decoder.embed_tokens.weight", "lm_head.weight")}

    def linear(src: str, *dst: str) -> None:  # fused projections are stacked along the output rows
        for kind in ("weight", "bias"):
            value = ct2.take(f"{src}/{kind}")
            if value.ndim == 0 or value.shape[0] % len(dst):
                raise BackConversionError(f"{ct2.path}: {src}/{kind} has shape {value.shape}, not {len(dst)} "
                                          "stacked projections")
            for part, name in zip(np.split(value, len(dst)), dst, strict=True):
                out[f"{name}.{kind}"] = part

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = ct2.take(f"{src}/gamma"), ct2.take(f"{src}/beta")

    for side in ("encoder", "decoder"):
        for i in range(layers[side]):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            linear(f"{src}/self_attention/linear_0", *(f"{dst}.self_attn.{p}_proj" for p in "qkv"))
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                linear(f"{src}/attention/linear_1", f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj")
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return out


def save_back(ct2_dir: str | Path, out: str | Path, *, check: bool = True,
              sentences: list[tuple[str, str]] | None = None, threads: int = 2,
              on_check: Callable[[ParityResult], None] | None = None) -> Path:
    """Writes the ``MarianMTModel`` of a CTranslate2 Marian model as a Hugging Face checkpoint, its tokenizer files
    beside it as in our own checkpoints, and checks it against the CTranslate2 model before moving it into place.

    Args:
        ct2_dir: CTranslate2 model directory holding its tokenizer (every model this project ships or exports does).
        out: the checkpoint directory; replaced if it exists (left as it was when the check fails); not
            ``ct2_dir`` or a directory above it.
        check: score ``trainers.parity`` pairs both ways. CTranslate2 run in float32 must agree within the exact
            tolerance (the weights are its own, dequantized; a float16 / bfloat16 model's rounded positions make
            that run quantized); an int8 / int16 model's gap at its own compute type is then measured and
            reported, not judged (``export_ct2`` does the same).
        sentences: (source, reference) pairs for the check; default ``trainers.parity.SENTENCES``.
        threads: CTranslate2 threads for the check.
        on_check: receives each passed check's result: the float32 one, then an integer model's own.

    Raises:
        BackConversionError, TeacherError, TokenizerError: the model or its tokenizer cannot be converted back.
        ParityError: the written model does not compute what CTranslate2 computes; nothing is written.
    """
    from pipeline.ct2 import check_model_dir, check_vocabulary
    from pipeline.tokenizer import Tokenizer, copy_tokenizer_files
    from trainers.parity import stored_weight_types

    ct2_dir, out = check_model_dir(ct2_dir), Path(out)
    if out.resolve() == ct2_dir.resolve() or out.resolve() in ct2_dir.resolve().parents:
        raise BackConversionError(f"--out {out} would replace the CTranslate2 model {ct2_dir}; choose another "
                                  "directory")
    tok = Tokenizer.load(ct2_dir)
    check_vocabulary(tok, ct2_dir)
    if tok.pad_id != len(tok.tokens):
        raise BackConversionError(f"{ct2_dir}: the tokenizer's <pad> is id {tok.pad_id}; a Marian conversion "
                                  f"needs it last (id {len(tok.tokens)})")
    model = ct2_to_marian(ct2_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        copy_tokenizer_files(ct2_dir, tmp)
        if check:
            weights = stored_weight_types(ct2_dir)
            # Half-precision models hold their positions rounded too, and transformers recomputes exact ones: that
            # run is judged as quantized. A CPU runs their weights in float32, int8 / int16 ones in int8.
            exact = EXACT if not weights & {"float16", "bfloat16"} else None
            for compute_type in ["float32"] + (["default"] if weights & {"int8", "int16"} else []):
                result = check_parity(ct2_dir, tmp, sentences=sentences, compute_type=compute_type, threads=threads,
                                      hf_label=str(out), judge=compute_type == "float32",
                                      tier=exact if compute_type == "float32" else None)
                raise_on_mismatch(result)
                if on_check is not None:
                    on_check(result)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
