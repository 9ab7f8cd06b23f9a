"""Training losses: NLL, token-/sentence-level KD, their gated hybrid, and divergences over the teacher's top-k.

Every loss takes student logits ``[B, T, V]`` (softmax math in float32) and a batch from the shard reader,
ignores padding (``labels == IGNORE``) and returns ``reduction="mean"`` (mean over non-padding target tokens)
or ``"sum"`` (so distributed training can divide by the global token count). Each loss is a per-token map
``[B, T]`` helper plus one shared reduction. ``p`` is the teacher distribution, ``q`` the student's full-vocabulary
softmax. The student is never renormalised over the teacher's top-k ids: a loss that only compares relative
probabilities inside the top k cannot see how much mass the student puts elsewhere (a student trained that way
learns nothing useful). ``token_kd`` compares the (renormalised) teacher top-k with the student's full-vocab
probabilities at those ids, or (``tail="bucket"``) two (k+1)-way distributions whose last entry is the mass
outside the top k; the other divergences always use those (k+1)-way distributions.

Batch keys: ``labels`` ``[B, T]`` int64; ``topk_ids`` ``[B, T, k]`` int64; ``topk_logprobs`` ``[B, T, k]``;
``tail_logprob`` ``[B, T]`` (log teacher mass outside the top k); ``score`` ``[B]`` (teacher sequence log-prob);
optionally ``hidden`` ``[B, T, d]`` (decoder states, for the per-token hybrid gate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainers.batching import IGNORE
from trainers.gates import FixedGate, HeldoutGate, UncertaintyGate

Reduction = Literal["mean", "sum"]
Tail = Literal["renormalize", "bucket"]
Weighting = Literal["none", "score"]
# Floor for log-probabilities: exp() already underflows to 0 in float32 near -104, and a finite floor keeps
# -inf (k = V, an empty tail) out of the products and gradients, where 0 * inf would give NaN.
_LOG_FLOOR = -1e4


class _LogSoftmaxAt(torch.autograd.Function):
    """``log_softmax(z, -1).gather(-1, ids)``, label-smoothed by ε, with a hand-written backward.

    The output layer dominates a small student's step: with an 8k vocabulary every full ``[B, T, V]`` pass costs
    as much as a transformer layer. Autograd of ``gather − logsumexp`` makes about five of them backwards
    (logsumexp's ``exp(z − lse)·g``, gather's zero-filled scatter, their sum); the gradient written here makes one
    (``bench/kd_step.py``: with the logits computed without their ``<pad>`` row, a `tiny` token-KD step 1.8×
    faster than before). With smoothing ε the value at each id is ``(1−ε)·log q(id) + ε·mean_v log q(v)``
    ``= (1−ε)·z_id + ε·mean(z) − lse`` (so its negation at the label is ``F.cross_entropy(label_smoothing=ε)``),
    and ``∂/∂z = scatter((1−ε)·g) + (ε/V − softmax(z))·Σ_k g``.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor, eps: float) -> torch.Tensor:
        lse = torch.logsumexp(z, -1, keepdim=True)
        out = z.gather(-1, ids)
        if eps:
            out = (1 - eps) * out + eps * z.mean(-1, keepdim=True)
        ctx.save_for_backward(z, lse, ids)
        ctx.eps = eps
        return out - lse

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, lse, ids = ctx.saved_tensors
        grad = torch.sub(z, lse).exp_()
        if ctx.eps:
            grad.sub_(ctx.eps / z.shape[-1])
        grad.mul_(-g.sum(-1, keepdim=True))
        return grad.scatter_add_(-1, ids, (1 - ctx.eps) * g if ctx.eps else g), None, None


def log_softmax_at(z: torch.Tensor, ids: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """``log softmax(z)`` over the last dim at ``ids`` (``[..., k]``, int64): the student's ``log q`` there;
    with ``smoothing`` ε, ``(1−ε)·log q(id) + ε·mean_v log q(v)``."""
    return _LogSoftmaxAt.apply(z, ids, float(smoothing))


def _reduce(loss_map: torch.Tensor, labels: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Sums ``loss_map`` ``[B, T]`` over non-padding tokens; ``"mean"`` divides by their count (0 if none)."""
    mask = labels != IGNORE
    total = torch.where(mask, loss_map, 0.0).sum()  # where, not *: padded entries may hold anything
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a ‖ b) = Σ_i a_i (log a_i − log b_i)`` over the last dim, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w·a + (1−w)·b)``, exact at ``w`` = 0 and 1."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _tempered_tail(tail_logprob: torch.Tensor, *, rest: int, temperature: float) -> torch.Tensor:
    """``log`` of the tail bucket's tempered weight (before renormalisation), ``[B, T]``, times T.

    The stored tail ``t`` is spread uniformly over the ``rest = V − k`` other tokens (the maximum-entropy
    completion of the top k), and each of them is tempered like a top-k token: ``rest·(t/rest)^{1/T}``. Returned
    multiplied by T, so that it sits beside ``log p_i`` in ``log_softmax(· / T)``:
    ``T·log rest + log t − log rest``. At T = 1 (or with an empty tail) it is ``log t`` itself.
    """
    if temperature == 1 or rest == 0:
        return tail_logprob
    return tail_logprob + (temperature - 1) * math.log(rest)


def _teacher(batch: dict, *, bucket: bool, temperature: float, vocab_size: int) -> torch.Tensor:
    """Teacher log-probs ``[B, T, k(+1)]``: ``softmax(log p / T)`` over the stored top-k (+ tempered tail bucket)."""
    mask = (batch["labels"] != IGNORE)[..., None]
    logp = batch["topk_logprobs"].float()
    if bucket:
        rest = vocab_size - logp.shape[-1]
        tail = _tempered_tail(batch["tail_logprob"].float(), rest=rest, temperature=temperature)
        logp = torch.cat([logp, tail[..., None]], dim=-1)
    logp = torch.where(mask, logp, 0.0)  # padding may be all -inf, whose log_softmax is NaN
    return F.log_softmax(logp / temperature, dim=-1).clamp_min(_LOG_FLOOR)


def _student(logits: torch.Tensor, ids: torch.Tensor, *, bucket: bool, temperature: float) -> torch.Tensor:
    """Student log-probs ``[B, T, k(+1)]`` at the teacher's top-k ids, from logits divided by T.

    Full-vocabulary ``log q_i`` at the k ids (not renormalised over them); with ``bucket`` also the remaining
    mass ``log(1 − Σ_topk q) = logsumexp(non-top-k logits) − logsumexp(all logits)``, without cancellation.
    """
    z = logits.float() if temperature == 1 else logits.float() / temperature  # / 1 would copy [B, T, V]
    if not bucket:
        return log_softmax_at(z, ids)
    lse = z.logsumexp(-1, keepdim=True)
    # Finite fill, not -inf: with k = V the rest is empty, and logsumexp's gradient of all -inf is NaN.
    rest = z.scatter(-1, ids, torch.finfo(z.dtype).min).logsumexp(-1, keepdim=True)
    return torch.cat([z.gather(-1, ids) - lse, (rest - lse).clamp_min(_LOG_FLOOR)], dim=-1)


def _support(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, log q)`` ``[B, T, k+1]``: top-k plus the rest-of-vocabulary bucket, both proper distributions."""
    ids = batch["topk_ids"]
    log_p = _teacher(batch, bucket=True, temperature=1.0, vocab_size=logits.shape[-1])
    return log_p, _student(logits, ids, bucket=True, temperature=1.0)


def _nll_map(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-token cross-entropy ``[B, T]`` (0 on padding), label-smoothed like ``F.cross_entropy``."""
    loss = -log_softmax_at(logits.float(), labels.clamp_min(0)[..., None], label_smoothing)[..., 0]
    return torch.where(labels != IGNORE, loss, 0.0)


def _token_kd_map(
    logits: torch.Tensor, batch: dict, *, temperature: float, tail: Tail, alpha: float, label_smoothing: float
) -> torch.Tensor:
    if tail not in ("renormalize", "bucket"):
        raise ValueError(f"unknown tail {tail!r}; expected 'renormalize' or 'bucket'")
    bucket = tail == "bucket"
    log_p = _teacher(batch, bucket=bucket, temperature=temperature, vocab_size=logits.shape[-1])
    log_q = _student(logits, batch["topk_ids"], bucket=bucket, temperature=temperature)
    kd = _kl(log_p, log_q) * temperature**2  # T² keeps gradient magnitudes comparable across T (Hinton)
    if alpha == 1:
        return kd
    return alpha * kd + (1 - alpha) * _nll_map(logits, batch["labels"], label_smoothing)


def _sentence_map(logits: torch.Tensor, batch: dict, *, weighting: Weighting, label_smoothing: float) -> torch.Tensor:
    labels = batch["labels"]
    loss = _nll_map(logits, labels, label_smoothing)
    if weighting == "none":
        return loss
    if weighting != "score":
        raise ValueError(f"unknown weighting {weighting!r}; expected 'none' or 'score'")
    lengths = (labels != IGNORE).sum(-1)  # [B]
    log_w = batch["score"].float() / lengths.clamp_min(1)  # log of the per-token geometric-mean probability
    # w_b = N·exp(log_w_b) / Σ_c n_c·exp(log_w_c), in log space: exp(log_w) alone underflows for long, unlikely
    # hypotheses. Rows with n_b = 0 drop out of the sum (log 0 = -inf); an all-padding batch gets w = 0, not NaN.
    log_z = torch.logsumexp(log_w + lengths.float().log(), dim=0)
    w = torch.where(lengths > 0, torch.exp(log_w - log_z) * lengths.sum(), 0.0)
    return loss * w.detach()[:, None]


def nll(
    logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Token cross-entropy with optional label smoothing.

    ``L = -(1-ε) log q(y) - ε/V Σ_v log q(v)`` per non-padding token.

    Args:
        logits: ``[B, T, V]`` unnormalised scores.
        labels: ``[B, T]`` target ids, ``IGNORE`` on padding.
        label_smoothing: ε in ``[0, 1)``.
        reduction: ``"mean"`` over non-padding tokens (0 if there are none) or ``"sum"``.
    """
    return _reduce(_nll_map(logits, labels, label_smoothing), labels, reduction)


def token_kd(
    logits: torch.Tensor,
    batch: dict,
    *,
    temperature: float = 1.0,
    tail: Tail = "renormalize",
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Word-level KD: ``α·T²·KL(p_T ‖ q_T) + (1−α)·NLL(labels)`` per token.

    ``p_T = softmax(log p_topk / T)`` over the support; ``q_T`` from ``softmax(logits / T)``.
    ``tail="renormalize"``: the teacher renormalised over its k ids, the student's full-vocab probabilities
    there. ``tail="bucket"``: a (k+1)-way distribution whose last entry is the mass outside the top k
    (teacher: ``exp(tail_logprob)``; student: ``1 − Σ_topk q``).

    Temperature with the bucket: the shards store only the tail's total ``t``, so the teacher is completed to a
    full-vocabulary distribution by spreading ``t`` uniformly over the ``V − k`` other tokens (the
    maximum-entropy choice), and tempered there like the student: ``p_T ∝ [p_1^{1/T}, …, p_k^{1/T},
    (V−k)·(t/(V−k))^{1/T}]``. Both sides are then the bucketed ``softmax(log · / T)`` of a full distribution, so
    a student equal to that completion has zero loss at every T (tempering the tail as one token, ``t^{1/T}``,
    would shrink it as T grows while the student's tail grows).

    Args:
        logits: ``[B, T, V]`` student scores.
        batch: ``labels``, ``topk_ids``, ``topk_logprobs`` and, for the bucket, ``tail_logprob``.
        temperature: T > 0 (1 = no smoothing).
        tail: ``"renormalize"`` or ``"bucket"``.
        alpha: weight of KD against NLL on ``labels``, in ``[0, 1]``.
        label_smoothing: ε of the NLL term.
        reduction: ``"mean"`` or ``"sum"`` over non-padding tokens.
    """
    loss = _token_kd_map(
        logits, batch, temperature=temperature, tail=tail, alpha=alpha, label_smoothing=label_smoothing
    )
    return _reduce(loss, batch["labels"], reduction)


def sentence_kd(
    logits: torch.Tensor,
    batch: dict,
    *,
    weighting: Weighting = "none",
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Sequence-level KD: NLL on the teacher hypotheses (``labels`` holds their ids; n-best rows allowed).

    ``weighting="score"`` weights every token of row b by ``w_b = exp(score_b / n_b)`` (the hypothesis'
    per-token geometric-mean probability; ``n_b`` its non-padding tokens), rescaled so that
    ``Σ_b n_b w_b = Σ_b n_b``; the mean is then ``Σ_b w_b Σ_t nll_bt / Σ_b n_b w_b``. The rescaling is per
    (local) batch, so with ``"sum"`` across workers the weights are normalised per worker.

    Args:
        logits: ``[B, T, V]`` student scores.
        batch: ``labels`` and, for ``"score"``, ``score`` ``[B]``.
        weighting: ``"none"`` or ``"score"``.
        label_smoothing: ε.
        reduction: ``"mean"`` or ``"sum"`` over non-padding tokens.
    """
    loss = _sentence_map(logits, batch, weighting=weighting, label_smoothing=label_smoothing)
    return _reduce(loss, batch["labels"], reduction)


def reverse_kl(logits: torch.Tensor, batch: dict, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Reverse KL over the support: ``KL(q ‖ p) = Σ_i q_i (log q_i − log p_i)`` (mode-seeking)."""
    log_p, log_q = _support(logits, batch)
    return _reduce(_kl(log_q, log_p), batch["labels"], reduction)


def jsd(logits: torch.Tensor, batch: dict, *, beta: float = 0.5, reduction: Reduction = "mean") -> torch.Tensor:
    """Generalized JSD over the support, as in GKD (Agarwal et al. 2024) and TRL's ``generalized_jsd_loss``.

    ``JSD_β = β·KL(p ‖ M) + (1−β)·KL(q ‖ M)`` with ``M = β·p + (1−β)·q``. That expression vanishes at both ends;
    ``JSD_β / β → KL(p ‖ q)`` as β → 0 and ``JSD_β / (1−β) → KL(q ‖ p)`` as β → 1, so, like TRL, β = 0 is
    defined as forward KL and β = 1 as reverse KL. β = 0.5 is the symmetric Jensen-Shannon divergence.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    log_p, log_q = _support(logits, batch)
    if beta == 0:
        loss = _kl(log_p, log_q)
    elif beta == 1:
        loss = _kl(log_q, log_p)
    else:
        log_m = _log_mix(log_p, log_q, beta)
        loss = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return _reduce(loss, batch["labels"], reduction)


def skew_kl(logits: torch.Tensor, batch: dict, *, lam: float = 0.1, reduction: Reduction = "mean") -> torch.Tensor:
    """DistiLLM skew KL over the support: ``KL(p ‖ λ·p + (1−λ)·q)``; λ = 0 is forward KL, λ = 1 gives 0."""
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    log_p, log_q = _support(logits, batch)
    return _reduce(_kl(log_p, _log_mix(log_p, log_q, lam)), batch["labels"], reduction)


def tvd(logits: torch.Tensor, batch: dict, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Total variation distance over the support: ``0.5·Σ_i |p_i − q_i|``."""
    log_p, log_q = _support(logits, batch)
    return _reduce(0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), batch["labels"], reduction)


class _KlFromLogits(torch.autograd.Function):
    """``KL(softmax(a) ‖ softmax(b))`` over the last dim, ``[...]``, with a hand-written backward.

    Autograd of two ``log_softmax`` and ``Σ p·(log p − log q)`` makes about ten full ``[B, T, V]`` passes
    backwards; here each side's ``exp`` is taken once (the costly pass), ``p``, ``q`` and ``log p − log q`` are
    kept from the forward (three ``[B, T, V]`` buffers), and the gradients ``∂/∂b = q − p`` and
    ``∂/∂a = p·(log p − log q − KL)`` take one pass each.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        def softmax_and_shift(z):  # softmax(z) and the log-normaliser lse(z), from one exp
            m = z.amax(-1, keepdim=True)
            e = torch.sub(z, m).exp_()
            s = e.sum(-1, keepdim=True)
            return e.div_(s), s.log_().add_(m)

        p, lse_a = softmax_and_shift(a)
        q, lse_b = softmax_and_shift(b)
        diff = torch.sub(a, b).sub_(lse_a - lse_b)  # log p − log q
        kl = torch.linalg.vecdot(p, diff)
        ctx.save_for_backward(p, q, diff, kl)
        return kl

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, q, diff, kl = ctx.saved_tensors
        g = g[..., None]
        grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = torch.sub(q, p).mul_(g)
        if ctx.needs_input_grad[0]:
            grad_a = torch.sub(diff, kl[..., None]).mul_(p).mul_(g)
        return grad_a, grad_b


def online_kl(logits: torch.Tensor, batch: dict, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Forward ``KL(p_T ‖ p_S)`` over the full vocabulary from the teacher's logits computed online
    (``batch["teacher_logits"]`` ``[B, T, V]``): the student side of ``okd`` and ``on_policy`` (``trainers.online``).
    A gradient reaches the teacher when its logits carry one (``okd``'s online modules)."""
    kl = _KlFromLogits.apply(batch["teacher_logits"].float(), logits.float())
    return _reduce(kl, batch["labels"], reduction)


class HybridGate(torch.nn.Module):
    """Learned gate ``g ∈ (0, 1)`` mixing token and sentence KD (``g`` weighs the token loss).

    ``kind="scalar"``: ``g = sigmoid(w)``, one parameter, ``w = 0`` (g = 0.5) at init.
    ``kind="token"``: ``g_t = sigmoid(W·h_t + b)`` from the decoder state ``h_t``; zero init, so also 0.5.
    The states are detached: the gate reads the decoder, it should not reshape it to favour a loss.
    """

    def __init__(self, kind: Literal["scalar", "token"] = "scalar", *, d_model: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "scalar":
            self.w = torch.nn.Parameter(torch.zeros(()))
        elif kind == "token":
            if d_model is None:
                raise ValueError("a token gate needs d_model")
            self.proj = torch.nn.Linear(d_model, 1)
            torch.nn.init.zeros_(self.proj.weight)
            torch.nn.init.zeros_(self.proj.bias)
        else:
            raise ValueError(f"unknown gate kind {kind!r}; expected 'scalar' or 'token'")
        self._last: torch.Tensor | None = None

    def forward(self, mask: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Gate values ``[B, T]`` for the non-padding ``mask`` ``[B, T]``; ``hidden`` ``[B, T, d]`` for tokens."""
        if self.kind == "scalar":
            g = torch.sigmoid(self.w).expand(mask.shape)
        else:
            if hidden is None:
                raise ValueError("a token gate needs the decoder hidden states (batch['hidden'] or hidden=)")
            g = torch.sigmoid(self.proj(hidden.detach().float())).squeeze(-1)
        # Kept as a tensor; .item() (a device sync) only when someone logs it.
        self._last = torch.where(mask, g.detach(), 0.0).sum() / mask.sum().clamp_min(1)
        return g

    def last_value(self) -> float:
        """Mean gate value over the non-padding tokens of the last call (NaN before any)."""
        return math.nan if self._last is None else float(self._last)

    def mix(self, tok: torch.Tensor, sent: torch.Tensor, mask: torch.Tensor, hidden=None) -> torch.Tensor:
        g = self(mask, hidden)
        return g * tok + (1 - g) * sent

    def log_values(self) -> dict:
        return {"gate": self.last_value()}


GateKind = Literal["scalar", "token", "fixed", "uncertainty", "heldout"]
Gate = HybridGate | FixedGate | UncertaintyGate | HeldoutGate


def hybrid(
    logits: torch.Tensor,
    batch: dict,
    gate: Gate,
    *,
    temperature: float = 1.0,
    tail: Tail = "renormalize",
    weighting: Weighting = "none",
    label_smoothing: float = 0.0,
    hidden: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Gated token/sentence KD: ``g_t·L_token,t + (1−g_t)·L_sentence,t`` per token (``gate.mix``).

    ``L_token`` is :func:`token_kd`'s per-token loss (α = 1), ``L_sentence`` :func:`sentence_kd`'s; both along
    the teacher hypotheses in ``labels``. The uncertainty gate weighs them ``e^{−s_i}/2`` and adds its
    regulariser instead (``trainers.gates``).

    Args:
        logits: ``[B, T, V]`` student scores.
        batch: keys of :func:`token_kd` and :func:`sentence_kd`; ``hidden`` ``[B, T, d]`` for a token gate.
        gate: a :class:`HybridGate` or a gate of ``trainers.gates`` (its parameters belong in the optimizer).
        temperature, tail: of the token loss. weighting, label_smoothing: of the sentence loss.
        hidden: decoder states; overrides ``batch["hidden"]``.
        reduction: ``"mean"`` or ``"sum"`` over non-padding tokens.
    """
    labels = batch["labels"]
    tok = _token_kd_map(logits, batch, temperature=temperature, tail=tail, alpha=1.0, label_smoothing=0.0)
    sent = _sentence_map(logits, batch, weighting=weighting, label_smoothing=label_smoothing)
    mixed = gate.mix(tok, sent, labels != IGNORE, hidden if hidden is not None else batch.get("hidden"))
    return _reduce(mixed, labels, reduction)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "nll": nll,
    "token": token_kd,
    "sentence": sentence_kd,
    "hybrid": hybrid,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "tvd": tvd,
    "okd": online_kl,
    "on_policy": online_kl,
}
# The LossConfig fields each loss reads; compute_loss passes exactly these.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "nll": ("label_smoothing",),
    "token": ("temperature", "tail", "alpha", "label_smoothing"),
    "sentence": ("weighting", "label_smoothing"),
    "hybrid": ("temperature", "tail", "weighting", "label_smoothing"),
    "reverse_kl": (),
    "jsd": ("beta",),
    "skew_kl": ("lam",),
    "tvd": (),
    "okd": (),
    "on_policy": (),
}
# The LossConfig fields the online teacher reads (trainers.online): training settings, so in the fingerprint.
_ONLINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "okd": ("lora_rank", "lora_alpha", "lora_targets", "lora_stacks", "anchor"),
    "on_policy": ("student_data",),
}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss function registered as ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[name]


class LossConfig(BaseModel):
    """Which loss to train with and its options (each loss reads only its own; see ``_OPTIONS``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    temperature: float = Field(1.0, gt=0)  # token / hybrid: softmax temperature T
    tail: Tail = "renormalize"  # token / hybrid: teacher mass outside the top k
    alpha: float = Field(1.0, ge=0, le=1)  # token: weight of KD vs NLL on labels
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # nll / token NLL term / sentence / hybrid sentence term
    beta: float = Field(0.5, ge=0, le=1)  # jsd: 0 = forward KL, 1 = reverse KL
    lam: float = Field(0.1, ge=0, le=1)  # skew_kl: teacher share λ of the mixture
    weighting: Weighting = "none"  # sentence / hybrid: per-hypothesis weights
    gate: GateKind = "scalar"  # hybrid: gate kind (trainers.gates; README, Losses)
    g: float = Field(0.5, ge=0, le=1)  # hybrid, gate fixed: the token weight
    gate_lr: float = Field(0.5, gt=0)  # hybrid, gate heldout: step size of w per held-out update
    gate_every: int = Field(50, gt=0)  # hybrid, gate heldout: training steps between held-out updates
    gate_lr_scale: float = Field(20.0, gt=0)  # hybrid, gate uncertainty: its scales' lr ÷ the student's
    lora_rank: int = Field(8, gt=0)  # okd: rank of the teacher's LoRA modules
    lora_alpha: float = Field(16.0, gt=0)  # okd: LoRA scale (the update is alpha/rank · B·A)
    lora_targets: list[str] = Field(["q_proj", "v_proj"], min_length=1)  # okd: teacher projections with modules
    lora_stacks: Literal["encoder", "decoder", "both"] = "both"  # okd: which stacks get modules
    anchor: float = Field(1.0, ge=0)  # okd: weight of the teacher's own NLL in the modules' objective
    student_data: float = Field(0.5, ge=0, le=1)  # on_policy: share of batches trained on student samples

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        get_loss(name)
        return name

    def training_fields(self) -> dict:
        """The name and the options this loss reads (another loss's option changes nothing)."""
        fields = {"name": self.name} | {field: getattr(self, field) for field in _OPTIONS[self.name]}
        fields |= {field: getattr(self, field) for field in _ONLINE_OPTIONS.get(self.name, ())}
        if self.name != "hybrid":
            return fields
        return fields | {"gate": self.gate} | {field: getattr(self, field) for field in _GATE_OPTIONS[self.gate]}


# The LossConfig fields each hybrid gate reads (scalar and token read none, so their fingerprints are unchanged).
_GATE_OPTIONS: dict[str, tuple[str, ...]] = {
    "scalar": (), "token": (), "fixed": ("g",), "uncertainty": ("gate_lr_scale",), "heldout": ("gate_lr", "gate_every"),
}


def make_gate(cfg: LossConfig, *, d_model: int) -> Gate | None:
    """The gate the ``hybrid`` loss needs (``None`` for every other loss)."""
    if cfg.name != "hybrid":
        return None
    if cfg.gate == "fixed":
        return FixedGate(cfg.g)
    if cfg.gate == "uncertainty":
        return UncertaintyGate(lr_scale=cfg.gate_lr_scale)
    if cfg.gate == "heldout":
        return HeldoutGate(lr=cfg.gate_lr, every=cfg.gate_every)
    return HybridGate(cfg.gate, d_model=d_model)


def heldout_gate_step(
    cfg: LossConfig,
    model: torch.nn.Module,
    train_batch: dict,
    valid_batches: list[dict],
    *,
    logits_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    all_reduce: Callable[[torch.Tensor], object] | None = None,
) -> bool:
    """Call once per training step, before the training loss: a due ``HeldoutGate`` (``model.kd_gate``) steps.

    On this step's training batch it takes the gradients of the summed token and sentence losses (the two
    terms of the hybrid, with the ``cfg`` options; times the batch's ``weight``); on one held-out batch
    (``valid_batches`` cycled by the gate's update count; NLL on its references) the held-out gradient; the
    gate then moves along their cosine (:class:`trainers.gates.HeldoutGate`). Dropout is off for these
    passes, and ``torch.autograd.grad`` leaves the parameters' ``.grad`` alone, so the training step that
    follows is unaffected but for the new ``g``. Returns whether the gate stepped.
    """
    gate = getattr(model, "kd_gate", None)
    if not isinstance(gate, HeldoutGate) or not gate.tick():
        return False
    params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("kd_gate.")]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits, labels = logits_fn(model, train_batch), train_batch["labels"]
            weight = train_batch.get("weight", 1.0)
            tok = _token_kd_map(logits, train_batch, temperature=cfg.temperature, tail=cfg.tail, alpha=1.0,
                                label_smoothing=0.0)
            sent = _sentence_map(logits, train_batch, weighting=cfg.weighting, label_smoothing=cfg.label_smoothing)
            grad_tok = torch.autograd.grad(_reduce(tok, labels, "sum") * weight, params, retain_graph=True,
                                           allow_unused=True)
            grad_sent = torch.autograd.grad(_reduce(sent, labels, "sum") * weight, params, allow_unused=True)
            grad_valid = None
            if valid_batches:
                held = valid_batches[int(gate.updates) % len(valid_batches)]
                grad_valid = torch.autograd.grad(nll(logits_fn(model, held), held["labels"], reduction="sum"),
                                                 params, allow_unused=True)
    finally:
        model.train(was_training)
    gate.update(grad_tok, grad_sent, grad_valid, params, all_reduce=all_reduce)
    return True


def compute_loss(
    cfg: LossConfig,
    logits: torch.Tensor,
    batch: dict,
    *,
    gate: Gate | None = None,
    hidden: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Calls the configured loss with its options: the one entry point for the training loop.

    Raises:
        ValueError: ``hybrid`` without a ``gate``.
    """
    kwargs = {field: getattr(cfg, field) for field in _OPTIONS[cfg.name]}
    if cfg.name == "nll":
        return nll(logits, batch["labels"], reduction=reduction, **kwargs)
    if cfg.name == "hybrid":
        if gate is None:
            raise ValueError("the hybrid loss needs a gate: a HybridGate or one of trainers.gates (see make_gate)")
        return hybrid(logits, batch, gate, hidden=hidden, reduction=reduction, **kwargs)
    return get_loss(cfg.name)(logits, batch, reduction=reduction, **kwargs)


def marian_forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Student forward pass: logits ``[B, T, V−1]`` without the ``<pad>`` column, which is never a target and
    which CTranslate2 removes from the model (so training and inference share one support), and the last
    decoder states ``[B, T, d]`` (a Marian's ``decoder_hidden_states[-1]``: it has no final layer norm).

    The logits come from the output layer's other rows, not from slicing full logits: a ``[..., :-1]`` view is
    strided, and its backward zero-fills and copies a full ``[B, T, V]`` tensor (measured: 15 % of a `tiny`
    student's step)."""
    states = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch["decoder_attention_mask"],
    )[0]
    return F.linear(states, model.lm_head.weight[:-1], model.final_logits_bias[0, :-1]), states


def marian_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """:func:`marian_forward`'s logits."""
    return marian_forward(model, batch)[0]


class MarianForward(torch.nn.Module):
    """:func:`marian_forward` as a module's ``forward``, so that DistributedDataParallel (which synchronises the
    gradients of what runs through its own forward) can wrap it; ``unwrapped`` is the Marian."""

    def __init__(self, marian: torch.nn.Module):
        super().__init__()
        self.unwrapped = marian

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return marian_forward(self.unwrapped, batch)
