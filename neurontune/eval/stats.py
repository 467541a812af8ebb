"""Small statistics of the evaluation: rates with their Wilson intervals, means that tolerate empty groups."""
from __future__ import annotations

import math
from typing import Sequence


def mean(values: Sequence[float]) -> float:
    """The mean, or NaN for no values (an empty group has no rate, not a rate of 0)."""
    return float(sum(values) / len(values)) if len(values) else float("nan")


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate (95 % by default): honest at 0/n and n/n, where the normal
    approximation collapses to a point (0 of 30 refusals still allows a rate up to 0.11)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
