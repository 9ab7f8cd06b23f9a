"""Checkpoint → CTranslate2 conversion with CTranslate2's own ``TransformersConverter``, checked against the
checkpoint's own forward (``trainers.parity``) before the model is moved into place."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from pipeline.tokenizer import copy_tokenizer_files
from trainers.parity import ParityResult, check_parity, raise_on_mismatch

QUANTIZATIONS = ("float32", "int8", "int8_float32", "int16", "float16", "bfloat16")


class ExportError(ValueError):
    """The checkpoint cannot be converted."""


def export_ct2(checkpoint: str | Path, out: str | Path, *, quantization: str = "int8", check: bool = True,
               zero_pad_embedding: bool = False, sentences: list[tuple[str, str]] | None = None,
               on_check: Callable[[ParityResult], None] | None = None) -> Path:
    """Converts a Hugging Face Marian checkpoint directory to a CTranslate2 model directory.

    A pruned student (``trainers.glu``: ``ffn_widths`` in its config) is converted with each layer trimmed to its
    own FFN width, so the CTranslate2 model holds only the kept channels.

    The tokenizer files are copied beside the converted model so the directory is self-contained:
    every command accepts it as ``--model`` without a separate ``--tokenizer``. The model is converted into a
    temporary directory and checked there; ``out`` is written only when the check passes.

    Args:
        checkpoint: directory with ``config.json``, weights and tokenizer files (e.g. ``run/best``).
        out: target directory; replaced if it exists (and left as it was when the export is refused).
        quantization: weight type stored in the CT2 model; ``float32`` keeps full precision.
        check: score a few sentences with the converted model and with the checkpoint (``trainers.parity``)
            and refuse a mismatch. A reduced-precision export is checked twice: its float32 conversion must match
            within the exact tolerance, and the rounded model's gap is measured and reported, not judged.
        zero_pad_embedding: zero the decoder-start (``<pad>``) embedding row in a copy of the checkpoint and
            convert that copy: CTranslate2 decodes from a zero vector, so this makes the checkpoint what
            CTranslate2 will compute. ``checkpoint`` itself is not changed.
        sentences: (source, reference) pairs for the check; default ``trainers.parity.SENTENCES``.
        on_check: receives each check's result when it passes (e.g. to print its numbers): the float32 check,
            then the reduced-precision measurement.

    Returns:
        ``out`` as a Path.

    Raises:
        ExportError: not a checkpoint, an unknown quantization, a conversion error, a gated student not pruned.
        ParityError: the converted model does not compute what the checkpoint computes; nothing is written.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} is not a Hugging Face checkpoint (no config.json)")
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("ffn_gates") is not None:
        raise ExportError(f"{checkpoint} is a gated student (ffn_gates): its gates are not part of a Marian model, "
                          "so converting it would drop them. Export its pruned checkpoint (RUN/pruned, written by "
                          "`distillery train`; trainers.glu.prune_checkpoint makes one)")
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    tmp = out.with_name(out.name + ".tmp")
    exact = out.with_name(out.name + ".float32-check")
    zeroed = out.with_name(out.name + ".zeroed-source")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        source = _zero_start_row(checkpoint, zeroed) if zero_pad_embedding else checkpoint
        trim = config.get("ffn_widths") is not None  # a pruned student: its FFN padding is dropped
        label = f"{checkpoint} (decoder-start row zeroed)" if zero_pad_embedding else str(checkpoint)

        def checked(model_dir: Path, judge: bool) -> None:
            result = check_parity(model_dir, source, sentences=sentences, hf_label=label, judge=judge)
            result.ct2_dir = out  # where it goes if it passes, not the temporary directory
            raise_on_mismatch(result)
            if on_check is not None:
                on_check(result)

        if check and quantization != "float32":
            # Conversion and rounding are checked apart: the float32 conversion must match exactly (a wrong mapping
            # shows at once), and the rounded model's gap is then only measured. Held to a fixed tolerance, the
            # gap refused correct int8 exports of trained students (0.22 nats/token mean: sharper distributions
            # amplify rounding), and no fixed limit separates rounding from a wrong mapping across models.
            _convert(source, checkpoint, exact, "float32", trim=trim)
            copy_tokenizer_files(checkpoint, exact)
            checked(exact, judge=True)
        _convert(source, checkpoint, tmp, quantization, trim=trim)
        copy_tokenizer_files(checkpoint, tmp)
        if check:
            checked(tmp, judge=quantization == "float32")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(zeroed, ignore_errors=True)
        shutil.rmtree(exact, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _convert(source: Path, checkpoint: Path, out: Path, quantization: str, *, trim: bool) -> None:
    try:
        with warnings.catch_warnings():  # the converter loads a MarianTokenizer: see pipeline.tokenizer
            warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
            _converter(str(source), trim=trim).convert(
                str(out), quantization=None if quantization == "float32" else quantization, force=True
            )
    except Exception as exc:  # the converter raises bare Exceptions; name the checkpoint
        raise ExportError(f"cannot convert {checkpoint}: {exc}") from exc


def _converter(checkpoint: str, *, trim: bool):
    """CTranslate2's ``TransformersConverter``; with ``trim``, one that converts the model with its FFN padding
    dropped (``trainers.glu.trim_ffn``: a pruned student's per-layer widths, which CTranslate2 runs)."""
    from ctranslate2.converters import TransformersConverter

    if not trim:
        return TransformersConverter(checkpoint)

    class TrimmedConverter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            from trainers.glu import trim_ffn

            return trim_ffn(super().load_model(model_class, model_name_or_path, **kwargs))

    return TrimmedConverter(checkpoint)


def _zero_start_row(checkpoint: Path, copy: Path) -> Path:
    """A copy of ``checkpoint`` whose decoder-start embedding row is zero (tied rows with it)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from trainers.checkpoint import save_model

    model = AutoModelForSeq2SeqLM.from_pretrained(str(checkpoint), dtype="float32")
    if model.config.model_type != "marian":
        raise ExportError(f"--zero-pad-embedding is for Marian models; {checkpoint} is {model.config.model_type!r}")
    with torch.no_grad():
        model.get_decoder().embed_tokens.weight[model.config.decoder_start_token_id].zero_()
    save_model(model, checkpoint, copy)
    return copy
