"""Learned feed-forward width: gates on the FFN channels of a Marian student, pruned away at export.

Every encoder and decoder layer computes ``fc2(act(fc1(x)))``. A gated student multiplies the hidden channels
(the input of ``fc2``) by one gate ``z_j ∈ [0, 1]`` per channel, installed as a forward pre-hook on ``fc2``: the
Marian modules and their state-dict keys stay as they are, the gate parameters live in ``model.ffn_gates``.

The gates are hard-concrete (Louizos, Welling & Kingma 2018, "Learning sparse neural networks through L0
regularization"). In training ``z = clamp(s·(ζ−γ) + γ, 0, 1)`` with ``s = sigmoid((logit(u) + log α)/β)``,
``u ~ U(0, 1)`` drawn per channel and step; at eval it is deterministic, ``z = clamp(sigmoid(log α)·(ζ−γ) + γ, 0,
1)``, which is exactly 0 for ``log α ≤ −2.4`` and exactly 1 for ``log α ≥ 2.4``. The stretch past [0, 1] is what
makes closed gates exactly zero, and the noise makes a half-open gate cost the task loss, so gates go to 0 or 1
instead of settling at a middle value a penalty on the mean gate would be satisfied by. ``P(z ≠ 0) =
sigmoid(log α − β·log(−γ/ζ))`` is differentiable; the training loss gets ``penalty · max(0, mean P(z ≠ 0) −
target)`` (``FFNGates``) with the target ramped from 1 down to the budget, so the student learns which channels to
keep while the expected kept fraction comes down to the budget.

What was measured, 70 Adam steps on one random batch of a toy model (``tests/trainers/test_glu.py``, budget
0.3): at penalty 1 the kept fraction at eval follows the expected one down to the budget (0.25 / 0.25 with a
40-step ramp, 0.24 / 0.23 without); at penalty 10 the gates slide down together (Adam moves each gate by about its
learning rate whatever the gradient's size) and end half-open in training but closed at eval (expected 0.19, at
eval 0.05 with the ramp; 0.04 / 0.00 without): the pruned model loses nearly everything. Nothing is tuned on real
data yet; watch ``ffn_open`` against ``ffn_expected_open`` in ``metrics.jsonl``. Through the student trainer on
the test corpus (a 32-wide toy, 60–120 steps) the same sliding shows: at lr_scale 50 the expected kept fraction fell
to 0.34 with every eval gate still open (log α just above −2.4, gates ≈ 0.01: the FFNs nearly off, nothing pruned);
at lr_scale 100 it fell to 0.20 with 2 of 128 channels open at eval. Short runs do not separate useful channels from
useless ones; whether long runs do is the open question (a top-k rule at eval, or a slower gate optimiser, are the
candidates if they do not).

Pruning (:func:`prune`) is exact: a channel whose eval gate is 0 contributes nothing and is dropped (its ``fc1``
row and bias, its ``fc2`` column); a kept channel's gate is folded into its ``fc2`` column. CTranslate2 takes
per-layer widths (a layer's width is its weights' shape; ``tests/trainers/test_glu.py`` converts one), but
``MarianConfig`` has one width per stack, so the pruned Hugging Face checkpoint holds every layer at its stack's
widest kept width, the narrower layers padded with zero channels (zero ``fc1`` row and bias, zero ``fc2``
column: exactly nothing, whatever the activation) after their kept ones, and records each layer's own width in
``config.ffn_widths``. The checkpoint loads anywhere as a plain Marian model; :func:`trim_ffn` drops the padding,
which ``trainers.export`` does before converting, and :func:`pruned_parameters` counts the trimmed model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from trainers.models import FFNGates, count_parameters

# Hard-concrete constants of Louizos et al. 2018: temperature β and the stretch interval (γ, ζ).
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
INIT_LOG_ALPHA = 2.5  # eval gate 1, P(open) 0.98, 71 % of training draws exactly 1: starts as the plain model
STACKS = ("encoder", "decoder")


def _layers(model, stack: str):
    return getattr(model.model, stack).layers


class FFNGateSet(torch.nn.Module):
    """The gates of every FFN channel of one Marian model; ``log α = lr_scale · θ`` with ``θ`` the parameters.

    Args:
        cfg: budget, penalty and the gates' learning-rate scale.
        widths: FFN width of each layer, per stack (``{"encoder": [256, 256], "decoder": [256, 256]}``).
    """

    def __init__(self, cfg: FFNGates, widths: dict[str, list[int]]):
        super().__init__()
        self.cfg = cfg
        for stack in STACKS:
            self.register_module(stack, torch.nn.ParameterList(
                torch.nn.Parameter(torch.full((w,), INIT_LOG_ALPHA / cfg.lr_scale)) for w in widths[stack]))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # training steps seen (the ramp); saved

    def log_alpha(self, stack: str, layer: int) -> torch.Tensor:
        return self.cfg.lr_scale * getattr(self, stack)[layer]

    def gate(self, stack: str, layer: int) -> torch.Tensor:
        """``z`` of one layer's channels [ffn_dim]: sampled in training mode, deterministic in eval mode."""
        log_alpha = self.log_alpha(stack, layer).float()
        if self.training:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    @torch.no_grad()
    def eval_gates(self) -> dict[str, list[torch.Tensor]]:
        """The deterministic (eval) gates of every layer, per stack: what the pruned model keeps and folds."""
        was_training = self.training
        self.eval()
        gates = {stack: [self.gate(stack, i) for i in range(len(getattr(self, stack)))] for stack in STACKS}
        self.train(was_training)
        return gates

    def expected_open(self) -> torch.Tensor:
        """Mean over all channels of ``P(z ≠ 0)``: the differentiable expected kept fraction (L0 / channels)."""
        log_alpha = torch.cat([self.log_alpha(stack, i).float() for stack in STACKS
                               for i in range(len(getattr(self, stack)))])
        return torch.sigmoid(log_alpha - BETA * torch.log(torch.tensor(-GAMMA / ZETA))).mean()

    def target(self) -> float:
        """The kept fraction aimed at now: 1 at step 0, falling linearly to the budget at ``ramp_steps``."""
        done = min(1.0, int(self.steps) / self.cfg.ramp_steps) if self.cfg.ramp_steps else 1.0
        return 1.0 - (1.0 - self.cfg.budget) * done

    def penalty(self) -> torch.Tensor:
        """``penalty · max(0, expected_open − target)``: the term the student adds to its per-token loss.

        Call it once per training step: in training mode each call advances the ramp by one step.
        """
        if self.training:
            self.steps += 1
        return self.cfg.penalty * torch.relu(self.expected_open() - self.target())

    def log_values(self) -> dict:
        """What the student records at each validation: the kept fraction and widths at eval, the expected one."""
        gates = self.eval_gates()
        kept = {stack: [int((z > 0).sum()) for z in gates[stack]] for stack in STACKS}
        total = sum(z.numel() for stack in STACKS for z in gates[stack])
        return {"ffn_open": sum(map(sum, kept.values())) / total,
                "ffn_expected_open": float(self.expected_open().detach()), "ffn_target": self.target(),
                "ffn_widths": kept}


def install_ffn_gates(model, cfg: FFNGates) -> FFNGateSet:
    """Gates every FFN channel of a ``MarianMTModel`` in place; returns the gates (also ``model.ffn_gates``).

    The gates are a submodule, so the optimiser, checkpoints and DDP see them with the weights. The config records
    ``ffn_gates``, which marks a saved checkpoint as gated (``trainers.export`` refuses to convert one unpruned).
    """
    widths = {stack: [layer.fc1.out_features for layer in _layers(model, stack)] for stack in STACKS}
    gates = FFNGateSet(cfg, widths)
    model.ffn_gates = gates
    for stack in STACKS:
        for i, layer in enumerate(_layers(model, stack)):
            layer.fc2.register_forward_pre_hook(_GateHook(gates, stack, i))
    model.config.ffn_gates = cfg.model_dump()
    return gates


class _GateHook:
    """``fc2``'s input times the layer's gates (a class, not a closure: the model stays picklable)."""

    def __init__(self, gates: FFNGateSet, stack: str, layer: int):
        self.gates, self.stack, self.layer = gates, stack, layer

    def __call__(self, module, args):
        (hidden,) = args
        return (hidden * self.gates.gate(self.stack, self.layer).to(hidden.dtype),)


@torch.no_grad()
def prune(model):
    """A plain ``MarianMTModel`` computing what the gated ``model`` computes in eval mode, closed channels dropped.

    Each layer keeps the channels whose eval gate is non-zero (at least one, so no layer is empty; a closed one
    kept so has a zero ``fc2`` column), kept ones first, gates folded into ``fc2``; every stack is as wide as its
    widest layer, the others padded with zero channels, and ``config.ffn_widths`` holds each layer's kept width.
    """
    from transformers import MarianMTModel

    gates: FFNGateSet = model.ffn_gates
    z = gates.eval_gates()
    keep = {stack: [torch.nonzero(g > 0).flatten() if bool((g > 0).any()) else g.argmax().reshape(1)
                    for g in z[stack]] for stack in STACKS}
    widths = {stack: [len(k) for k in keep[stack]] for stack in STACKS}
    config = copy.deepcopy(model.config)
    del config.ffn_gates
    config.encoder_ffn_dim, config.decoder_ffn_dim = max(widths["encoder"]), max(widths["decoder"])
    config.ffn_widths = widths
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("ffn_gates.")}
    for stack in STACKS:
        dim = getattr(config, f"{stack}_ffn_dim")
        for i, layer in enumerate(_layers(model, stack)):
            idx, prefix = keep[stack][i], f"model.{stack}.layers.{i}"
            w1, b1 = layer.fc1.weight.new_zeros(dim, config.d_model), layer.fc1.bias.new_zeros(dim)
            w2 = layer.fc2.weight.new_zeros(config.d_model, dim)
            w1[: len(idx)], b1[: len(idx)] = layer.fc1.weight[idx], layer.fc1.bias[idx]
            w2[:, : len(idx)] = layer.fc2.weight[:, idx] * z[stack][i][idx].to(w2.dtype)
            state |= {f"{prefix}.fc1.weight": w1, f"{prefix}.fc1.bias": b1, f"{prefix}.fc2.weight": w2}
    pruned = MarianMTModel(config)
    pruned.load_state_dict(state, strict=True)
    pruned.tie_weights()
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.train(model.training)


@torch.no_grad()
def trim_ffn(model):
    """Drops the zero padding channels of a pruned model in place (``config.ffn_widths``): per-layer widths, which
    CTranslate2 converts and runs but ``MarianConfig`` cannot describe. A model without ffn_widths is unchanged."""
    widths = getattr(model.config, "ffn_widths", None)
    if widths is None:
        return model
    for stack in STACKS:
        for layer, width in zip(_layers(model, stack), widths[stack], strict=True):
            fc1 = torch.nn.Linear(layer.fc1.in_features, width, dtype=layer.fc1.weight.dtype,
                                  device=layer.fc1.weight.device)
            fc2 = torch.nn.Linear(width, layer.fc2.out_features, dtype=layer.fc2.weight.dtype,
                                  device=layer.fc2.weight.device)
            fc1.weight.copy_(layer.fc1.weight[:width])
            fc1.bias.copy_(layer.fc1.bias[:width])
            fc2.weight.copy_(layer.fc2.weight[:, :width])
            fc2.bias.copy_(layer.fc2.bias)
            layer.fc1, layer.fc2 = fc1, fc2
    return model


def load_gated(checkpoint: str | Path):
    """A gated student checkpoint (a ``best/`` or ``checkpoint/`` directory) with its gates, in eval mode.

    Raises:
        ValueError: the checkpoint is not gated (its config has no ``ffn_gates``).
        CheckpointError: its weights do not fit the gated model.
    """
    from transformers import MarianConfig, MarianMTModel

    from trainers.checkpoint import _load_weights

    checkpoint = Path(checkpoint)
    config = MarianConfig.from_pretrained(checkpoint)
    if getattr(config, "ffn_gates", None) is None:
        raise ValueError(f"{checkpoint} is not a gated checkpoint (no ffn_gates in its config.json)")
    model = MarianMTModel(config)
    install_ffn_gates(model, FFNGates.model_validate(config.ffn_gates))
    _load_weights(model, checkpoint / "model.safetensors")
    return model.eval()


def prune_checkpoint(checkpoint: str | Path, out: str | Path) -> dict:
    """Prunes a gated checkpoint into ``out`` (a Hugging Face directory with the tokenizer files beside it).

    Returns:
        ``{"parameters": …, "ffn_widths": {"encoder": […], "decoder": […]}}`` of the pruned model, counted from
        the checkpoint written to ``out`` (trimmed to its per-layer widths).
    """
    from trainers.checkpoint import save_model

    checkpoint, out = Path(checkpoint), Path(out)
    save_model(prune(load_gated(checkpoint)), checkpoint, out)
    return {"parameters": pruned_parameters(out),
            "ffn_widths": json.loads((out / "config.json").read_text())["ffn_widths"]}


def pruned_parameters(checkpoint: str | Path) -> int:
    """Trainable parameters of a saved Marian checkpoint trimmed to its per-layer FFN widths (``count_parameters``
    convention: tied embeddings once, sinusoidal positions and the logits bias buffer not counted)."""
    from transformers import MarianMTModel

    return count_parameters(trim_ffn(MarianMTModel.from_pretrained(checkpoint)))
