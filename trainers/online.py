"""A teacher that runs in torch beside the student: Online KD (OKD) and the on-policy baseline it claims to replace.

Offline KD reads the teacher's top-k from shards. Two losses need the teacher at training time instead, and both
train the student on the teacher's **full** distribution, forward ``KL(p_T ‖ p_S)`` per target token:

- ``okd`` (Online Knowledge Distillation, arXiv 2409.12512): the frozen teacher carries small trainable **online
  modules** — LoRA adapters (the ``peft`` library; rank, scale, which projections and which stacks are options)
  — trained concurrently with the student so that the teacher's distribution moves toward what the student can
  follow, while an NLL anchor keeps it a translator. What is optimised, per target token of the (reference)
  training data, in one backward pass:

      student θ_S:   KL(p_T ‖ p_S)
      modules φ:     KL(p_T ‖ p_S) + anchor · NLL_T(reference)

  i.e. one joint objective ``KL(p_T ‖ p_S) + anchor · NLL_T`` whose NLL term has no student gradient. Our
  reading of the paper, whose exact module objective was not available offline: the modules descend the same
  divergence as the student (the teacher meets the student half-way) plus the teacher's own NLL.
- ``on_policy``: the frozen teacher (no modules) scores **student samples**: for a share ``student_data`` of the
  training batches (chosen by the batch's content, so a resumed run chooses the same) the student samples a
  translation of each source (ancestral sampling, dropout off, ``<pad>`` suppressed, no gradient) and is trained
  by ``KL(p_T ‖ p_S)`` along its own samples; the other batches use the references (GKD's mix, Agarwal et al.
  2024, with forward KL). The sampling is what OKD claims to make unnecessary, at up to 4× the training time.

The base weights never change (``requires_grad`` off; the tests check they stay bit-identical); the modules are
registered on the student (``model.online_modules``), so they are optimised, clipped, checkpointed and resumed
with it. One worker only: the online losses are not wired into the multi-worker token accounting yet.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from pipeline.errors import InputError
from trainers.batching import IGNORE

ONLINE_LOSSES = ("okd", "on_policy")


def needs_online_teacher(loss_name: str) -> bool:
    return loss_name in ONLINE_LOSSES


class OnlineTeacher:
    """The Hugging Face teacher from ``hf_dir`` (``distillery teacher to-hf`` writes one from a CT2 teacher).

    Args:
        hf_dir: a ``MarianMTModel`` checkpoint with its tokenizer files.
        loss: the student's ``LossConfig`` (``okd``: LoRA modules are added; ``on_policy``: frozen as is).
        tokenizer: the student's tokenizer; the teacher's vocabulary must be the same (full-vocabulary KL).
    """

    def __init__(self, hf_dir: str | Path, loss, *, tokenizer, device: torch.device):
        from transformers import MarianMTModel

        from pipeline.tokenizer import Tokenizer

        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise InputError(f"online teacher {hf_dir}: not a Hugging Face checkpoint (no config.json); "
                             "`distillery teacher to-hf CT2_DIR --out DIR` writes one from a CTranslate2 teacher")
        theirs = Tokenizer.load(hf_dir).vocab_hash
        if theirs != tokenizer.vocab_hash:
            raise InputError(f"online teacher {hf_dir}: its vocabulary (hash {theirs[:12]}) is not the student's "
                             f"({tokenizer.vocab_hash[:12]}); full-vocabulary KD needs the same one")
        self.loss = loss
        self.model = MarianMTModel.from_pretrained(hf_dir).to(device)
        self.model.requires_grad_(False)
        self.model.eval()  # dropout off: the teacher's signal is deterministic given its weights
        if loss.name == "okd":
            self._add_modules()
        self.trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _add_modules(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        stacks = "encoder|decoder" if self.loss.lora_stacks == "both" else self.loss.lora_stacks
        targets = "|".join(self.loss.lora_targets)
        config = LoraConfig(r=self.loss.lora_rank, lora_alpha=self.loss.lora_alpha, lora_dropout=0.0,
                            target_modules=rf".*\.({stacks})\.layers\.\d+\..*({targets})")
        try:
            inject_adapter_in_model(config, self.model)
        except ValueError as exc:  # peft's NoMatchingPeftModuleError
            raise InputError(f"okd: no module of the teacher matches lora_targets {self.loss.lora_targets} in "
                             f"{self.loss.lora_stacks}; Marian's are q_proj, k_proj, v_proj, out_proj, fc1, "
                             "fc2") from exc
        if not any("lora_" in name for name, _ in self.model.named_parameters()):
            raise InputError(f"okd: no module of the teacher matches lora_targets {self.loss.lora_targets} in "
                             f"{self.loss.lora_stacks}; Marian's are q_proj, k_proj, v_proj, out_proj, fc1, fc2")
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)

    def modules(self) -> torch.nn.ParameterDict:
        """The trainable module parameters, under state-dict-safe names, to register on the student."""
        return torch.nn.ParameterDict({name.replace(".", "__"): p for name, p in self.trainable.items()})

    def logits(self, batch: dict) -> torch.Tensor:
        """Teacher logits ``[B, T, V−1]`` (``<pad>`` column dropped, like the student's) on ``batch``'s targets;
        with a gradient into the modules for ``okd``, none for ``on_policy``."""
        from trainers.losses import marian_logits

        with torch.set_grad_enabled(bool(self.trainable) and torch.is_grad_enabled()):
            return marian_logits(self.model, batch)

    @torch.no_grad()
    def valid_loss(self, batches) -> float:
        """The teacher's token-mean NLL on the references of ``batches`` (on its device): for ``okd``, how far
        its online modules have moved it from the frozen teacher, whose value is the one before training (the
        modules start as a zero update)."""
        from trainers.losses import marian_logits, nll

        total, tokens = 0.0, 0
        for batch in batches:
            total += float(nll(marian_logits(self.model, batch), batch["labels"], reduction="sum"))
            tokens += int((batch["labels"] != IGNORE).sum())
        return total / max(tokens, 1)

    def base_state(self) -> dict[str, torch.Tensor]:
        """The frozen weights (modules excluded) under their checkpoint names: what must stay bit-identical."""
        return {name.replace(".base_layer.", "."): t for name, t in self.model.state_dict().items()
                if "lora_" not in name}


def anchor_loss(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's NLL on the references, summed over tokens (the modules' anchor in ``okd``)."""
    from trainers.losses import nll

    return nll(teacher_logits, labels, reduction="sum")


def takes_student_data(batch: dict, share: float) -> bool:
    """Whether ``on_policy`` trains this batch on student samples: a fixed function of the batch's source ids
    (crc32 → [0, 1) below ``share``), so a resumed run decides every batch as the first run did."""
    if share >= 1:
        return True
    if share <= 0:
        return False
    digest = zlib.crc32(batch["input_ids"].cpu().numpy().tobytes())
    return digest / 2**32 < share


class InverseCdfSampler:
    """A logits processor that draws one token per row from ``softmax(scores)`` by inverse-CDF sampling and
    leaves only it (score 0, the rest −inf), so generation's greedy step emits the sample.

    Why not ``do_sample=True``: transformers samples with ``torch.multinomial`` without replacement, which on a
    CPU draws an exponential variate per vocabulary entry (``exponential_``, not vectorised): 57 % of a tiny
    student's sampling time over an 8k vocabulary. Inverse CDF needs one uniform per row and a cumulative sum.
    Runs after generation's own processors (``<pad>`` suppressed, ``</s>`` forced at the length limit).
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float(), -1).cumsum_(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        # right=True: the first id whose cumulative mass exceeds u; a zero-probability id never is one
        picked = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(-1, picked, 0.0)


@torch.no_grad()
def sample_targets(student, batch: dict, *, pad_id: int, eos_id: int, max_new_tokens: int) -> dict:
    """``batch`` with its targets replaced by one ancestral sample of ``student`` per source.

    Dropout is off while sampling (the student's training mode is restored); ``<pad>`` — the decoder-start token,
    never a target — is suppressed; each token is drawn by :class:`InverseCdfSampler`. Labels stop after the first
    ``</s>`` (padding beyond it is ``IGNORE``); a sample that reaches ``max_new_tokens`` ends with the ``</s>``
    Marian's generation config forces there.
    """
    was_training = student.training
    student.eval()
    try:
        out = student.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                               suppress_tokens=[pad_id], logits_processor=[InverseCdfSampler()])
    finally:
        student.train(was_training)
    labels = out[:, 1:].clone()
    after_eos = (labels == eos_id).long().cumsum(1) - (labels == eos_id).long() > 0  # strictly after the first
    labels[after_eos] = IGNORE
    decoder_input_ids = out[:, :-1].clone()
    decoder_input_ids[after_eos] = pad_id
    return batch | {"labels": labels, "decoder_input_ids": decoder_input_ids,
                    "decoder_attention_mask": (~after_eos).long()}
