"""The rows an evaluation generates: held-out prompts of every group, in a fixed order."""
from __future__ import annotations

from ..config import EvalConfig
from ..data import attacks
from ..data.prompts import Prompt
from ..data.splits import Splits

ROW_FIELDS = ("prompt", "category", "family", "split", "topic", "request", "base_answer", "answer", "base_refusal", "refusal")


def eval_plan(splits: Splits, cfg: EvalConfig) -> list[dict]:
    """The generation rows of an evaluation, in a fixed order (held-out prompts only)."""
    families = tuple(cfg.families) if cfg.families is not None else tuple(sorted(attacks.attack_families()))

    def row(p: Prompt, category: str, split: str) -> dict:
        return {"prompt": p.text, "category": category, "family": p.family, "split": split,
                "topic": p.category, "request": p.source or p.text}

    rows = [row(p, "harmful", "test") for p in splits.harmful_test[: cfg.n_harmful]]
    for p in attacks.attacked(splits.harmful_test[: cfg.n_per_family], families):
        split = ("heldout_family" if p.family in splits.heldout_families else
                 "train_family" if p.family in splits.train_families else "other_family")
        rows.append(row(p, "attacked", split))
    rows += [row(p, "benign", "test") for p in splits.benign_test[: cfg.n_benign]]
    rows += [row(p, "borderline", "test") for p in splits.borderline_test[: cfg.n_borderline]]
    return rows
