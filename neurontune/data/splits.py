"""The prompt splits of one run: what attribution and tuning may see, and what evaluation holds out.

Harmful, benign and borderline prompts are split by a hash of their text (stable under reordering);
attack families are split by name, so evaluation can report families tuning never saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..config import DataConfig
from . import attacks
from . import prompts as sets
from .prompts import DataError, Prompt, stable_int


def split(prompts: Sequence[Prompt], test_fraction: float = 0.3, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic train/test split by a hash of the text: stable when prompts are added or reordered."""
    train, test = [], []
    for p in prompts:
        (test if (stable_int(p.source or p.text, seed) % 1000) / 1000 < test_fraction else train).append(p)
    return train, test


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
        return attacks.attacked(chosen, self.train_families)


def _take(prompts: list[Prompt], n: int) -> list[Prompt]:
    return prompts[:n] if n >= 0 else prompts


def build_splits(cfg: DataConfig) -> Splits:
    harmful = list(sets.load_prompts(cfg.harmful_file) if cfg.harmful_file else sets.harmful())
    benign = list(sets.load_prompts(cfg.benign_file) if cfg.benign_file else sets.benign())
    borderline = list(sets.load_prompts(cfg.borderline_file) if cfg.borderline_file else sets.borderline())
    families = set(attacks.attack_families())
    unknown = (set(cfg.train_families) | set(cfg.heldout_families)) - families
    if unknown:
        raise DataError(f"Unknown attack families {sorted(unknown)}; known: {sorted(families)}.")
    overlap = set(cfg.train_families) & set(cfg.heldout_families)
    if overlap:
        raise DataError(f"Families {sorted(overlap)} are both trained on and held out; a held-out family must be unseen.")
    parts = {}
    for name, prompts in (("harmful", harmful), ("benign", benign), ("borderline", borderline)):
        train, test = split(prompts, cfg.test_fraction, cfg.seed)
        if not train or not test:
            raise DataError(f"The {name} set has {len(prompts)} prompts: too few to split into train and test.")
        parts[name] = (train, test)
    return Splits(*parts["harmful"], *parts["benign"], *parts["borderline"],
                  tuple(cfg.train_families), tuple(cfg.heldout_families))
