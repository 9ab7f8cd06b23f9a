"""Marian model size presets shared by teachers and students.

Every model is a Hugging Face ``MarianMTModel`` over one shared vocabulary (token-level KD needs the
teacher's and the student's vocabularies to be identical), with tied embeddings.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_serializer


class FFNGates(BaseModel):
    """Learned feed-forward width (``trainers.glu``): a hard-concrete gate on every FFN channel, a budget term in
    the training loss, and the closed channels pruned at export.

    The term added to the per-token training loss is ``penalty · max(0, E[kept fraction] − target)``, where the
    expected kept fraction is the mean over all FFN channels of P(gate ≠ 0) (the L0 norm of Louizos et al. 2018,
    per channel) and the target falls linearly from 1 to ``budget`` over the first ``ramp_steps`` training steps
    (a sparsity warm-up as in structured-pruning practice, so channels close while the rest of the model adapts).
    ``budget: 0`` with no ramp is a plain L0 penalty. Defaults tried on a toy problem only (``trainers.glu``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: float = Field(0.5, ge=0, lt=1, description="target fraction of FFN channels kept (expected, over all "
                          "layers); the term is zero below it")
    penalty: float = Field(1.0, ge=0, description="weight of the budget term, in nats per token per unit of "
                           "expected kept fraction above the target (10 closed nearly every gate at eval on a toy "
                           "problem)")
    ramp_steps: int = Field(500, ge=0, description="training steps over which the target falls from 1 to budget")
    lr_scale: float = Field(20.0, gt=0, description="the gate logits learn this many times faster than the "
                            "weights (log α = lr_scale · θ): at the weights' lr a gate would need thousands of "
                            "steps to close")


class ModelSize(BaseModel):
    """Transformer shape. Parameter counts in the presets assume an 8k vocabulary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_model: int = Field(gt=0, description="hidden width")
    encoder_layers: int = Field(gt=0)
    decoder_layers: int = Field(gt=0)
    heads: int = Field(gt=0, description="attention heads, encoder and decoder")
    ffn_dim: int = Field(gt=0, description="feed-forward inner width")
    dropout: float = Field(0.1, ge=0, lt=1)
    max_positions: int = Field(512, gt=0, description="longest sequence in tokens")
    ffn_gates: FFNGates | None = Field(None, description="learn the FFN width (students only; trainers.glu): "
                                       "ffn_dim is then the width before pruning")

    @model_serializer(mode="wrap")
    def _omit_unset_gates(self, handler):
        # An ungated shape dumps as before ffn_gates existed: its fingerprints and grid unit keys are unchanged.
        data = handler(self)
        if self.ffn_gates is None:
            data.pop("ffn_gates", None)
        return data


# ~parameters with an 8k vocabulary in brackets.
PRESETS: dict[str, ModelSize] = {
    "tiny": ModelSize(d_model=64, encoder_layers=2, decoder_layers=2, heads=2, ffn_dim=256),  # ~0.8M
    "mini": ModelSize(d_model=128, encoder_layers=3, decoder_layers=3, heads=4, ffn_dim=512),  # ~2.4M
    "small": ModelSize(d_model=256, encoder_layers=4, decoder_layers=4, heads=4, ffn_dim=1024),  # ~9M
    "medium": ModelSize(d_model=384, encoder_layers=6, decoder_layers=6, heads=6, ffn_dim=1536),  # ~29M
    "base": ModelSize(d_model=512, encoder_layers=6, decoder_layers=6, heads=8, ffn_dim=2048),  # ~48M
    "big": ModelSize(d_model=640, encoder_layers=6, decoder_layers=6, heads=8, ffn_dim=2560),  # ~70M
}


def resolve_size(size: str | ModelSize) -> ModelSize:
    """A preset name or an explicit shape → ModelSize; unknown names list the valid ones."""
    if isinstance(size, ModelSize):
        return size
    if size not in PRESETS:
        raise ValueError(f"unknown model size {size!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[size]


def build_marian(size: str | ModelSize, *, vocab_size: int, pad_id: int, eos_id: int):
    """A freshly initialised ``MarianMTModel`` of the given shape.

    Args:
        size: preset name or shape.
        vocab_size: tokenizer length, ``<pad>`` included (it must be the last id).
        pad_id: the tokenizer's pad id; Marian also starts decoding from it.
        eos_id: the tokenizer's ``</s>`` id.
    """
    from transformers import MarianConfig, MarianMTModel

    shape = resolve_size(size)
    if pad_id != vocab_size - 1:
        raise ValueError(f"<pad> must be the last token (id {vocab_size - 1}), got id {pad_id}")
    config = MarianConfig(
        vocab_size=vocab_size,
        d_model=shape.d_model,
        encoder_layers=shape.encoder_layers,
        decoder_layers=shape.decoder_layers,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        encoder_ffn_dim=shape.ffn_dim,
        decoder_ffn_dim=shape.ffn_dim,
        dropout=shape.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=shape.max_positions,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
        forced_eos_token_id=eos_id,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    model = MarianMTModel(config)
    # Embeddings ~ N(0, d^-1/2) as in Vaswani et al. / fairseq, not HF's N(0, 0.02). The model reads
    # sqrt(d)·E, so token identity enters at unit scale, level with the sinusoidal positions. At 0.02 the
    # post-LN encoder of a small model collapses within a few hundred steps to one vector for every position
    # of every sentence (measured: the decoder then ignores the source for good, a pure target-side LM).
    shared = model.get_input_embeddings()
    if shared.weight.device.type != "meta":
        with torch.no_grad():
            shared.weight.normal_(0.0, shape.d_model ** -0.5)
            shared.weight[pad_id].zero_()
    return model


def count_parameters(model) -> int:
    """Unique trained parameters: tied embeddings once, the fixed sinusoidal positions never (a model built here
    freezes them, but ``from_pretrained`` loads them back as trainable)."""
    fixed = {id(p) for m in model.modules() if type(m).__name__.endswith("SinusoidalPositionalEmbedding")
             for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in fixed)
