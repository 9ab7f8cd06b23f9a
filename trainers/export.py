"""Checkpoint → CTranslate2 conversion with CTranslate2's own ``TransformersConverter``."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.tokenizer import copy_tokenizer_files

QUANTIZATIONS = ("float32", "int8", "int8_float32", "int16", "float16", "bfloat16")


class ExportError(ValueError):
    """The checkpoint cannot be converted."""


def export_ct2(checkpoint: str | Path, out: str | Path, *, quantization: str = "int8") -> Path:
    """Converts a Hugging Face Marian checkpoint directory to a CTranslate2 model directory.

    The tokenizer files are copied beside the converted model so the directory is self-contained:
    every command accepts it as ``--model`` without a separate ``--tokenizer``.

    Args:
        checkpoint: directory with ``config.json``, weights and tokenizer files (e.g. ``run/best``).
        out: target directory; replaced if it exists.
        quantization: weight type stored in the CT2 model; ``float32`` keeps full precision.

    Returns:
        ``out`` as a Path.
    """
    from ctranslate2.converters import TransformersConverter

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} is not a Hugging Face checkpoint (no config.json)")
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        TransformersConverter(str(checkpoint)).convert(
            str(tmp), quantization=None if quantization == "float32" else quantization, force=True
        )
    except Exception as exc:  # the converter raises bare Exceptions; name the checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot convert {checkpoint}: {exc}") from exc
    copy_tokenizer_files(checkpoint, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
