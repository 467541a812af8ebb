"""The layer-wise refusal-direction baseline (activation addition, after Arditi et al. 2024): fit a direction
for every layer and choose the layer and coefficient. The intervention itself is
`interventions.direction.RefusalDirection`.

`fit_refusal_direction` finds a direction for every layer from mean residual differences at the last
token; `choose_layer_and_coef` picks the layer (refusal proxy) and the coefficient (judged refusal of
short answers, or the proxy) on the training split.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..data import prompts as sets
from ..data.chat import chat_prompt
from ..data.splits import Splits
from ..infra.devices import stack_to_host
from ..infra.progress import Progress, check_cancel
from ..interventions.direction import RefusalDirection
from ..interventions.hooks import scoped_pre_hooks
from ..model.logprobs import encode_pairs, forward, last_token_index
from ..model.neuron_map import decoder_layers
from .proxy import judged_refusal, refusal_proxy

KINDS = ("harmful_minus_harmless", "refusal_minus_compliance")
MULTIPLIERS = tuple(round(2 ** (k / 2), 4) for k in range(-6, 9))  # 0.125 .. 16 times the mean-difference norm, ratio sqrt(2)


@dataclass
class DirectionFit:
    """One candidate direction per layer: `directions: [n_layers, d_model]` unit rows, `norms: [n_layers]`
    the norm of the raw mean difference (a natural coefficient scale for that layer)."""

    kind: str
    directions: torch.Tensor
    norms: torch.Tensor
    n: int

    def at(self, layer: int, coef: float | None = None) -> RefusalDirection:
        """The direction of `layer` with `coef` (default: the raw difference's norm, i.e. adding the mean difference)."""
        c = float(self.norms[layer]) if coef is None else float(coef)
        return RefusalDirection(layer, self.directions[layer], c, self.kind, {"kind": "refusal_direction", "direction": self.kind})


@torch.no_grad()
def _residual_batches(lm, prompts: Sequence[str], targets: Sequence[str] | None, batch_size: int,
                      cancel: threading.Event | None) -> Iterator[list[torch.Tensor]]:
    """Per batch, one [B, d_model] float32 tensor per decoder layer: the residual stream entering it at each
    row's last token, picked out by the hook and left on the layer's device."""
    layers = decoder_layers(lm.model)
    targets = list(targets) if targets is not None else [""] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        check_cancel(cancel, "Direction fitting")
        chunk = [chat_prompt(lm.tokenizer, p) for p in prompts[start:start + batch_size]]
        batch = encode_pairs(lm.tokenizer, chunk, targets[start:start + batch_size])
        last = last_token_index(batch)
        store: list = [None] * len(layers)

        def make(l: int):
            def hook(module, args):
                x = args[0]
                store[l] = x[torch.arange(x.shape[0], device=x.device), last.to(x.device)].float()
            return hook

        with scoped_pre_hooks([(layer, make(l)) for l, layer in enumerate(layers)]):
            forward(lm.model, batch)
        yield store


def last_token_residuals(lm, prompts: Sequence[str], targets: Sequence[str] | None = None, batch_size: int = 16,
                         cancel: threading.Event | None = None) -> torch.Tensor:
    """[n, n_layers, d_model] residual stream entering each decoder layer at the last token of
    chat_prompt(prompt) + target (target "" = the last prompt token, i.e. the assistant header)."""
    return torch.cat([stack_to_host(store, 1) for store in _residual_batches(lm, prompts, targets, batch_size, cancel)])


def mean_last_token_residual(lm, prompts: Sequence[str], targets: Sequence[str] | None = None, batch_size: int = 16,
                             cancel: threading.Event | None = None) -> torch.Tensor:
    """[n_layers, d_model] mean of `last_token_residuals` over the prompts, summed on each layer's device
    in float32; only the mean reaches the host."""
    if not prompts:
        raise ValueError("No prompts to average residuals over.")
    sums: list = []
    for store in _residual_batches(lm, prompts, targets, batch_size, cancel):
        parts = [x.sum(0) for x in store]
        sums = parts if not sums else [s + p for s, p in zip(sums, parts)]
    return stack_to_host(sums, 0) / len(prompts)


def _first_words(text: str, n: int = 3) -> str:
    return " ".join(text.split()[:n])


def fit_refusal_direction(lm, splits: Splits, kind: str = "harmful_minus_harmless", n: int = 32, *,
                          batch_size: int = 16, cancel: threading.Event | None = None) -> DirectionFit:
    """Difference of mean residuals at the last token, for every layer, normalised.

    harmful_minus_harmless: n harmful vs n benign training prompts, at the last prompt token.
    refusal_minus_compliance: n harmful training prompts forced to open a refusal (the first three words
    of sets.targets()["refusal"], rotating) vs a compliance (of ["compliance"]), at the last forced token."""
    if kind not in KINDS:
        raise ValueError(f"Unknown direction kind '{kind}'; use one of {KINDS}.")
    harmful = [p.text for p in splits.harmful_train[:n]]
    if not harmful:
        raise ValueError("No harmful training prompts to fit a direction on.")
    if kind == "harmful_minus_harmless":
        benign = [p.text for p in splits.benign_train[:n]]
        pos = mean_last_token_residual(lm, harmful, None, batch_size, cancel)
        neg = mean_last_token_residual(lm, benign, None, batch_size, cancel)
    else:
        tg = sets.targets()
        refuse = [_first_words(tg["refusal"][i % len(tg["refusal"])]) for i in range(len(harmful))]
        comply = [_first_words(tg["compliance"][i % len(tg["compliance"])]) for i in range(len(harmful))]
        pos = mean_last_token_residual(lm, harmful, refuse, batch_size, cancel)
        neg = mean_last_token_residual(lm, harmful, comply, batch_size, cancel)
    diff = pos - neg  # [n_layers, d_model]
    norms = diff.norm(dim=-1)
    return DirectionFit(kind, diff / norms.clamp(min=1e-12)[:, None], norms, len(harmful))


def default_layers(n_layers: int, max_layers: int = 8) -> list[int]:
    """Candidate layers: the middle 60% of the stack, at most `max_layers` evenly spaced."""
    edge = max(1, n_layers // 5)
    pool = list(range(edge, max(edge + 1, n_layers - edge)))
    step = max(1, math.ceil(len(pool) / max_layers))
    return [l for l in pool[::step] if l < n_layers]


def choose_layer_and_coef(lm, fit: DirectionFit, splits: Splits, target, *, layers: Sequence[int] | None = None,
                          n: int = 16, by: str = "judge", judge_tokens: int = 16,
                          multipliers: Sequence[float] = MULTIPLIERS, refine_steps: int = 4, patience: int = 2,
                          batch_size: int = 16, progress: Progress | None = None,
                          cancel: threading.Event | None = None) -> RefusalDirection:
    """Pick the layer and coefficient of the baseline on the training split (last n harmful and benign
    training prompts; fitting uses the first ones).

    Layer (refusal proxy, fast): among `layers` (default `default_layers`), the one whose direction at 1x
    its mean-difference norm raises the harmful proxy most relative to the benign one
    (max of delta_harmful - delta_benign).
    Coefficient: the smallest of `multipliers` x that norm whose harmful refusal reaches `target`, refined
    by bisection; the scan stops early once refusal has stayed below its peak for `patience` coefficients
    (larger coefficients only break the model: on SmolLM2, refusal-minus-compliance at 0.5x its norm
    refused 44% of the time and at 1x produced no refusals at all). by="judge" (default) measures refusal by judging `judge_tokens`-token greedy answers;
    by="proxy" uses the mean refusal proxy (no generation, but it also counts answers opening with "I"
    that do not refuse: on SmolLM2 a harmful-minus-harmless direction matched the proxy of a tuned
    modulation while refusing nothing). `target` is a value of that measure in [0, 1], or an intervention
    whose measured harmful refusal is matched (e.g. the tuned modulation). If no tried coefficient
    reaches it, the one with the highest measured refusal is kept. The result's meta records the layer
    scores, the coefficient curve, the target and `reached`."""
    if by not in ("judge", "proxy"):
        raise ValueError(f"by must be 'judge' or 'proxy', not {by!r}.")
    harmful = [p.text for p in splits.harmful_train[-n:]]
    benign = [p.text for p in splits.benign_train[-n:]]
    layers = list(layers) if layers is not None else default_layers(fit.directions.shape[0])
    total = 2 + 2 * len(layers) + len(multipliers) + refine_steps + (0 if isinstance(target, (int, float)) else 1)
    done = 0

    def step() -> None:
        nonlocal done
        check_cancel(cancel, "The direction search")
        done += 1
        if progress:
            progress(done, total, "direction search")

    def proxy(iv, prompts) -> float:
        step()
        return float(refusal_proxy(lm, iv, prompts, batch_size).mean())

    def measure(iv) -> float:
        if by == "proxy":
            return proxy(iv, harmful)
        step()
        return judged_refusal(lm, iv, harmful, judge_tokens, batch_size)

    target_value = float(target) if isinstance(target, (int, float)) else measure(target)
    h0, b0 = proxy(None, harmful), proxy(None, benign)
    scores = {}
    for l in layers:
        d = fit.at(l)
        scores[l] = (proxy(d, harmful) - h0) - (proxy(d, benign) - b0)
    best = max(scores, key=scores.get)
    base_dir, scale = fit.at(best), float(fit.norms[best])
    curve: list[tuple[float, float]] = []
    lo, hi, peak, falls = 0.0, None, 0.0, 0
    for m in multipliers:
        value = measure(base_dir.scaled(m * scale))
        curve.append((m * scale, value))
        if value >= target_value:
            hi = m * scale
            break
        lo = m * scale
        peak, falls = (value, 0) if value > peak else (peak, falls + (value < peak))
        if falls >= patience:
            break
    if hi is not None:
        for _ in range(refine_steps):
            mid = (lo + hi) / 2
            value = measure(base_dir.scaled(mid))
            curve.append((mid, value))
            lo, hi = (mid, hi) if value < target_value else (lo, mid)
        coef, reached = hi, True
    else:
        coef, reached = max(curve, key=lambda cv: cv[1])[0], False
    chosen = base_dir.scaled(coef)
    chosen.meta.update(layer_scores={int(k): v for k, v in scores.items()}, curve=sorted(curve), target=target_value,
                       measure=by, reached=reached, base_harmful_proxy=h0, base_benign_proxy=b0)
    return chosen
