"""How well does the model itself tell harmful from harmless at the end of the prompt? A ceiling for any
method that must decide to refuse from what the model has read.

For every decoder layer, a logistic probe on the residual stream entering it at the prompt's last token is
fitted on the training pools (harmful vs benign + borderline-safe, plain and wrapped in the training attack
families alike: `Splits.harm_pools`) and scored on another split: ROC AUC, and the share of harmful prompts it
flags when its threshold lets through at most `fpr` of the harmless ones. That threshold is set on the scored
split itself, which makes the figure optimistic: a *ceiling*. If no layer's linear readout flags 90 % of harmful
prompts while flagging at most 5 % of harmless ones, a set of per-neuron gains (the same for every prompt) is
unlikely to refuse that selectively either: it can only act on what the residual stream carries.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..data.splits import Splits, check_split
from ..infra.probes import fit_probe, recall_at_fpr, roc_auc
from ..infra.progress import SILENT, Reporter
from .direction import last_token_residuals


@dataclass
class Pools:
    """Prompt texts of one split: harmful and harmless, each plain and inside the training attack families."""

    harmful: list[str]
    harmless: list[str]
    n_plain: tuple[int, int]  # how many of (harmful, harmless) are plain; the rest are wrapped in templates

    @classmethod
    def of(cls, splits: Splits, split: str, n: int, per_family: int) -> "Pools":
        harmful, harmless = splits.harm_pools(split, n, per_family)
        plain_harmful, plain_harmless = splits.harm_pools(split, n, 0)  # the plain prompts come first in each pool
        return cls(harmful, harmless, (len(plain_harmful), len(plain_harmless)))


def probe_ceiling(lm, splits: Splits, *, split: str = "validation", fpr: float = 0.05, n_train: int = 400,
                  per_family_train: int = 40, n_eval: int = 10**6, per_family_eval: int = 16, batch_size: int = 16,
                  reporter: Reporter | None = None) -> pd.DataFrame:
    """One row per decoder layer: the probe's ROC AUC on `split`, and its recall of harmful prompts (all, plain,
    in templates) at the threshold that flags at most `fpr` of the harmless prompts (plain and in templates,
    whose own rates are shown). Columns also give the pool sizes."""
    check_split(split)
    if split == "train":
        raise ValueError("Score the probe on another split than the one it is fitted on (validation or test).")
    train, held = Pools.of(splits, "train", n_train, per_family_train), Pools.of(splits, split, n_eval, per_family_eval)
    if not (train.harmful and train.harmless and held.harmful and held.harmless):
        raise ValueError("The probe needs harmful and harmless prompts in both the training split and the scored split.")
    reporter = reporter or SILENT
    x_train = last_token_residuals(lm, train.harmful + train.harmless, batch_size=batch_size, reporter=reporter.within("train pools: "))
    x_held = last_token_residuals(lm, held.harmful + held.harmless, batch_size=batch_size, reporter=reporter.within(f"{split} pools: "))
    y = torch.tensor([1.0] * len(train.harmful) + [0.0] * len(train.harmless))
    n_pos, (pos_plain, neg_plain) = len(held.harmful), held.n_plain
    rows = []
    for layer in range(x_train.shape[1]):
        mean, std, w, b = fit_probe(x_train[:, layer], y)
        s = ((x_held[:, layer] - mean) / std) @ w + b
        pos, neg = s[:n_pos], s[n_pos:]
        recall, threshold = recall_at_fpr(pos, neg, fpr)
        rows.append({"layer": layer, "auc": roc_auc(pos, neg), f"harmful flagged @{fpr:g}": recall,
                     "harmful plain": float((pos[:pos_plain] > threshold).float().mean()),
                     "harmful in templates": float((pos[pos_plain:] > threshold).float().mean()) if n_pos > pos_plain else float("nan"),
                     "harmless flagged": float((neg > threshold).float().mean()),
                     "harmless plain flagged": float((neg[:neg_plain] > threshold).float().mean()),
                     "harmless in templates flagged": float((neg[neg_plain:] > threshold).float().mean()) if len(neg) > neg_plain else float("nan"),
                     "n harmful": n_pos, "n harmless": len(neg)})
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame, fpr: float = 0.05) -> str:
    """One line: the best layer by recall at the allowed false-positive rate (ties: AUC)."""
    col = f"harmful flagged @{fpr:g}"
    best = table.sort_values([col, "auc"], ascending=False).iloc[0]
    return (f"best layer {int(best['layer'])}: AUC {best['auc']:.3f}; flags {best[col]:.2f} of harmful prompts "
            f"(plain {best['harmful plain']:.2f}, in templates {best['harmful in templates']:.2f}) while flagging at most "
            f"{fpr:.0%} of harmless ones ({int(best['n harmful'])} harmful, {int(best['n harmless'])} harmless prompts; "
            "threshold set on these prompts, so this is a ceiling).")
