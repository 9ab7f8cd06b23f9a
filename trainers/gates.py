"""Gates of the ``hybrid`` loss that cannot collapse onto the smaller loss.

A gate ``g = sigmoid(w)`` trained by the same gradient as ``g·L_token + (1−g)·L_sentence`` gets
``∂L/∂w = g(1−g)·(L_token − L_sentence)``: it only ever moves toward whichever loss is currently smaller, at the
optimiser's speed (``losses.HybridGate``, kept as the baseline that shows it). The gates here take their weight
from somewhere else:

- :class:`FixedGate`: a constant ``g`` (the fixed-g grid baseline).
- :class:`UncertaintyGate`: Kendall et al. 2018 uncertainty weighting, whose stationary point balances the losses.
- :class:`HeldoutGate`: ``g`` is not trained by the mixed loss at all; it takes first-order hypergradient steps
  that lower the student's loss on held-out data (driven by ``losses.heldout_gate_step``).

Every gate has ``mix(tok, sent, mask, hidden) -> [B, T]`` (the per-token loss the hybrid reduces) and
``log_values() -> dict`` (what the student records at each validation; ``gate`` is always the token weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


class FixedGate(torch.nn.Module):
    """``g·L_token + (1−g)·L_sentence`` with a constant ``g``; no parameter."""

    def __init__(self, g: float):
        super().__init__()
        if not 0 <= g <= 1:
            raise ValueError(f"a fixed gate needs g in [0, 1], got {g}")
        self.g = float(g)

    def mix(self, tok: torch.Tensor, sent: torch.Tensor, mask: torch.Tensor, hidden=None) -> torch.Tensor:
        return self.g * tok + (1 - self.g) * sent

    def log_values(self) -> dict:
        return {"gate": self.g}


class UncertaintyGate(torch.nn.Module):
    """Uncertainty weighting (Kendall, Gal & Cipolla 2018) of the two losses, per token:

    ``L = L_token/(2σ₁²) + L_sentence/(2σ₂²) + log σ₁ + log σ₂`` with learned ``s_i = log σ_i²`` (0 at init, so
    it starts as ½·(L_token + L_sentence)), trained by the student's optimiser. ``∂L/∂s_i = ½(1 − L_i·e^{−s_i})``
    vanishes at ``σ_i² = L_i``: each scale tracks its loss instead of running to a vertex. The reported gate is
    the implied token weight ``g = σ₁⁻² / (σ₁⁻² + σ₂⁻²)`` (= ``L_sentence / (L_token + L_sentence)`` there).

    ``lr_scale``: the two scales learn at ``lr_scale ×`` the student's learning rate (``trainers.loop.make_optimizer``
    reads it). At the student's rate they cannot keep up: Adam moves ``s_i`` by about ``lr`` per step, and the
    losses sit near ``log σ² ≈ 1.6`` after a few hundred steps, so in the 800-step `tiny` grid at lr 1e-3 both
    σ² were still climbing at the end (1.55) and the implied weight never left 0.50.
    """

    def __init__(self, lr_scale: float = 1.0):
        super().__init__()
        if lr_scale <= 0:
            raise ValueError(f"an uncertainty gate needs lr_scale > 0, got {lr_scale}")
        self.s_token = torch.nn.Parameter(torch.zeros(()))
        self.s_sentence = torch.nn.Parameter(torch.zeros(()))
        for s in (self.s_token, self.s_sentence):
            s.lr_scale = float(lr_scale)

    def mix(self, tok: torch.Tensor, sent: torch.Tensor, mask: torch.Tensor, hidden=None) -> torch.Tensor:
        # The regulariser log σ₁σ₂ = (s₁+s₂)/2 on every token, so that the token mean (or sum / token count)
        # holds it exactly once.
        s1, s2 = self.s_token.float(), self.s_sentence.float()
        return 0.5 * (torch.exp(-s1) * tok + torch.exp(-s2) * sent + s1 + s2)

    def weight(self) -> float:
        """The implied token weight ``σ₁⁻² / (σ₁⁻² + σ₂⁻²) = sigmoid(s₂ − s₁)``."""
        return float(torch.sigmoid(self.s_sentence.detach() - self.s_token.detach()))

    def log_values(self) -> dict:
        return {"gate": self.weight(), "sigma_token": math.exp(0.5 * float(self.s_token.detach())),
                "sigma_sentence": math.exp(0.5 * float(self.s_sentence.detach()))}


class HeldoutGate(torch.nn.Module):
    """``g = sigmoid(w)`` learned from held-out data, never from the loss it mixes (first-order bilevel).

    ``w`` is a buffer, not a parameter: the mixed training loss gives it no gradient and the optimiser never
    sees it. Every ``every`` training steps (:meth:`tick`), :meth:`update` estimates how ``g`` changes the held-out
    loss after one gradient step of the student. With ``θ' = θ − η·(g·∇L_tok + (1−g)·∇L_sent)``,
    ``∂L_valid(θ')/∂g ≈ −η·⟨∇L_valid, ∇L_tok − ∇L_sent⟩`` (all gradients at θ; the hypergradient of a one-step
    lookahead). The gate descends it, normalised to the cosine so the step does not depend on gradient scales:

        ``w ← w + lr · g(1−g) · cos(∇L_valid, ∇L_tok − ∇L_sent)``

    So ``g`` rises when the token loss's gradient points where the held-out loss falls, whichever training loss
    is larger. State (``w``, the step and update counters, the last cosine) lives in buffers, i.e. in the
    model's state dict and checkpoint, so a resumed run continues exactly.
    """

    def __init__(self, *, lr: float, every: int):
        super().__init__()
        if lr <= 0 or every < 1:
            raise ValueError(f"a heldout gate needs lr > 0 and every >= 1, got lr={lr}, every={every}")
        self.lr, self.every = float(lr), int(every)
        self.register_buffer("w", torch.zeros(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # training steps seen
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))  # hypergradient steps taken
        self.register_buffer("last_cos", torch.zeros(()))

    def value(self) -> torch.Tensor:
        return torch.sigmoid(self.w)

    def mix(self, tok: torch.Tensor, sent: torch.Tensor, mask: torch.Tensor, hidden=None) -> torch.Tensor:
        g = self.value().detach()  # a buffer already; detached so no future change can leak a gradient in
        return g * tok + (1 - g) * sent

    def tick(self) -> bool:
        """Counts one training step; True when this step is due for a held-out update (steps every, 2·every …)."""
        self.calls += 1
        return int(self.calls) % self.every == 0

    def update(self, grad_token: Sequence[torch.Tensor | None], grad_sentence: Sequence[torch.Tensor | None],
               grad_valid: Sequence[torch.Tensor | None] | None, params: Sequence[torch.Tensor], *,
               all_reduce: Callable[[torch.Tensor], object] | None = None) -> float:
        """One step of ``w`` from the student's gradients (``None`` entries: no gradient); returns the cosine.

        ``grad_valid=None`` (a worker without held-out data) contributes zeros. ``all_reduce`` sums a vector
        over workers in place, so the cosine is that of the global gradients.
        """
        def flat(grads):
            if grads is None:
                return torch.cat([torch.zeros(p.numel(), device=p.device) for p in params])
            return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                              for g, p in zip(grads, params, strict=True)])

        diff, valid = flat(grad_token) - flat(grad_sentence), flat(grad_valid)
        if all_reduce is not None:
            all_reduce(diff)
            all_reduce(valid)
        denom = diff.norm() * valid.norm()
        cos = torch.where(denom > 0, diff.double() @ valid.double() / denom.double().clamp_min(1e-300), 0.0)
        with torch.no_grad():
            g = torch.sigmoid(self.w)
            self.w += (self.lr * g * (1 - g) * cos).to(self.w.dtype)
            self.last_cos.fill_(float(cos))
            self.updates += 1
        return float(cos)

    def log_values(self) -> dict:
        return {"gate": float(self.value()), "gate_updates": int(self.updates), "gate_cos": float(self.last_cos)}
