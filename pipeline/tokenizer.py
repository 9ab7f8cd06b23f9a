"""One shared subword vocabulary for teacher and students.

Two kinds of tokenizer directory are accepted, both loaded by ``transformers.AutoTokenizer``:

* our own, trained here with Hugging Face ``tokenizers`` (Unigram + Metaspace, i.e. SentencePiece-style
  pieces) and saved as a ``PreTrainedTokenizerFast``; ``</s>`` is id 0, ``<unk>`` id 1 and ``<pad>`` the
  **last** id, as Marian expects (CTranslate2's Marian converter drops that last ``<pad>``);
* a user's OPUS-MT / Marian directory (``source.spm``, ``target.spm``, ``vocab.json``).

Both append ``</s>`` to every encoded sentence. Target text is encoded with ``text_target=`` so a Marian
tokenizer uses its target SentencePiece model.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from pipeline.errors import InputError

EOS, UNK, PAD = "</s>", "<unk>", "<pad>"
# Every file a tokenizer directory of either kind may hold. A model directory (a CTranslate2 teacher, a
# checkpoint) often holds its tokenizer beside the weights: copying a tokenizer means copying these only.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "source.spm", "target.spm", "vocab.json")


class TokenizerError(InputError):
    """A tokenizer directory is missing, unreadable or does not match a model."""


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 8000) -> Tokenizer:
    """Trains a shared Unigram vocabulary on ``texts`` (both languages) and saves it to ``out_dir``.

    Args:
        texts: training sentences of both sides; pass the training split only.
        out_dir: directory written in Hugging Face format (``tokenizer.json`` + config).
        vocab_size: pieces including the three special tokens.

    Returns:
        The saved tokenizer, loaded back from ``out_dir``.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.Unigram())
    raw.normalizer = normalizers.NFKC()
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - 1,  # <pad> is appended below
        special_tokens=[EOS, UNK],
        unk_token=UNK,
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    raw.model = _canonical_unigram(json.loads(raw.model.__getstate__())["vocab"])
    raw.add_special_tokens([PAD])  # last id: Marian's decoder-start / padding token
    raw.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, raw.token_to_id(EOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=EOS, unk_token=UNK, pad_token=PAD, model_max_length=1024
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return Tokenizer.load(out_dir)


def _canonical_unigram(vocab: list[list]):
    """The trained Unigram model with its pieces in a canonical order.

    The trainer is not deterministic: the same text gives the same pieces, but in a hash-map order, and the
    scores of rare pieces differ in the third or fourth decimal from run to run — so ids change, and a
    teacher trained on them follows another path. Ordering the pieces by their text makes the ids a function
    of the training text alone. The special tokens keep their leading ids.
    """
    from tokenizers import models

    specials = [(p, 0.0) for p, _ in vocab if p in (EOS, UNK)]
    pieces = sorted((p, score) for p, score in vocab if p not in (EOS, UNK))
    return models.Unigram(specials + pieces, unk_id=[p for p, _ in specials].index(UNK), byte_fallback=False)


HF_FILES = ("tokenizer.json",)  # ours (`distillery tokenizer train`), or any fast tokenizer
MARIAN_FILES = ("source.spm", "target.spm", "vocab.json")  # OPUS-MT / Marian: all three
OTHER_FILES = ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.txt")  # AutoTokenizer may load


def check_tokenizer_files(path: Path) -> None:
    """Says which tokenizer files a directory lacks, before transformers fails with a message about packages.

    Raises:
        TokenizerError: no known tokenizer file, or an incomplete Marian set, in ``path``.
    """
    present = {p.name for p in path.iterdir()}
    if present & set(HF_FILES):
        return
    if present & set(MARIAN_FILES):
        if missing := [name for name in MARIAN_FILES if name not in present]:
            raise TokenizerError(f"incomplete Marian tokenizer in {path}: {', '.join(missing)} missing "
                                 f"(a Marian / OPUS-MT tokenizer needs {', '.join(MARIAN_FILES)})")
        return
    if present & set(OTHER_FILES):
        return
    raise TokenizerError(
        f"no tokenizer files in {path}: looked for {', '.join(HF_FILES)} (`distillery tokenizer train`), "
        f"{' + '.join(MARIAN_FILES)} (Marian / OPUS-MT) or {', '.join(OTHER_FILES)}. A CTranslate2 export holds "
        "its tokenizer only when the files were copied in (ct2-transformers-converter --copy_files); otherwise "
        "point `tokenizer` / --tokenizer at the tokenizer's own directory"
    )


class Tokenizer:
    """A loaded tokenizer with the few operations the project needs, batch-first."""

    def __init__(self, hf_tokenizer, path: Path):
        self.hf = hf_tokenizer
        self.path = path
        if self.hf.eos_token_id is None or self.hf.pad_token_id is None:
            raise TokenizerError(f"{path}: tokenizer needs an eos and a pad token")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Loads a tokenizer directory; raises ``TokenizerError`` with a readable reason."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {path}")
        check_tokenizer_files(path)
        from transformers import AutoTokenizer

        try:
            with warnings.catch_warnings():
                # MarianTokenizer asks for sacremoses for a punctuation normalizer that its encoding never calls
                warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
                hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # transformers raises many types; the user needs the path and the cause
            raise TokenizerError(f"cannot load a tokenizer from {path}: {exc}") from exc
        return cls(hf, path)

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id

    def __len__(self) -> int:
        return len(self.hf)

    def encode_source(self, texts: Sequence[str]) -> list[list[int]]:
        """Source sentences → ids, each ending with ``</s>``."""
        return self.hf(list(texts), add_special_tokens=True)["input_ids"]

    def encode_target(self, texts: Sequence[str]) -> list[list[int]]:
        """Target sentences → ids, each ending with ``</s>`` (Marian: target SentencePiece model)."""
        return self.hf(text_target=list(texts), add_special_tokens=True)["input_ids"]

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Target ids → detokenized text; special tokens are dropped."""
        return self.hf.batch_decode(ids, skip_special_tokens=True)

    def ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(ids))

    def tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        """CTranslate2 output tokens → ids; a token outside the vocabulary maps to ``<unk>``."""
        vocab = self.token_to_id
        unk = vocab.get(UNK, 0)
        return [vocab.get(t, unk) for t in tokens]

    @cached_property
    def tokens(self) -> list[str]:
        """The vocabulary as CTranslate2 sees it: ordered by id, the trailing ``<pad>`` removed."""
        vocab = self.hf.get_vocab()
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
        return tokens[:-1] if tokens and tokens[-1] == PAD else tokens

    @cached_property
    def token_to_id(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    @cached_property
    def vocab_hash(self) -> str:
        """Content hash of the vocabulary; teacher and student must share it for token-level KD."""
        return vocab_hash(self.tokens)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer files of ``src`` (and nothing else: no weights, no model vocabulary) into ``dst``.

    Returns:
        The names copied (none when ``src`` holds no tokenizer).
    """
    import shutil

    src, dst = Path(src), Path(dst)
    names = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def vocab_hash(tokens: Sequence[str]) -> str:
    """sha256 over the ordered token list (the identity the manifest and the trainers compare)."""
    payload = json.dumps(list(tokens), ensure_ascii=False, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(payload).hexdigest()
