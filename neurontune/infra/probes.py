"""Linear probes and the ranking measures that judge them: a class-balanced logistic regression on standardised
features, ROC AUC, and the recall at a false-positive budget. Shared by the separability ceiling
(`eval/separability.py`) and the layer-reading gate (`method/gate_fit.py`), so both read a layer the same way."""
from __future__ import annotations

import torch


def roc_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann–Whitney U)."""
    scores = torch.cat([pos, neg]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    for value in scores.unique():  # average ranks over ties
        tied = scores == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    u = float(ranks[: len(pos)].sum()) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def recall_at_fpr(pos: torch.Tensor, neg: torch.Tensor, fpr: float) -> tuple[float, float]:
    """(share of positives above the threshold, the threshold) for the lowest threshold that lets at most `fpr`
    of the negatives score above it (strictly)."""
    allowed = int(fpr * len(neg))  # negatives allowed above the threshold
    ordered = neg.sort(descending=True).values
    threshold = float(ordered[allowed]) if allowed < len(ordered) else float("-inf")
    return float((pos > threshold).float().mean()), threshold


def fit_probe(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, steps: int = 200,
              precise: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-balanced L2 logistic regression on standardised features (LBFGS, deterministic).
    Returns (mean, std, weight, bias): score = ((x - mean) / std) @ weight + bias. `precise=False` fits in
    float32 without a line search: the amplified-neuron gate's original fit, kept so its gates reproduce."""
    dtype = torch.float64 if precise else torch.float32
    mean, std = x.mean(0), x.std(0).clamp(min=1e-4)
    z = ((x - mean) / std).to(dtype)
    yd = y.to(dtype)
    w = torch.zeros(z.shape[1], dtype=dtype, requires_grad=True)
    b = torch.zeros((), dtype=dtype, requires_grad=True)
    pos_weight = torch.tensor(float((yd == 0).sum()) / max(float((yd == 1).sum()), 1.0), dtype=dtype)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe" if precise else None)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, yd, pos_weight=pos_weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return mean, std, w.detach().float(), b.detach().float()


def fit_bias_free(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *, l2: float = 1e-3, steps: int = 300) -> torch.Tensor:
    """Weighted L2 logistic regression with no intercept and no standardisation: score = x @ w. What a neuron without a
    bias can compute from its input (the folded switch); `weight` gives each row its share of the loss (LBFGS, float64)."""
    xd = x.double()
    scale = xd.pow(2).mean().sqrt().clamp(min=1e-12)
    z, yd, wd = xd / scale, y.double(), (weight / weight.sum()).double()
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z @ w, yd, reduction="none") * wd).sum() + l2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return (w.detach() / scale).float()
