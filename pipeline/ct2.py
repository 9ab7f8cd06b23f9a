"""Loading a CTranslate2 teacher and checking it against a tokenizer.

A teacher is a CTranslate2 model directory (``model.bin`` + vocabulary + ``config.json``), produced by
``distillery export`` or by CTranslate2's own converters (e.g. ``ct2-transformers-converter`` on an
OPUS-MT model). Its tokenizer may live in the same directory or anywhere else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import InputError
from pipeline.tokenizer import Tokenizer, vocab_hash

EVAL_RECORD = "distillery_eval.json"  # written by `distillery eval` next to the model; not part of its identity
# Weight files of a Hugging Face checkpoint (e.g. a run's best/): never part of a CTranslate2 model directory.
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
COMPUTE_TYPES = ("int8", "int8_float32", "float32", "int16", "float16", "bfloat16", "int8_float16", "int8_bfloat16",
                 "default", "auto")


class TeacherError(InputError):
    """The teacher model directory is missing, unreadable, or incompatible with the tokenizer."""


def check_model_dir(model_dir: str | Path) -> Path:
    """Returns ``model_dir`` as a Path if it looks like a CTranslate2 model, else raises TeacherError."""
    path = Path(model_dir)
    if not path.is_dir():
        raise TeacherError(f"teacher model directory not found: {path}")
    if any((path / name).is_file() for name in HF_WEIGHTS):
        raise TeacherError(f"{path} is a Hugging Face checkpoint, not a CTranslate2 model: convert it with "
                           f"`distillery export {path} --out CT2_DIR`")
    if not (path / "model.bin").is_file():
        raise TeacherError(
            f"{path} has no model.bin: not a CTranslate2 model "
            "(convert a checkpoint with `distillery export` or ct2-transformers-converter)"
        )
    return path


def check_compute_type(compute_type: str, device: str = "cpu") -> str:
    """Refuses a compute type this machine's CTranslate2 cannot run on ``device`` (checked in the driver, before
    any worker loads the model: e.g. ``int16`` needs a CPU with the right instructions)."""
    import ctranslate2

    if compute_type not in COMPUTE_TYPES:
        raise TeacherError(f"unknown compute type {compute_type!r}; choose one of {', '.join(COMPUTE_TYPES)}")
    supported = ctranslate2.get_supported_compute_types(device)
    if compute_type not in ("default", "auto") and compute_type not in supported:
        raise TeacherError(f"compute type {compute_type!r} is not supported on this {device}; "
                           f"it supports {', '.join(sorted(supported))}")
    return compute_type


def model_vocabulary(model_dir: str | Path) -> list[str]:
    """The target vocabulary a CTranslate2 model was converted with, ordered by id."""
    path = check_model_dir(model_dir)
    for name in ("shared_vocabulary", "target_vocabulary"):
        if (path / f"{name}.json").is_file():
            return json.loads((path / f"{name}.json").read_text(encoding="utf-8"))
        if (path / f"{name}.txt").is_file():
            return (path / f"{name}.txt").read_text(encoding="utf-8").splitlines()
    raise TeacherError(f"{path}: no shared_vocabulary or target_vocabulary file")


def check_vocabulary(tokenizer: Tokenizer, model_dir: str | Path) -> str:
    """Refuses a tokenizer whose vocabulary differs from the model's; returns the vocabulary hash."""
    model_tokens = model_vocabulary(model_dir)
    if model_tokens != tokenizer.tokens:
        n_diff = sum(a != b for a, b in zip(model_tokens, tokenizer.tokens, strict=False))
        raise TeacherError(
            f"tokenizer {tokenizer.path} does not match teacher {model_dir}: "
            f"{len(tokenizer.tokens)} vs {len(model_tokens)} tokens, {n_diff} differing positions"
        )
    return vocab_hash(model_tokens)


def check_prefix_tokens(tokenizer: Tokenizer, source_prefix: list[str], target_prefix: list[str]) -> None:
    """Refuses language tokens the teacher does not know: CTranslate2 would map them to ``<unk>`` silently."""
    known = tokenizer.token_to_id
    missing = [f"{side}_prefix {token!r}" for side, tokens in (("source", source_prefix), ("target", target_prefix))
               for token in tokens if token not in known]
    if missing:
        raise TeacherError(f"teacher.{', teacher.'.join(missing)}: not in the teacher's vocabulary "
                           f"({len(known)} tokens in {tokenizer.path})")


def model_hash(model_dir: str | Path) -> str:
    """sha256 over the model's weights and config: the teacher identity recorded in manifests."""
    path = check_model_dir(model_dir)
    digest = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".json")):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", EVAL_RECORD):
            continue  # tokenizer files are hashed separately; a score is about the model, not the model
        digest.update(name.encode())
        with open(path / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def load_translator(
    model_dir: str | Path,
    *,
    compute_type: str = "int8",
    intra_threads: int = 1,
    inter_threads: int = 1,
    device: str = "cpu",
    device_index: int = 0,
):
    """Opens a ``ctranslate2.Translator``; every failure becomes a TeacherError with the cause."""
    import ctranslate2

    path = check_model_dir(model_dir)
    if compute_type not in COMPUTE_TYPES:
        raise TeacherError(f"unknown compute type {compute_type!r}; choose one of {COMPUTE_TYPES}")
    try:
        return ctranslate2.Translator(
            str(path),
            device=device,
            device_index=device_index,
            compute_type=compute_type,
            intra_threads=intra_threads,
            inter_threads=inter_threads,
        )
    except (RuntimeError, ValueError) as exc:
        raise TeacherError(f"cannot load teacher {path}: {exc}") from exc
