"""``make demo``: the main job end to end on the bundled corpus, every step skipped when already done.

corpus → validated splits → shared tokenizer → teacher → CTranslate2 → BLEU on the held-out test split
→ distilled dataset (teacher-forced top-k over the training split, on the embedded local Ray).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

# Teacher settings for a 2-core CPU: the budget, not the epochs, ends training (see README, "Demo").
DEMO_VOCAB = 8000


def _step(console: Console, name: str, done: bool) -> bool:
    console.print(f"[bold]{name}[/] " + ("[dim](done, reused)[/]" if done else "…"))
    return not done


def run_demo(workdir: Path, *, teacher_minutes: float, teacher_size: str, console: Console) -> dict:
    """Runs (or resumes) the demo in ``workdir``; returns and prints the results table."""
    from pipeline.bundled import BUNDLED_SPLIT, bundled_corpus_spec
    from pipeline.evaluate import score, translate
    from pipeline.prepare import load_prepared, prepare
    from pipeline.run import run_job
    from pipeline.tokenizer import Tokenizer, train_tokenizer
    from trainers.export import export_ct2
    from trainers.loop import OptimConfig
    from trainers.teacher import TeacherConfig, train_teacher

    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, tok_dir = workdir / "data", workdir / "tokenizer"
    teacher_run, teacher_ct2 = workdir / "teacher", workdir / "teacher-ct2"

    prepared = load_prepared(data_dir)
    if _step(console, "1/6 corpus: validate and split the bundled de→en Bible", prepared is not None):
        prepared = prepare(bundled_corpus_spec(), BUNDLED_SPLIT, data_dir)
    console.print("    " + ", ".join(f"{k} {v:,}" for k, v in prepared.counts.items()))

    if _step(console, "2/6 tokenizer: shared Unigram vocabulary", (tok_dir / "tokenizer.json").is_file()):
        train = pq.read_table(prepared.path("train"), columns=["source", "target"])
        train_tokenizer(train.column("source").to_pylist() + train.column("target").to_pylist(), tok_dir,
                        vocab_size=DEMO_VOCAB)
    tokenizer = Tokenizer.load(tok_dir)

    cfg = TeacherConfig(
        train=prepared.path("train"), valid=prepared.path("valid"), tokenizer=tok_dir, out=teacher_run,
        size=teacher_size,
        # Chosen by measurement on 2 cores (README, "Demo"): smaller batches and a higher peak rate learn
        # fastest within a few minutes of CPU time.
        optim=OptimConfig(lr=2e-3, warmup_steps=200, max_tokens=3000, eval_every=400, checkpoint_every=200,
                          max_minutes=teacher_minutes),
    )
    started = time.monotonic()
    console.print(f"[bold]3/6 teacher[/]: Marian '{teacher_size}', budget {teacher_minutes:g} min (resumes)")
    state = train_teacher(cfg)
    console.print(f"    {state.finished}: {state.step} steps, best valid loss {state.best_valid:.3f}")

    best_mtime = (teacher_run / "best" / "model.safetensors").stat().st_mtime
    exported = (teacher_ct2 / "model.bin").is_file() and (teacher_ct2 / "model.bin").stat().st_mtime > best_mtime
    if _step(console, "4/6 export: CTranslate2 int8", exported):
        export_ct2(teacher_run / "best", teacher_ct2, quantization="int8")

    console.print("[bold]5/6 evaluate[/]: beam 4 on the held-out test split")
    test = pq.read_table(prepared.path("test"), columns=["source", "target"])
    sources, refs = test.column("source").to_pylist(), test.column("target").to_pylist()
    hyps = translate(teacher_ct2, tokenizer, sources, beam_size=4)
    (workdir / "teacher.test.hyp.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    teacher = score(hyps, refs)
    baseline = score(sources, refs)  # trivial baseline: copy the German source

    results = {
        "teacher": {**teacher.as_dict(), "steps": state.step, "train_minutes": round(state.elapsed_s / 60, 1)},
        "copy_source_baseline": baseline.as_dict(),
        "wall_minutes_this_run": round((time.monotonic() - started) / 60, 1),
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    table = Table(title=f"de→en Bible test split ({teacher.sentences:,} verses)")
    for col in ("system", "BLEU", "chrF", "train"):
        table.add_column(col)
    table.add_row("copy source (trivial baseline)", f"{baseline.bleu:.2f}", f"{baseline.chrf:.2f}", "-")
    table.add_row(f"teacher ({teacher_size}, CT2 int8, beam 4)", f"{teacher.bleu:.2f}",
                  f"{teacher.chrf:.2f}", f"{state.step} steps / {state.elapsed_s / 60:.1f} min")
    Console().print(table)
    console.print(f"signature: {teacher.bleu_signature}")

    console.print("[bold]6/6 distill[/]: teacher-forced top-8 log-probs over the training split (local Ray)")
    manifest = run_job(demo_distill_spec(workdir, prepared.path("train"), teacher_ct2))
    counts = manifest["counts"]
    console.print(f"    {counts['examples']:,} examples, {counts['target_tokens']:,} target tokens, "
                  f"{counts['bytes'] / counts['target_tokens']:.1f} bytes/token, {len(manifest['shards'])} shards "
                  f"→ {workdir / 'datasets' / manifest['dataset']}")
    results["distilled"] = {"dataset": str(workdir / "datasets" / manifest["dataset"]), "counts": counts,
                            "dataset_hash": manifest["dataset_hash"]}
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    console.print(f"results → {workdir / 'results.json'}")
    return results


def demo_distill_spec(workdir: Path, train: Path, teacher: Path):
    """The demo's distillation job: the same spec a user would write in YAML. The dataset name carries
    the teacher's hash, so a retrained teacher gets a new dataset instead of a refused re-run."""
    from pipeline.ct2 import model_hash
    from pipeline.spec import JobSpec

    name = f"bible-teacher-forcing-{model_hash(teacher).removeprefix('sha256:')[:8]}"

    return JobSpec.model_validate({
        "corpus": {"path": str(train), "id_column": "id"},
        "teacher": {"model": str(teacher), "compute_type": "int8"},
        "decoding": {"mode": "teacher_forcing"},
        "targets": {"top_k": 8},
        "output": {"store": str(workdir / "datasets"), "dataset": name, "shard_size": 2000},
        # On 2 cores two single-threaded translators outrun one with two threads (bench/pipeline_throughput.py).
        "resources": {"workers": 2, "threads_per_worker": 1},
    })
