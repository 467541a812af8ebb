"""Neuron selection by count thresholds: the top-k safety neurons and the top-k utility neurons.

Rules (shown to the user by `Selection.rules`):
1. Safety neurons: the `k_safety` highest `safety` scores (positive only: they push towards refusal);
   with `safety_rank="contrast"`, the highest `safety - over_refusal` among neurons with positive
   safety: neurons that push harmful prompts towards refusal more than benign ones.
2. Utility neurons: the `k_utility` highest `over_refusal` scores (positive only: they push benign and
   borderline prompts towards refusal); with `utility_rank="contrast"`, the highest `over_refusal - safety`
   among neurons with positive over-refusal: neurons that push harmless prompts towards refusal more than
   harmful ones.
3. Protected: the `protect_top` neurons benign answers depend on most are never amplified.
4. Overlap: a neuron in both sets drives refusal of harmful *and* benign prompts; amplifying it raises
   over-refusal, so it is left untouched (neither amplified nor suppressed).
An optional per-layer cap applies to each set before the overlap rule.
Everything is a few top-k calls on cached tensors: well under 100 ms for 46k neurons.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from ..config import SelectionConfig
from ..interventions.modulation import Modulation

RULES = (
    "Safety neurons: top k_safety by safety score (> 0), or by safety minus over-refusal score when "
    "ranking by contrast. Utility neurons: top k_utility by over-refusal "
    "score (> 0). The protect_top neurons benign answers depend on most are never amplified. A neuron in "
    "both sets is left untouched (it drives refusal of harmful and benign prompts alike)."
)

ROLES = {"safety": "amplify", "utility": "suppress", "overlap": "left alone (in both sets)", "protected": "protected"}  # mask -> role


class SelectionError(ValueError):
    """A threshold is out of range; the message gives the valid range."""


@dataclass
class Selection:
    safety: torch.Tensor  # [n_layers, n_neurons] bool: amplify
    utility: torch.Tensor  # [n_layers, n_neurons] bool: suppress
    overlap: torch.Tensor  # [n_layers, n_neurons] bool: in both candidate sets, left untouched
    protected: torch.Tensor  # [n_layers, n_neurons] bool: benign-critical, never amplified
    protected_dropped: torch.Tensor  # [n_layers, n_neurons] bool: safety candidates dropped as protected
    config: SelectionConfig
    rules: str = RULES
    safety_rank: torch.Tensor | None = None  # [n_layers, n_neurons] the score the safety neurons were ranked by

    def top_safety(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, neurons) of the `k` safety neurons ranked highest (what a gate fitted before training reads)."""
        picked = self.safety.nonzero()
        rank = self.safety_rank[picked[:, 0], picked[:, 1]] if self.safety_rank is not None else torch.zeros(len(picked))
        order = torch.argsort(rank, descending=True, stable=True)[:k]
        return picked[order, 0], picked[order, 1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.safety.shape)

    def role(self, layer: int, index: int) -> str:
        """What the selection does with one neuron (a value of `ROLES`), or "" when it is not selected."""
        return next((role for mask, role in ROLES.items() if bool(getattr(self, mask)[layer, index])), "")

    def counts(self) -> dict[str, int]:
        return {"safety": int(self.safety.sum()), "utility": int(self.utility.sum()),
                "overlap_dropped": int(self.overlap.sum()), "protected_dropped": int(self.protected_dropped.sum())}

    def per_layer(self) -> pd.DataFrame:
        return pd.DataFrame({"layer": range(self.shape[0]), "safety": self.safety.sum(1).numpy(),
                             "utility": self.utility.sum(1).numpy()})

    def initial_gains(self, safety_gain: float = 1.0, utility_gain: float = 1.0) -> torch.Tensor:
        """Dense [n_layers, n_neurons] gains: `safety_gain` on safety neurons, `utility_gain` on utility ones."""
        g = torch.ones(self.shape)
        g[self.safety] = safety_gain
        g[self.utility] = utility_gain
        return g

    def modulation(self, safety_gain: float, utility_gain: float = 1.0, fingerprint: str | None = None) -> Modulation:
        """A fixed-gain modulation of the selection (the "attribution only" baseline, or a quick preview)."""
        return Modulation.from_dense(self.initial_gains(safety_gain, utility_gain), fingerprint,
                                     {"kind": "fixed", "safety_gain": safety_gain, "utility_gain": utility_gain})


def _top_mask(scores: torch.Tensor, k: int, per_layer_cap: int | None) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    s = scores.clone()
    s[s <= 0] = float("-inf")  # only neurons that push towards refusal qualify
    if per_layer_cap is not None:
        cap = min(per_layer_cap, s.shape[1])
        keep = torch.zeros_like(mask)
        keep.scatter_(1, torch.topk(s, cap, dim=1).indices, True)
        s[~keep] = float("-inf")
    vals, flat = torch.topk(s.flatten(), min(k, s.numel()))
    mask.view(-1)[flat[torch.isfinite(vals)]] = True
    return mask


def _check(name: str, value, upper: int | None, what: str = "the model has") -> int:
    """A whole number in 0..upper (upper None: not known yet, e.g. before the model loads)."""
    within = f"between 0 and {upper}" if upper is not None else "0 or more"
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < 0 or (upper is not None and number > upper):
        context = f"; {what} {upper:,} neurons, choose 0..{upper}" if upper is not None else ""
        raise SelectionError(f"{name} must be a whole number {within}, not {value!r}{context}.")
    return int(number)


def check_counts(cfg: SelectionConfig, shape: tuple[int, int] | None = None, *, training: bool = False) -> tuple[int, int, int, int | None]:
    """Validate the thresholds (against a model of `shape` = (n_layers, n_neurons) when known) before any
    work: returns (k_safety, k_utility, protect_top, per_layer_cap). `training`: at least one neuron must be selected."""
    total = shape[0] * shape[1] if shape else None
    k_s = _check("k_safety", cfg.k_safety, total)
    k_u = _check("k_utility", cfg.k_utility, total)
    protect = _check("protect_top", cfg.protect_top, total)
    cap = None if cfg.per_layer_cap is None else _check("per_layer_cap", cfg.per_layer_cap, shape[1] if shape else None,
                                                        "each layer has")
    if cfg.safety_rank not in ("safety", "contrast"):
        raise SelectionError(f"safety_rank must be 'safety' or 'contrast', not {cfg.safety_rank!r}.")
    if cfg.utility_rank not in ("over_refusal", "contrast"):
        raise SelectionError(f"utility_rank must be 'over_refusal' or 'contrast', not {cfg.utility_rank!r}.")
    if training and k_s == 0 and k_u == 0:
        raise SelectionError("k_safety and k_utility are both 0: there is nothing to train. Choose at least 1 neuron "
                             "in one of them" + (f" (the model has {total:,}; choose 1..{total})." if total else "."))
    return k_s, k_u, protect, cap


def select(scores, cfg: SelectionConfig = SelectionConfig()) -> Selection:
    """Apply the selection rules to cached `NeuronScores` (anything with ["safety"], ["over_refusal"])."""
    safety_s, over_s = scores["safety"], scores["over_refusal"]
    k_s, k_u, protect, cap = check_counts(cfg, tuple(safety_s.shape))
    raw_safety = safety_s
    if cfg.safety_rank == "contrast":
        safety_s = torch.where(safety_s > 0, (safety_s - over_s).clamp(min=0), torch.zeros_like(safety_s))
    if cfg.utility_rank == "contrast":
        over_s = torch.where(over_s > 0, (over_s - raw_safety).clamp(min=0), torch.zeros_like(over_s))
    safety_raw = _top_mask(safety_s, k_s, cap)
    utility_raw = _top_mask(over_s, k_u, cap)
    protected = torch.zeros_like(safety_raw)
    if protect and "benign_dependence" in getattr(scores, "scores", scores):
        dep = scores["benign_dependence"]
        protected.view(-1)[torch.topk(dep.flatten(), protect).indices] = True
    overlap = safety_raw & utility_raw
    safety = safety_raw & ~overlap
    return Selection(safety & ~protected, utility_raw & ~overlap, overlap, protected, safety & protected, cfg,
                     safety_rank=safety_s)
