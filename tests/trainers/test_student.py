"""Students on Ray Train: N workers follow 1 worker, resume is exact, and KD students actually learn."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.checkpoint import CheckpointError
from trainers.loop import OptimConfig
from trainers.losses import LossConfig
from trainers.models import ModelSize
from trainers.student import DatasetRef, StudentConfig, train_student

pytestmark = pytest.mark.slow
# No dropout: 1 and 2 workers draw different dropout masks, which would make the curves differ by design.
SMALL = ModelSize(d_model=32, encoder_layers=1, decoder_layers=1, heads=2, ffn_dim=64, dropout=0.0)


def config(tiny_distilled, tiny_data, tiny_tokenizer, out, *, dataset="tf", loss="token", workers=1, size=SMALL,
           **optim):
    return StudentConfig(
        dataset=DatasetRef(store=tiny_distilled["store"], name=dataset), valid=tiny_data / "valid.parquet",
        tokenizer=tiny_tokenizer.path, out=out, size=size, loss=LossConfig(name=loss), workers=workers,
        optim=OptimConfig(**{"max_steps": 8, "eval_every": 4, "checkpoint_every": 4, "warmup_steps": 2,
                             "max_tokens": 1500, "lr": 3e-3} | optim))


def valid_curve(out) -> list[float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["valid_loss"] for e in events if e["event"] == "valid"]


def top1_agreement(student_dir, teacher_dir, tiny_data, tokenizer) -> float:
    """Fraction of reference positions of the test split where student and teacher agree on the argmax."""
    import pyarrow.parquet as pq
    from transformers import MarianMTModel

    from trainers.batching import IGNORE, seq2seq_batch
    from trainers.losses import marian_logits

    test = pq.read_table(tiny_data / "test.parquet")
    batch = seq2seq_batch(tokenizer.encode_source(test["source"].to_pylist()),
                          tokenizer.encode_target(test["target"].to_pylist()), pad_id=tokenizer.pad_id)
    mask = batch["labels"] != IGNORE
    with torch.no_grad():
        s = marian_logits(MarianMTModel.from_pretrained(student_dir).eval(), batch).argmax(-1)
        t = marian_logits(MarianMTModel.from_pretrained(teacher_dir).eval(), batch).argmax(-1)
    return float((s == t)[mask].float().mean())


def mean_nll(model_dir, sources: list[str], targets: list[str], tokenizer) -> float:
    """Per-token NLL of ``targets`` given ``sources`` under a model (a plain torch forward + cross-entropy)."""
    from transformers import MarianMTModel

    from trainers.batching import IGNORE, seq2seq_batch
    from trainers.losses import marian_logits

    batch = seq2seq_batch(tokenizer.encode_source(sources), tokenizer.encode_target(targets), pad_id=tokenizer.pad_id)
    with torch.no_grad():
        logits = marian_logits(MarianMTModel.from_pretrained(model_dir).eval(), batch)
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                                   ignore_index=IGNORE))


def test_two_workers_follow_one_worker(ray_local, tiny_distilled, tiny_data, tiny_tokenizer, tmp_path):
    one = train_student(config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "one"))
    exported = (tmp_path / "one" / "ct2" / "model.bin").stat().st_mtime_ns
    assert train_student(config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "one")) == one  # done: reused
    assert (tmp_path / "one" / "ct2" / "model.bin").stat().st_mtime_ns == exported  # not exported again
    # Another loss (or any setting that changes training) must not resume, nor relabel, the finished run.
    other = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "one")
    other.loss = LossConfig(name="token", temperature=2.0)
    with pytest.raises(CheckpointError, match=r"(?s)loss\.temperature: 1\.0 → 2\.0.*--restart"):
        train_student(other)
    assert json.loads((tmp_path / "one" / "results.json").read_text()) == one and one["config_hash"]
    two = train_student(config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "two", workers=2))
    assert one["steps"] == two["steps"] == 8
    curve1, curve2 = valid_curve(tmp_path / "one"), valid_curve(tmp_path / "two")
    assert len(curve1) == len(curve2) == 2 and curve1[-1] < curve1[0]
    assert curve2 == pytest.approx(curve1, rel=1e-4)
    w1 = load_file(tmp_path / "one" / "best" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "best" / "model.safetensors")
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-3, atol=1e-4, msg=key)


def test_resumed_run_continues_exactly(ray_local, tiny_distilled, tiny_data, tiny_tokenizer, tmp_path):
    # Two workers with dropout: each draws its own masks, so each must get its own RNG state back on resume.
    kw = {"loss": "hybrid", "workers": 2, "size": SMALL.model_copy(update={"dropout": 0.3})}
    # The straight run also measures valid BLEU, which must not change its training (greedy, dropout off).
    straight = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "a", **kw)
    straight.bleu_every = 4
    train_student(straight)
    events = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "valid_bleu" in e] == [4, 8]
    # A run stopped after its step-4 checkpoint, as a crash right after it would leave it ...
    cut = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "b", max_steps=4, **kw)
    train_student(cut)
    state_file = tmp_path / "b" / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # the workers' streams differ
    state["progress"]["finished"] = ""
    torch.save(state, state_file)
    # ... then resumed with the original settings.
    train_student(config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "b", **kw))
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert any(k.startswith("kd_gate") for k in a)  # the gate is checkpointed with the student
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert valid_curve(tmp_path / "b")[-1] == valid_curve(tmp_path / "a")[-1]


def test_two_workers_select_by_valid_bleu(ray_local, tiny_distilled, tiny_data, tiny_tokenizer, tmp_path):
    # Rank 0 decodes; the other worker must receive the same BLEU (or the workers' selection and early-stopping
    # decisions would part, and the next collective would hang).
    cfg = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "s", dataset="beam", loss="sentence",
                 workers=2, max_steps=12, select_by="valid_bleu")
    results = train_student(cfg)
    events = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    bleu = {e["step"]: e["valid_bleu"] for e in events if e["event"] == "valid"}
    assert list(bleu) == [4, 8, 12]  # measured at every validation, not only every `bleu_every` steps
    first_best = next(step for step, value in bleu.items() if value == max(bleu.values()))
    assert results["selected_by"] == "valid_bleu"
    assert results["selected_step"] == first_best and results["selected_valid_bleu"] == max(bleu.values())
    assert results["last_valid_bleu"] == bleu[12]


@pytest.mark.parametrize("loss, dataset", [("token", "tf"), ("sentence", "beam")])
def test_students_learn_toward_the_teacher(loss, dataset, ray_local, tiny_distilled, tiny_data, tiny_tokenizer,
                                           tiny_teacher, tmp_path):
    cfg = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / loss, dataset=dataset, loss=loss,
                 max_steps=60, eval_every=20, lr=5e-3, max_tokens=3000, log_every=5)
    cfg.size = "tiny"
    cfg.test = tiny_data / "test.parquet"
    results = train_student(cfg)
    events = [json.loads(line) for line in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in events if e["event"] == "train"]
    assert train_losses[-1] < 0.6 * train_losses[0]
    untrained_cfg = cfg.model_copy(update={"out": tmp_path / "untrained", "optim": cfg.optim.model_copy(
        update={"max_steps": 1, "lr": 1e-9, "warmup_steps": 0})})
    untrained_results = train_student(untrained_cfg)
    import pyarrow.parquet as pq

    test = pq.read_table(tiny_data / "test.parquet")
    sources, refs = test["source"].to_pylist(), test["target"].to_pylist()
    if loss == "token":
        # The student moves toward the teacher's distribution: on held-out references, how often its next-token
        # argmax equals the teacher's (torch forwards of both), against an untrained student of the same shape.
        trained = top1_agreement(tmp_path / loss / "best", tiny_teacher["hf"], tiny_data, tiny_tokenizer)
        untrained = top1_agreement(tmp_path / "untrained" / "best", tiny_teacher["hf"], tiny_data, tiny_tokenizer)
        assert trained > untrained + 0.2, (trained, untrained)
    else:
        # Sentence KD learns the teacher's translations: on held-out sources, the student finds the teacher's beam-4
        # translations far likelier than an untrained student does, and than a student of the same budget trained on
        # the references does (measured: 0.30 vs 1.94 nats/token). Argmax agreement along them says little: a 60-step
        # teacher's output is repetitive, so any model predicts the repeated token.
        from pipeline.evaluate import translate

        nll_cfg = cfg.model_copy(update={"out": tmp_path / "nll", "loss": LossConfig(name="nll"),
                                         "dataset": cfg.dataset.model_copy(update={"name": "tf"}), "test": None})
        train_student(nll_cfg)
        hyps = translate(tiny_teacher["ct2_int8"], tiny_tokenizer, sources, beam_size=4, max_decoding_length=48)
        on_hyps = mean_nll(tmp_path / loss / "best", sources, hyps, tiny_tokenizer)
        untrained = mean_nll(tmp_path / "untrained" / "best", sources, hyps, tiny_tokenizer)
        reference_trained = mean_nll(tmp_path / "nll" / "best", sources, hyps, tiny_tokenizer)
        assert on_hyps < 0.5 * untrained and on_hyps < 0.5 * reference_trained, (on_hyps, untrained, reference_trained)
    assert "nrefs:1" in results["bleu_signature"]
    # The reported BLEU is the test hypotheses' corpus BLEU (sacrebleu directly), above the untrained student's.
    import sacrebleu

    hyps = (tmp_path / loss / "test.hyp.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs) and len(set(hyps)) > 1  # one line per sentence, not one constant output
    assert results["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=0.01)
    assert results["bleu"] > untrained_results["bleu"], (results["bleu"], untrained_results["bleu"])


def test_greedy_translate_matches_ctranslate2(tiny_teacher, tiny_data, tiny_tokenizer):
    """The in-training BLEU decoder (torch ``generate``) against CT2's greedy search on the same weights."""
    import pyarrow.parquet as pq
    from transformers import MarianMTModel

    from pipeline.evaluate import translate
    from trainers.student import greedy_translate

    sources = pq.read_table(tiny_data / "valid.parquet")["source"].to_pylist()
    model = MarianMTModel.from_pretrained(tiny_teacher["hf"]).train()  # as it is mid-training
    ours = greedy_translate(model, tiny_tokenizer, sources, device=torch.device("cpu"), batch_size=7)
    theirs = translate(tiny_teacher["ct2_f32"], tiny_tokenizer, sources, beam_size=1, compute_type="float32")
    assert len(set(ours)) > 1  # not a degenerate constant output
    # Both cap output length per batch (2 × longest source + 10) and batch differently, so a sentence that
    # hits the cap may be cut at another length: greedy search must agree on the common prefix.
    agree = [a.startswith(b) or b.startswith(a) for a, b in zip(ours, theirs, strict=True)]
    assert sum(agree) >= 0.95 * len(sources)
    assert model.training  # dropout back on for the next training step


def test_local_paths_are_resolved_for_the_workers(tmp_path, monkeypatch):
    """Ray Train workers start in their own directory: relative paths must reach them resolved."""
    from trainers.student import _absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = StudentConfig(dataset=DatasetRef(store="work/datasets", name="d"), valid="data/valid.parquet",
                        tokenizer="tok", out="runs/s")
    resolved = _absolute_paths(cfg)
    assert resolved.dataset.store == str(tmp_path / "work" / "datasets")
    assert resolved.valid == tmp_path / "data" / "valid.parquet" and resolved.out == tmp_path / "runs" / "s"
    assert resolved.tokenizer == tmp_path / "tok" and resolved.test is None
    s3 = cfg.model_copy(update={"dataset": DatasetRef(store="s3://bucket/prefix", name="d")})
    assert _absolute_paths(s3).dataset.store == "s3://bucket/prefix"


def test_rows_longer_than_max_positions_are_skipped_counted_and_reported(ray_local, tiny_distilled, tiny_data,
                                                                        tiny_tokenizer, tmp_path):
    """A student with short positions trains on the rows that fit, and says how many it skipped."""
    import pyarrow.dataset as pads

    limit = 40
    table = pads.dataset(f"{tiny_distilled['store']}/tf", format="parquet").to_table()
    too_long = sum(max(len(s), len(h)) > limit for s, h in zip(table["source_ids"].to_pylist(),
                                                                table["hyp_ids"].to_pylist(), strict=True))
    assert 0 < too_long < table.num_rows
    cfg = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "short", max_steps=4, select_by="valid_bleu")
    cfg.size = SMALL.model_copy(update={"max_positions": limit})
    results = train_student(cfg)
    assert results["steps"] == 4
    assert results["skipped_too_long"] == too_long and results["train_rows"] == table.num_rows - too_long


def test_nll_student_trains_from_a_prepared_corpus(ray_local, tiny_distilled, tiny_data, tiny_tokenizer, tmp_path):
    """`distillery train` with `corpus:` (no distilled dataset) and `--max-steps`: the same training as nll on the
    teacher-forcing dataset of the same split, whose rows are the same references."""
    import yaml
    from typer.testing import CliRunner

    from distillery.cli import app

    on_dataset = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "dataset", loss="nll", max_steps=4)
    train_student(on_dataset)
    data = json.loads(on_dataset.model_dump_json(exclude={"dataset"})) | {
        "corpus": str(tiny_data / "train.parquet"), "out": str(tmp_path / "corpus")}
    data["optim"]["max_steps"] = 100  # the command line's --max-steps wins
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "student.yaml"), "--max-steps", "4"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "corpus" / "results.json").read_text())
    assert results["steps"] == 4 and results["loss"] == "nll" and results["skipped_too_long"] == 0
    assert valid_curve(tmp_path / "corpus") == pytest.approx(valid_curve(tmp_path / "dataset"), rel=1e-6)


def test_corpus_is_for_nll_only_and_excludes_a_dataset(tiny_data, tiny_tokenizer, tmp_path):
    from pydantic import ValidationError

    common = {"valid": tiny_data / "valid.parquet", "tokenizer": tiny_tokenizer.path, "out": tmp_path}
    with pytest.raises(ValidationError, match="trains loss nll, not token"):
        StudentConfig(corpus=tiny_data / "train.parquet", **common)
    with pytest.raises(ValidationError, match="either dataset"):
        StudentConfig(corpus=tiny_data / "train.parquet", dataset=DatasetRef(store="s", name="d"),
                      loss=LossConfig(name="nll"), **common)
    with pytest.raises(ValidationError, match="either dataset"):
        StudentConfig(**common)


def test_shuffle_window_is_part_of_the_fingerprint_only_when_it_splits_the_dataset(tiny_distilled, tiny_data,
                                                                                    tiny_tokenizer, tmp_path):
    """A window at least the dataset's size leaves the plan the global shuffle (a resumed run may change it); one
    that splits the dataset changes the batches, so a checkpoint of the other window must not be resumed."""
    from trainers.student import training_fingerprint, training_rows

    rows = tiny_distilled["tf"].counts.rows

    def fp(window):
        cfg = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "s").model_copy(
            update={"shuffle_window": window})
        return training_fingerprint(cfg, training_rows(cfg, tiny_tokenizer, max_rank=1), tiny_tokenizer)

    assert fp(rows) == fp(10 * rows) == fp(50_000)
    assert fp(rows // 2) != fp(rows) and fp(rows // 2) != fp(rows // 3)


def test_a_run_kept_in_s3_storage_resumes_from_an_empty_out(ray_local, s3_endpoint, tiny_distilled, tiny_data,
                                                            tiny_tokenizer, tmp_path):
    """With ``storage`` on S3 nothing the workers write needs a shared disk: a run stopped after its step-4 report,
    started again from an empty ``out`` (another machine), resumes from the storage and ends bit-identical to a
    straight run kept in ``out``. The storage runs go through the CLI, whose fresh Ray has the S3 credentials."""
    import subprocess
    import sys

    from pipeline.storage import Store
    from tests.conftest import make_bucket

    kw = {"size": SMALL.model_copy(update={"dropout": 0.3})}  # dropout: the RNG state must come back too
    storage = {"storage": f"s3://{make_bucket(s3_endpoint)}/runs", "storage_s3_endpoint": s3_endpoint}
    train_student(config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "a", **kw))

    def train_cli(out, **optim):
        cfg = config(tiny_distilled, tiny_data, tiny_tokenizer, out, **kw, **optim).model_copy(update=storage)
        path = tmp_path / f"{out.name}.json"
        path.write_text(cfg.model_dump_json())
        done = subprocess.run([sys.executable, "-m", "distillery.cli", "train", str(path)], capture_output=True,
                              text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads((out / "results.json").read_text())

    assert train_cli(tmp_path / "b", max_steps=4)["steps"] == 4
    reports = Store.from_uri(storage["storage"], endpoint_override=s3_endpoint).list("")
    assert any(e.path.endswith("checkpoint/model.safetensors") for e in reports)  # the run is in the bucket
    assert train_cli(tmp_path / "c")["steps"] == 8
    events = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    # The step-4 validation came from the storage and was not redone: the run continued, it did not start over.
    assert [e["step"] for e in events if e["event"] == "valid"] == [4, 8]
    assert [e["event"] for e in events].count("data") == 2  # two starts: b's, then c's from b's report
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    c = load_file(tmp_path / "c" / "checkpoint" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=0, atol=0, msg=key)
    assert (tmp_path / "c" / "best" / "config.json").is_file() and (tmp_path / "c" / "ct2" / "model.bin").is_file()
    # c's out now holds the run's checkpoint: a storage without a report of it is refused, not silently restarted.
    moved = config(tiny_distilled, tiny_data, tiny_tokenizer, tmp_path / "c", **kw).model_copy(
        update={"storage": str(tmp_path / "empty-storage")})
    with pytest.raises(CheckpointError, match="has no report of it"):
        train_student(moved)
    assert not (tmp_path / "empty-storage").exists()
