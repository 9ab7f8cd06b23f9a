"""Model selection in the training loop: best/ and early stopping follow ``optim.select_by``."""

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from trainers.loop import OptimConfig, fit
from trainers.losses import marian_logits, nll
from trainers.models import build_marian
from trainers.teacher import TeacherConfig, load_pairs, make_batches

# BLEU scripted per validation step: it peaks at step 4 while the loss keeps falling, so selecting by BLEU and
# by loss must pick different models; three worse evaluations after the peak end the run at step 10.
SCRIPTED_BLEU = {2: 1.0, 4: 5.0, 6: 3.0, 8: 2.0, 10: 4.0, 12: 9.0}


def _fit(tiny_data, tiny_tokenizer, out, on_validate=None, **optim):
    torch.manual_seed(0)
    model = build_marian("tiny", vocab_size=len(tiny_tokenizer), pad_id=tiny_tokenizer.pad_id,
                         eos_id=tiny_tokenizer.eos_id)
    src, tgt = load_pairs(tiny_data / "train.parquet", tiny_tokenizer, 64)
    vsrc, vtgt = load_pairs(tiny_data / "valid.parquet", tiny_tokenizer, 64)
    pad = tiny_tokenizer.pad_id

    def loss_fn(model, batch):
        n = int((batch["labels"] != -100).sum())
        return nll(marian_logits(model, batch), batch["labels"]), n

    cfg = OptimConfig(**{"max_steps": 12, "eval_every": 2, "checkpoint_every": 100, "warmup_steps": 2,
                         "max_tokens": 1024, "lr": 3e-3, "patience": 3} | optim)
    return fit(model, train_batches=lambda e: make_batches(src, tgt, pad_id=pad, max_tokens=1024, seed=0, epoch=e,
                                                           shuffle=True),
               valid_batches=make_batches(vsrc, vtgt, pad_id=pad, max_tokens=1024, seed=0, epoch=0, shuffle=False),
               loss_fn=loss_fn, cfg=cfg, run_dir=out, progress_bar=False, on_validate=on_validate)


def test_selection_by_bleu_keeps_the_bleu_best_model_and_stops_on_it(tiny_data, tiny_tokenizer, tmp_path):
    state = _fit(tiny_data, tiny_tokenizer, tmp_path / "bleu", select_by="valid_bleu",
                 on_validate=lambda record: record.update(valid_bleu=SCRIPTED_BLEU[record["step"]]))
    assert state.finished == "early_stopping" and state.step == 10
    assert state.best_step == 4 and state.best_bleu == 5.0
    events = [json.loads(line) for line in (tmp_path / "bleu" / "metrics.jsonl").read_text().splitlines()]
    valid = {e["step"]: e["valid_loss"] for e in events if e["event"] == "valid"}
    assert min(valid, key=valid.get) != 4  # selecting by loss would have kept another model
    assert state.best_valid == valid[4]  # the loss reported is the selected model's
    # best/ holds exactly the step-4 weights: a run of the same seed stopped at step 4 ends on them.
    _fit(tiny_data, tiny_tokenizer, tmp_path / "four", max_steps=4)
    best = load_file(tmp_path / "bleu" / "best" / "model.safetensors")
    four = load_file(tmp_path / "four" / "checkpoint" / "model.safetensors")
    for key in four:
        torch.testing.assert_close(best[key], four[key], rtol=0, atol=0, msg=key)


def test_selection_by_bleu_needs_someone_to_measure_it(tiny_data, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="valid_bleu"):
        _fit(tiny_data, tiny_tokenizer, tmp_path / "r", select_by="valid_bleu", max_steps=2)
    with pytest.raises(ValidationError, match="teacher selects its best model by valid_loss"):
        TeacherConfig(train=tiny_data / "train.parquet", valid=tiny_data / "valid.parquet",
                      tokenizer=tiny_tokenizer.path, out=tmp_path / "t", optim=OptimConfig(select_by="valid_bleu"))
