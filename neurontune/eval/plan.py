"""The rows an evaluation generates, from one split (validation while choosing, test when reporting): plain
harmful, benign and borderline-safe requests in every phrasing group, alarming-word pairs (the safe request and its
unsafe twin in the same words), harmful requests in every attack family the split may use, and harmless requests
inside those same templates."""
from __future__ import annotations

from ..config import EvalConfig
from ..data.forms import PHRASINGS, phrasing
from ..data.prompts import Prompt
from ..data.splits import Splits, check_split

ROW_FIELDS = ("prompt", "category", "family", "split", "group", "phrasing", "topic", "request",
              "base_answer", "answer", "base_verdict", "verdict", "base_refusal", "refusal", "strength",
              "base_second_verdict", "second_verdict")  # the last two: a second judge's verdicts, where one ran


def by_phrasing(prompts: list[Prompt], n: int) -> list[Prompt]:
    """The first `n` prompts of each phrasing group, in the split's (hashed) order."""
    out = []
    for group in PHRASINGS:
        out += [p for p in prompts if phrasing(p.text) == group][:n]
    return out


def eval_plan(splits: Splits, cfg: EvalConfig, split: str = "test") -> list[dict]:
    """The generation rows of an evaluation on `split`, in a fixed order."""
    check_split(split)
    families = splits.families(split) if cfg.families is None else tuple(f for f in cfg.families if f in splits.families(split))

    def family_group(family: str) -> str:
        return "heldout_family" if family in splits.heldout_families else "train_family"

    def row(p: Prompt, category: str, group: str) -> dict:
        request = p.source or p.text
        return {"prompt": p.text, "category": category, "family": p.family, "split": split, "group": group,
                "phrasing": "template" if p.family != "plain" else phrasing(p.text), "topic": p.category, "request": request}

    rows = [row(p, "harmful", phrasing(p.text)) for p in by_phrasing(splits.harmful[split], cfg.n_harmful)]
    rows += [row(p, "attacked", family_group(p.family))
             for p in splits.attacked("harmful", split, cfg.n_per_family, families)]
    rows += [row(p, "benign", phrasing(p.text)) for p in by_phrasing(splits.benign[split], cfg.n_benign)]
    rows += [row(p, "borderline", phrasing(p.text)) for p in by_phrasing(splits.borderline[split], cfg.n_borderline)]
    if cfg.n_alarming and splits.alarming[split]:  # the same words, safe and unsafe: both halves of each chosen pair
        chosen = [i for group in PHRASINGS for i in [j for j, p in enumerate(splits.alarming[split]) if phrasing(p.text) == group][:cfg.n_alarming]]
        rows += [row(splits.alarming[split][i], "alarming", phrasing(splits.alarming[split][i].text)) for i in chosen]
        rows += [row(splits.contrast[split][i], "contrast", phrasing(splits.contrast[split][i].text)) for i in chosen]
    if cfg.n_benign_per_family:
        half = max(1, cfg.n_benign_per_family // 2)
        wrapped = (splits.attacked("benign", split, cfg.n_benign_per_family - half, families)
                   + splits.attacked("borderline", split, half, families))
        rows += [row(p, "benign_attacked", family_group(p.family)) for p in wrapped]
    return rows
