"""The harm direction each layer's input-side terms read (`modulation.InputTerms`), from the training split.

For a layer l, x is the input of its MLP input projection (after the layer norm) at the prompt's last token. The
direction is the difference of the mean x over harmful and harmless training prompts (plain, inside the training
attack families, and the alarming-word pairs: `Splits.harm_pools`), scaled so that its projection has unit standard
deviation over those prompts, and centred so that the average prompt reads about zero:
- an input projection with a bias (GPT-2's `c_fc`) keeps the direction and gets offset = mean projection, which
  folds into the bias;
- one without (LLaMA's `up_proj`) has no place for an offset, so the direction is made orthogonal to the mean x
  instead (offset 0): the mean prompt then projects to exactly 0.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.chat import chat_prompt
from ..infra.progress import Reporter
from ..interventions.capture import last_token


def harm_directions(lm, harmful: Sequence[str], harmless: Sequence[str], layers: Sequence[int], *,
                    reporter: Reporter | None = None) -> dict[int, tuple[torch.Tensor, float]]:
    """{layer: (direction [d_model], offset)} for user prompts `harmful` / `harmless` (chat template applied here)."""
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        return {}
    texts = [chat_prompt(lm.tokenizer, t) for t in list(harmful) + list(harmless)]
    x = last_token(lm, texts, "mlp_input", layers=layers, reporter=reporter)  # [n, L, d]
    n_pos = len(harmful)
    out = {}
    for i, layer in enumerate(layers):
        xi = x[:, i].double()
        mean = xi.mean(0)
        d = xi[:n_pos].mean(0) - xi[n_pos:].mean(0)
        has_bias = lm.nmap.input_bias(layer) is not None
        if not has_bias:  # centre by making the direction orthogonal to the mean input
            d = d - (d @ mean) / (mean @ mean).clamp(min=1e-12) * mean
        proj = xi @ d
        d = d / proj.std().clamp(min=1e-12)
        offset = float((xi @ d).mean()) if has_bias else 0.0
        out[layer] = (d.float(), offset)
    return out
