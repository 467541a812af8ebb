"""The prompt splits of one run: train (attribution, tuning), validation (every choice: early stopping,
presets, thresholds, the gate's bias, the sweep) and test (read once per reported table).

Harmful, benign and borderline prompts are split by a hash of their original text (stable under reordering
and under the form rewrite), and each split is shuffled by a hash, so a slice mixes every source and form.
Attack families are split by name: held-out families are only ever used on the test split, so evaluation
can report families that neither tuning nor any choice saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..config import DataConfig
from . import attacks
from . import prompts as sets
from .prompts import DataError, Prompt, stable_int
from .style_audit import StyleAudit, audit

SPLITS = ("train", "validation", "test")


def split3(prompts: Sequence[Prompt], val_fraction: float, test_fraction: float, seed: int = 0) -> dict[str, list[Prompt]]:
    """Deterministic train/validation/test split by a hash of each prompt's original text, each part in a
    hashed order (so that `part[:n]` is a fair sample of every source and form)."""
    parts: dict[str, list[Prompt]] = {name: [] for name in SPLITS}
    for p in prompts:
        u = (stable_int(p.source or p.text, seed) % 1000) / 1000
        parts["test" if u < test_fraction else "validation" if u < test_fraction + val_fraction else "train"].append(p)
    return {name: sorted(part, key=lambda p: stable_int(p.source or p.text, seed + 7919)) for name, part in parts.items()}


def split(prompts: Sequence[Prompt], test_fraction: float = 0.3, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic two-way split by a hash of the text (inside one training pool: support vs query batches)."""
    parts = split3(prompts, 0.0, test_fraction, seed)
    return parts["train"], parts["test"]


def split_pairs(pairs: Sequence[tuple[Prompt, Prompt]], val_fraction: float, test_fraction: float,
                seed: int = 0) -> tuple[dict[str, list[Prompt]], dict[str, list[Prompt]]]:
    """Split (first, second) pairs together, by a hash of the first's original text: both halves of a pair land
    in the same split, at the same position of their lists."""
    twin = {p.source or p.text: q for p, q in pairs}
    firsts = split3([p for p, _ in pairs], val_fraction, test_fraction, seed)
    return firsts, {name: [twin[p.source or p.text] for p in part] for name, part in firsts.items()}


@dataclass
class Splits:
    harmful: dict[str, list[Prompt]]  # split name -> prompts
    benign: dict[str, list[Prompt]]
    borderline: dict[str, list[Prompt]]
    train_families: tuple[str, ...]
    heldout_families: tuple[str, ...]
    # safe requests with alarming words, and their unsafe twins in the same words (aligned: contrast[s][i] is the
    # twin of alarming[s][i]); empty when the run's data turns them off
    alarming: dict[str, list[Prompt]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    contrast: dict[str, list[Prompt]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    # training only: (safe, unsafe) pairs about staying safe from a harm and causing it (`prompts.safety_pairs`),
    # read by the gate when its run asks (`meta.gate_safety_pairs`); no evaluation reads them
    safety: list[tuple[Prompt, Prompt]] = field(default_factory=list)

    # the names most code reads
    @property
    def harmful_train(self) -> list[Prompt]:
        return self.harmful["train"]

    @property
    def benign_train(self) -> list[Prompt]:
        return self.benign["train"]

    @property
    def borderline_train(self) -> list[Prompt]:
        return self.borderline["train"]

    @property
    def harmful_test(self) -> list[Prompt]:
        return self.harmful["test"]

    @property
    def benign_test(self) -> list[Prompt]:
        return self.benign["test"]

    @property
    def borderline_test(self) -> list[Prompt]:
        return self.borderline["test"]

    def families(self, split: str) -> tuple[str, ...]:
        """Attack families a split may use: held-out families on the test split only."""
        check_split(split)
        return tuple(self.train_families) + (tuple(self.heldout_families) if split == "test" else ())

    def attacked(self, kind: str, split: str, n_per_family: int, families: Sequence[str] | None = None) -> list[Prompt]:
        """The first `n_per_family` prompts of one kind ("harmful", "benign", "borderline") of a split, wrapped
        in each family the split may use (or `families`, which must be among them)."""
        allowed = self.families(split)
        chosen = tuple(families) if families is not None else allowed
        if set(chosen) - set(allowed):
            raise DataError(f"The {split} split may not use the attack families {sorted(set(chosen) - set(allowed))}: "
                            "held-out families are for the test split only.")
        pool = getattr(self, kind)[split]
        return attacks.attacked(pool[:n_per_family], chosen)

    def harm_pools(self, split: str, n: int, per_family: int, *, pairs: int | None = None,
                   safety: bool = False) -> tuple[list[str], list[str]]:
        """(harmful, harmless) texts of one split, plain and wrapped in the training attack families in both pools
        alike, so that a template alone does not tell them apart: the first `n` harmful requests and `per_family`
        per family; harmless = 70 % benign, 30 % borderline-safe, in the same proportions inside the families.
        Then the first `pairs` alarming-word pairs (default n // 2): the unsafe twins with the harmful, the safe ones
        with the harmless, so that alarming words alone do not tell them apart either. The plain prompts come first."""
        k = n // 2 if pairs is None else pairs
        positive = ([p.text for p in self.harmful[split][:n]] + [p.text for p in self.contrast[split][:k]]
                    + [p.text for p in self.attacked("harmful", split, per_family, self.train_families)])
        negative = ([p.text for p in self.benign[split][: n * 7 // 10]] + [p.text for p in self.borderline[split][: n * 3 // 10]]
                    + [p.text for p in self.alarming[split][:k]]
                    + [p.text for p in self.attacked("benign", split, per_family * 2 // 3, self.train_families)]
                    + [p.text for p in self.attacked("borderline", split, per_family - per_family * 2 // 3, self.train_families)])
        if safety and split == "train":
            positive += [unsafe.text for _, unsafe in self.safety]
            negative += [safe.text for safe, _ in self.safety]
        return positive, negative

    def style_audit(self, split: str) -> StyleAudit:
        """Can the training pools' form predict harmful vs harmless on `split`? (plain requests, alarming-word pairs
        included: a classifier of surface features fitted on train, its balanced accuracy there)."""
        def texts(kinds: tuple[str, ...], part: str) -> list[str]:
            return [p.text for kind in kinds for p in getattr(self, kind)[part]]
        harmful, harmless = ("harmful", "contrast"), ("benign", "borderline", "alarming")
        return audit(texts(harmful, "train"), texts(harmless, "train"), texts(harmful, split), texts(harmless, split))

    def attacked_train(self, n_per_family: int) -> list[Prompt]:
        """Training harmful prompts wrapped in each training family."""
        return self.attacked("harmful", "train", n_per_family)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    return split


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
    if cfg.alarming_pairs:
        parts["alarming"], parts["contrast"] = split_pairs(sets.alarming_pairs(), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    for name, pool in (("harmful", harmful), ("benign", benign), ("borderline", borderline)):
        parts[name] = split3(pool, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        empty = [s for s, part in parts[name].items() if not part]
        if empty:
            raise DataError(f"The {name} set has {len(pool)} prompts: too few to split into train, validation and test "
                            f"({', '.join(empty)} would be empty). Add prompts (a few dozen at least).")
    extra = {k: parts[k] for k in ("alarming", "contrast") if k in parts}
    return Splits(parts["harmful"], parts["benign"], parts["borderline"], tuple(cfg.train_families), tuple(cfg.heldout_families),
                  safety=list(sets.safety_pairs()), **extra)
