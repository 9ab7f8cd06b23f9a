"""Online KD and the on-policy baseline: the teacher runs in torch beside the student (trainers.online).

Checked against independent computations: the online modules move the teacher toward a fixed student (the
divergence falls) while the anchor holds its NLL and its base weights stay bit-identical; on-policy targets are
the student's own samples (a student forced onto one token yields only that token; a flat student yields many,
so it is sampling, not greedy search); the online KL is KL computed by ``torch.distributions``.
"""

import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import InputError
from trainers.batching import IGNORE, seq2seq_batch
from trainers.losses import LossConfig, compute_loss, marian_logits, nll
from trainers.models import ModelSize, build_marian
from trainers.online import InverseCdfSampler, OnlineTeacher, anchor_loss, sample_targets, takes_student_data
from trainers.student import StudentConfig

SMALL = ModelSize(d_model=32, encoder_layers=1, decoder_layers=1, heads=2, ffn_dim=64, dropout=0.0)


def _batch(tiny_data, tok, rows=16):
    test = pq.read_table(tiny_data / "test.parquet").slice(0, rows)
    return seq2seq_batch(tok.encode_source(test["source"].to_pylist()),
                         tok.encode_target(test["target"].to_pylist()), pad_id=tok.pad_id)


def _student(tok, seed=0):
    torch.manual_seed(seed)
    return build_marian(SMALL, vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id)


def _kl(teacher_logits, student_logits, labels):
    """Mean over target tokens of KL(p_T ‖ p_S), by torch.distributions."""
    p = torch.distributions.Categorical(logits=teacher_logits.double())
    q = torch.distributions.Categorical(logits=student_logits.double())
    kl = torch.distributions.kl_divergence(p, q)
    return kl[labels != IGNORE].mean()


def test_online_kl_is_forward_kl_over_the_full_vocabulary(tiny_data, tiny_tokenizer, tiny_teacher):
    tok, batch = tiny_tokenizer, _batch(tiny_data, tiny_tokenizer)
    teacher = OnlineTeacher(tiny_teacher["hf"], LossConfig(name="on_policy"), tokenizer=tok, device=torch.device("cpu"))
    student = _student(tok)
    t_logits, s_logits = teacher.logits(batch), marian_logits(student, batch)
    got = compute_loss(LossConfig(name="okd"), s_logits, batch | {"teacher_logits": t_logits})
    torch.testing.assert_close(got.double(), _kl(t_logits, s_logits, batch["labels"]), rtol=1e-5, atol=1e-6)
    assert not t_logits.requires_grad  # on_policy: a frozen teacher, no modules


def _reference_nll(hf_dir, batch, pad_id) -> float:
    """Token-mean NLL of the plain Hugging Face teacher on ``batch``'s labels (``<pad>`` never predicted)."""
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits.double()
    logits[..., pad_id] = -torch.inf
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                   ignore_index=IGNORE))


def test_teacher_valid_loss_is_the_teachers_nll_over_all_batches(tiny_data, tiny_tokenizer, tiny_teacher):
    tok, batch = tiny_tokenizer, _batch(tiny_data, tiny_tokenizer)
    teacher = OnlineTeacher(tiny_teacher["hf"], LossConfig(name="okd", lora_rank=2), tokenizer=tok,
                            device=torch.device("cpu"))
    halves = [{k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}]  # a token mean, not
    got = teacher.valid_loss(halves)  # a mean of batch means (the halves hold different token counts)
    assert got == pytest.approx(_reference_nll(tiny_teacher["hf"], batch, tok.pad_id), rel=1e-5)


def test_okd_modules_move_the_teacher_toward_the_student_and_leave_its_weights_alone(
        tiny_data, tiny_tokenizer, tiny_teacher):
    tok, batch = tiny_tokenizer, _batch(tiny_data, tiny_tokenizer)
    original = load_file(tiny_teacher["hf"] / "model.safetensors")
    student = _student(tok)
    student.requires_grad_(False)  # fixed: only the modules can close the gap

    def run(anchor, steps=40):
        cfg = LossConfig(name="okd", anchor=anchor, lora_rank=4)
        teacher = OnlineTeacher(tiny_teacher["hf"], cfg, tokenizer=tok, device=torch.device("cpu"))
        assert teacher.trainable and all("lora_" in name for name in teacher.trainable)
        s_logits = marian_logits(student, batch)
        opt = torch.optim.Adam(teacher.trainable.values(), lr=1e-2)
        before = teacher.logits(batch).detach()
        for step in range(steps):
            t_logits = teacher.logits(batch)
            total = compute_loss(cfg, s_logits, batch | {"teacher_logits": t_logits}, reduction="sum")
            total = total + cfg.anchor * anchor_loss(t_logits, batch["labels"])
            opt.zero_grad()
            total.backward()
            if step == 0:  # LoRA's B starts at zero: B gets the first gradient, and no base weight gets one
                assert any(p.grad is not None and p.grad.abs().sum() > 0
                           for name, p in teacher.trainable.items() if "lora_B" in name)
                assert all(p.grad is None for p in teacher.model.parameters() if not p.requires_grad)
            opt.step()
        after = teacher.logits(batch).detach()
        base = teacher.base_state()
        for key, value in original.items():  # bit-identical frozen weights (the tied lm_head is saved once)
            assert torch.equal(base[key], value), key
        return (_kl(before, s_logits, batch["labels"]), _kl(after, s_logits, batch["labels"]),
                nll(before, batch["labels"]), nll(after, batch["labels"]))

    kl0, kl_free, nll0, nll_free = run(anchor=0.0)
    _, kl_anchored, _, nll_anchored = run(anchor=5.0)
    # Measured on the fixture teacher (rank-4 q/v modules, 40 Adam steps): KL 1.61 → 1.05 free (NLL 5.16 → 9.27),
    # → 1.40 anchored (NLL 5.09).
    assert kl_free < 0.8 * kl0  # the modules can pull the teacher toward the student ...
    assert nll_free > nll0 + 0.5  # ... at the cost of its translations, when nothing holds it
    assert kl_anchored < 0.95 * kl0  # with the anchor it still moves toward the student ...
    assert nll_anchored < nll_free - 0.5 and nll_anchored < nll0 + 0.5  # ... and stays a translator


def test_on_policy_targets_are_samples_of_the_student(tiny_data, tiny_tokenizer):
    tok, batch = tiny_tokenizer, _batch(tiny_data, tiny_tokenizer, rows=8)
    forced = _student(tok)
    word = tok.encode_target(["the"])[0][0]
    with torch.no_grad():
        forced.final_logits_bias[0, word] = 50.0  # this student says "the" and nothing else
        forced.final_logits_bias[0, tok.pad_id] = 60.0  # and would say <pad>, were it not suppressed
    out = sample_targets(forced, batch, pad_id=tok.pad_id, eos_id=tok.eos_id, max_new_tokens=12)
    assert out["labels"].shape == (8, 12) and bool((out["labels"][:, :-1] == word).all())
    assert bool((out["labels"][:, -1] == tok.eos_id).all())  # forced at the length limit (forced_eos_token_id)
    assert torch.equal(out["decoder_input_ids"][:, 0], torch.full((8,), tok.pad_id))  # starts from <pad>
    assert torch.equal(out["decoder_input_ids"][:, 1:], out["labels"][:, :-1])

    flat = _student(tok)
    with torch.no_grad():
        for p in flat.parameters():
            p.zero_()  # every token equally likely: greedy search would repeat one token, sampling does not
    torch.manual_seed(1)
    labels = sample_targets(flat, batch, pad_id=tok.pad_id, eos_id=tok.eos_id, max_new_tokens=12)["labels"]
    kept = labels[labels != IGNORE]
    assert kept.unique().numel() > 30 and not bool((kept == tok.pad_id).any())
    # After the first </s> a row is padding: ignored labels, masked decoder positions.
    for row, mask in zip(labels, labels != IGNORE, strict=True):
        eos = (row == tok.eos_id).nonzero().flatten()
        if len(eos):
            assert bool(mask[: eos[0] + 1].all()) and not bool(mask[eos[0] + 1:].any())


def test_the_sampler_draws_from_the_softmax_and_never_a_suppressed_token():
    # A hand-built distribution over 6 ids (id 3 suppressed: −inf, id 5 has mass 0.01); 40,000 draws.
    probs = torch.tensor([0.45, 0.25, 0.19, 0.0, 0.10, 0.01])
    scores = probs.log().expand(40_000, -1).clone() + 7.0  # softmax ignores a shift
    torch.manual_seed(0)
    out = InverseCdfSampler()(torch.zeros(40_000, 1, dtype=torch.long), scores)
    picked = out.argmax(-1)
    assert bool((out.max(-1).values == 0).all()) and bool((torch.isinf(out).sum(-1) == 5).all())  # one id left
    freq = torch.bincount(picked, minlength=6).double() / 40_000
    assert freq[3] == 0
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)  # binomial sd ≤ 0.0025


def test_student_data_share_is_a_function_of_the_batch(tiny_data, tiny_tokenizer):
    batches = [_batch(tiny_data, tiny_tokenizer, rows=n) for n in range(1, 41)]
    taken = [takes_student_data(b, 0.5) for b in batches]
    assert taken == [takes_student_data(b, 0.5) for b in batches]  # the same decision every time
    assert 10 <= sum(taken) <= 30
    assert not any(takes_student_data(b, 0.0) for b in batches) and all(takes_student_data(b, 1.0) for b in batches)


def test_online_losses_are_configured_or_refused(tiny_data, tiny_tokenizer, tiny_teacher, tmp_path):
    common = {"dataset": {"store": str(tmp_path), "name": "tf"}, "valid": tiny_data / "valid.parquet",
              "tokenizer": tiny_tokenizer.path, "out": tmp_path / "s"}
    with pytest.raises(ValueError, match="give teacher_hf"):
        StudentConfig(**common, loss=LossConfig(name="okd"))
    with pytest.raises(ValueError, match="read by the online losses"):
        StudentConfig(**common, loss=LossConfig(name="token"), teacher_hf=tiny_teacher["hf"])
    with pytest.raises(ValueError, match="one worker"):
        StudentConfig(**common, loss=LossConfig(name="okd"), teacher_hf=tiny_teacher["hf"], workers=2)
    with pytest.raises(InputError, match="not a Hugging Face checkpoint"):
        OnlineTeacher(tiny_teacher["ct2_int8"].parent / "nowhere", LossConfig(name="okd"), tokenizer=tiny_tokenizer,
                      device=torch.device("cpu"))
    with pytest.raises(InputError, match="matches lora_targets"):
        OnlineTeacher(tiny_teacher["hf"], LossConfig(name="okd", lora_targets=["no_such_proj"]),
                      tokenizer=tiny_tokenizer, device=torch.device("cpu"))
    # The module options are training settings: they change the fingerprint (a resume with others is refused).
    assert LossConfig(name="okd", lora_rank=4).training_fields() != LossConfig(name="okd").training_fields()
    assert "lora_rank" not in LossConfig(name="token", lora_rank=4).training_fields()


@pytest.mark.slow
def test_students_train_online_and_resume_exactly(ray_local, tiny_distilled, tiny_data, tiny_tokenizer, tiny_teacher,
                                                   tmp_path):
    """Through train_student: okd checkpoints its modules with the student; an on_policy run (every batch
    sampled) stopped at step 4 and resumed ends bit-identical to one that ran straight to 8 (the sampling RNG
    is restored with the checkpoint)."""
    from tests.trainers.test_student import config
    from trainers.student import train_student

    def run(out, loss, steps):
        cfg = config(tiny_distilled, tiny_data, tiny_tokenizer, out, max_steps=steps)
        cfg.loss, cfg.teacher_hf = loss, tiny_teacher["hf"]
        return train_student(cfg)

    okd = run(tmp_path / "okd", LossConfig(name="okd", lora_rank=2), 8)
    assert okd["loss"] == "okd" and okd["steps"] == 8 and okd["train_minutes"] > 0
    saved = load_file(tmp_path / "okd" / "checkpoint" / "model.safetensors")
    modules = {k: v for k, v in saved.items() if k.startswith("online_modules.")}
    assert modules and any("lora_B" in k and v.abs().sum() > 0 for k, v in modules.items())  # trained, saved
    assert not any(k.startswith("online_modules.") and "lora_" not in k for k in saved)  # no teacher weights
    # The teacher's valid NLL: the frozen teacher's before training (independent forward), then where the
    # modules moved it, at each validation.
    events = [json.loads(line) for line in (tmp_path / "okd" / "metrics.jsonl").read_text().splitlines()]
    start = next(e["valid_loss"] for e in events if e["event"] == "online_teacher")
    valid = pq.read_table(tiny_data / "valid.parquet")
    refs = seq2seq_batch(tiny_tokenizer.encode_source(valid["source"].to_pylist()),
                         tiny_tokenizer.encode_target(valid["target"].to_pylist()), pad_id=tiny_tokenizer.pad_id)
    assert start == pytest.approx(_reference_nll(tiny_teacher["hf"], refs, tiny_tokenizer.pad_id), rel=1e-4)
    moved = [e["teacher_valid_loss"] for e in events if e["event"] == "valid"]
    assert len(moved) == 2 and all(m != start for m in moved)

    policy = LossConfig(name="on_policy", student_data=1.0)
    run(tmp_path / "a", policy, 8)
    run(tmp_path / "b", policy, 4)
    run(tmp_path / "b", policy, 8)
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    events = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "valid"] == [4, 8]
