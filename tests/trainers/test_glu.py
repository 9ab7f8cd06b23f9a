"""Learned FFN width (trainers/glu.py): the budget term closes gates, pruning is exact, the pruned CTranslate2
model is smaller and decodes like the gated student, and a gated student trains, prunes and reports end to end."""

import json
import struct

import pytest
import torch

from trainers.glu import STACKS, install_ffn_gates, load_gated, prune, prune_checkpoint, pruned_parameters, trim_ffn
from trainers.models import PRESETS, FFNGates, ModelSize, build_marian, count_parameters

V = 40  # vocabulary of the tokenizer-free tests (<pad> last)
SHAPE = ModelSize(d_model=16, encoder_layers=2, decoder_layers=2, heads=2, ffn_dim=32, dropout=0.0)


def gated_model(cfg: FFNGates | None = None, shape: ModelSize = SHAPE, seed: int = 0):
    torch.manual_seed(seed)
    model = build_marian(shape, vocab_size=V, pad_id=V - 1, eos_id=0)
    install_ffn_gates(model, cfg or FFNGates())
    return model


def batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(1, V - 1, (4, 7), generator=g), torch.randint(1, V - 1, (4, 6), generator=g)
    start = torch.full((4, 1), V - 1)
    return {"input_ids": src, "decoder_input_ids": torch.cat([start, tgt[:, :-1]], 1), "labels": tgt}


def forward(model, b: dict) -> torch.Tensor:
    return model(input_ids=b["input_ids"], decoder_input_ids=b["decoder_input_ids"]).logits


def set_log_alpha(model, pattern) -> None:
    """Sets every layer's gate logits: ``pattern(stack, layer, width) -> log α`` [width]."""
    gates = model.ffn_gates
    with torch.no_grad():
        for stack in STACKS:
            for i, theta in enumerate(getattr(gates, stack)):
                theta.copy_(pattern(stack, i, theta.numel()) / gates.cfg.lr_scale)


def test_ungated_shapes_dump_as_before_so_fingerprints_and_unit_keys_keep():
    from distillery.experiment.grid import content_key, size_label

    tiny = PRESETS["tiny"]
    assert "ffn_gates" not in tiny.model_dump() and "ffn_gates" not in tiny.model_dump_json()
    gated = ModelSize.model_validate(tiny.model_dump() | {"ffn_gates": {"budget": 0.25}})
    assert gated.model_dump()["ffn_gates"] == {"budget": 0.25, "penalty": 1.0, "ramp_steps": 500, "lr_scale": 20.0}
    assert content_key("student", {"size": gated.model_dump()}) != content_key("student", {"size": tiny.model_dump()})
    assert size_label(gated) == "d64-e2-d2-f256-gates[budget=0.25]" and size_label(tiny) == "d64-e2-d2-f256"


def test_gradient_reaches_the_gates_and_the_budget_term_closes_them():
    """Adam steps on one batch: with the budget term the kept fraction (expected, and at eval) comes down to the
    budget without closing everything; with penalty 0 the task loss alone keeps the gates open."""
    b = batch()

    def train(penalty: float) -> tuple[float, float]:
        torch.manual_seed(0)
        model = gated_model(FFNGates(budget=0.3, penalty=penalty, ramp_steps=40, lr_scale=20.0)).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.98))  # log α moves ≈ 0.2 per step
        for step in range(70):
            logits = forward(model, b)[..., :-1]
            task = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten())
            if step == 0:  # the task loss alone reaches every layer's gates through the hooks
                task_grads = torch.autograd.grad(task, list(model.ffn_gates.parameters()), allow_unused=True,
                                                 retain_graph=True)
                assert all(g is not None and g.abs().sum() > 0 for g in task_grads)
            loss = task + model.ffn_gates.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert model.ffn_gates.target() == pytest.approx(0.3) and int(model.ffn_gates.steps) == 70
        return float(model.ffn_gates.expected_open().detach()), model.ffn_gates.log_values()["ffn_open"]

    expected, kept = train(penalty=1.0)
    assert expected < 0.3 + 0.03 and 0.15 < kept < 0.3 + 0.05, (expected, kept)
    expected_free, kept_free = train(penalty=0.0)
    assert expected_free > 0.8 and kept_free > 0.8, (expected_free, kept_free)


def _pattern(stack: str, layer: int, width: int) -> torch.Tensor:
    """Per-layer mixes of closed (−5: gate 0), open (5: gate 1) and half-open (0.3: gate ≈ 0.6) channels, so the
    widths differ by layer and one decoder layer is closed altogether."""
    g = torch.Generator().manual_seed(hash((stack, layer)) % 1000)
    kept = {("encoder", 0): 20, ("encoder", 1): 5, ("decoder", 0): 0, ("decoder", 1): 11}[(stack, layer)]
    values = torch.full((width,), -5.0)
    chosen = torch.randperm(width, generator=g)[:kept]
    values[chosen] = torch.where(torch.arange(kept) % 3 == 0, 0.3, 5.0)
    return values


def test_pruning_is_exact_and_the_count_is_the_kept_channels():
    model = gated_model()
    set_log_alpha(model, _pattern)
    model.eval()
    b = batch(2)
    pruned = prune(model).eval()
    widths = pruned.config.ffn_widths
    assert widths == {"encoder": [20, 5], "decoder": [1, 11]}  # a closed layer keeps one (zero) channel
    assert (pruned.config.encoder_ffn_dim, pruned.config.decoder_ffn_dim) == (20, 11)
    with torch.no_grad():
        gated_logits, pruned_logits = forward(model, b), forward(pruned, b)
        assert torch.allclose(pruned_logits, gated_logits, atol=1e-5, rtol=1e-5)
        trimmed = trim_ffn(prune(model)).eval()
        assert torch.allclose(forward(trimmed, b), gated_logits, atol=1e-5, rtol=1e-5)
    # By hand: the unpruned shape's count less (2·d_model + 1) per dropped channel (fc1 row + bias, fc2 column).
    plain = count_parameters(build_marian(SHAPE, vocab_size=V, pad_id=V - 1, eos_id=0))
    dropped = sum(SHAPE.ffn_dim - w for stack in STACKS for w in widths[stack])
    assert count_parameters(trimmed) == plain - dropped * (2 * SHAPE.d_model + 1)
    assert count_parameters(trimmed) < count_parameters(pruned) < plain  # padding to the stack's widest layer
    assert sum(p.numel() for p in trimmed.parameters() if p.requires_grad) == count_parameters(trimmed)


def test_saved_gated_checkpoint_prunes_to_a_plain_marian_checkpoint(tmp_path):
    from transformers import MarianMTModel

    model = gated_model()
    set_log_alpha(model, _pattern)
    model.save_pretrained(tmp_path / "gated")
    reloaded = load_gated(tmp_path / "gated")
    b = batch(3)
    with torch.no_grad():
        assert torch.equal(forward(reloaded, b), forward(model.eval(), b))
    out = prune_checkpoint(tmp_path / "gated", tmp_path / "pruned")
    plain = MarianMTModel.from_pretrained(tmp_path / "pruned").eval()  # no custom code needed to load it
    assert "ffn_gates" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    with torch.no_grad():
        assert torch.allclose(forward(plain, b), forward(model, b), atol=1e-5, rtol=1e-5)
    assert out["ffn_widths"] == {"encoder": [20, 5], "decoder": [1, 11]}
    assert out["parameters"] == pruned_parameters(tmp_path / "pruned") == count_parameters(trim_ffn(plain))
    with pytest.raises(ValueError, match="not a gated checkpoint"):
        load_gated(tmp_path / "pruned")


def ct2_variables(model_dir) -> dict[str, tuple[int, ...]]:
    """Name → shape of every variable in a CTranslate2 model.bin (read here, independently of the code tested)."""
    out = {}
    with open(model_dir / "model.bin", "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        read("I")
        f.seek(read("H"), 1)
        read("I")
        for _ in range(read("I")):
            name = f.read(read("H")).decode().rstrip("\0")
            rank = read("B")
            dims = tuple(read("I") for _ in range(rank))
            read("B")
            f.seek(read("I"), 1)
            out[name] = dims
    return out


@pytest.mark.slow
def test_pruned_ct2_int8_export_is_smaller_and_decodes_like_the_gated_student(tiny_data, tiny_tokenizer, tmp_path):
    """A tiny gated Marian over the test tokenizer with per-layer gate patterns: the pruned int8 CTranslate2 model
    passes the export's parity check, holds exactly the kept channels per layer (read from model.bin), counts what
    results.json would report, and decodes like the gated torch model."""
    import pyarrow.parquet as pq
    from transformers import MarianMTModel

    from pipeline.evaluate import translate
    from pipeline.tokenizer import copy_tokenizer_files
    from trainers.export import ExportError, export_ct2
    from trainers.parity import EXACT, check_parity
    from trainers.student import greedy_translate

    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = build_marian("tiny", vocab_size=len(tok), pad_id=tok.pad_id, eos_id=tok.eos_id)
    model.save_pretrained(tmp_path / "plain")  # the same shape unpruned, for the size comparison
    copy_tokenizer_files(tok.path, tmp_path / "plain")
    install_ffn_gates(model, FFNGates())
    width = PRESETS["tiny"].ffn_dim

    def keep_strongest(stack, layer, n):  # the largest fc2 columns open, 16 of them half-open (folded into fc2)
        fc2 = getattr(model.model, stack).layers[layer].fc2.weight.detach()
        kept = {"encoder": (160, 96), "decoder": (128, 200)}[stack][layer]
        values = torch.full((n,), -5.0)
        order = fc2.norm(dim=0).argsort(descending=True)
        values[order[:kept]] = 5.0
        values[order[kept - 16:kept]] = 1.5  # gate ≈ 0.88
        return values

    set_log_alpha(model, keep_strongest)
    model.save_pretrained(tmp_path / "gated")
    copy_tokenizer_files(tok.path, tmp_path / "gated")
    with pytest.raises(ExportError, match="gated student"):
        export_ct2(tmp_path / "gated", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    pruned = prune_checkpoint(tmp_path / "gated", tmp_path / "pruned")
    ct2 = export_ct2(tmp_path / "pruned", tmp_path / "ct2", quantization="int8")  # parity-checked
    ct2_f32 = export_ct2(tmp_path / "pruned", tmp_path / "ct2-f32", quantization="float32")

    shapes = ct2_variables(ct2)
    ct2_widths = {stack: [shapes[f"{stack}/layer_{i}/ffn/linear_0/weight"][0] for i in range(2)] for stack in STACKS}
    assert ct2_widths == pruned["ffn_widths"] == {"encoder": [160, 96], "decoder": [128, 200]}
    d = PRESETS["tiny"].d_model
    unpruned = count_parameters(MarianMTModel.from_pretrained(tmp_path / "plain"))
    dropped = sum(width - w for stack in STACKS for w in ct2_widths[stack])
    assert pruned["parameters"] == unpruned - dropped * (2 * d + 1) == pruned_parameters(tmp_path / "pruned")
    plain_ct2 = export_ct2(tmp_path / "plain", tmp_path / "plain-ct2", quantization="int8", check=False)
    assert (ct2 / "model.bin").stat().st_size < (plain_ct2 / "model.bin").stat().st_size

    # The chain gated torch ≡ pruned HF (logits) ≡ CT2 float32 (exact-tier parity) ≈ CT2 int8 (the export's check).
    sources = pq.read_table(tiny_data / "test.parquet")["source"].to_pylist()[:12]
    gated, plain = load_gated(tmp_path / "gated"), MarianMTModel.from_pretrained(tmp_path / "pruned").eval()
    src, tgt = tiny_tokenizer.encode_source(sources[:4]), tiny_tokenizer.encode_target(sources[:4])
    for s, t in zip(src, tgt, strict=True):
        b = {"input_ids": torch.tensor([s]), "decoder_input_ids": torch.tensor([[tiny_tokenizer.pad_id, *t[:-1]]])}
        with torch.no_grad():
            assert torch.allclose(forward(plain, b), forward(gated, b), atol=1e-4, rtol=1e-4)
    assert check_parity(ct2_f32, tmp_path / "pruned").tier == EXACT  # export_ct2 passed it: within 0.02 nats
    # Greedy search, one sentence per batch on both sides. An untrained model's greedy output is mostly one token
    # repeated up to the length cap, which torch and CTranslate2 count one apart: outputs must agree on their
    # common prefix (as in test_student's greedy check), the two torch models exactly.
    ours = [greedy_translate(gated, tiny_tokenizer, [s], device=torch.device("cpu"))[0] for s in sources]
    assert [greedy_translate(plain, tiny_tokenizer, [s], device=torch.device("cpu"))[0] for s in sources] == ours
    one_by_one = {"beam_size": 1, "max_batch_tokens": 1}
    for model_dir, compute_type in ((ct2_f32, "float32"), (ct2, "int8")):
        theirs = translate(model_dir, tiny_tokenizer, sources, compute_type=compute_type, **one_by_one)
        pairs = list(zip(theirs, ours, strict=True))
        assert all(a.startswith(b) or b.startswith(a) for a, b in pairs), (compute_type, pairs)


@pytest.mark.slow
def test_gated_student_trains_prunes_exports_and_reports_the_pruned_count(ray_local, tiny_data, tiny_tokenizer,
                                                                          tmp_path):
    """Through ``train_student`` (the nll baseline from references: no teacher needed): gates close, best/ (chosen
    after the ramp) is pruned into pruned/, the CT2 model is that, and results.json counts it. The plumbing only:
    on 60 steps the gates slide down together and nearly all close at eval (see ``trainers.glu``)."""
    from trainers.export import ExportError, export_ct2
    from trainers.loop import OptimConfig
    from trainers.losses import LossConfig
    from trainers.student import StudentConfig, train_student

    size = ModelSize(d_model=32, encoder_layers=1, decoder_layers=1, heads=2, ffn_dim=64, dropout=0.0,
                     ffn_gates=FFNGates(budget=0.3, penalty=1.0, ramp_steps=30, lr_scale=100.0))
    cfg = StudentConfig(corpus=tiny_data / "train.parquet", valid=tiny_data / "valid.parquet",
                        tokenizer=tiny_tokenizer.path, out=tmp_path / "run", size=size, loss=LossConfig(name="nll"),
                        optim=OptimConfig(max_steps=60, eval_every=20, checkpoint_every=20, warmup_steps=2,
                                          max_tokens=1500, lr=3e-3))
    results = train_student(cfg)
    run = tmp_path / "run"
    with torch.device("meta"):
        unpruned = count_parameters(build_marian(size.model_copy(update={"ffn_gates": None}),
                                                 vocab_size=len(tiny_tokenizer), pad_id=tiny_tokenizer.pad_id,
                                                 eos_id=tiny_tokenizer.eos_id))
    assert results["unpruned_parameters"] == unpruned
    assert results["parameters"] == pruned_parameters(run / "pruned") < unpruned
    widths = results["ffn_widths"]
    assert widths == json.loads((run / "pruned" / "config.json").read_text())["ffn_widths"]
    assert ct2_variables(run / "ct2")["encoder/layer_0/ffn/linear_0/weight"][0] == widths["encoder"][0] < 64
    valid = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [e for e in valid if e["event"] == "valid"]
    assert valid[0]["ffn_target"] > valid[-1]["ffn_target"] == pytest.approx(0.3)
    # best/ is chosen only among models at their budget (step 20, narrower target, lower loss, is passed over)
    assert [e["selectable"] for e in valid] == [False] + [True] * (len(valid) - 1) and results["selected_step"] >= 30
    selected = next(e for e in valid if e["step"] == results["selected_step"])  # best/: what was pruned
    assert 0 < selected["ffn_open"] < 0.6  # a layer keeps at least one (zero) channel: never empty
    assert {k: [max(1, w) for w in v] for k, v in selected["ffn_widths"].items()} == widths
    with pytest.raises(ExportError, match="gated student"):
        export_ct2(run / "best", tmp_path / "refused")
