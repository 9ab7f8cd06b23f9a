"""Hybrid gates on constructed cases where the two losses differ: the old gate drifts, the new ones do not.

The constructed student is a table of per-position logits (its parameters are the logits). On the training
batch the student already puts most mass on the sentence hypotheses' tokens, while the teacher's top-k favour
other tokens, so ``L_token ≫ L_sentence``; the held-out references are the teacher's tokens, so held-out data
prefers the LARGER training loss. A gate that follows the training loss goes the wrong way there.
"""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.trainers.test_losses import make_batch
from trainers.batching import IGNORE, seq2seq_batch
from trainers.gates import FixedGate, HeldoutGate, UncertaintyGate
from trainers.loop import OptimConfig, make_optimizer, make_schedule
from trainers.losses import (
    HybridGate,
    LossConfig,
    compute_loss,
    heldout_gate_step,
    hybrid,
    make_gate,
    marian_logits,
    sentence_kd,
    token_kd,
)

T, V = 4, 6


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny models run many times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

SENT = torch.tensor([[0, 1, 2, 3]])  # the sentence hypotheses the student already fits
TEACH = torch.tensor([[4, 5, 4, 5]])  # the teacher's (and the held-out references') tokens


class Table(torch.nn.Module):
    """A student whose parameters are its logits ``[1, T, V]`` (it ignores the source)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(4.0 * F.one_hot(SENT, V).float())


def table_logits(model, batch):
    return model.table.expand(len(batch["labels"]), -1, -1)


def train_batch(labels: torch.Tensor = SENT, teacher: torch.Tensor = TEACH) -> dict:
    """Teacher top-2 per row: 0.9 on ``teacher``, 0.0999 on the next id, 1e-4 elsewhere; ``labels`` per row."""
    b = len(labels)
    ids = torch.stack([teacher, (teacher + 1) % V], dim=-1).expand(b, -1, -1)
    return {"labels": labels.clone(), "topk_ids": ids,
            "topk_logprobs": torch.tensor([0.9, 0.0999]).log().expand(b, T, 2),
            "tail_logprob": torch.full((b, T), math.log(1e-4)), "score": torch.zeros(b)}


# Two rows for one source (the table student) whose hypotheses and teacher distributions disagree at every
# position, as n-best rows do: neither loss can reach 0, as in real data.
NBEST, NBEST_TEACH = torch.cat([SENT, torch.tensor([[2, 3, 0, 1]])]), torch.cat([TEACH, torch.tensor([[5, 4, 5, 4]])])


VALID = [{"labels": TEACH.clone()}]


def valid_nll(model) -> float:
    return float(F.cross_entropy(model.table[0].detach(), TEACH[0]))


def train(gate, steps: int, *, lr: float = 0.01, cfg: LossConfig | None = None, batch: dict | None = None):
    """``steps`` Adam steps of the hybrid loss on the constructed case; returns the gate values and the student."""
    model = Table()
    model.kd_gate = gate
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch, values = batch or train_batch(), []
    for _ in range(steps):
        if cfg is not None:
            heldout_gate_step(cfg, model, batch, VALID, logits_fn=table_logits)
        loss = hybrid(table_logits(model, batch), batch, gate)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # The scalar gate's log value is from the forward pass; the value after the step is sigmoid(w).
        scalar = isinstance(gate, HybridGate)
        values.append(float(torch.sigmoid(gate.w.detach())) if scalar else gate.log_values()["gate"])
    return values, model


def test_constructed_case_has_token_loss_much_larger():
    model, batch = Table(), train_batch()
    tok, sent = token_kd(model.table, batch), sentence_kd(model.table, batch)
    assert tok > 10 * sent  # ≈ 3.7 vs 0.088


def test_scalar_gate_drifts_monotonically_to_the_smaller_loss_at_the_optimisers_speed():
    """The finding, kept: ∂L/∂w = g(1−g)(L_tok − L_sent) > 0 at every step, so Adam lowers w by ≈ lr per step."""
    values, _ = train(HybridGate("scalar"), 40, lr=0.01)
    assert all(b < a for a, b in zip([0.5, *values], values, strict=False))  # strictly down, every step
    w_final = math.log(values[-1] / (1 - values[-1]))
    assert -0.4 <= w_final < -0.9 * 40 * 0.01  # Adam's step is ≈ lr while the sign of the gradient holds


def test_uncertainty_gate_converges_to_the_analytic_balance():
    """Constant losses L₁ = 3, L₂ = 0.5: ∂L/∂s_i = ½(1 − L_i e^{−s_i}) = 0 ⇒ σ_i² = L_i, g = L₂/(L₁+L₂) = 1/7."""
    gate = UncertaintyGate()
    mask = torch.tensor([[True, True, False]])
    tok, sent = torch.full((1, 3), 3.0), torch.full((1, 3), 0.5)
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(1500):
        loss = torch.where(mask, gate.mix(tok, sent, mask), 0.0).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.exp(float(gate.s_token.detach())) == pytest.approx(3.0, rel=1e-3)
    assert math.exp(float(gate.s_sentence.detach())) == pytest.approx(0.5, rel=1e-3)
    values = gate.log_values()
    assert values["gate"] == pytest.approx(1 / 7, rel=1e-3)
    assert values["sigma_token"] == pytest.approx(math.sqrt(3.0), rel=1e-3)
    assert values["sigma_sentence"] == pytest.approx(math.sqrt(0.5), rel=1e-3)


def test_uncertainty_gate_on_a_training_student_settles_at_the_balance_of_its_losses():
    """Where the scalar gate runs to a vertex, the uncertainty weight settles inside (0, 1), at
    g = L_sent / (L_tok + L_sent) of the losses the student reaches (σ_i² = L_i)."""
    batch = train_batch(NBEST, NBEST_TEACH)
    values, model = train(UncertaintyGate(), 300, lr=0.05, batch=batch)
    scalar, _ = train(HybridGate("scalar"), 300, lr=0.05, batch=batch)
    assert scalar[-1] < 0.01  # the baseline collapses onto the sentence loss
    logits = table_logits(model, batch).detach()
    tok, sent = float(token_kd(logits, batch)), float(sentence_kd(logits, batch))
    assert 0.1 < values[-1] < 0.9 and abs(values[-1] - values[-30]) < 0.01  # interior, and settled
    assert values[-1] == pytest.approx(sent / (tok + sent), abs=0.01)
    sigmas = model.kd_gate.log_values()
    assert sigmas["sigma_token"] ** 2 == pytest.approx(tok, rel=0.02)
    assert sigmas["sigma_sentence"] ** 2 == pytest.approx(sent, rel=0.02)


def uncertainty_after(lr_scale: float, steps: int) -> tuple[float, float]:
    """σ₁², σ₂² after ``steps`` of the student's real optimiser and warmup schedule (lr 1e-3, as the gates grid)
    on constant losses L_token = 4, L_sentence = 6 (about what the grid's `tiny` students train on)."""
    model = Table()
    model.kd_gate = UncertaintyGate(lr_scale=lr_scale)
    cfg = OptimConfig(lr=1e-3, warmup_steps=150)
    opt = make_optimizer(model, cfg)
    schedule = make_schedule(opt, cfg, steps)
    mask = torch.ones(1, 3, dtype=torch.bool)
    for _ in range(steps):
        loss = model.kd_gate.mix(torch.full((1, 3), 4.0), torch.full((1, 3), 6.0), mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return math.exp(float(model.kd_gate.s_token.detach())), math.exp(float(model.kd_gate.s_sentence.detach()))


def test_uncertainty_gate_at_the_students_lr_is_rate_limited_and_its_lr_scale_lets_it_reach_the_balance():
    """The tiny grid's finding, reproduced: at the student's lr, 800 steps leave both σ² far below their losses
    (the weight stays ≈ 0.5 whatever the losses); with lr_scale 20 they settle at σ_i² = L_i, g = 6/10."""
    slow = uncertainty_after(1.0, 800)
    assert slow[0] < 2.2 and slow[1] < 2.2  # still climbing toward 4 and 6
    fast = uncertainty_after(20.0, 800)
    assert fast == pytest.approx((4.0, 6.0), rel=0.03)
    assert fast[1] / (fast[0] + fast[1]) == pytest.approx(0.6, abs=0.01)  # g = L_sent / (L_tok + L_sent)


def test_make_optimizer_gives_lr_scaled_parameters_their_own_group_and_keeps_two_groups_otherwise():
    cfg = OptimConfig(lr=1e-3, weight_decay=0.01)
    plain = make_optimizer(Table(), cfg)
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in plain.param_groups] == [(1, 1e-3, 0.01),
                                                                                            (0, 1e-3, 0.0)]
    model = Table()
    model.kd_gate = UncertaintyGate(lr_scale=20)
    groups = make_optimizer(model, cfg).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.01), (0, 0.0), (2, 0.0)]
    assert groups[2]["lr"] == pytest.approx(0.02) and groups[1]["lr"] == 1e-3
    assert {id(p) for p in groups[2]["params"]} == {id(model.kd_gate.s_token), id(model.kd_gate.s_sentence)}


def test_uncertainty_gate_collapses_onto_a_loss_the_student_can_drive_to_zero():
    """The finding for uncertainty weighting: with L_sent → 0 (one hypothesis the student memorises), σ₂ → 0 and
    log σ₂ → −∞: the objective is unbounded below and the weight runs to the sentence vertex."""
    values, _ = train(UncertaintyGate(), 200, lr=0.05)
    assert values[-1] < 1e-3


def test_uncertainty_gate_matches_autograd_on_the_closed_form():
    logits, batch, _ = make_batch()
    s1, s2 = 0.7, -0.4
    gate = UncertaintyGate()
    with torch.no_grad():
        gate.s_token.fill_(s1)
        gate.s_sentence.fill_(s2)
    leaf = logits.clone().requires_grad_()
    loss = hybrid(leaf, batch, gate, weighting="score")
    loss.backward()
    # The closed form, written out: L = L_tok/(2σ₁²) + L_sent/(2σ₂²) + log σ₁ + log σ₂, σ_i = exp(s_i / 2).
    a = torch.tensor(s1, requires_grad=True)
    b = torch.tensor(s2, requires_grad=True)
    ref_leaf = logits.clone().requires_grad_()
    sig1, sig2 = torch.exp(a / 2), torch.exp(b / 2)
    ref = (token_kd(ref_leaf, batch) / (2 * sig1**2) + sentence_kd(ref_leaf, batch, weighting="score") / (2 * sig2**2)
           + torch.log(sig1) + torch.log(sig2))
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gate.s_token.grad, a.grad)
    torch.testing.assert_close(gate.s_sentence.grad, b.grad)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)
    assert gate.log_values()["gate"] == pytest.approx(math.exp(-s1) / (math.exp(-s1) + math.exp(-s2)))


def test_fixed_gate_has_no_parameter_and_mixes_exactly():
    logits, batch, _ = make_batch()
    gate = make_gate(LossConfig(name="hybrid", gate="fixed", g=0.3), d_model=4)
    assert isinstance(gate, FixedGate) and list(gate.parameters()) == [] and gate.state_dict() == {}
    torch.testing.assert_close(hybrid(logits, batch, gate), 0.3 * token_kd(logits, batch) + 0.7 * sentence_kd(
        logits, batch))
    assert hybrid(logits, batch, FixedGate(1.0)).item() == token_kd(logits, batch).item()
    assert hybrid(logits, batch, FixedGate(0.0)).item() == sentence_kd(logits, batch).item()
    assert gate.log_values() == {"gate": 0.3}
    with pytest.raises(pydantic.ValidationError):
        LossConfig(name="hybrid", gate="fixed", g=1.5)


def test_heldout_gate_gets_no_gradient_from_the_mixed_loss():
    gate = HeldoutGate(lr=1.0, every=1)
    assert list(gate.parameters()) == []  # w is a buffer: the optimiser never sees it
    model, batch = Table(), train_batch()
    model.kd_gate = gate
    loss = hybrid(model.table, batch, gate)
    assert not gate.w.requires_grad
    loss.backward()
    assert gate.w.grad is None
    values, _ = train(HeldoutGate(lr=1.0, every=1), 30)  # the training loss alone, no held-out step
    assert values == [0.5] * 30


def _flat_grad(loss, param):
    return torch.autograd.grad(loss, param)[0].flatten()


def test_heldout_gate_moves_toward_what_lowers_the_held_out_loss():
    """One held-out step against an independent computation, and against a one-step lookahead."""
    cfg = LossConfig(name="hybrid", gate="heldout", gate_lr=2.0, gate_every=1)
    model, batch = Table(), train_batch()
    model.kd_gate = make_gate(cfg, d_model=4)
    # Independently: gradients of KL(p‖q) (the teacher renormalised over its top 2) and of the two NLLs.
    theta = model.table.detach().clone().requires_grad_()
    log_q = theta[0].log_softmax(-1)
    p = torch.tensor([0.9, 0.0999]) / 0.9999
    ids = batch["topk_ids"][0]
    kl = (p * (p.log() - log_q.gather(-1, ids))).sum()
    sent = F.cross_entropy(theta[0], SENT[0], reduction="sum")
    held = F.cross_entropy(theta[0], TEACH[0], reduction="sum")
    diff = _flat_grad(kl, theta) - _flat_grad(sent, theta)
    g_valid = _flat_grad(held, theta)
    cos = float(diff @ g_valid / (diff.norm() * g_valid.norm()))
    assert cos > 0.5  # the held-out gradient sides with the (larger) token loss

    assert heldout_gate_step(cfg, model, batch, VALID, logits_fn=table_logits)
    gate = model.kd_gate
    assert float(gate.w) == pytest.approx(2.0 * 0.25 * cos, rel=1e-5)  # w += lr·g(1−g)·cos from w = 0
    assert gate.log_values() == pytest.approx({"gate": 1 / (1 + math.exp(-float(gate.w))), "gate_updates": 1,
                                               "gate_cos": cos}, rel=1e-5)
    assert model.table.grad is None  # the probe left the student's gradients alone

    # A one-step lookahead, θ' = θ − η·∇(g·L_tok + (1−g)·L_sent) (means): raising g lowers the held-out loss.
    def lookahead(g: float, eta: float = 0.1) -> float:
        th = model.table.detach().clone().requires_grad_()
        mix = g * token_kd(th, batch) + (1 - g) * sentence_kd(th, batch)
        step = (th - eta * torch.autograd.grad(mix, th)[0]).detach()
        return float(F.cross_entropy(step[0], TEACH[0]))

    assert lookahead(0.51) < lookahead(0.5) < lookahead(0.49)
    # The scalar gate's gradient on the same batch has the opposite sign: it would lower g.
    scalar = HybridGate("scalar")
    hybrid(model.table, batch, scalar).backward()
    assert scalar.w.grad > 0


def test_heldout_gate_trades_off_where_the_scalar_gate_goes_the_wrong_way():
    cfg = LossConfig(name="hybrid", gate="heldout", gate_lr=1.0, gate_every=1)
    held, held_model = train(make_gate(cfg, d_model=4), 60, lr=0.02, cfg=cfg)
    scalar, scalar_model = train(HybridGate("scalar"), 60, lr=0.02)
    assert held[-1] > 0.8 and scalar[-1] < 0.3
    assert valid_nll(held_model) < valid_nll(scalar_model) - 0.2


def test_heldout_gate_steps_every_n_training_steps():
    cfg = LossConfig(name="hybrid", gate="heldout", gate_every=3)
    model = Table()
    model.kd_gate = make_gate(cfg, d_model=4)
    stepped = [heldout_gate_step(cfg, model, train_batch(), VALID, logits_fn=table_logits) for _ in range(7)]
    assert stepped == [False, False, True, False, False, True, False]
    assert int(model.kd_gate.updates) == 2 and int(model.kd_gate.calls) == 7
    other = Table()
    other.kd_gate = make_gate(LossConfig(name="hybrid"), d_model=4)  # the scalar gate: never a held-out step
    assert not heldout_gate_step(cfg, other, train_batch(), VALID, logits_fn=table_logits)


def test_gate_settings_are_training_fields():
    base = LossConfig(name="hybrid").training_fields()
    assert base == {"name": "hybrid", "temperature": 1.0, "tail": "renormalize", "weighting": "none",
                    "label_smoothing": 0.0, "gate": "scalar"}  # unchanged for the old gates
    assert LossConfig(name="hybrid", gate="fixed", g=0.2).training_fields() == base | {"gate": "fixed", "g": 0.2}
    assert LossConfig(name="hybrid", gate="uncertainty", gate_lr_scale=5).training_fields() == (
        base | {"gate": "uncertainty", "gate_lr_scale": 5.0})
    assert LossConfig(name="hybrid", gate="heldout", gate_lr=0.3, gate_every=7).training_fields() == (
        base | {"gate": "heldout", "gate_lr": 0.3, "gate_every": 7})
    assert "g" not in LossConfig(name="token", g=0.2).training_fields()
    with pytest.raises(pydantic.ValidationError):
        LossConfig(name="hybrid", gate="learned")


# --- resume: the heldout gate's state (w, its counters) lives in buffers, the uncertainty gate's scales in their own
# optimiser group: a resumed run continues exactly.

def _marian_batches(seed: int, n: int, vocab: int, pad: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        src = [torch.randint(0, pad - 1, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(3)]
        tgt = [torch.randint(0, pad - 1, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(3)]
        batch = seq2seq_batch(src, tgt, pad_id=pad)
        teacher = (2 * torch.randn(*batch["labels"].shape, vocab - 1, generator=g)).log_softmax(-1)
        top = teacher.topk(3, dim=-1)
        batch |= {"topk_ids": top.indices, "topk_logprobs": top.values, "score": torch.zeros(3),
                  "tail_logprob": teacher.scatter(-1, top.indices, -math.inf).logsumexp(-1),
                  "weight": 1.0, "global_tokens": int((batch["labels"] != IGNORE).sum())}
        out.append(batch)
    return out


def _fit(run_dir, max_steps: int, cfg: LossConfig):
    from trainers.loop import OptimConfig, fit
    from trainers.models import ModelSize, build_marian

    vocab, pad = 20, 19
    torch.manual_seed(0)
    model = build_marian(ModelSize(d_model=16, encoder_layers=1, decoder_layers=1, heads=2, ffn_dim=32, dropout=0.2),
                         vocab_size=vocab, pad_id=pad, eos_id=0)
    model.kd_gate = make_gate(cfg, d_model=16)
    train, valid = _marian_batches(1, 5, vocab, pad), _marian_batches(2, 2, vocab, pad)

    def loss_fn(model, batch):
        heldout_gate_step(cfg, model, batch, valid, logits_fn=marian_logits)
        return compute_loss(cfg, marian_logits(model, batch), batch, gate=model.kd_gate), 1

    def valid_loss_fn(model, batch):
        return F.cross_entropy(marian_logits(model, batch).flatten(0, 1), batch["labels"].flatten()), 1

    opt = OptimConfig(max_steps=max_steps, eval_every=4, checkpoint_every=4, warmup_steps=1, lr=1e-2)
    return fit(model, train_batches=lambda epoch: train, valid_batches=valid, loss_fn=loss_fn,
               valid_loss_fn=valid_loss_fn, cfg=opt, run_dir=run_dir, progress_bar=False)


@pytest.mark.parametrize("gate", ["heldout", "uncertainty"])
def test_gates_resume_exactly(tmp_path, gate):
    cfg = LossConfig(name="hybrid", gate=gate, gate_every=3, gate_lr=1.0, gate_lr_scale=20)
    _fit(tmp_path / "a", 9, cfg)
    _fit(tmp_path / "b", 4, cfg)  # stops after its step-4 checkpoint (a heldout gate stepped at 3) ...
    _fit(tmp_path / "b", 9, cfg)  # ... and continues to 9 (steps at 6 and 9) under the larger budget
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    if gate == "heldout":
        assert int(a["kd_gate.updates"]) == 3 and int(a["kd_gate.calls"]) == 9 and float(a["kd_gate.w"]) != 0
    else:  # nine steps at lr_scale × 1e-2: at the student's lr Adam could move them 0.09 at most
        assert float(a["kd_gate.s_token"]) > 0.5 and float(a["kd_gate.s_sentence"]) > 0.5
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_students_train_with_each_new_gate(ray_local, tiny_distilled, tiny_data, tiny_tokenizer, tmp_path):
    """Through train_student: every validation logs the gate; heldout (2 workers: all-reduced gradients) steps."""
    import json

    from tests.trainers.test_student import config
    from trainers.student import train_student

    gates = {"fixed": ({"g": 0.3}, 1), "uncertainty": ({}, 1), "heldout": ({"gate_every": 2, "gate_lr": 1.0}, 2)}
    for gate, (options, workers) in gates.items():
        cfg = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / gate, workers=workers)
        cfg.loss = LossConfig(name="hybrid", gate=gate, **options)
        results = train_student(cfg)
        events = [json.loads(line) for line in (tmp_path / gate / "metrics.jsonl").read_text().splitlines()]
        valid = [e for e in events if e["event"] == "valid"]
        assert [e["step"] for e in valid] == [4, 8] and results["gate"] == valid[-1]["gate"]
        if gate == "fixed":
            assert [e["gate"] for e in valid] == [0.3, 0.3]
        elif gate == "uncertainty":
            assert all(e["gate"] == pytest.approx(1 / (1 + (e["sigma_token"] / e["sigma_sentence"]) ** 2))
                       for e in valid)
            assert valid[-1]["gate"] != 0.5 and 0 < valid[-1]["gate"] < 1  # the scales moved
        else:
            assert [e["gate_updates"] for e in valid] == [2, 4]
            assert valid[-1]["gate"] != 0.5 and all(-1 <= e["gate_cos"] <= 1 for e in valid)
            saved = load_file(tmp_path / gate / "checkpoint" / "model.safetensors")
            assert 1 / (1 + math.exp(-float(saved["kd_gate.w"]))) == pytest.approx(valid[-1]["gate"])
