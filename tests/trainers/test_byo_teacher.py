"""Bring your own teacher, end to end: an OPUS-MT-style Marian teacher (separate source/target SentencePiece models,
a shared vocab.json; tests/trainers/conftest.py builds it offline) converted by CTranslate2's converter, checked,
distilled on local Ray, a student trained from its shards, and the student evaluated by `distillery eval`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from distillery.cli import app
from pipeline.ct2 import model_vocabulary
from pipeline.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")]


def test_opus_style_teacher_distills_into_a_student_that_evaluates(opus_teacher, ray_local, tiny_data, tmp_path):
    from transformers import MarianMTModel, MarianTokenizer

    from pipeline.run import plan_job, run_job
    from pipeline.spec import JobSpec
    from trainers.loop import OptimConfig
    from trainers.losses import LossConfig
    from trainers.models import ModelSize
    from trainers.student import DatasetRef, StudentConfig, train_student

    teacher, vocab = opus_teacher["ct2_int8"], opus_teacher["vocab"]
    marian = MarianTokenizer.from_pretrained(str(opus_teacher["tokenizer"]))  # the reference encoder throughout

    # Teacher: a self-contained CTranslate2 directory; the converter dropped <pad>, the last entry of vocab.json.
    assert {"source.spm", "target.spm", "vocab.json"} <= {p.name for p in teacher.iterdir()}
    assert model_vocabulary(teacher) == vocab[:-1]
    code, out = invoke("teacher", "check", teacher, "--hf", opus_teacher["hf"])
    assert code == 0 and "pass:" in out, out

    # Distill: teacher forcing with top-8 over a slice of the train split.
    train = pq.read_table(tiny_data / "train.parquet").slice(0, 160)
    pq.write_table(train, tmp_path / "corpus.parquet")
    store = tmp_path / "datasets"
    spec = JobSpec.model_validate({
        "corpus": {"path": str(tmp_path / "corpus.parquet"), "id_column": "id"}, "teacher": {"model": str(teacher)},
        "decoding": {"mode": "teacher_forcing"}, "targets": {"top_k": 8},
        "output": {"store": str(store), "dataset": "byo", "shard_size": 80},
        "resources": {"workers": 1, "threads_per_worker": 2}})
    manifest = run_job(spec, plan=plan_job(spec))
    assert manifest.counts.examples == 160 and len(manifest.shards) == 2
    assert manifest.tokenizer.vocab_hash == Tokenizer.load(teacher).vocab_hash
    rows = pq.read_table(store / "byo").sort_by("index").to_pylist()
    expected_ids = marian(text_target=[r["target"] for r in rows])["input_ids"]  # target SentencePiece model
    assert [r["target_ids"] for r in rows] == expected_ids
    assert [r["source_ids"] for r in rows] == marian([r["source"] for r in rows])["input_ids"]
    topk = np.concatenate([np.asarray(r["topk_ids"]) for r in rows])
    assert topk.shape[1] == 8 and topk.min() >= 0 and topk.max() < len(vocab) - 1  # Marian ids, never <pad>
    # The stored log-probs are the teacher's: the Hugging Face model's forward at the stored ids, within int8 error.
    model = MarianMTModel.from_pretrained(opus_teacher["hf"]).eval()
    row = rows[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["source_ids"]]),
                       decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id, *row["target_ids"][:-1]]]))
    hf = torch.log_softmax(logits.logits[0, :, :-1].double(), -1).gather(1, torch.tensor(row["topk_ids"])).numpy()
    assert np.abs(hf - np.asarray(row["topk_logprobs"])).mean() < 0.15

    # Student: trained from those shards with the teacher's own tokenizer, exported (and checked) by train_student.
    valid = pq.read_table(tiny_data / "valid.parquet").slice(0, 40)
    pq.write_table(valid, tmp_path / "valid.parquet")
    cfg = StudentConfig(dataset=DatasetRef(store=str(store), name="byo"), valid=tmp_path / "valid.parquet",
                        tokenizer=teacher, out=tmp_path / "student", loss=LossConfig(name="token"),
                        size=ModelSize(d_model=32, encoder_layers=1, decoder_layers=1, heads=2, ffn_dim=64),
                        optim=OptimConfig(max_steps=6, eval_every=3, checkpoint_every=3, warmup_steps=2,
                                          max_tokens=1500, lr=3e-3))
    results = train_student(cfg)
    assert results["steps"] == 6 and results["train_rows"] == 160
    student = tmp_path / "student" / "ct2"
    for name in ("source.spm", "target.spm", "vocab.json"):
        assert (student / name).read_bytes() == (teacher / name).read_bytes()
    assert Tokenizer.load(student).vocab_hash == Tokenizer.load(teacher).vocab_hash
    assert model_vocabulary(student) == model_vocabulary(teacher)

    # Eval: `distillery eval` decodes with the student and its Marian tokenizer and scores with sacrebleu.
    test = pq.read_table(tiny_data / "test.parquet").slice(0, 30)
    pq.write_table(test, tmp_path / "test.parquet")
    code, out = invoke("eval", "--model", student, "--test", tmp_path / "test.parquet", "--json",
                       "--hypotheses", tmp_path / "hyps.txt")
    assert code == 0, out
    scores = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert scores["sentences"] == 30 and 0.0 <= scores["bleu"] <= 100.0 and "nrefs:1" in scores["bleu_signature"]
    assert len((tmp_path / "hyps.txt").read_text(encoding="utf-8").splitlines()) == 30


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")
