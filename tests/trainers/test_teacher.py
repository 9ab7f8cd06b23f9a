"""Teacher training: it learns, keeps the best model, and resumes exactly after an interruption."""

import json

import pytest
import torch
from safetensors.torch import load_file

from trainers.checkpoint import CheckpointError
from trainers.loop import OptimConfig
from trainers.teacher import TeacherConfig, train_teacher


def test_teacher_learns_and_keeps_best(tiny_teacher):
    run = tiny_teacher["run"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in events if e["event"] == "train"]
    valid = [e["valid_loss"] for e in events if e["event"] == "valid"]
    # from ~ln(600) = 6.4 at init (uniform) down by well over half a nat in 60 steps
    assert train_losses[0] > 6.0 and train_losses[-1] < train_losses[0] - 0.5
    assert valid[-1] < valid[0]
    finished = [e for e in events if e["event"] == "finished"]
    assert finished[-1]["reason"] == "max_steps" and finished[-1]["step"] == 60
    assert finished[-1]["best_valid"] == pytest.approx(min(valid))
    # best/ is a self-contained HF checkpoint: weights + tokenizer
    assert (run / "best" / "model.safetensors").is_file() and (run / "best" / "tokenizer.json").is_file()


def _cfg(tiny_data, tiny_tokenizer, out, **optim):
    return TeacherConfig(train=tiny_data / "train.parquet", valid=tiny_data / "valid.parquet",
                         tokenizer=tiny_tokenizer.path, out=out, size="tiny", threads=1,
                         optim=OptimConfig(**{"max_steps": 12, "eval_every": 4, "checkpoint_every": 5,
                                              "warmup_steps": 4, "max_tokens": 1024} | optim))


def test_resume_continues_exactly(tiny_data, tiny_tokenizer, tmp_path, monkeypatch):
    straight = train_teacher(_cfg(tiny_data, tiny_tokenizer, tmp_path / "a"), progress_bar=False)

    # Interrupt a second run at step 8: the last checkpoint holds step 5 (checkpoint_every=5).
    import trainers.loop as loop

    real_clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def crash_at_step_8(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(loop.torch.nn.utils, "clip_grad_norm_", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(_cfg(tiny_data, tiny_tokenizer, tmp_path / "b"), progress_bar=False)
    monkeypatch.setattr(loop.torch.nn.utils, "clip_grad_norm_", real_clip)
    resumed = train_teacher(_cfg(tiny_data, tiny_tokenizer, tmp_path / "b"), progress_bar=False)

    assert resumed.step == straight.step == 12
    assert resumed.target_tokens == straight.target_tokens
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert resumed.best_valid == straight.best_valid


def test_finished_run_is_not_retrained(tiny_data, tiny_tokenizer, tmp_path):
    cfg = _cfg(tiny_data, tiny_tokenizer, tmp_path / "r")
    first = train_teacher(cfg, progress_bar=False)
    mtime = (tmp_path / "r" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    again = train_teacher(cfg, progress_bar=False)
    assert again.step == first.step and again.finished == first.finished
    assert (tmp_path / "r" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == mtime


def test_larger_budget_continues_a_finished_run(tiny_data, tiny_tokenizer, tmp_path):
    straight = train_teacher(_cfg(tiny_data, tiny_tokenizer, tmp_path / "a"), progress_bar=False)
    short = train_teacher(_cfg(tiny_data, tiny_tokenizer, tmp_path / "b", max_steps=6), progress_bar=False)
    assert short.finished == "max_steps" and short.step == 6
    longer = train_teacher(_cfg(tiny_data, tiny_tokenizer, tmp_path / "b"), progress_bar=False)  # max_steps 12
    assert longer.step == straight.step == 12
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    for key in a:  # the extra validation at step 6 draws no random numbers: same weights, bit for bit
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _weights(run):
    return load_file(run / "checkpoint" / "model.safetensors")


def test_changed_settings_are_refused_by_name_and_restart_starts_over(tiny_data, tiny_tokenizer, tmp_path):
    run = tmp_path / "r"
    train_teacher(_cfg(tiny_data, tiny_tokenizer, run, max_steps=4), progress_bar=False)
    saved = (run / "config.json").read_text()
    changed = _cfg(tiny_data, tiny_tokenizer, run, max_steps=8, lr=2e-3)  # a larger budget alone would resume
    changed.label_smoothing = 0.2
    changed.train = tiny_data / "test.parquet"  # another corpus under another name: a content change
    with pytest.raises(CheckpointError, match=r"(?s)label_smoothing: 0\.1 → 0\.2.*optim\.lr: 0\.0007 → 0\.002"
                                              r".*train: .*--restart"):
        train_teacher(changed, progress_bar=False)
    assert (run / "config.json").read_text() == saved  # the refused run rewrote nothing

    restarted = train_teacher(changed, progress_bar=False, restart=True)
    fresh = train_teacher(changed.model_copy(update={"out": tmp_path / "fresh"}), progress_bar=False)
    assert restarted.step == fresh.step == 8
    a, b = _weights(run), _weights(tmp_path / "fresh")
    for key in a:  # trained from scratch, not from the old checkpoint
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "finished"] == [8]  # the old run's records are gone


def test_changed_settings_are_an_error_on_the_command_line(tiny_data, tiny_tokenizer, tmp_path):
    from typer.testing import CliRunner

    from distillery.cli import app

    cfg = _cfg(tiny_data, tiny_tokenizer, tmp_path / "r", max_steps=2)
    train_teacher(cfg, progress_bar=False)
    spec = tmp_path / "teacher.json"
    spec.write_text(cfg.model_copy(update={"size": "mini"}).model_dump_json())
    result = CliRunner().invoke(app, ["teacher", "train", str(spec)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "size.d_model: 64 → 128" in result.output
    assert "Traceback" not in result.output


def test_checkpoint_weights_load_strictly(tiny_data, tiny_tokenizer, tmp_path):
    from safetensors.torch import save_file

    run = tmp_path / "r"
    train_teacher(_cfg(tiny_data, tiny_tokenizer, run, max_steps=2), progress_bar=False)
    weights = _weights(run)
    weights["model.encoder.layers.0.fc1.renamed"] = weights.pop("model.encoder.layers.0.fc1.weight")
    save_file(weights, run / "checkpoint" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \['model\.encoder\.layers\.0\.fc1\.weight'\], "
                                              r"unexpected \['model\.encoder\.layers\.0\.fc1\.renamed'\]"):
        train_teacher(_cfg(tiny_data, tiny_tokenizer, run, max_steps=4), progress_bar=False)


def test_budget_fields_stay_out_of_the_fingerprint():
    base = OptimConfig(max_steps=10).trajectory_fields()
    assert OptimConfig(max_steps=20, max_minutes=5, max_epochs=3, eval_every=7, patience=9, checkpoint_every=3,
                       log_every=1).trajectory_fields() == base
    assert OptimConfig(max_steps=10, lr=1e-3).trajectory_fields() != base
    # a cosine schedule decays over the whole budget: there the budget is part of the trajectory
    assert (OptimConfig(schedule="cosine", max_steps=10).trajectory_fields()
            != OptimConfig(schedule="cosine", max_steps=20).trajectory_fields())


def test_early_stopping(tiny_data, tiny_tokenizer, tmp_path):
    # A learning rate this high diverges: validation stops improving and patience ends the run.
    cfg = _cfg(tiny_data, tiny_tokenizer, tmp_path / "e", lr=5.0, patience=2)
    cfg.optim.max_steps = 200
    state = train_teacher(cfg, progress_bar=False)
    assert state.finished == "early_stopping"
    assert state.step < 200 and state.bad_evals == 2


def test_autocast_choice():
    from trainers.loop import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None  # bf16 is emulated on most CPUs: fp32 unless asked
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16


def test_bf16_autocast_trains_close_to_fp32(tiny_data, tiny_tokenizer, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        train_teacher(_cfg(tiny_data, tiny_tokenizer, tmp_path / precision, precision=precision), progress_bar=False)
        events = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        runs[precision] = [e["valid_loss"] for e in events if e["event"] == "valid"]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16 != fp32  # autocast really ran in bf16 ...
    assert bf16 == pytest.approx(fp32, rel=0.02)  # ... and learns the same curve within bf16's precision
    assert bf16[-1] < bf16[0]



def test_tokenizer_in_a_ct2_directory_puts_only_tokenizer_files_in_best(tiny_data, tiny_teacher, tmp_path):
    """`tokenizer:` may be a CTranslate2 model directory (tokenizer beside model.bin): best/ must get the tokenizer,
    not the teacher's weights and vocabulary, or it is neither a clean checkpoint nor a loadable CT2 model."""
    from pipeline.tokenizer import Tokenizer
    from trainers.export import export_ct2

    ct2 = tiny_teacher["ct2_int8"]
    cfg = TeacherConfig(train=tiny_data / "train.parquet", valid=tiny_data / "valid.parquet", tokenizer=ct2,
                        out=tmp_path / "t", size="tiny", threads=1,
                        optim=OptimConfig(max_steps=2, eval_every=2, warmup_steps=1, max_tokens=1024))
    train_teacher(cfg, progress_bar=False)
    best = tmp_path / "t" / "best"
    assert not {"model.bin", "shared_vocabulary.json"} & {p.name for p in best.iterdir()}
    assert Tokenizer.load(best).vocab_hash == Tokenizer.load(ct2).vocab_hash
    assert (export_ct2(best, tmp_path / "ct2") / "model.bin").is_file()


def test_snapshots_are_kept_pruned_and_averaged_exactly(tiny_data, tiny_tokenizer, tmp_path):
    from trainers.checkpoint import average_snapshots, snapshots

    cfg = TeacherConfig(train=tiny_data / "train.parquet", valid=tiny_data / "valid.parquet",
                        tokenizer=tiny_tokenizer.path, out=tmp_path / "t", size="tiny",
                        optim=OptimConfig(max_steps=6, eval_every=2, warmup_steps=1, max_tokens=1000, keep_last=2))
    train_teacher(cfg, progress_bar=False)
    assert [p.name for p in snapshots(cfg.out)] == ["step-0000004", "step-0000006"]  # step 2 pruned
    steps = average_snapshots(cfg.out, 2, tmp_path / "avg", tokenizer_dir=tiny_tokenizer.path)
    assert steps == [4, 6]
    a, b = (load_file(p / "model.safetensors") for p in snapshots(cfg.out))
    mean = load_file(tmp_path / "avg" / "model.safetensors")
    assert set(mean) == set(a)
    for name in a:  # the element-wise mean, computed here independently
        torch.testing.assert_close(mean[name], (a[name].double() + b[name].double()).div(2).float())
    assert not torch.equal(a["model.shared.weight"], b["model.shared.weight"])  # the average is not a copy
    with pytest.raises(CheckpointError, match="has 2 snapshots; averaging needs 3"):
        average_snapshots(cfg.out, 3, tmp_path / "avg3")


@pytest.mark.slow
def test_package_writes_a_scored_ct2_teacher_with_its_readme(tiny_data, tiny_teacher, tmp_path):
    import pyarrow.parquet as pq
    from sacrebleu.metrics import BLEU

    from pipeline.tokenizer import Tokenizer
    from trainers.teacher import package_teacher

    out = tmp_path / "shipped"
    info = package_teacher(tiny_teacher["run"], out, test=tiny_data / "test.parquet", threads=1)
    assert (out / "model.bin").is_file() and (out / "tokenizer.json").is_file()
    Tokenizer.load(out)  # self-contained: the tokenizer is beside the model
    # The recorded BLEU is the BLEU of what this directory translates, recomputed here with ctranslate2 itself.
    import ctranslate2

    tok = Tokenizer.load(out)
    test = pq.read_table(tiny_data / "test.parquet")
    translator = ctranslate2.Translator(str(out), compute_type="int8")
    tokens = [tok.ids_to_tokens(ids) for ids in tok.encode_source(test["source"].to_pylist())]
    limits = [min(256, 2 * len(t) + 10) for t in tokens]
    hyps = [tok.decode([tok.tokens_to_ids(translator.translate_batch([t], beam_size=4, max_decoding_length=m)[0]
                                          .hypotheses[0])])[0] for t, m in zip(tokens, limits, strict=True)]
    assert info["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [test["target"].to_pylist()]).score, abs=0.01)
    saved = json.loads((out / "model_info.json").read_text())
    assert saved["bleu"] == info["bleu"] and saved["speed"]["sentences"] == 100
    assert saved["parameters"] == json.loads((tiny_teacher["run"] / "model_info.json").read_text())["parameters"]
    readme = (out / "README.md").read_text()
    assert f"**{info['bleu']:.2f}**" in readme and saved["commit"] in readme and "best model" in readme
