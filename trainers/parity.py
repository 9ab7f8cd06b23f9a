"""Does a CTranslate2 model compute what its Hugging Face source computes?

A conversion can succeed and still change the model. The known case: a Marian checkpoint whose ``<pad>`` row —
the decoder-start token's embedding — is not zero. Hugging Face starts decoding from that row; CTranslate2's Marian
converter drops it and starts from a zero vector (``start_from_zero_embedding``), so the converted teacher scores
every sentence differently (up to 5.5 nats per token were seen on a fine-tuned OPUS-MT model). Our own trainers keep
that row zero (``build_marian`` zeroes it; ``marian_logits`` drops the ``<pad>`` column, so no gradient reaches it
through the tied output layer), and so does transformers' OPUS-MT conversion, but fine-tuning with Hugging Face's
own loss trains it: the ``<pad>`` logit is in its softmax, and the output layer is the embedding matrix.

The check scores a few sentence pairs both ways, with teacher forcing — CTranslate2's ``score_batch`` (equal to the
pipeline's own teacher-forced logits, ``tests/pipeline/test_ct2_parity.py``) and the Hugging Face model's forward in
torch — and compares the log-probs of the reference tokens, besides looking for a non-zero decoder-start row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import InputError, RunError

# A handful of German→English pairs (not from the bundled corpus). Any teacher can score them: teacher forcing
# measures the function, not the quality, so the language pair need not be the teacher's.
SENTENCES = (
    ("Der Zug nach Berlin fährt um halb acht vom zweiten Gleis ab.",
     "The train to Berlin leaves from platform two at half past seven."),
    ("Können Sie mir bitte sagen, wo die nächste Apotheke ist?",
     "Could you please tell me where the nearest pharmacy is?"),
    ("Im Winter liegt auf den Bergen oft bis in den April hinein Schnee.",
     "In winter there is often snow on the mountains well into April."),
    ("Die Regierung hat gestern neue Regeln für den Wohnungsbau vorgestellt.",
     "Yesterday the government presented new rules for housing construction."),
    ("Meine Großmutter backt jeden Sonntag einen Apfelkuchen.", "My grandmother bakes an apple pie every Sunday."),
    ("Und Gott sah, dass das Licht gut war.", "And God saw that the light was good."),
    ("Wir haben das Problem gefunden und es noch am selben Abend behoben.",
     "We found the problem and fixed it the same evening."),
    ("Ja.", "Yes."),
)
MAX_SENTENCES = 64  # a check, not an evaluation: more pairs from --sentences are not read

# Tolerances in nats per reference token, |log p_CT2 - log p_HF|. Measured on correct conversions of tiny Marian
# models (tests/trainers/test_parity.py builds them): float32 weights run in float32 agree to < 1e-5 (max) — only
# summation order differs; int8 weights (int8 or float32 compute) differ by up to 0.81 (max) and 0.056 (mean) on an
# untrained, nearly uniform model and 0.42 / 0.023 on a briefly trained one; float16 / bfloat16 weights (run in float32
# on a CPU, hence the tier is judged from the stored weight types) by up to 0.0066 / 0.0015. The limits leave ~2.5x over
# those and stay far below what a wrong conversion gives: a CTranslate2 model of another checkpoint of the same shape
# and vocabulary differs by 1.0 nats per token on average (max 4.1), the non-zero start row by up to 5.5 nats (and it
# is caught from the weights anyway).
EXACT = "exact"  # float32 weights, float32 compute
QUANTIZED = "quantized"  # any reduced precision in the weights or the compute


@dataclass(frozen=True)
class Tolerance:
    max_abs: float
    mean_abs: float


TOLERANCES = {EXACT: Tolerance(max_abs=0.02, mean_abs=0.002), QUANTIZED: Tolerance(max_abs=2.0, mean_abs=0.15)}


class ParityError(RunError):
    """The CTranslate2 model does not compute what its Hugging Face source computes (exit status 1)."""

    prefix = ""  # its message says what failed; "job failed" would not


@dataclass(frozen=True)
class StartRow:
    """The decoder-start token's embedding row in the Hugging Face model."""

    token_id: int
    token: str
    norm: float

    @property
    def is_zero(self) -> bool:
        return self.norm == 0.0


@dataclass
class ParityResult:
    """The numbers and the verdict of one check."""

    ct2_dir: Path
    hf_dir: Path
    compute_type: str  # what CTranslate2 ran, e.g. int8_float32
    weights: str  # the types of the stored weight matrices, e.g. int8 or float32
    tier: str  # EXACT or QUANTIZED
    tolerance: Tolerance
    sentences: int
    tokens: int
    max_abs: float
    mean_abs: float
    start_row: StartRow
    problems: list[str] = field(default_factory=list)
    judged: bool = True  # False: the log-prob gap is reported, not held to the tolerance (see export_ct2)

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The numbers, one line each."""
        lines = [
            f"CTranslate2 {self.ct2_dir} ({self.compute_type}; weights {self.weights}) vs Hugging Face {self.hf_dir}",
            f"{self.sentences} sentence pairs, {self.tokens} reference tokens, teacher-forced",
            f"|log p CT2 - log p HF| per token: max {self.max_abs:.5f}, mean {self.mean_abs:.5f} nats "
            + (f"(tolerance, {self.tier}: max {self.tolerance.max_abs}, mean {self.tolerance.mean_abs})" if self.judged
               else "(what the reduced precision costs; not judged: the float32 conversion passed the exact check)")
            if self.max_abs == self.max_abs else "log-probs not compared: the vocabularies differ",  # NaN: not scored
        ]
        row = self.start_row
        lines.append(f"decoder-start row {row.token} (id {row.token_id}): L2 norm {row.norm:.6g}"
                     + (" (zero, as CTranslate2 assumes)" if row.is_zero else " (NOT zero)"))
        return "\n".join(lines)

    def verdict(self) -> str:
        if self.passed:
            return "pass: CTranslate2 computes the Hugging Face model within tolerance"
        return "mismatch: " + "; ".join(self.problems)


def load_sentences(path: str | Path) -> list[tuple[str, str]]:
    """Sentence pairs from a TSV (source<TAB>target per line; any other extension is read as TSV too), JSONL or
    Parquet with ``source``/``target``; at most ``MAX_SENTENCES``.

    Raises:
        InputError: the file is missing or unreadable, or holds no valid pair.
    """
    from pipeline.corpus import CorpusSpec, read_corpus

    path = Path(path)
    if not path.is_file():
        raise InputError(f"sentences file not found: {path}")
    fmt = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix, "tsv")
    corpus = read_corpus(CorpusSpec(path=str(path), format=fmt))
    if corpus.kept == 0:
        raise InputError(f"no sentence pair in {path}: {corpus.summary()}")
    table = corpus.table.slice(0, MAX_SENTENCES)
    return list(zip(table.column("source").to_pylist(), table.column("target").to_pylist(), strict=True))


def decoder_start_row(model, tokenizer) -> StartRow:
    """The decoder-start row of a Marian model: the one CTranslate2 replaces by zeros."""
    token_id = model.config.decoder_start_token_id
    row = model.get_decoder().embed_tokens.weight[token_id]
    return StartRow(token_id, tokenizer.hf.convert_ids_to_tokens(token_id), float(row.detach().double().norm()))


def start_row_problem(row: StartRow, hf_dir: Path | str) -> str:
    """What a non-zero start row means and how to fix it."""
    return (f"the decoder-start token {row.token} (id {row.token_id}) has a non-zero embedding row in {hf_dir} "
            f"(L2 norm {row.norm:.4g}): Hugging Face starts decoding from that row, but CTranslate2's Marian converter "
            f"drops it and decodes from a zero vector, so the converted model is another model. Fix: zero that row "
            f"and convert again — `distillery export {hf_dir} --out CT2_DIR --zero-pad-embedding` zeroes it in a copy "
            f"(the checkpoint itself is left as it is)")


def check_parity(ct2_dir: str | Path, hf_dir: str | Path, *, sentences: list[tuple[str, str]] | None = None,
                 compute_type: str = "default", threads: int = 2, hf_label: str | None = None,
                 judge: bool = True, tier: str | None = None) -> ParityResult:
    """Scores ``sentences`` with the CTranslate2 model and with the Hugging Face model it was converted from.

    Args:
        ct2_dir: CTranslate2 model directory.
        hf_dir: the Hugging Face checkpoint directory it came from; its tokenizer encodes the sentences (the
            CTranslate2 directory's when it has none).
        sentences: (source, reference) pairs; default ``SENTENCES``.
        compute_type: CTranslate2 compute type; ``default`` runs the stored weights' type.
        threads: CTranslate2 intra-op threads.
        hf_label: how messages name the checkpoint (default ``hf_dir``), e.g. when ``hf_dir`` is a temporary copy.
        judge: hold the log-prob gap to the tier's tolerance; False only measures it (a quantized export whose
            float32 conversion already passed the exact check: its gap is rounding, however sharp the model).
        tier: the tolerance tier to judge by, instead of the one the weights and compute type imply: EXACT for a
            Hugging Face model dequantized from the CTranslate2 weights themselves, run against CTranslate2 in
            float32 (``trainers.ct2_back``).

    Returns:
        The numbers and the verdict (``passed``, ``problems``); nothing is raised on a mismatch.

    Raises:
        InputError: a directory is missing or not a model, no tokenizer, an unsupported compute type.
    """
    import numpy as np

    from pipeline.ct2 import check_compute_type, check_model_dir, load_translator, model_vocabulary

    ct2_dir, hf_dir = check_model_dir(ct2_dir), Path(hf_dir)
    check_compute_type(compute_type)
    model, tok = _load_hf(hf_dir, ct2_dir)
    pairs = list(sentences or SENTENCES)
    limit = model.config.max_position_embeddings  # a longer sentence is cut, keeping its </s>, as training cuts it
    src = [_cut(ids, limit, tok.eos_id) for ids in tok.encode_source([s for s, _ in pairs])]
    tgt = [_cut(ids, limit, tok.eos_id) for ids in tok.encode_target([t for _, t in pairs])]
    translator = load_translator(ct2_dir, compute_type=compute_type, intra_threads=threads)
    weights = stored_weight_types(ct2_dir)  # on a CPU, float16 weights run as float32: the compute type hides them
    tier = tier or (EXACT if weights == {"float32"} and translator.compute_type == "float32" else QUANTIZED)
    start_row = decoder_start_row(model, tok)
    problems = [] if start_row.is_zero else [start_row_problem(start_row, hf_label or hf_dir)]
    ct2_vocab, hf_vocab = model_vocabulary(ct2_dir), _ordered_vocab(tok)
    result = ParityResult(ct2_dir, Path(hf_label or hf_dir), translator.compute_type,
                          "+".join(sorted(weights)) if weights else "unknown", tier,
                          TOLERANCES[tier], len(pairs), sum(map(len, tgt)), float("nan"), float("nan"), start_row,
                          problems, judged=judge)
    if hf_vocab[: len(ct2_vocab)] != ct2_vocab or model.config.vocab_size < len(ct2_vocab):
        problems.append(f"vocabularies differ: {len(ct2_vocab)} tokens in {ct2_dir}, {len(hf_vocab)} in the tokenizer "
                        f"of {result.hf_dir}; the CTranslate2 model was not converted from this checkpoint")
        return result
    scored = translator.score_batch([tok.ids_to_tokens(s) for s in src], [tok.ids_to_tokens(t[:-1]) for t in tgt])
    ct2 = np.concatenate([np.asarray(r.log_probs, dtype=np.float64) for r in scored])
    hf = np.concatenate(_hf_logprobs(model, src, tgt, columns=len(ct2_vocab)))
    diff = np.abs(ct2 - hf)
    result.max_abs, result.mean_abs = float(diff.max()), float(diff.mean())
    if judge and (result.max_abs > result.tolerance.max_abs or result.mean_abs > result.tolerance.mean_abs):
        problems.append(f"CTranslate2's log-probs differ from the Hugging Face model's by up to {result.max_abs:.3f} "
                        f"nats per token (mean {result.mean_abs:.3f}), beyond the {tier} tolerance "
                        f"(max {result.tolerance.max_abs}, mean {result.tolerance.mean_abs})")
    return result


# CTranslate2's model.bin (ctranslate2/specs/model_spec.py, ``_serialize``): binary version, spec name, revision,
# then every variable as name, rank, dims, dtype id, byte count, bytes. Dtype ids follow its DataType enum.
_BINARY_VERSIONS = (6,)  # what CTranslate2 4.8 writes; another version is read as unknown
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def stored_weight_types(model_dir: str | Path) -> set[str]:
    """The types of the weight matrices in a CTranslate2 ``model.bin`` (what quantization changes); empty when the
    file's format is not one this reader knows (the check is then judged as quantized)."""
    import struct

    def read(f, fmt: str):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def skip_string(f) -> None:
        f.seek(read(f, "H"), 1)

    types: set[str] = set()
    with open(Path(model_dir) / "model.bin", "rb") as f:
        if read(f, "I") not in _BINARY_VERSIONS:
            return set()
        skip_string(f)
        read(f, "I")  # spec revision
        for _ in range(read(f, "I")):
            skip_string(f)
            rank = read(f, "B")
            f.seek(4 * rank, 1)  # the dims
            dtype = read(f, "B")
            f.seek(read(f, "I"), 1)
            if dtype >= len(_DTYPES):
                return set()
            if rank >= 2:  # weight matrices and embeddings; scalars hold settings (e.g. int8 flags), biases stay
                types.add(_DTYPES[dtype])
    return types - {"int32"}


def require_parity(ct2_dir: str | Path, hf_dir: str | Path, **kwargs) -> ParityResult:
    """``check_parity``, raising ``ParityError`` (exit status 1) with the numbers on a mismatch."""
    return raise_on_mismatch(check_parity(ct2_dir, hf_dir, **kwargs))


def raise_on_mismatch(result: ParityResult) -> ParityResult:
    """``result`` when it passed; else ``ParityError`` with the verdict and the numbers."""
    if not result.passed:
        raise ParityError(f"{result.verdict()}\n{result.summary()}")
    return result


def _load_hf(hf_dir: Path, ct2_dir: Path):
    """The Hugging Face model in float32, eval mode, and its tokenizer."""
    from transformers import AutoModelForSeq2SeqLM

    from pipeline.ct2 import HF_WEIGHTS
    from pipeline.tokenizer import HF_FILES, MARIAN_FILES, Tokenizer

    is_ct2 = (hf_dir / "model.bin").is_file() and not any((hf_dir / name).is_file() for name in HF_WEIGHTS)
    if not (hf_dir / "config.json").is_file() or is_ct2:
        what = "a CTranslate2 model" if is_ct2 else "no config.json"
        raise InputError(f"{hf_dir} is not a Hugging Face checkpoint ({what}); --hf takes the checkpoint the "
                         "CTranslate2 model was converted from")
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(str(hf_dir), dtype="float32").eval()
    except Exception as exc:  # transformers raises many types; the user needs the path and the cause
        raise InputError(f"cannot load a Hugging Face model from {hf_dir}: {exc}") from exc
    if model.config.model_type != "marian":  # others need language tokens forced (M2M100, NLLB): not checked yet
        raise InputError(f"{hf_dir} is a {model.config.model_type!r} model; the check covers Marian (OPUS-MT) models "
                         "(`distillery export --no-check` converts without it)")
    has_tokenizer = any((hf_dir / name).is_file() for name in (*HF_FILES, *MARIAN_FILES))
    return model, Tokenizer.load(hf_dir if has_tokenizer else ct2_dir)


def _cut(ids: list[int], limit: int, eos: int) -> list[int]:
    return ids if len(ids) <= limit else [*ids[: limit - 1], eos]


def _ordered_vocab(tok) -> list[str]:
    """Every token of the tokenizer by id, ``<pad>`` included (CTranslate2's Marian converter drops it)."""
    return [t for t, _ in sorted(tok.hf.get_vocab().items(), key=lambda item: item[1])]


def _hf_logprobs(model, src: list[list[int]], tgt: list[list[int]], *, columns: int) -> list:
    """The Hugging Face model's log-prob of every reference token, one sentence at a time (no padding), over the
    first ``columns`` logits: the vocabulary CTranslate2 kept."""
    import torch

    start = model.config.decoder_start_token_id
    out = []
    with torch.no_grad():
        for s, t in zip(src, tgt, strict=True):
            logits = model(input_ids=torch.tensor([s]), decoder_input_ids=torch.tensor([[start, *t[:-1]]])).logits
            logprobs = torch.log_softmax(logits[0, :, :columns].double(), dim=-1)
            out.append(logprobs.gather(1, torch.tensor(t)[:, None])[:, 0].numpy())
    return out
