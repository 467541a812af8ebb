"""Can harmful and harmless prompts be told apart by their form alone? A classifier that sees only surface
features (final punctuation, question mark, first word, length, an attack template) is fitted on one pair of
pools and scored on another. Near 0.5 (chance) means style cannot decide; well above it means a method trained
on these pools may learn the form ("no final punctuation -> harmful") instead of the harm.

`audit(train_pos, train_neg, eval_pos, eval_neg)` reports the balanced accuracy on the evaluation pools and the
features that separate them most; `audit_pools(pos, neg)` splits each pool by a hash of the text first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

from .attacks import attack_families
from .prompts import stable_int

LIMIT = 0.65  # above this balanced accuracy the pools are separable by style: the data test fails
ENDINGS = ("none", ".", "?", "!", "other")


@lru_cache(maxsize=1)
def _template_marks() -> tuple[str, ...]:
    """The fixed opening of every attack template (the text before its first placeholder, at most 40 chars)."""
    marks = []
    for templates in attack_families().values():
        for t in templates:
            head = t.split("{", 1)[0].strip()[:40]
            if len(head) >= 12:
                marks.append(head.lower())
    return tuple(marks)


def ending(text: str) -> str:
    t = text.rstrip()
    if not t or t[-1].isalnum():
        return "none"
    return t[-1] if t[-1] in ".?!" else "other"


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip("\"'“‘(").lower() if words else ""


def templated(text: str) -> bool:
    low = text.lower()
    return any(mark in low for mark in _template_marks())


@dataclass
class Features:
    """Surface features of prompts as a matrix, with the first-word vocabulary fitted on the training texts."""

    vocab: tuple[str, ...]

    @classmethod
    def fit(cls, texts: Sequence[str], top_words: int = 40) -> "Features":
        counts: dict[str, int] = {}
        for t in texts:
            w = first_word(t)
            counts[w] = counts.get(w, 0) + 1
        return cls(tuple(sorted(counts, key=lambda w: (-counts[w], w))[:top_words]))

    @property
    def names(self) -> list[str]:
        return ([f"ends with {e}" for e in ENDINGS] + ["contains ?", "words (log)", "characters (log)", "attack template"]
                + [f"first word '{w}'" for w in self.vocab] + ["first word (other)"])

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        index = {w: i for i, w in enumerate(self.vocab)}
        rows = []
        for t in texts:
            end = [float(ending(t) == e) for e in ENDINGS]
            first = [0.0] * (len(self.vocab) + 1)
            first[index.get(first_word(t), len(self.vocab))] = 1.0
            rows.append(end + [float("?" in t), math.log1p(len(t.split())), math.log1p(len(t)), float(templated(t))] + first)
        return np.asarray(rows, dtype=np.float64)


@dataclass
class StyleAudit:
    """The result: balanced accuracy on the evaluation pools (0.5 = chance) and what separates them."""

    accuracy: float
    n_train: tuple[int, int]  # (positive, negative)
    n_eval: tuple[int, int]
    top_features: list[tuple[str, float]] = field(default_factory=list)  # (feature, weight): > 0 points to "positive"
    rates: dict[str, tuple[float, float]] = field(default_factory=dict)  # feature -> (positive rate, negative rate)

    @property
    def separable(self) -> bool:
        return self.accuracy > LIMIT

    def summary(self, positive: str = "harmful", negative: str = "harmless") -> str:
        verdict = ("SEPARABLE BY STYLE: a method trained on these pools may learn their form instead of their meaning"
                   if self.separable else "not separable by style")
        top = ", ".join(f"{name} ({'→ ' + positive if w > 0 else '→ ' + negative})" for name, w in self.top_features[:4])
        return (f"style audit: balanced accuracy {self.accuracy:.3f} (chance 0.5, limit {LIMIT}) — {verdict}; "
                f"strongest features: {top}.")


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 500) -> tuple[np.ndarray, float]:
    """Class-balanced logistic regression by gradient descent on standardised features (deterministic)."""
    w, b = np.zeros(x.shape[1]), 0.0
    weight = np.where(y == 1, 0.5 / max(y.mean(), 1e-9), 0.5 / max(1 - y.mean(), 1e-9))
    lr = 0.5
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        g = weight * (p - y)
        w -= lr * (x.T @ g / len(y) + l2 * w)
        b -= lr * g.mean()
    return w, b


def _balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    recalls = [float((pred[y == c] == c).mean()) for c in (0, 1) if (y == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def audit(train_pos: Sequence[str], train_neg: Sequence[str], eval_pos: Sequence[str], eval_neg: Sequence[str],
          *, top_words: int = 40) -> StyleAudit:
    """Fit the surface-feature classifier on the training pools; its balanced accuracy on the evaluation pools."""
    if not (train_pos and train_neg and eval_pos and eval_neg):
        raise ValueError("The style audit needs prompts in all four pools (train/eval x positive/negative).")
    feats = Features.fit(list(train_pos) + list(train_neg), top_words)
    x_tr, x_ev = feats(list(train_pos) + list(train_neg)), feats(list(eval_pos) + list(eval_neg))
    y_tr = np.array([1] * len(train_pos) + [0] * len(train_neg), dtype=np.float64)
    y_ev = np.array([1] * len(eval_pos) + [0] * len(eval_neg), dtype=np.float64)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-9
    w, b = _fit_logistic((x_tr - mean) / std, y_tr)
    pred = (((x_ev - mean) / std) @ w + b > 0).astype(np.float64)
    order = np.argsort(-np.abs(w))
    names = feats.names
    pos_rate, neg_rate = x_tr[y_tr == 1].mean(0), x_tr[y_tr == 0].mean(0)
    return StyleAudit(_balanced_accuracy(pred, y_ev), (len(train_pos), len(train_neg)), (len(eval_pos), len(eval_neg)),
                      [(names[i], float(w[i])) for i in order[:8]],
                      {names[i]: (float(pos_rate[i]), float(neg_rate[i])) for i in range(len(names))})


def audit_pools(positive: Sequence[str], negative: Sequence[str], *, eval_fraction: float = 0.3, seed: int = 0) -> StyleAudit:
    """Split each pool by a hash of the text (70/30 by default), then `audit` (for a user's own files)."""
    def part(texts, held):
        return [t for t in texts if ((stable_int(t, seed) % 1000) / 1000 < eval_fraction) == held]
    return audit(part(positive, False), part(negative, False), part(positive, True), part(negative, True))
