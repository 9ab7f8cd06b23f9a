"""TeacherWorker: one CTranslate2 translator per Ray actor; turns examples into shard rows.

Per sub-batch (examples sorted by length, cut by a token budget) it decodes in the configured mode, then
reduces CTranslate2's full-vocabulary logits to the top k **immediately**, so a worker's memory never grows
with corpus size. Top-k runs in torch (numpy's argpartition is slower than the int8 teacher itself), on the
device the teacher ran on: CTranslate2's logits become torch tensors without a copy (``__array_interface__`` on
CPU, ``__cuda_array_interface__`` on CUDA) and only the k best ids/log-probs per position reach host memory.

* ``teacher_forcing`` — one pass with the reference as ``target_prefix``, cut at ``decoding.max_length``
  tokens like every decoded hypothesis (the kept positions' distributions are exact: decoding is causal).
* ``greedy`` — one pass; CTranslate2 returns the logits of the steps it took.
* ``beam`` / ``sample`` — CTranslate2 returns no per-step logits here, so the chosen hypotheses get a
  second, teacher-forced pass.

Multilingual teachers (M2M100 / NLLB style) get ``teacher.source_prefix`` before every source sentence and
``teacher.target_prefix`` forced at the start of every target. The forced positions are not stored: ``hyp_ids``,
the top-k and the score describe the target tokens after them (distributions conditioned on the prefix), and
``decoding.max_length`` counts those tokens only; the manifest's spec names the prefix.

``min_decoding_length=0`` everywhere: otherwise CTranslate2 masks ``</s>`` at step 0 of the returned logits
and the stored distribution would not be the teacher's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from pipeline import schema
from pipeline.batching import budget_chunks
from pipeline.ct2 import TeacherError, check_prefix_tokens, check_vocabulary, load_translator
from pipeline.device import resolve_device
from pipeline.noise import noise_batch
from pipeline.spec import DecodeMode, JobSpec
from pipeline.tokenizer import Tokenizer


@dataclass
class _Rows:
    """Column buffers of the rows produced so far (one row per example × hypothesis)."""

    example: list[int] = field(default_factory=list)  # position of the example in the shard
    rank: list[int] = field(default_factory=list)
    hyp_ids: list[list[int]] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    topk_ids: list[np.ndarray] = field(default_factory=list)  # [L, k] each
    topk_lp: list[np.ndarray] = field(default_factory=list)  # [L, k] float32
    tail: list[np.ndarray] = field(default_factory=list)  # [L]


def as_torch(view) -> torch.Tensor:
    """A CTranslate2 StorageView as a torch tensor on the same device, sharing its memory (no copy).

    torch reads a CUDA view through ``__cuda_array_interface__``; a CPU view exposes only
    ``__array_interface__``, which torch takes through numpy (``torch.as_tensor(view)`` itself refuses it).
    Neither interface has a bfloat16 type (a ``bfloat16`` / ``int8_bfloat16`` teacher): such a view is converted
    to float32 first, on its device. Both tensors keep the view they read alive.
    """
    import ctranslate2

    if view.dtype == ctranslate2.DataType.bfloat16:
        view = view.to(ctranslate2.DataType.float32)
    if view.device == "cuda":
        return torch.as_tensor(view, device=f"cuda:{view.device_index}")
    return torch.from_numpy(np.asarray(view))


def _steps_to_tensor(steps) -> torch.Tensor:
    """CTranslate2 per-step logits (StorageViews of shape ``[V]``) → ``[L, V]`` float32 tensor on their device.

    The views only borrow CTranslate2's buffers; ``stack`` copies them (on the device) while ``steps`` keeps the
    result alive.
    """
    return torch.stack([as_torch(s) for s in steps]).float()


class TeacherWorker:
    """Distils examples into shard rows. Ray Data constructs it once per actor (``map_batches``)."""

    def __init__(self, spec: JobSpec, *, threads: int | None = None, device: str | None = None):
        """Args:
            spec: the job.
            threads: CTranslate2 ``intra_threads`` (default ``resources.threads_per_worker``).
            device: ``cpu`` or ``cuda``, as the driver resolved ``teacher.device`` (default: resolved here).
        """
        self.spec = spec
        self.device = device or resolve_device(spec.teacher.device, spec.resources.gpus_per_worker)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TeacherError("teacher.device is cuda but this worker's torch has no CUDA (a CPU build): the top-k "
                               "reduction runs in torch on the teacher's device; install torch's CUDA build")
        self.tokenizer = Tokenizer.load(spec.tokenizer_dir)
        check_vocabulary(self.tokenizer, spec.teacher.model)
        check_prefix_tokens(self.tokenizer, spec.teacher.source_prefix, spec.teacher.target_prefix)
        self.source_prefix, self.target_prefix = spec.teacher.source_prefix, spec.teacher.target_prefix
        self.threads = threads or spec.resources.threads_per_worker
        self.translator = self._load()
        self.k = spec.targets.top_k
        if self.k > len(self.tokenizer.tokens):
            raise ValueError(f"top_k {self.k} exceeds the vocabulary ({len(self.tokenizer.tokens)})")
        self.schema = schema.shard_schema(self.k)
        self.eos = self.tokenizer.eos_id

    def _load(self):
        return load_translator(self.spec.teacher.model, compute_type=self.spec.teacher.compute_type,
                               intra_threads=self.threads, device=self.device,
                               device_index=self.spec.teacher.device_index)

    # -- one shard ------------------------------------------------------------------------------
    def distill(self, examples: pa.Table, *, vocab: dict | None = None, seed: int = 0) -> pa.Table:
        """Examples (``id, index, source, target``) → shard table, rows ordered by (index, hyp_rank).

        Args:
            examples: the shard's examples in corpus order.
            vocab: substitution words per side for noise injection.
            seed: sampling seed of this shard (sample mode).
        """
        batch = noise_batch({c: examples.column(c).to_pylist() for c in ("id", "source", "target")},
                            self.spec.noise, vocab or {})
        src = self.tokenizer.encode_source(batch["source"])
        tgt = self.tokenizer.encode_target(batch["target"])
        rows = _Rows()
        if self.spec.decoding.mode == DecodeMode.SAMPLE:
            import ctranslate2

            # CTranslate2 seeds each worker thread's RNG when the translator is built, so a seed set
            # later has no effect (upstream issue #1757): rebuild it so each shard's samples are
            # reproducible whichever actor runs it.
            ctranslate2.set_random_seed(seed)
            self.translator = self._load()
        lengths = [len(s) for s in src]
        order = np.argsort(lengths, kind="stable")
        for sub in budget_chunks(order, lengths, self.spec.resources.batch_tokens):
            self._decode(sub, src, tgt, rows)

        perm = np.lexsort((rows.rank, rows.example))
        take = perm.tolist()
        ex = [rows.example[i] for i in take]
        hyp_ids = [rows.hyp_ids[i] for i in take]
        lengths = np.array([len(h) for h in hyp_ids], dtype=np.int64)
        topk_ids, topk_lp = schema.topk_arrays(
            np.concatenate([rows.topk_ids[i] for i in take]), np.concatenate([rows.topk_lp[i] for i in take]),
            lengths,
        )
        tail = schema.list_array(
            pa.array(np.concatenate([rows.tail[i] for i in take]).astype(np.float16)), lengths
        )
        kind = "reference" if self.spec.decoding.mode == DecodeMode.TEACHER_FORCING else self.spec.decoding.mode.value
        columns = {
            "id": pa.array([batch["id"][e] for e in ex], pa.string()),
            "index": pa.array(examples.column("index").take(pa.array(ex)).to_numpy(), pa.int64()),
            "source": pa.array([batch["source"][e] for e in ex], pa.string()),
            "target": pa.array([batch["target"][e] for e in ex], pa.string()),
            "source_ids": pa.array([src[e] for e in ex], pa.list_(pa.int32())),
            "target_ids": pa.array([tgt[e] for e in ex], pa.list_(pa.int32())),
            "hyp_rank": pa.array([rows.rank[i] for i in take], pa.int16()),
            "hyp_kind": pa.array([kind] * len(take), pa.string()),
            "hyp_text": pa.array(self.tokenizer.decode(hyp_ids), pa.string()),
            "hyp_ids": pa.array(hyp_ids, pa.list_(pa.int32())),
            "score": pa.array([rows.score[i] for i in take], pa.float32()),
            "topk_ids": topk_ids,
            "topk_logprobs": topk_lp,
            "tail_logprob": tail,
            "noise": pa.array([batch["noise"][e] for e in ex], pa.string()),
        }
        return pa.Table.from_arrays([columns[f.name] for f in self.schema], schema=self.schema)

    # -- decoding -------------------------------------------------------------------------------
    def _tokens(self, ids: list[int]) -> list[str]:
        return self.tokenizer.ids_to_tokens(ids)

    def _decode(self, sub: list[int], src, tgt, rows: _Rows) -> None:
        dec, mode = self.spec.decoding, self.spec.decoding.mode
        source_tokens = [self.source_prefix + self._tokens(src[i]) for i in sub]
        if mode == DecodeMode.TEACHER_FORCING:
            self._forced(sub, source_tokens, [tgt[i][: dec.max_length] for i in sub], [0] * len(sub), rows)
            return
        p = len(self.target_prefix)
        common = dict(max_decoding_length=dec.max_length + p, min_decoding_length=0, max_batch_size=0,
                      target_prefix=[self.target_prefix] * len(sub) if p else None)
        if mode == DecodeMode.GREEDY:
            results = self.translator.translate_batch(source_tokens, beam_size=1, return_logits_vocab=True, **common)
            for i, res in zip(sub, results, strict=True):
                logits = _steps_to_tensor(res.logits[0][p:])
                ids = self.tokenizer.tokens_to_ids(self._unprefixed(res.hypotheses[0]))
                ids = ids + [self.eos] if len(logits) == len(ids) + 1 else ids  # no </s> when truncated
                self._reduce(i, 0, ids, logits[: len(ids)], rows)
            return
        if mode == DecodeMode.BEAM:
            results = self.translator.translate_batch(
                source_tokens, beam_size=dec.beam_size, num_hypotheses=dec.num_hypotheses,
                length_penalty=dec.length_penalty, **common)
        else:
            results = self.translator.translate_batch(
                source_tokens, beam_size=1, sampling_topk=0, sampling_topp=dec.top_p,
                sampling_temperature=dec.temperature, num_hypotheses=dec.num_hypotheses, **common)
        owners, ranks, hyps, srcs = [], [], [], []
        for i, toks, res in zip(sub, source_tokens, results, strict=True):
            for rank, hyp in enumerate(res.hypotheses):
                ids = self.tokenizer.tokens_to_ids(self._unprefixed(hyp))
                owners.append(i), ranks.append(rank), srcs.append(toks)
                hyps.append(ids + [self.eos] if len(ids) < dec.max_length else ids)
        self._forced(owners, srcs, hyps, ranks, rows)

    def _unprefixed(self, hypothesis: list[str]) -> list[str]:
        """A decoded hypothesis without the forced target prefix (CTranslate2 returns it in front)."""
        p = len(self.target_prefix)
        if hypothesis[:p] != self.target_prefix:
            raise RuntimeError(f"CTranslate2 returned {hypothesis[:p]} where the target prefix "
                               f"{self.target_prefix} was forced")
        return hypothesis[p:]

    def _forced(self, owners: list[int], source_tokens, hyps: list[list[int]], ranks: list[int], rows) -> None:
        """Teacher-forced pass: the distribution at every position of each ``hyps`` row (after the prefix)."""
        p = len(self.target_prefix)
        results = self.translator.translate_batch(
            source_tokens,
            target_prefix=[self.target_prefix + self._tokens(h[:-1]) for h in hyps],
            beam_size=1,
            return_logits_vocab=True,
            min_decoding_length=0,
            max_decoding_length=max(len(h) for h in hyps) + p,
            max_batch_size=0,
        )
        for owner, rank, hyp, res in zip(owners, ranks, hyps, results, strict=True):
            self._reduce(owner, rank, hyp, _steps_to_tensor(res.logits[0][p: p + len(hyp)]), rows)

    def _reduce(self, example: int, rank: int, ids: list[int], logits: torch.Tensor, rows: _Rows) -> None:
        """Full-vocabulary logits ``[L, V]`` (on the teacher's device) → top-k ids/log-probs, tail mass and
        sequence score; only ``[L, k]`` values and one score leave the device."""
        logprobs = torch.log_softmax(logits, dim=-1)
        values, indices = logprobs.topk(self.k, dim=-1)
        score = logprobs.gather(1, torch.as_tensor(ids, device=logprobs.device).unsqueeze(1)).sum()
        values = values.cpu().numpy()
        rows.example.append(example)
        rows.rank.append(rank)
        rows.hyp_ids.append(ids)
        rows.score.append(score.item())
        rows.topk_ids.append(indices.to(torch.int32).cpu().numpy())
        rows.topk_lp.append(values)
        rows.tail.append(schema.tail_logprob(values))


def cut_rows(table: pa.Table, eos: int) -> int:
    """Rows whose ``hyp_ids`` were cut at ``max_length``: every complete sequence ends with ``</s>``."""
    hyp = table.column("hyp_ids").combine_chunks()
    if len(hyp) == 0:
        return 0
    offsets = hyp.offsets.to_numpy()
    last = hyp.flatten().to_numpy()[offsets[1:] - offsets[0] - 1]
    return int((last != eos).sum())


def shard_seed(seed: int, shard: int) -> int:
    """A per-shard sampling seed independent of which actor runs the shard."""
    digest = hashlib.sha256(f"{seed}:{shard}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
