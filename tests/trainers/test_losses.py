"""KD losses against independent computations (torch.distributions, explicit loops), on tiny tensors."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from trainers.batching import IGNORE
from trainers.losses import (
    LOSSES,
    HybridGate,
    LossConfig,
    compute_loss,
    get_loss,
    hybrid,
    jsd,
    log_softmax_at,
    make_gate,
    nll,
    online_kl,
    reverse_kl,
    sentence_kd,
    skew_kl,
    token_kd,
    tvd,
)

B, T, V, D = 3, 5, 7, 4


def make_batch(k: int = 3, seed: int = 0) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Student logits ``[B, T, V]``, a shard-like batch from a random teacher, and the teacher's full log-probs.

    Row 1 has 2 padded positions, row 2 has 4; padded teacher entries are -inf to check they stay harmless.
    """
    g = torch.Generator().manual_seed(seed)
    teacher = (2 * torch.randn(B, T, V, generator=g)).log_softmax(-1)
    top = teacher.topk(k, dim=-1)
    ids, logprobs = top.indices, top.values
    tail = teacher.scatter(-1, ids, -math.inf).logsumexp(-1)  # -inf when k == V
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 3:] = IGNORE
    labels[2, 1:] = IGNORE
    pad = labels == IGNORE
    ids = ids.masked_fill(pad[..., None], 0)
    logprobs = logprobs.masked_fill(pad[..., None], -math.inf)
    score = torch.where(pad, 0.0, teacher.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)).sum(-1)
    batch = {
        "labels": labels,
        "topk_ids": ids,
        "topk_logprobs": logprobs,
        "tail_logprob": tail,
        "score": score,
        "hyp_rank": torch.zeros(B, dtype=torch.long),
        "hidden": torch.randn(B, T, D, generator=g),
        "teacher_logits": teacher.masked_fill(pad[..., None], 0.0),  # the online losses' full distribution
    }
    return torch.randn(B, T, V, generator=g), batch, teacher


def masked_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = labels != IGNORE
    return values[mask].mean()


def positions(labels: torch.Tensor):
    return [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1]) if labels[b, t] != IGNORE]


def kl_explicit(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


# --- token KD -----------------------------------------------------------------------------------------------


def test_token_kd_full_vocab_equals_torch_distributions_kl():
    logits, batch, teacher = make_batch(k=V)
    expected = masked_mean(kl_divergence(Categorical(probs=teacher.exp()), Categorical(logits=logits)), batch["labels"])
    for tail in ("renormalize", "bucket"):  # with k = V the tail is empty (-inf): both modes agree
        leaf = logits.clone().requires_grad_()
        loss = token_kd(leaf, batch, tail=tail)
        torch.testing.assert_close(loss, expected)
        loss.backward()
        assert torch.isfinite(leaf.grad).all()


def test_token_kd_renormalize_uses_the_students_full_vocabulary_probabilities():
    """Teacher renormalised over its top k; student probabilities from the full softmax, not renormalised."""
    logits, batch, _ = make_batch(k=3)
    losses = []
    for b, t in positions(batch["labels"]):
        p = batch["topk_logprobs"][b, t].double().exp()
        p = p / p.sum()
        q = logits[b, t].double().softmax(-1)[batch["topk_ids"][b, t]]
        losses.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True)))
    assert token_kd(logits, batch).item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_token_kd_sees_student_mass_outside_the_top_k():
    """Moving student mass off the teacher's top k (same relative order inside it) must raise the loss."""
    logits, batch, _ = make_batch(k=3)
    outside = torch.ones_like(logits).scatter(-1, batch["topk_ids"], 0.0).bool()
    worse = logits + 5.0 * outside
    assert token_kd(worse, batch).item() > token_kd(logits, batch).item() + 1.0


def _completed_teacher(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-vocabulary teacher a shard describes: its top k kept, the tail mass spread uniformly over the
    other V − k tokens. Returns (log-probs ``[B, T, V]``, top-k ids ``[B, T, k]``)."""
    ids = teacher.topk(k, dim=-1).indices
    in_top = torch.zeros_like(teacher, dtype=torch.bool).scatter(-1, ids, True)
    tail = torch.where(in_top, 0.0, teacher.exp()).sum(-1, keepdim=True)
    return torch.where(in_top, teacher, (tail / (V - k)).log()), ids


def _bucketed(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, T, k+1]``: ``probs`` at ``ids`` and, last, the mass of every other token."""
    top = probs.gather(-1, ids)
    return torch.cat([top, probs.sum(-1, keepdim=True) - top.sum(-1, keepdim=True)], dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_token_kd_bucket_equals_kl_of_the_tempered_full_teacher_bucketed(temperature):
    """Expectation from a full V-way teacher (top-k + the tail spread uniformly), tempered over the whole
    vocabulary with softmax(log p / T) and only then bucketed: the loss's tempered tail must be that one."""
    k = 3
    logits, batch, teacher = make_batch(k=k)
    full, ids = _completed_teacher(teacher.double(), k)
    p = _bucketed(torch.softmax(full / temperature, -1), ids)
    q = _bucketed(torch.softmax(logits.double() / temperature, -1), ids)
    expected = masked_mean(temperature**2 * kl_divergence(Categorical(probs=p), Categorical(probs=q)), batch["labels"])
    loss = token_kd(logits, batch, tail="bucket", temperature=temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_token_kd_bucket_is_zero_for_a_student_equal_to_the_completed_teacher(temperature):
    """A student that is the shard's teacher (top-k + uniform tail) has nothing to learn at any temperature."""
    _, batch, teacher = make_batch(k=3)
    full, _ = _completed_teacher(teacher, 3)
    assert token_kd(full, batch, tail="bucket", temperature=temperature).item() == pytest.approx(0.0, abs=1e-5)


def test_token_kd_temperature_renormalize_manual():
    temperature = 3.0
    logits, batch, _ = make_batch(k=4)
    losses = []
    for b, t in positions(batch["labels"]):
        p = (batch["topk_logprobs"][b, t].double() / temperature).exp()
        p = p / p.sum()
        q = (logits[b, t].double() / temperature).softmax(-1)[batch["topk_ids"][b, t]]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
        losses.append(temperature**2 * kl)
    expected = sum(losses) / len(losses)
    assert token_kd(logits, batch, temperature=temperature).item() == pytest.approx(expected, rel=1e-5)


def test_token_kd_alpha_interpolates_with_nll():
    logits, batch, _ = make_batch(k=3)
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, label_smoothing=0.1)
    expected = 0.3 * token_kd(logits, batch) + 0.7 * ce
    torch.testing.assert_close(token_kd(logits, batch, alpha=0.3, label_smoothing=0.1), expected)


def test_token_kd_bf16_logits_use_float32_math():
    logits, batch, _ = make_batch(k=3)
    low = logits.bfloat16()
    loss = token_kd(low, batch, tail="bucket")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, token_kd(low.float(), batch, tail="bucket"))


# --- divergences --------------------------------------------------------------------------------------------


def test_reverse_kl_equals_torch_distributions_with_swapped_arguments():
    logits, batch, teacher = make_batch(k=V)
    expected = masked_mean(kl_divergence(Categorical(logits=logits), Categorical(probs=teacher.exp())), batch["labels"])
    torch.testing.assert_close(reverse_kl(logits, batch), expected)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    logits, batch, _ = make_batch(k=4)
    # The divergences compare (k+1)-way distributions: forward KL there is token_kd's bucket mode.
    torch.testing.assert_close(jsd(logits, batch, beta=0.0), token_kd(logits, batch, tail="bucket"))
    torch.testing.assert_close(jsd(logits, batch, beta=1.0), reverse_kl(logits, batch))
    # The endpoints are the limits of the normalised divergence, not arbitrary special cases.
    eps = 1e-3
    forward = token_kd(logits, batch, tail="bucket").item()
    assert (jsd(logits, batch, beta=eps) / eps).item() == pytest.approx(forward, rel=1e-2)
    assert (jsd(logits, batch, beta=1 - eps) / eps).item() == pytest.approx(reverse_kl(logits, batch).item(), rel=1e-2)


def _swap_batch(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A full-vocabulary batch whose teacher is ``log_p`` and whose student logits are ``log_q``."""
    labels = torch.zeros(log_p.shape[:-1], dtype=torch.long)
    ids = torch.arange(V).expand(*log_p.shape[:-1], V)
    batch = {
        "labels": labels,
        "topk_ids": ids,
        "topk_logprobs": log_p,
        "tail_logprob": torch.full(labels.shape, -math.inf),
    }
    return log_q, batch


def test_jsd_matches_definition_and_symmetry():
    g = torch.Generator().manual_seed(1)
    log_p = torch.randn(2, 3, V, generator=g).log_softmax(-1)
    log_q = torch.randn(2, 3, V, generator=g).log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    for beta in (0.3, 0.5):
        m = Categorical(probs=beta * p + (1 - beta) * q)
        expected = (
            beta * kl_divergence(Categorical(probs=p), m) + (1 - beta) * kl_divergence(Categorical(probs=q), m)
        ).mean()
        torch.testing.assert_close(jsd(*_swap_batch(log_p, log_q), beta=beta), expected)
    # JSD_β(p, q) = JSD_{1-β}(q, p); at β = 0.5 plain symmetry.
    torch.testing.assert_close(jsd(*_swap_batch(log_p, log_q), beta=0.5), jsd(*_swap_batch(log_q, log_p), beta=0.5))
    torch.testing.assert_close(jsd(*_swap_batch(log_p, log_q), beta=0.2), jsd(*_swap_batch(log_q, log_p), beta=0.8))
    assert jsd(*_swap_batch(log_p, log_q), beta=0.2).item() != pytest.approx(
        jsd(*_swap_batch(log_q, log_p), beta=0.2).item(), rel=1e-3
    )


def test_skew_kl_limits_and_definition():
    logits, batch, teacher = make_batch(k=V)
    assert skew_kl(logits, batch, lam=1.0).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(skew_kl(logits, batch, lam=0.0), token_kd(logits, batch))
    p = teacher.exp()
    mix = Categorical(probs=0.1 * p + 0.9 * logits.softmax(-1))
    expected = masked_mean(kl_divergence(Categorical(probs=p), mix), batch["labels"])
    torch.testing.assert_close(skew_kl(logits, batch), expected)


def test_tvd_matches_half_l1_on_the_k_plus_1_distributions():
    logits, batch, _ = make_batch(k=3)
    losses = []
    for b, t in positions(batch["labels"]):
        p = torch.cat([batch["topk_logprobs"][b, t], batch["tail_logprob"][b, t, None]]).double().exp()
        full = logits[b, t].double().softmax(-1)
        q = full[batch["topk_ids"][b, t]]
        q = torch.cat([q, 1 - q.sum(0, keepdim=True)])
        losses.append(0.5 * (p / p.sum() - q).abs().sum().item())
    assert tvd(logits, batch).item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_divergence_parameters_are_validated():
    logits, batch, _ = make_batch()
    with pytest.raises(ValueError, match="beta"):
        jsd(logits, batch, beta=1.5)
    with pytest.raises(ValueError, match="lam"):
        skew_kl(logits, batch, lam=-0.1)
    with pytest.raises(ValueError, match="tail"):
        token_kd(logits, batch, tail="uniform")


# --- sentence KD and NLL ------------------------------------------------------------------------------------


def test_nll_and_sentence_none_equal_cross_entropy():
    logits, batch, _ = make_batch()
    for eps in (0.0, 0.1):
        expected = F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, label_smoothing=eps
        )
        torch.testing.assert_close(nll(logits, batch["labels"], label_smoothing=eps), expected)
        torch.testing.assert_close(sentence_kd(logits, batch, label_smoothing=eps), expected)


@pytest.mark.parametrize("scale", [1.0, 100.0])  # 100: exp(score / n) underflows in float32
def test_sentence_score_weighting_manual(scale):
    logits, batch, _ = make_batch()
    batch["score"] = batch["score"] * scale
    ce = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="none")
    num = den = 0.0
    for b in range(B):
        n_b = int((batch["labels"][b] != IGNORE).sum())
        w_b = math.exp(float(batch["score"][b]) / n_b)
        num += w_b * float(ce[b].sum())
        den += w_b * n_b
    loss = sentence_kd(logits, batch, weighting="score")
    assert loss.item() == pytest.approx(num / den, rel=1e-5)
    assert loss.item() != pytest.approx(sentence_kd(logits, batch).item(), rel=1e-3)


# --- hybrid -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["scalar", "token"])
def test_hybrid_gradients_equal_the_analytic_gate_gradient(kind):
    """At init g = 0.5 everywhere, so dL/d(gate input) = g(1−g)·(L_token − L_sentence) = ¼·(tok − sent) per
    token (mean over tokens); tok and sent computed independently (torch.distributions KL, cross-entropy)."""
    logits, batch, teacher = make_batch(k=V)
    hidden = batch["hidden"].clone().requires_grad_()
    gate = HybridGate(kind, d_model=D)
    leaf = logits.clone().requires_grad_()
    hybrid(leaf, dict(batch, hidden=hidden), gate).backward()
    assert gate.last_value() == pytest.approx(0.5)  # zero init

    mask = batch["labels"] != IGNORE
    ref = logits.clone().requires_grad_()
    tok = kl_divergence(Categorical(probs=teacher.exp()), Categorical(logits=ref))
    sent = F.cross_entropy(ref.transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="none")
    masked_mean(0.5 * tok + 0.5 * sent, batch["labels"]).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)  # the student gets the equal mix of both losses' gradients

    diff = torch.where(mask, tok - sent, 0.0).detach() / mask.sum()  # [B, T]
    if kind == "scalar":
        torch.testing.assert_close(gate.w.grad, 0.25 * diff.sum())
    else:
        torch.testing.assert_close(gate.proj.bias.grad, 0.25 * diff.sum()[None])
        torch.testing.assert_close(gate.proj.weight.grad, 0.25 * (diff[..., None] * batch["hidden"]).sum((0, 1))[None])
    assert hidden.grad is None  # the gate reads detached decoder states


def test_hybrid_saturated_scalar_gate_gives_token_or_sentence_loss():
    logits, batch, _ = make_batch()
    gate = HybridGate("scalar")
    with torch.no_grad():
        gate.w.fill_(50.0)
    kw = {"temperature": 2.0, "tail": "bucket"}
    torch.testing.assert_close(hybrid(logits, batch, gate, **kw), token_kd(logits, batch, **kw))
    assert gate.last_value() == pytest.approx(1.0)
    with torch.no_grad():
        gate.w.fill_(-50.0)
    torch.testing.assert_close(
        hybrid(logits, batch, gate, weighting="score"), sentence_kd(logits, batch, weighting="score")
    )
    assert gate.last_value() == pytest.approx(0.0, abs=1e-6)


def test_hybrid_token_gate_mixes_per_position():
    logits, batch, teacher = make_batch(k=V)
    gate = HybridGate("token", d_model=D)
    with torch.no_grad():
        gate.proj.weight.normal_()
        gate.proj.bias.fill_(0.3)
    hidden = torch.randn(B, T, D)
    g = torch.sigmoid(hidden @ gate.proj.weight.T + 0.3).squeeze(-1)
    tok = kl_divergence(Categorical(probs=teacher.exp()), Categorical(logits=logits))
    sent = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="none")
    expected = masked_mean(g * tok + (1 - g) * sent, batch["labels"])
    torch.testing.assert_close(hybrid(logits, batch, gate, hidden=hidden), expected)  # hidden= wins over batch
    assert gate.last_value() == pytest.approx(masked_mean(g, batch["labels"]).item(), rel=1e-5)
    with pytest.raises(ValueError, match="hidden"):
        hybrid(logits, {k: v for k, v in batch.items() if k != "hidden"}, gate)


# --- every loss: padding, reduction, registry ---------------------------------------------------------------


def _call(name: str, logits: torch.Tensor, batch: dict, reduction: str = "mean", gate_kind: str = "token"):
    cfg = LossConfig(name=name, temperature=1.5, tail="bucket", alpha=0.5, weighting="score", beta=0.3, gate=gate_kind)
    torch.manual_seed(0)  # same gate init on every call
    return compute_loss(cfg, logits, batch, gate=make_gate(cfg, d_model=D), reduction=reduction)


@pytest.mark.parametrize("name", list(LOSSES))
def test_padding_does_not_affect_any_loss(name):
    logits, batch, _ = make_batch()
    pad = batch["labels"] == IGNORE
    noisy = logits.clone()
    noisy[pad] = 100 * torch.randn(int(pad.sum()), V)
    noisy[1, 3, 0] = math.inf  # NaN losses at padded positions must not leak into the reduction
    noisy_batch = dict(
        batch,
        hidden=batch["hidden"].masked_fill(pad[..., None], 1e3),
        tail_logprob=batch["tail_logprob"].masked_fill(pad, math.nan),
        teacher_logits=batch["teacher_logits"].masked_fill(pad[..., None], math.nan),
    )
    torch.testing.assert_close(_call(name, noisy, noisy_batch), _call(name, logits, batch))


@pytest.mark.parametrize("name", list(LOSSES))
def test_sum_over_token_count_equals_mean(name):
    logits, batch, _ = make_batch()
    count = int((batch["labels"] != IGNORE).sum())
    torch.testing.assert_close(_call(name, logits, batch, "sum") / count, _call(name, logits, batch))


def test_all_padding_gives_zero_not_nan():
    logits, batch, _ = make_batch()
    batch = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    for name in LOSSES:
        leaf = logits.clone().requires_grad_()
        loss = _call(name, leaf, batch, gate_kind="scalar")
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(leaf.grad).all()


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid losses: nll, token, sentence, hybrid, reverse_kl, jsd, skew_kl, tvd"):
        get_loss("kl")
    with pytest.raises(pydantic.ValidationError, match="valid losses"):
        LossConfig(name="kl")
    with pytest.raises(pydantic.ValidationError):
        LossConfig(name="token", temperatur=2.0)  # extra=forbid catches typos


def test_compute_loss_dispatches_options():
    logits, batch, _ = make_batch()
    cfg = LossConfig(name="jsd", beta=0.0, temperature=9.0)  # temperature is a token-loss option: unused here
    torch.testing.assert_close(compute_loss(cfg, logits, batch), token_kd(logits, batch, tail="bucket"))
    cfg = LossConfig(name="nll", label_smoothing=0.1)
    torch.testing.assert_close(compute_loss(cfg, logits, batch), nll(logits, batch["labels"], label_smoothing=0.1))
    with pytest.raises(ValueError, match="HybridGate"):
        compute_loss(LossConfig(name="hybrid"), logits, batch)
    assert make_gate(LossConfig(name="token"), d_model=D) is None


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_log_softmax_at_gradient_equals_autograd_of_log_softmax_gather(eps):
    # The hand-written backward against autograd through torch.log_softmax, on a non-contiguous slice (the
    # training logits drop their <pad> column) with repeated ids (padding rows carry id 0 k times); with
    # smoothing ε the reference is (1−ε)·log q(id) + ε·mean_v log q(v).
    g = torch.Generator().manual_seed(3)
    full = (3 * torch.randn(B, T, V + 1, generator=g, dtype=torch.float64))
    ids = torch.randint(0, V, (B, T, 4), generator=g)
    ids[1, 2] = 0
    upstream = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    mine, ref = full.clone().requires_grad_(), full.clone().requires_grad_()
    out = log_softmax_at(mine[..., :-1], ids, eps)
    log_q = torch.log_softmax(ref[..., :-1], -1)
    expected = (1 - eps) * log_q.gather(-1, ids) + eps * log_q.mean(-1, keepdim=True)
    torch.testing.assert_close(out, expected)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad)
    assert (mine.grad[..., -1] == 0).all()  # the dropped column gets nothing
    assert torch.autograd.gradcheck(log_softmax_at, (full[..., :-1].detach().requires_grad_(), ids, eps))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_nll_gradient_equals_cross_entropys(eps):
    logits, batch, _ = make_batch()
    mine, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    nll(mine, batch["labels"], label_smoothing=eps).backward()
    F.cross_entropy(ref.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, label_smoothing=eps).backward()
    torch.testing.assert_close(mine.grad, ref.grad)


@pytest.mark.parametrize("name", ["token", "sentence"])
def test_kd_gradients_equal_autograd_of_the_plain_formula(name):
    # token: KL(p‖q) with q = log_softmax at the top-k ids; sentence: cross-entropy. Both written with torch ops.
    logits, batch, _ = make_batch()
    mine, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    get_loss(name)(mine, batch).backward()
    labels = batch["labels"]
    if name == "token":
        log_p = torch.where((labels != IGNORE)[..., None], batch["topk_logprobs"], 0.0).log_softmax(-1)
        log_q = torch.log_softmax(ref, -1).gather(-1, batch["topk_ids"])
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        expected = per_token[labels != IGNORE].mean()
    else:
        expected = F.cross_entropy(ref.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    expected.backward()
    torch.testing.assert_close(mine.grad, ref.grad)


@pytest.mark.parametrize("teacher_grad", [True, False])
def test_online_kl_gradients_equal_autograd_of_torch_distributions(teacher_grad):
    # okd's teacher logits carry a gradient (its online modules), on_policy's do not; the reference is
    # torch.distributions' KL between the two full-vocabulary categoricals, through autograd.
    g = torch.Generator().manual_seed(5)
    a, b = (3 * torch.randn(B, T, V, generator=g) for _ in range(2))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, -2:] = IGNORE
    mine_a, ref_a = a.clone().requires_grad_(teacher_grad), a.double().requires_grad_(teacher_grad)
    mine_b, ref_b = b.clone().requires_grad_(), b.double().requires_grad_()
    got = online_kl(mine_b, {"teacher_logits": mine_a, "labels": labels})
    per_token = kl_divergence(Categorical(logits=ref_a), Categorical(logits=ref_b))
    expected = torch.where(labels != IGNORE, per_token, 0.0).sum() / (labels != IGNORE).sum()
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    got.backward()
    expected.backward()
    torch.testing.assert_close(mine_b.grad, ref_b.grad.float(), rtol=1e-4, atol=1e-7)
    if teacher_grad:
        torch.testing.assert_close(mine_a.grad, ref_a.grad.float(), rtol=1e-4, atol=1e-7)
