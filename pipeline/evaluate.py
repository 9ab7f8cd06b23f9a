"""Decode a test set with CTranslate2 and score it with sacrebleu (BLEU and chrF, with signatures)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.batching import budget_chunks
from pipeline.ct2 import EVAL_RECORD, check_vocabulary, load_translator
from pipeline.tokenizer import Tokenizer


@dataclass(frozen=True)
class Scores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    sentences: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def decode_limit(longest_source: int, *, length_ratio: float = 2.0, max_length: int = 256) -> int:
    """Output-length cap for a batch whose longest source has ``longest_source`` tokens: a weak model that never
    emits ``</s>`` cannot make evaluation crawl to ``max_length`` on every sentence."""
    return min(max_length, int(length_ratio * longest_source) + 10)


def translate(
    model_dir: str | Path,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    *,
    beam_size: int = 4,
    max_batch_tokens: int = 4096,
    compute_type: str = "int8",
    threads: int = 2,
    max_decoding_length: int = 256,
    length_ratio: float = 2.0,
    speed: dict | None = None,
) -> list[str]:
    """Translates ``sources`` with a CTranslate2 model; returns detokenized hypotheses in input order.

    Sentences are decoded in length-sorted chunks whose decoding length is capped by ``decode_limit``.

    Args:
        speed: when given, receives the decoding speed: ``seconds`` (tokenising, translating and detokenising,
            model loading excluded), ``sentences``, ``tokens`` (target tokens generated, ``</s>`` excluded),
            ``sentences_per_s``, ``tokens_per_s`` and ``threads``.
    """
    check_vocabulary(tokenizer, model_dir)
    translator = load_translator(model_dir, compute_type=compute_type, intra_threads=threads)
    started = time.perf_counter()
    tokens = [tokenizer.ids_to_tokens(ids) for ids in tokenizer.encode_source(sources)]
    ids: list[list[int]] = [[] for _ in tokens]
    lengths = [len(t) for t in tokens]
    for chunk in budget_chunks(sorted(range(len(tokens)), key=lengths.__getitem__), lengths, max_batch_tokens):
        limit = decode_limit(len(tokens[chunk[-1]]), length_ratio=length_ratio, max_length=max_decoding_length)
        results = translator.translate_batch([tokens[i] for i in chunk], beam_size=beam_size,
                                             max_decoding_length=limit)
        for i, res in zip(chunk, results, strict=True):
            ids[i] = tokenizer.tokens_to_ids(res.hypotheses[0])
    hypotheses = tokenizer.decode(ids)
    if speed is not None:
        seconds = max(time.perf_counter() - started, 1e-9)
        generated = sum(len(i) for i in ids)
        speed.update(seconds=round(seconds, 3), sentences=len(sources), tokens=generated, threads=threads,
                     sentences_per_s=round(len(sources) / seconds, 2), tokens_per_s=round(generated / seconds, 1))
    return hypotheses


def score(hypotheses: Sequence[str], references: Sequence[str]) -> Scores:
    """Corpus BLEU and chrF with their sacrebleu signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses vs {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(list(hypotheses), [list(references)])
    c = chrf.corpus_score(list(hypotheses), [list(references)])
    return Scores(
        bleu=round(b.score, 2),
        chrf=round(c.score, 2),
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        sentences=len(hypotheses),
    )


def record_evaluation(model_dir: str | Path, *, test: str, model: Scores, copy_baseline: Scores,
                      beam_size: int) -> Path:
    """Writes the model's test score next to the copy-the-source baseline into ``model_dir/distillery_eval.json``
    (the latest evaluation; ``model_hash`` ignores the file), so that a distillation can see a weak teacher."""
    path = Path(model_dir) / EVAL_RECORD
    record = {"test": test, "beam_size": beam_size, "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "model": model.as_dict(), "copy_baseline": copy_baseline.as_dict()}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def teacher_warning(model_dir: str | Path) -> str | None:
    """A warning when the model's recorded BLEU is below copying the source, else None (also when unscored)."""
    path = Path(model_dir) / EVAL_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        bleu, copy = float(record["model"]["bleu"]), float(record["copy_baseline"]["bleu"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # never evaluated (or an unreadable record): nothing to compare
    if bleu >= copy:
        return None
    return (f"teacher {model_dir} scored BLEU {bleu:.2f} on {record.get('test')}, below copying the source "
            f"(BLEU {copy:.2f}): students will learn from a teacher worse than no translation at all")
