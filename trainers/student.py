"""Student training from a distilled dataset on Ray Train (``TorchTrainer``; gloo on CPU, NCCL on GPUs).

One training function serves 1 or N workers: ``ScalingConfig(num_workers=N)`` decides. Every worker follows
the same global batch plan and trains on its slice (``trainers.data``); losses are summed over local tokens
and divided by the step's global token count times the world size, so after DDP's gradient averaging each
step's gradient is the gradient of the global per-token mean — the same as on one worker.

After training, the best checkpoint (pruned first when the size learns its FFN width: ``trainers.glu``) is
converted to CTranslate2 and scored on the test split (BLEU / chrF with sacrebleu signatures). "Best" is lowest
NLL on the valid references (``optim.select_by: valid_loss``) or highest greedy BLEU on the valid split
(``valid_bleu``). NLL on references is the wrong yardstick for sentence-level KD:
a student that learns the teacher's translations can gain BLEU while its NLL on the references rises.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.dataset import DatasetName
from trainers.loop import OptimConfig
from trainers.losses import LossConfig
from trainers.models import ModelSize
from trainers.online import ONLINE_LOSSES, needs_online_teacher


class DatasetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str = Field(description="local directory or s3://bucket/prefix")
    name: DatasetName = Field(description="dataset name written by `distillery distill`")
    s3_endpoint: str | None = None


class StudentConfig(BaseModel):
    """Everything ``distillery train`` needs; loadable from YAML/JSON."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetRef | None = Field(None, description="the distilled dataset to train on")
    corpus: Path | None = Field(None, description="instead of a dataset, for loss nll only: a prepared corpus "
                                "Parquet with source/target text (`data prepare`'s train.parquet)")
    valid: Path = Field(description="Parquet with source/target: validation NLL on the references")
    test: Path | None = Field(None, description="Parquet with source/target: BLEU/chrF after training")
    tokenizer: Path = Field(description="the teacher's tokenizer (vocabulary hash checked)")
    out: Path = Field(description="run directory: checkpoint/, best/, ct2/, metrics.jsonl, results.json "
                     "(and pruned/: best/ without its closed FFN channels, for a size with ffn_gates)")
    size: str | ModelSize = "mini"
    loss: LossConfig = LossConfig(name="token")
    teacher_hf: Path | None = Field(None, description="the teacher as a Hugging Face Marian checkpoint, for the "
                                    "online losses okd and on_policy (`distillery teacher to-hf` writes one)")
    max_rank: int | None = Field(None, ge=1, description="use hypotheses with hyp_rank < max_rank")
    shuffle_window: int = Field(50_000, gt=0, description="rows a worker holds decoded at most: the batch plan "
                                "shuffles within windows of whole row groups of about this many rows")
    storage: str | None = Field(None, description="Ray Train storage for the run: a directory or s3://bucket/prefix "
                                "every node reaches. The workers then keep checkpoint/, best/ and metrics.jsonl in a "
                                "scratch directory of their own node and report them there at every checkpoint; a "
                                "run started again anywhere resumes from it, and the driver copies the last report "
                                "into `out`. None: the workers write `out` itself (a filesystem every node sees)")
    storage_s3_endpoint: str | None = Field(None, description="S3 endpoint of an s3:// storage (else "
                                            "$DISTILLERY_S3_ENDPOINT or AWS's)")
    workers: int = Field(1, ge=1, description="Ray Train workers")
    threads_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    bleu_every: int | None = Field(None, gt=0, description="greedy BLEU on the valid split at the first "
                                   "validation after every N steps (None: only test BLEU at the end); "
                                   "optim.select_by=valid_bleu measures it at every validation")
    bleu_sentences: int = Field(300, gt=0, description="valid sentences decoded for that BLEU")
    optim: OptimConfig = OptimConfig()

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if (self.dataset is None) == (self.corpus is None):
            raise ValueError("give either dataset (a distilled dataset) or corpus (references, for loss nll)")
        if self.corpus is not None and self.loss.name != "nll":
            raise ValueError(f"corpus holds references only: it trains loss nll, not {self.loss.name} "
                             "(distil a dataset for KD losses)")
        online = needs_online_teacher(self.loss.name)
        if online and self.teacher_hf is None:
            raise ValueError(f"loss {self.loss.name} runs the teacher during training: give teacher_hf (a Hugging "
                             "Face checkpoint; `distillery teacher to-hf CT2_DIR --out DIR` writes one)")
        if not online and self.teacher_hf is not None:
            raise ValueError(f"teacher_hf is read by the online losses ({', '.join(ONLINE_LOSSES)}) only, not by "
                             f"{self.loss.name}")
        if online and self.workers > 1:
            raise ValueError(f"loss {self.loss.name} trains on one worker only (workers: 1)")
        return self


def training_rows(cfg: StudentConfig, tok, *, max_rank: int | None):
    """The rows ``cfg`` trains on (``trainers.data``), rows longer than the student's ``max_positions`` skipped."""
    from trainers.data import DistilledDataset, ReferenceCorpus
    from trainers.models import resolve_size

    max_positions = resolve_size(cfg.size).max_positions
    if cfg.corpus is not None:
        return ReferenceCorpus(cfg.corpus, tokenizer=tok, max_positions=max_positions)
    return DistilledDataset(cfg.dataset.store, cfg.dataset.name, tokenizer=tok, endpoint=cfg.dataset.s3_endpoint,
                            max_rank=max_rank, max_positions=max_positions, window=cfg.shuffle_window)


def _worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import shutil

    import pyarrow.parquet as pq
    import ray.train
    import ray.train.torch

    from pipeline.evaluate import decode_limit, score
    from pipeline.run import peak_rss_mb
    from pipeline.tokenizer import Tokenizer
    from trainers.batching import PlannedBatches
    from trainers.checkpoint import append_metrics
    from trainers.data import collate, worker_slice
    from trainers.glu import install_ffn_gates
    from trainers.loop import Dist, fit, to_device, unwrap
    from trainers.losses import MarianForward, compute_loss, heldout_gate_step, make_gate, marian_logits, nll
    from trainers.models import build_marian, resolve_size
    from trainers.online import OnlineTeacher, anchor_loss, sample_targets, takes_student_data
    from trainers.teacher import load_pairs, make_batches

    fp = config["fingerprint"]
    cfg = StudentConfig.model_validate({k: v for k, v in config.items() if k != "fingerprint"})
    ctx = ray.train.get_context()
    dist = Dist(rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    torch.set_num_threads(cfg.threads_per_worker)
    tok = Tokenizer.load(cfg.tokenizer)
    run_dir = restore_run(cfg)
    data = training_rows(cfg, tok, max_rank=cfg.max_rank)
    max_positions = resolve_size(cfg.size).max_positions
    nodes = dist.all_gather(ray.get_runtime_context().get_node_id())  # by rank: which cluster node trained
    if dist.is_main:  # results.json reports the last of these
        append_metrics(run_dir, {"event": "data", "rows": len(data), "skipped_too_long": data.skipped_too_long,
                                 "max_positions": max_positions, "worker_nodes": nodes})
    torch.manual_seed(cfg.optim.seed)
    model = build_marian(cfg.size, vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id)
    if (ffn_cfg := resolve_size(cfg.size).ffn_gates) is not None:
        install_ffn_gates(model, ffn_cfg)  # model.ffn_gates: learned FFN width, pruned after training
    gate = make_gate(cfg.loss, d_model=model.config.d_model)
    if gate is not None:
        model.kd_gate = gate  # a submodule: optimised, checkpointed and DDP-synchronised with the student
    device = ray.train.torch.get_device()
    online = None
    if cfg.teacher_hf is not None:  # okd / on_policy: the teacher runs beside the student (trainers.online)
        online = OnlineTeacher(cfg.teacher_hf, cfg.loss, tokenizer=tok, device=device)
        if online.trainable:
            model.online_modules = online.modules()  # optimised, clipped and checkpointed with the student
    model = MarianForward(model)  # logits without <pad> and the decoder states; unwrap(model) is the Marian
    if dist.world_size > 1:
        model = ray.train.torch.prepare_model(model)  # moves it to `device` and wraps it in DDP
    pad_id, opt = tok.pad_id, cfg.optim

    def build(global_idx) -> dict:
        """This worker's part of one global batch, its rows fetched from the shards now."""
        local, weight = worker_slice(global_idx, dist.rank, dist.world_size), 1.0
        if len(local) == 0:  # fewer rows than workers: join the step with a zero-weight row
            local, weight = global_idx[:1], 0.0
        rows = data.fetch(local)
        batch = collate(rows, np.arange(len(rows)), pad_id=pad_id,
                        global_tokens=int(data.target_tokens[global_idx].sum()))
        return batch | {"weight": weight}

    def train_batches(epoch: int) -> PlannedBatches:
        return PlannedBatches(data.plan(max_tokens=opt.max_tokens, seed=opt.seed, epoch=epoch), build)

    def online_loss_fn(model, batch):
        # One worker (StudentConfig refuses more): the loss is a mean over this batch's own target tokens, which
        # for on_policy are the student's samples, not the planned references.
        if cfg.loss.name == "on_policy" and takes_student_data(batch, cfg.loss.student_data):
            limit = decode_limit(batch["input_ids"].shape[1], length_ratio=2.0, max_length=min(256, max_positions))
            batch = sample_targets(unwrap(model), batch, pad_id=pad_id, eos_id=tok.eos_id, max_new_tokens=limit)
        batch = batch | {"teacher_logits": online.logits(batch)}
        logits, _ = model(batch)
        total = compute_loss(cfg.loss, logits, batch, reduction="sum")
        if cfg.loss.name == "okd":  # the modules' anchor: no student gradient
            total = total + cfg.loss.anchor * anchor_loss(batch["teacher_logits"], batch["labels"])
        n_local = int((batch["labels"] != -100).sum())
        return total / max(n_local, 1), n_local

    def loss_fn(model, batch):
        if online is not None:
            return online_loss_fn(model, batch)
        # The heldout gate steps on held-out data every gate_every steps (a no-op for the other gates).
        heldout_gate_step(cfg.loss, unwrap(model), batch, valid_share, logits_fn=marian_logits,
                          all_reduce=torch.distributed.all_reduce if dist.world_size > 1 else None)
        logits, states = model(batch)
        total = compute_loss(cfg.loss, logits, batch, gate=getattr(unwrap(model), "kd_gate", None),
                             hidden=states, reduction="sum")
        n_local = int((batch["labels"] != -100).sum()) if batch["weight"] else 0
        loss = total * batch["weight"] * dist.world_size / batch["global_tokens"]
        ffn_gates = getattr(unwrap(model), "ffn_gates", None)
        if ffn_gates is not None:  # the same term on every worker: DDP's average keeps it once
            loss = loss + ffn_gates.penalty()
        return loss, n_local

    def valid_loss_fn(model, batch):
        return nll(marian_logits(model, batch), batch["labels"]), int((batch["labels"] != -100).sum())

    vsrc, vtgt = load_pairs(cfg.valid, tok, max_positions)  # cut (not skipped) like the teacher's valid split
    valid = make_batches(vsrc, vtgt, pad_id=pad_id, max_tokens=opt.max_tokens, seed=0, epoch=0, shuffle=False)
    valid_local = [to_device(b, device) for b in valid[dist.rank::dist.world_size]]
    heldout = cfg.loss.name == "hybrid" and cfg.loss.gate == "heldout"
    valid_share = valid_local if heldout else []  # its data
    bleu_pairs = pq.read_table(cfg.valid, columns=["source", "target"]).slice(0, cfg.bleu_sentences).to_pylist()
    last_bleu = {"bucket": 0}
    if online is not None and online.trainable and dist.is_main:  # one worker: StudentConfig refuses more
        append_metrics(run_dir, {"event": "online_teacher", "valid_loss": online.valid_loss(valid_local)})

    def on_validate(record: dict) -> None:
        if online is not None and online.trainable:  # okd: how far the modules moved the teacher (NLL, refs)
            record["teacher_valid_loss"] = online.valid_loss(valid_local)
        gate = getattr(unwrap(model), "kd_gate", None)
        if gate is not None:
            record |= gate.log_values()  # gate = the token weight; uncertainty: both σ; heldout: its updates
        ffn_gates = getattr(unwrap(model), "ffn_gates", None)
        if ffn_gates is not None:
            record |= ffn_gates.log_values()  # kept fraction and per-layer widths at eval, expected kept fraction
            # best/ is chosen among models at their budget: before it, a wider model would win on loss and be reported
            record["selectable"] = record["ffn_target"] <= ffn_gates.cfg.budget + 1e-9
        bucket = record["step"] // cfg.bleu_every if cfg.bleu_every else 0
        if bucket > last_bleu["bucket"] or opt.select_by == "valid_bleu":
            last_bleu["bucket"] = bucket
            bleu = 0.0
            if dist.is_main:  # one worker decodes; the sum shares its BLEU so all take the same selection decision
                hyps = greedy_translate(unwrap(model), tok, [p["source"] for p in bleu_pairs], device=device,
                                        max_len=min(256, max_positions))
                bleu = score(hyps, [p["target"] for p in bleu_pairs]).bleu
            record["valid_bleu"] = round(dist.all_sum(bleu)[0], 2)

    fit(model, train_batches=train_batches, valid_batches=valid[dist.rank::dist.world_size], loss_fn=loss_fn,
        valid_loss_fn=valid_loss_fn, cfg=opt, run_dir=run_dir, tokenizer_dir=cfg.tokenizer, progress_bar=False,
        dist=dist, on_validate=on_validate, device=device, fingerprint=fp,
        on_checkpoint=(lambda state: report_run(run_dir, dist, state.step)) if cfg.storage else None)
    peaks = dist.all_gather(peak_rss_mb())  # per worker: what bench/trainer_memory.py reads
    if dist.is_main:
        append_metrics(run_dir, {"event": "memory", "peak_rss_mb": peaks})
    if cfg.storage:
        report_run(run_dir, dist, None)  # the finished and memory records too
        shutil.rmtree(run_dir, ignore_errors=True)  # this node's scratch copy: the storage holds the run


RUN_FILES = ("checkpoint", "best", "snapshots", "metrics.jsonl")  # what a worker reports; the driver restores


def restore_run(cfg: StudentConfig) -> Path:
    """The directory this worker trains in: ``out``, or with ``storage`` a fresh scratch directory of this node
    holding the run's last report to Ray Train's storage (none on a first start)."""
    import tempfile

    import ray.train

    if not cfg.storage:
        return cfg.out
    run_dir = Path(tempfile.mkdtemp(prefix="distillery-run-"))
    last = ray.train.get_checkpoint()  # the latest report of this run (same storage and name), on any node
    if last is not None:
        last.to_directory(str(run_dir))
    return run_dir


def report_run(run_dir: Path, dist, step: int | None) -> None:
    """Reports ``run_dir`` (rank 0's: it alone writes it) to Ray Train's storage; every worker calls this together."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(run_dir)) if dist.is_main else None
    ray.train.report({"step": step if step is not None else -1}, checkpoint=checkpoint)


def _storage(cfg: StudentConfig, fp: dict):
    """(store, run name) of ``cfg.storage``. The name is the hash of the settings that change training: a run
    resumes only from reports of those settings, from whichever machine and ``out`` it is started again (a larger
    budget continues it, as it does from ``out``)."""
    from pipeline.storage import Store

    store = Store.from_uri(cfg.storage, endpoint_override=cfg.storage_s3_endpoint)
    return store, f"student-{fp['hash'].split(':')[-1][:16]}"


def _fetch_run(result, out: Path) -> None:
    """Copies the run files of the last report (``result.checkpoint``) into ``out``, replacing what was there."""
    import shutil
    import tempfile

    if result.checkpoint is None:
        raise RuntimeError("the training run reported no checkpoint to its storage")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        result.checkpoint.to_directory(tmp)
        for name in RUN_FILES:
            src, dst = Path(tmp) / name, out / name
            if not src.exists():
                continue
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            shutil.move(str(src), str(dst))


@torch.no_grad()
def greedy_translate(model, tok, sources: list[str], *, device: torch.device, batch_size: int = 64,
                     max_len: int = 256, length_ratio: float = 2.0) -> list[str]:
    """Greedy decoding with the torch model itself (no export): for BLEU during training.

    Output length is capped like ``pipeline.evaluate.translate`` caps it (``decode_limit``), so an early student
    that never emits ``</s>`` costs little to evaluate.

    Dropout is off while decoding, and greedy search draws no random numbers, so a run that measures BLEU
    trains exactly like one that does not.
    """
    from pipeline.evaluate import decode_limit
    from trainers.batching import pad

    was_training = model.training
    model.eval()
    ids = tok.encode_source(sources)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    hyps: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids = pad([ids[i][:max_len] for i in chunk], tok.pad_id).to(device)
        limit = decode_limit(input_ids.shape[1], length_ratio=length_ratio, max_length=max_len)
        out = model.generate(input_ids=input_ids, attention_mask=(input_ids != tok.pad_id).long(),
                             num_beams=1, do_sample=False, max_new_tokens=limit)
        hyps.update(zip(chunk, tok.decode(out.tolist()), strict=True))
    model.train(was_training)
    return [hyps[i] for i in range(len(sources))]


def _absolute_paths(cfg: StudentConfig) -> StudentConfig:
    """``cfg`` with its local paths resolved against the driver's working directory."""
    update = {name: getattr(cfg, name).resolve() for name in ("corpus", "valid", "test", "tokenizer", "out",
                                                              "teacher_hf")
              if getattr(cfg, name) is not None}
    if cfg.dataset is not None and "://" not in cfg.dataset.store:
        update["dataset"] = cfg.dataset.model_copy(update={"store": str(Path(cfg.dataset.store).resolve())})
    if cfg.storage is not None and "://" not in cfg.storage:
        update["storage"] = str(Path(cfg.storage).resolve())
    return cfg.model_copy(update=update)


def training_fingerprint(cfg: StudentConfig, data, tok) -> dict:
    """``checkpoint.fingerprint`` of what changes a student's training: data by content, model, loss, optimiser
    (no budgets), the number of workers (each draws its own dropout masks) and how the best model is chosen."""
    from pipeline.errors import InputError
    from trainers.checkpoint import file_hash, fingerprint
    from trainers.models import resolve_size

    # The data by content: a distilled dataset's hash, or (nll from a prepared corpus) the Parquet file's.
    data_id = file_hash(cfg.corpus) if cfg.corpus is not None else data.manifest.dataset_hash
    fields = {"dataset": data_id, "max_rank": cfg.max_rank, "tokenizer": tok.vocab_hash,
              "valid": file_hash(cfg.valid), "size": resolve_size(cfg.size).model_dump(),
              "loss": cfg.loss.training_fields(), "workers": cfg.workers, "optim": cfg.optim.trajectory_fields()}
    if cfg.corpus is None and data.manifest.counts.rows > cfg.shuffle_window:
        fields["shuffle_window"] = cfg.shuffle_window  # it shapes the batch plan only when it splits the corpus
    if cfg.optim.select_by == "valid_bleu":
        fields["bleu_sentences"] = cfg.bleu_sentences
    if cfg.teacher_hf is not None:  # the online teacher by content
        weights = cfg.teacher_hf / "model.safetensors"
        if not weights.is_file():
            raise InputError(f"teacher_hf {cfg.teacher_hf}: no model.safetensors (a Hugging Face checkpoint; "
                             "`distillery teacher to-hf CT2_DIR --out DIR` writes one)")
        fields["teacher_hf"] = file_hash(weights)
    return fingerprint(fields)


def train_student(cfg: StudentConfig, *, address: str | None = None, restart: bool = False) -> dict:
    """Trains (or resumes) a student on Ray Train, exports the best checkpoint to CTranslate2 and scores it.

    When ``out`` already holds the results of this exact config they are returned as they are; otherwise
    the run trains, or resumes from its checkpoint.

    Args:
        restart: discard what ``cfg.out`` holds and start over (otherwise a run of another training
            configuration there is refused).

    Returns:
        The run summary also written to ``cfg.out / "results.json"`` (with the ``config_hash`` it was trained under).

    Raises:
        CheckpointError: ``cfg.out`` holds a checkpoint or results of other training settings (they are named).
    """
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.run import init_ray
    from pipeline.tokenizer import Tokenizer
    from trainers.checkpoint import STATE_FILE, CheckpointError, check_resumable, clear_run
    from trainers.export import export_ct2
    from trainers.glu import prune_checkpoint
    from trainers.models import build_marian, count_parameters, resolve_size

    # Ray Train workers run in their own working directory; validating again checks fields set after loading.
    cfg = StudentConfig.model_validate(_absolute_paths(cfg).model_dump())
    tok = Tokenizer.load(cfg.tokenizer)
    # Fail fast, in the driver, on a missing dataset, a vocabulary mismatch or rows that all exceed max_positions.
    data = training_rows(cfg, tok, max_rank=1)
    fp = training_fingerprint(cfg, data, tok)
    if restart:
        clear_run(cfg.out, extra=("ct2", "pruned", "results.json", "test.hyp.txt", "ray"))
    check_resumable(cfg.out, fp)  # in the driver: a clear error before any worker starts
    if cfg.storage:
        store, name = _storage(cfg, fp)
        reported = store.filesystem.get_file_info(store.join(name)).type != pafs.FileType.NotFound
        if restart and reported:
            store.filesystem.delete_dir(store.join(name))
        elif not reported and (cfg.out / "checkpoint" / STATE_FILE).is_file():
            raise CheckpointError(f"{cfg.out} holds a checkpoint of this run kept in `out`, and storage {cfg.storage} "
                                  f"has no report of it ({name}): the workers would start over. Resume it without "
                                  "`storage`, or start over with --restart (restart=True).")
    saved, done = cfg.out / "config.json", cfg.out / "results.json"
    if done.is_file() and saved.is_file() and StudentConfig.model_validate_json(saved.read_text()) == cfg:
        results = json.loads(done.read_text())
        if "selected_step" in results:  # this exact run is complete (and its summary is of this version)
            return results
    cfg.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(cfg.model_dump_json(indent=2))
    init_ray(address)
    if cfg.storage:
        run_config = RunConfig(name=name, storage_path=store.root, storage_filesystem=store.filesystem,
                               checkpoint_config=CheckpointConfig(num_to_keep=2))
    else:
        run_config = RunConfig(name="train", storage_path=str((cfg.out / "ray").resolve()))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=cfg.model_dump(mode="json") | {"fingerprint": fp},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.threads_per_worker}),
        run_config=run_config,
    )
    result = trainer.fit()
    if cfg.storage:
        _fetch_run(result, cfg.out)  # the workers' run directory was on their own node
    events = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    finished = [e for e in events if e["event"] == "finished"][-1]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        params = count_parameters(build_marian(cfg.size, vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id))
    exported, ffn = cfg.out / "best", {}
    if resolve_size(cfg.size).ffn_gates is not None:  # the selected model, closed FFN channels dropped
        pruned = prune_checkpoint(cfg.out / "best", cfg.out / "pruned")
        exported, ffn = cfg.out / "pruned", {"unpruned_parameters": params, "ffn_widths": pruned["ffn_widths"]}
        params = pruned["parameters"]  # counted from the pruned checkpoint: what the CT2 model holds
    data = [e for e in events if e["event"] == "data"][-1]
    # selected_*: the checkpoint in best/ (chosen by selected_by); last_valid_bleu: the last validation's.
    results = {"loss": cfg.loss.name, "config_hash": fp["hash"], "parameters": params, "steps": finished["step"],
               "selected_by": cfg.optim.select_by, "selected_step": finished["best_step"],
               "selected_valid_nll": finished["best_valid"], "selected_valid_bleu": finished["best_bleu"],
               "last_valid_bleu": next((e["valid_bleu"] for e in reversed(events) if "valid_bleu" in e), None),
               "train_minutes": round(finished["elapsed_s"] / 60, 2),
               "stopped": finished["reason"],
               "gate": next((e["gate"] for e in reversed(events) if "gate" in e), None),
               "train_rows": data["rows"], "skipped_too_long": data["skipped_too_long"], **ffn,
               "worker_nodes": data.get("worker_nodes")}  # the Ray node id of each worker, by rank
    checks: list = []
    ct2 = export_ct2(exported, cfg.out / "ct2", quantization="int8", on_check=checks.append)
    results["int8_logprob_gap"] = round(checks[-1].mean_abs, 4)  # nats/token int8 rounding costs the tested model
    if cfg.test is not None:
        import pyarrow.parquet as pq

        from pipeline.evaluate import score, translate

        test = pq.read_table(cfg.test, columns=["source", "target"])
        hyps = translate(ct2, tok, test["source"].to_pylist(), beam_size=4)
        (cfg.out / "test.hyp.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        results |= score(hyps, test["target"].to_pylist()).as_dict()
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    return results
