"""An OPUS-MT-style teacher built locally and offline: two SentencePiece models (source.spm, target.spm) trained
on the tiny corpus, a shared vocab.json (``<pad>`` last, as in OPUS-MT), a MarianTokenizer and a tiny, untrained
MarianMTModel saved as a Hugging Face directory, then converted with CTranslate2's converter (``export_ct2``)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

MARIAN_TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json")


def build_marian_checkpoint(tok_dir: Path, out: Path, *, seed: int) -> Path:
    """A tiny untrained MarianMTModel over ``tok_dir``'s vocabulary, saved with the tokenizer files in ``out``."""
    import torch

    from pipeline.tokenizer import Tokenizer
    from trainers.models import build_marian

    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(seed)
    model = build_marian("tiny", vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id)
    model.save_pretrained(out)
    for name in MARIAN_TOKENIZER_FILES:
        shutil.copy2(tok_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def opus_teacher(tiny_data, tmp_path_factory) -> dict:
    """{"tokenizer", "hf", "ct2_f32", "ct2_int8"} paths and the ``vocab`` (tokens in id order, ``<pad>`` last)."""
    import sentencepiece as spm
    from transformers import MarianTokenizer

    from trainers.export import export_ct2

    root = tmp_path_factory.mktemp("opus_teacher")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    train = pq.read_table(tiny_data / "train.parquet")
    pieces = []
    for name, column in (("source", "source"), ("target", "target")):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(train.column(column).to_pylist()), model_writer=model,
                                       vocab_size=400, model_type="unigram", character_coverage=1.0, unk_id=0,
                                       eos_id=1, bos_id=-1, minloglevel=2)
        (tok_dir / f"{name}.spm").write_bytes(model.getvalue())
        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / f"{name}.spm"))
        pieces += [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    vocab = ["</s>", "<unk>", *sorted(set(pieces)), "<pad>"]  # OPUS-MT's layout: one vocabulary for both sides
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    MarianTokenizer(str(tok_dir / "source.spm"), str(tok_dir / "target.spm"), str(tok_dir / "vocab.json"),
                    source_lang="de", target_lang="en").save_pretrained(tok_dir)
    hf = build_marian_checkpoint(tok_dir, root / "hf", seed=0)
    return {"tokenizer": tok_dir, "hf": hf, "vocab": vocab,
            "ct2_f32": export_ct2(hf, root / "ct2-float32", quantization="float32"),
            "ct2_int8": export_ct2(hf, root / "ct2-int8", quantization="int8")}
