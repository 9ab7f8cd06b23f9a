"""What Online KD did to its teacher: the frozen teacher vs the teacher with an okd run's trained online modules.

    .venv/bin/python bench/okd_teacher.py RUN_DIR [RUN_DIR ...]

For each ``okd`` student run directory (``distillery train`` or a grid's ``cache/students/s-…``), it loads the
run's config, the torch teacher (``teacher_hf``) and the LoRA modules from the run's last checkpoint, and
measures on the run's valid split: the teacher's NLL on the references (as the student's ``teacher_valid_loss``
records it since 2026-11-27) and its greedy BLEU on the first ``bleu_sentences`` sentences (as the student's
``valid_bleu``), each for the frozen teacher and for the adapted one. A teacher whose modules moved it toward a
weak student teaches a weaker target: this says how far it moved. Not a speed benchmark: one process, no ratio.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def measure(run: Path) -> dict:
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from pipeline.evaluate import score
    from pipeline.tokenizer import Tokenizer
    from trainers.models import resolve_size
    from trainers.online import OnlineTeacher
    from trainers.student import StudentConfig, greedy_translate
    from trainers.teacher import load_pairs, make_batches

    for needed in (run / "config.json", run / "checkpoint" / "model.safetensors"):
        if not needed.is_file():
            raise SystemExit(f"{run}: no {needed.relative_to(run)}; give a student run directory with a checkpoint")
    cfg = StudentConfig.model_validate_json((run / "config.json").read_text())
    if cfg.loss.name != "okd":
        raise SystemExit(f"{run}: a {cfg.loss.name} run; only okd trains online modules")
    tok, cpu = Tokenizer.load(cfg.tokenizer), torch.device("cpu")
    max_positions = resolve_size(cfg.size).max_positions
    src, tgt = load_pairs(cfg.valid, tok, max_positions)
    batches = make_batches(src, tgt, pad_id=tok.pad_id, max_tokens=cfg.optim.max_tokens, seed=0, epoch=0,
                           shuffle=False)
    pairs = pq.read_table(cfg.valid, columns=["source", "target"]).slice(0, cfg.bleu_sentences).to_pylist()
    teacher = OnlineTeacher(cfg.teacher_hf, cfg.loss, tokenizer=tok, device=cpu)

    def quality() -> tuple[float, float]:
        hyps = greedy_translate(teacher.model, tok, [p["source"] for p in pairs], device=cpu,
                                max_len=min(256, max_positions))
        return teacher.valid_loss(batches), score(hyps, [p["target"] for p in pairs]).bleu

    frozen = quality()  # the modules start as a zero update (LoRA's B = 0): this is the frozen teacher
    saved = load_file(run / "checkpoint" / "model.safetensors")
    state = {k.removeprefix("online_modules."): v for k, v in saved.items() if k.startswith("online_modules.")}
    modules = teacher.modules()
    if set(state) != set(modules.keys()):
        raise SystemExit(f"{run}: the checkpoint's online modules do not match the config's")
    with torch.no_grad():
        for name, value in state.items():
            modules[name].copy_(value)
    adapted = quality()
    return {"run": run.name, "nll_frozen": frozen[0], "nll_adapted": adapted[0],
            "bleu_frozen": frozen[1], "bleu_adapted": adapted[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from distillery.cli import quiet_libraries

    quiet_libraries()
    print("| run | teacher valid NLL frozen → adapted | teacher greedy valid BLEU frozen → adapted |")
    print("|---|---|---|")
    for run in args.runs:
        m = measure(run)
        print(f"| {m['run']} | {m['nll_frozen']:.3f} → {m['nll_adapted']:.3f} | "
              f"{m['bleu_frozen']:.2f} → {m['bleu_adapted']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
