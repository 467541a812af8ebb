"""Activation addition: add `coef * direction` to the residual stream entering one decoder layer, at every
position, in this thread/context only (the refusal-direction baseline's intervention, after Arditi et al. 2024)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.neuron_map import decoder_layers
from .hooks import scoped_pre_hooks


def _add_hook(direction: torch.Tensor, coef: float, strengths: torch.Tensor | None = None):
    """Pre-hook adding coef * direction (times each row's strength, if given) to the decoder layer's
    hidden-state input at every position."""
    cache: dict = {}

    def hook(module, args):
        if not args:
            raise RuntimeError("This decoder layer got its hidden states as a keyword argument; the direction hook "
                               "expects them as the first positional argument.")
        x = args[0]
        v = cache.get((x.device, x.dtype))
        if v is None:
            v = (coef * direction.float()).to(device=x.device, dtype=x.dtype)
            if strengths is not None:  # [B, 1, d]: one strength per row
                v = strengths.to(device=x.device, dtype=x.dtype)[:, None, None] * v
            cache[(x.device, x.dtype)] = v
        return (x + v, *args[1:])

    return hook


@dataclass
class RefusalDirection:
    """Add `coef * direction` to the residual stream entering decoder layer `layer` (0 = embeddings)."""

    layer: int
    direction: torch.Tensor  # [d_model], unit norm
    coef: float
    kind: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"direction({self.kind or 'custom'})@L{self.layer}x{self.coef:.3g}"

    def scaled(self, coef: float) -> "RefusalDirection":
        return RefusalDirection(self.layer, self.direction, float(coef), self.kind, dict(self.meta))

    def apply(self, lm):
        """Context manager: the direction is added in this thread/context only, removed on exit. Coef 0
        registers no hook at all (bit-identical to the base model)."""
        layers = self._layers(lm)
        hooks = [] if self.coef == 0 else [(layers[self.layer], _add_hook(self.direction, self.coef))]
        return scoped_pre_hooks(hooks)

    def apply_rows(self, lm, strengths: torch.Tensor):
        """The direction at `coef` times one strength per batch row."""
        layers = self._layers(lm)
        hooks = [] if self.coef == 0 else [(layers[self.layer], _add_hook(self.direction, self.coef, strengths.float()))]
        return scoped_pre_hooks(hooks)

    def _layers(self, lm):
        layers = decoder_layers(lm.model)
        if not 0 <= self.layer < len(layers):
            raise ValueError(f"Layer {self.layer} is out of range: the model has decoder layers 0..{len(layers) - 1}.")
        d_model = getattr(lm.model.config, "hidden_size", None)
        if d_model is not None and self.direction.shape[-1] != d_model:
            raise ValueError(f"A direction of size {self.direction.shape[-1]} does not fit hidden size {d_model}.")
        return layers
