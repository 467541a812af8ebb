"""The layer-wise refusal-direction baseline (activation addition, after Arditi et al. 2024): fit a direction
for every layer and choose the layer and coefficient. The intervention itself is
`interventions.direction.RefusalDirection`.

`fit_refusal_direction` finds a direction for every layer from mean residual differences at the last
token (training split); `choose_layer_and_coef` searches every layer and a coefficient scale by the judged
refusal of short greedy answers on the validation split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..data import prompts as sets
from ..data.chat import chat_prompt
from ..data.splits import Splits
from ..infra.devices import stack_to_host
from ..infra.progress import SILENT, Reporter
from ..interventions.direction import RefusalDirection
from ..interventions.capture import iter_last_token
from .proxy import judged_refusal

KINDS = ("harmful_minus_harmless", "refusal_minus_compliance")
MULTIPLIERS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # times the layer's mean-difference norm


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


def _residual_batches(lm, prompts: Sequence[str], targets: Sequence[str] | None, batch_size: int,
                      reporter: Reporter | None) -> Iterator[list[torch.Tensor]]:
    """Per batch, one [B, d_model] float32 tensor per decoder layer: the residual stream entering it at each
    row's last token (of chat_prompt(prompt) + target), left on the layer's device."""
    texts = [chat_prompt(lm.tokenizer, p) for p in prompts]
    targets = list(targets) if targets is not None else [""] * len(prompts)
    for store in iter_last_token(lm, texts, "residual", targets=targets, batch_size=batch_size, max_length=256,
                                 reporter=reporter, stage="residuals"):
        yield [store[layer] for layer in sorted(store)]


def last_token_residuals(lm, prompts: Sequence[str], targets: Sequence[str] | None = None, batch_size: int = 16,
                         reporter: Reporter | None = None) -> torch.Tensor:
    """[n, n_layers, d_model] residual stream entering each decoder layer at the last token of
    chat_prompt(prompt) + target (target "" = the last prompt token, i.e. the assistant header)."""
    return torch.cat([stack_to_host(store, 1) for store in _residual_batches(lm, prompts, targets, batch_size, reporter)])


def mean_last_token_residual(lm, prompts: Sequence[str], targets: Sequence[str] | None = None, batch_size: int = 16,
                             reporter: Reporter | None = None) -> torch.Tensor:
    """[n_layers, d_model] mean of `last_token_residuals` over the prompts, summed on each layer's device
    in float32; only the mean reaches the host."""
    if not prompts:
        raise ValueError("No prompts to average residuals over.")
    sums: list = []
    for store in _residual_batches(lm, prompts, targets, batch_size, reporter):
        parts = [x.sum(0) for x in store]
        sums = parts if not sums else [s + p for s, p in zip(sums, parts)]
    return stack_to_host(sums, 0) / len(prompts)


def _first_words(text: str, n: int = 3) -> str:
    return " ".join(text.split()[:n])


def fit_refusal_direction(lm, splits: Splits, kind: str = "harmful_minus_harmless", n: int = 32, *,
                          batch_size: int = 16, reporter: Reporter | None = None) -> DirectionFit:
    """Difference of mean residuals at the last token, for every layer, normalised (training split only).

    harmful_minus_harmless: harmful training requests (plain and in the training attack families) vs harmless
    ones in the same forms (benign and borderline-safe, plain and in the same families), at the last prompt token.
    refusal_minus_compliance: n harmful training prompts forced to open a refusal (the first three words
    of sets.targets()["refusal"], rotating) vs a compliance (of ["compliance"]), at the last forced token."""
    if kind not in KINDS:
        raise ValueError(f"Unknown direction kind '{kind}'; use one of {KINDS}.")
    harmful = [p.text for p in splits.harmful_train[:n]]
    if not harmful:
        raise ValueError("No harmful training prompts to fit a direction on.")
    if kind == "harmful_minus_harmless":
        per = max(1, n // (4 * max(1, len(splits.train_families))))
        pos_texts = harmful + [p.text for p in splits.attacked("harmful", "train", per)]
        harmless = [p.text for p in splits.benign_train[: n // 2]] + [p.text for p in splits.borderline_train[: n - n // 2]]
        neg_texts = harmless + [p.text for p in splits.attacked("benign", "train", per)]
        pos = mean_last_token_residual(lm, pos_texts, None, batch_size, reporter)
        neg = mean_last_token_residual(lm, neg_texts, None, batch_size, reporter)
    else:
        tg = sets.targets()
        refuse = [_first_words(tg["refusal"][i % len(tg["refusal"])]) for i in range(len(harmful))]
        comply = [_first_words(tg["compliance"][i % len(tg["compliance"])]) for i in range(len(harmful))]
        pos = mean_last_token_residual(lm, harmful, refuse, batch_size, reporter)
        neg = mean_last_token_residual(lm, harmful, comply, batch_size, reporter)
    diff = pos - neg  # [n_layers, d_model]
    norms = diff.norm(dim=-1)
    return DirectionFit(kind, diff / norms.clamp(min=1e-12)[:, None], norms, len(harmful))


def choose_layer_and_coef(lm, fit: DirectionFit, splits: Splits, target, *, layers: Sequence[int] | None = None,
                          n: int = 16, judge_tokens: int = 16, multipliers: Sequence[float] = MULTIPLIERS,
                          patience: int = 2, batch_size: int = 16, reporter: Reporter | None = None) -> RefusalDirection:
    """Choose the layer and coefficient on the VALIDATION split by generation: for every layer (default: all of
    them), scan the coefficient (`multipliers` x the layer's mean-difference norm, ascending) until the judged
    refusal of short greedy answers to `n` validation harmful requests reaches `target`, stopping early once it
    has stayed below its peak for `patience` coefficients (larger ones only break the model). Then measure the
    over-refusal of `n` validation benign requests at that coefficient, and keep the layer with the least
    over-refusal among those that reached the target (if none did: the most harmful minus benign refusal).

    `target` is a refusal rate in [0, 1], or an intervention whose judged refusal on the same prompts is matched
    (e.g. the tuned modulation). The result's meta records every layer's curve, the target and `reached`."""
    harmful = [p.text for p in splits.harmful["validation"][:n]]
    benign = [p.text for p in splits.benign["validation"][:n]]
    layers = list(layers) if layers is not None else list(range(fit.directions.shape[0]))
    layers = [l for l in layers if float(fit.norms[l]) > 1e-6]  # no difference there (e.g. the embeddings of one token)
    if not layers:
        raise ValueError("The direction is zero at every candidate layer: nothing to add.")
    total = 1 + len(layers) * (len(multipliers) + 1)
    done, reporter = 0, reporter or SILENT

    def judged(iv, prompts) -> float:
        nonlocal done
        reporter.check("The direction search")
        done += 1
        reporter.progress(done, total, "direction search")
        return judged_refusal(lm, iv, prompts, judge_tokens, batch_size)

    target_value = float(target) if isinstance(target, (int, float)) else judged(target, harmful)
    per_layer: dict[int, dict] = {}
    for layer in layers:
        scale, curve, peak, falls, hit = float(fit.norms[layer]), [], 0.0, 0, None
        for m in multipliers:
            value = judged(fit.at(layer, m * scale), harmful)
            curve.append((m * scale, value))
            if value >= target_value:
                hit = m * scale
                break
            peak, falls = (value, 0) if value > peak else (peak, falls + (value < peak))
            if falls >= patience:
                break
        coef = hit if hit is not None else max(curve, key=lambda cv: cv[1])[0]
        refusal = dict(curve)[coef]
        per_layer[layer] = {"coef": coef, "harmful": refusal, "benign": judged(fit.at(layer, coef), benign),
                            "reached": hit is not None, "curve": curve}
    reached = [l for l, r in per_layer.items() if r["reached"]]
    best = (min(reached, key=lambda l: (per_layer[l]["benign"], per_layer[l]["coef"])) if reached
            else max(per_layer, key=lambda l: per_layer[l]["harmful"] - per_layer[l]["benign"]))
    chosen = fit.at(best, per_layer[best]["coef"])
    chosen.meta.update(layers={int(k): {kk: v for kk, v in r.items()} for k, r in per_layer.items()}, target=target_value,
                       measure="judged refusal, validation split", reached=bool(per_layer[best]["reached"]))
    return chosen
