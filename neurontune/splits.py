"""The prompt splits of one run: what attribution and tuning may see, and what evaluation holds out.

Harmful, benign and borderline prompts are split by a hash of their text (stable under reordering);
attack families are split by name, so evaluation can report families tuning never saw.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import data
from .config import DataConfig
from .data import DataError, Prompt


@dataclass
class Splits:
    harmful_train: list[Prompt]
    harmful_test: list[Prompt]
    benign_train: list[Prompt]
    benign_test: list[Prompt]
    borderline_train: list[Prompt]
    borderline_test: list[Prompt]
    train_families: tuple[str, ...]
    heldout_families: tuple[str, ...]

    def attacked_train(self, n_per_family: int, offset: int = 0) -> list[Prompt]:
        """Training harmful prompts wrapped in each training family (a rotating window of prompts)."""
        pool = self.harmful_train
        chosen = [pool[(offset + i) % len(pool)] for i in range(min(n_per_family, len(pool)))]
        return data.attacked(chosen, self.train_families)


def _take(prompts: list[Prompt], n: int) -> list[Prompt]:
    return prompts[:n] if n >= 0 else prompts


def build_splits(cfg: DataConfig) -> Splits:
    harmful = list(data.load_prompts(cfg.harmful_file) if cfg.harmful_file else data.harmful())
    benign = list(data.load_prompts(cfg.benign_file) if cfg.benign_file else data.benign())
    borderline = list(data.load_prompts(cfg.borderline_file) if cfg.borderline_file else data.borderline())
    families = set(data.attack_families())
    unknown = (set(cfg.train_families) | set(cfg.heldout_families)) - families
    if unknown:
        raise DataError(f"Unknown attack families {sorted(unknown)}; known: {sorted(families)}.")
    overlap = set(cfg.train_families) & set(cfg.heldout_families)
    if overlap:
        raise DataError(f"Families {sorted(overlap)} are both trained on and held out; a held-out family must be unseen.")
    parts = {}
    for name, prompts in (("harmful", harmful), ("benign", benign), ("borderline", borderline)):
        train, test = data.split(prompts, cfg.test_fraction, cfg.seed)
        if not train or not test:
            raise DataError(f"The {name} set has {len(prompts)} prompts: too few to split into train and test.")
        parts[name] = (train, test)
    return Splits(*parts["harmful"], *parts["benign"], *parts["borderline"],
                  tuple(cfg.train_families), tuple(cfg.heldout_families))
