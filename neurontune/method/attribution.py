"""Neuron attribution: score every MLP neuron of every layer in one backward pass per batch.

Score of neuron i for an example = sum over positions of activation_i * d(target log-prob)/d(activation_i)
("activation x gradient", the first-order estimate of what ablating the neuron would change), or the
same with the gradient averaged along a path that scales every MLP activation from 0 to its value
("integrated gradients", joint path over all layers, midpoint rule). Only activation gradients are
computed (the weights stay frozen), so a pass costs about one forward plus one activation backward.
Activations x gradients are summed over tokens on the device each layer runs on; only per-neuron totals
([batch, n_neurons] per layer) reach the host, so host memory is O(layers x neurons) per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..config import AttributionConfig
from ..infra.devices import stack_to_host
from ..infra.progress import SILENT, Reporter
from ..interventions.hooks import scoped_pre_hooks
from ..model.logprobs import encode_pairs, forward, target_logprob


@dataclass
class GroupScores:
    """Sums over the examples of one group; divide by `n` (or `tokens`) for means. All [n_layers, n_neurons]."""

    score: torch.Tensor
    abs_score: torch.Tensor
    act: torch.Tensor
    n: int = 0
    tokens: int = 0
    truncated: int = 0
    per_example: list = field(default_factory=list)  # optional [n_layers, n_neurons] per example (tests, drill-down)

    @classmethod
    def zeros(cls, shape: tuple[int, int]) -> "GroupScores":
        return cls(torch.zeros(shape), torch.zeros(shape), torch.zeros(shape))

    def add(self, other: "GroupScores") -> "GroupScores":
        """Add another part's sums and counts in place (sums of sums / sums of counts stay exact means)."""
        self.score += other.score
        self.abs_score += other.abs_score
        self.act += other.act
        self.n, self.tokens, self.truncated = self.n + other.n, self.tokens + other.tokens, self.truncated + other.truncated
        self.per_example.extend(other.per_example)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """Sums and counts as tensors (what a cross-process reduction adds up); `from_tensors` inverts it."""
        counts = torch.tensor([self.n, self.tokens, self.truncated], dtype=torch.int64)
        return {"score": self.score, "abs_score": self.abs_score, "act": self.act, "counts": counts}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "GroupScores":
        n, tokens, truncated = (int(v) for v in t["counts"])
        return cls(t["score"], t["abs_score"], t["act"], n, tokens, truncated)


def _capture(nmap, store: list, alpha: float = 1.0):
    """Pre-hooks that record each projection's input (scaled by alpha for integrated gradients)."""
    def make(layer: int):
        def hook(module, args):
            x = args[0] * alpha if alpha != 1.0 else args[0]
            store[layer] = x
            return (x, *args[1:]) if alpha != 1.0 else None
        return hook
    return [(proj, make(l)) for l, proj in enumerate(nmap.projections)]


def _token_sum(x: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] float32 sum over positions of x (* grad) * weights, computed on x's device.

    x, grad: [B, T, N] (or OPT's flattened [B*T, N]) in the model's dtype; weights: [B, T] float32 on x's
    device. The product is taken in float32 (exact upcast of the model's values), as is the sum."""
    B, T = weights.shape
    prod = x.reshape(B, T, -1).float()
    if grad is not None:
        prod = prod * grad.reshape(B, T, -1).float()
    return (prod * weights[:, :, None]).sum(1)


def _batch_scores(lm, batch, cfg: AttributionConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch -> (scores [B, L, N], activations [B, L, N] summed over prompt tokens, token count [B]).

    Every reduction over tokens runs on the device of the layer it reads (activations x gradients are
    summed per layer as the gradients come back, and the integrated-gradients path is accumulated there);
    only the per-neuron totals, [B, N] per layer, are copied to the host, once per device."""
    model, nmap = lm.model, lm.nmap
    embed = model.get_input_embeddings()
    store: list = [None] * nmap.n_layers
    mask = batch.attention_mask.to(torch.float32)  # [B, T]
    prompt_mask = (batch.attention_mask.bool() & ~batch.target_mask).to(torch.float32)
    weights: dict = {}  # (kind, device) -> the [B, T] mask on that device, moved once per batch

    def on(kind: str, m: torch.Tensor, device: torch.device) -> torch.Tensor:
        if (kind, device) not in weights:
            weights[kind, device] = m.to(device)
        return weights[kind, device]

    acts_full: list = []  # [B, T, N] per layer, on its device, in the model's dtype
    if cfg.method == "grad_x_act":
        alphas = [1.0]
    else:  # activations at full scale first; the path gradients are then reduced against them step by step
        alphas = [(k + 0.5) / cfg.ig_steps for k in range(cfg.ig_steps)]
        with torch.no_grad(), scoped_pre_hooks(_capture(nmap, store)):
            forward(model, batch)
        acts_full = [s.detach() for s in store]
    scores: list = [None] * nmap.n_layers  # [B, N] float32 per layer, on its device
    for alpha in alphas:
        store[:] = [None] * nmap.n_layers  # drop the previous step's scaled activations before the next forward
        embeds = embed(batch.input_ids.to(embed.weight.device)).detach().requires_grad_(True)
        with torch.enable_grad(), scoped_pre_hooks(_capture(nmap, store, alpha)):
            logp = target_logprob(forward(model, batch, embeds), batch)
            grads = list(torch.autograd.grad(logp.sum(), store))
        if cfg.method == "grad_x_act":
            acts_full = [s.detach() for s in store]
        for layer, grad in enumerate(grads):
            part = _token_sum(acts_full[layer], on("all", mask, grad.device), grad)
            scores[layer] = part if scores[layer] is None else scores[layer] + part
            grads[layer] = None  # free each layer's gradient as soon as it is reduced
        del logp, embeds
    if len(alphas) > 1:
        scores = [s / len(alphas) for s in scores]
    acts = [_token_sum(a, on("prompt", prompt_mask, a.device)) for a in acts_full]
    return stack_to_host(scores, 1), stack_to_host(acts, 1), prompt_mask.sum(1)


def attribute(lm, prompts: Sequence[str], targets: Sequence[str], cfg: AttributionConfig = AttributionConfig(), *,
              keep_per_example: bool = False, reporter: Reporter | None = None,
              stage: str = "attribute", offset: int = 0, total: int | None = None) -> GroupScores:
    """Attribute log p(target | prompt) for formatted chat prompts to every neuron; returns group sums."""
    if not prompts:
        raise ValueError("No prompts to attribute.")
    out = GroupScores.zeros(lm.nmap.shape)
    total = total or len(prompts)
    reporter = reporter or SILENT
    for start in range(0, len(prompts), cfg.batch_size):
        reporter.check("Attribution")
        batch = encode_pairs(lm.tokenizer, prompts[start:start + cfg.batch_size], targets[start:start + cfg.batch_size], cfg.max_length)
        scores, acts, count = _batch_scores(lm, batch, cfg)
        out.score += scores.sum(0)
        out.abs_score += scores.abs().sum(0)
        out.act += acts.sum(0)
        out.n += scores.shape[0]
        out.tokens += int(count.sum())
        out.truncated += batch.n_truncated
        if keep_per_example:
            out.per_example.extend(scores.unbind(0))
        reporter.progress(offset + min(start + cfg.batch_size, len(prompts)), total, stage)
    return out
