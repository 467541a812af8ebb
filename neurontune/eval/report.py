"""The evaluation table as a reader needs it: every rate with its Wilson 95 % interval, and over several
training seeds the mean ± sd, in blocks that compare like with like (static gains with static gains, gated
with gated)."""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from .harness import MAIN_METRICS, STRICT, STRICT_RATES, EvalResult
from .stats import wilson

HEADLINE = ("harmful_refusal", "heldout_family_refusal", "train_family_refusal", "contrast_refusal", "benign_over_refusal",
            "template_over_refusal", "borderline_over_refusal", "alarming_over_refusal", "ppl_ratio", "mc_accuracy", "degenerate_rate",
            "judge_agreement")  # the last: both judges ran
LABELS = {"harmful_refusal": "harmful refusal ↑", "heldout_family_refusal": "held-out attacks ↑",
          "train_family_refusal": "training attacks ↑", "contrast_refusal": "unsafe twins ↑", "benign_over_refusal": "benign over-refusal ↓",
          "template_over_refusal": "benign in templates ↓", "borderline_over_refusal": "borderline over-refusal ↓",
          "alarming_over_refusal": "alarming words ↓",
          "ppl_ratio": "ppl ratio", "mc_accuracy": "MC accuracy", "degenerate_rate": "degenerate ↓", "repetition_rate": "repetition ↓",
          "judge_agreement": "judges agree"}
LABELS.update({STRICT + k: f"{LABELS[k]} (full only)" for k in STRICT_RATES})


def summarise(groups: dict[str, Sequence[EvalResult]], metrics: Sequence[str] = MAIN_METRICS) -> pd.DataFrame:
    """One row per intervention name, over its results (one per seed): for each metric the mean, sd over seeds,
    the number of prompts n, and the Wilson 95 % interval of the mean rate at n (columns `metric`,
    `metric:sd`, `metric:lo`, `metric:hi`, `metric:n`, and `seeds`)."""
    rows = []
    for name, results in groups.items():
        row: dict = {"intervention": name, "seeds": len(results)}
        keys = [m for m in metrics if any(m in r.metrics for r in results)]
        keys += sorted({k for r in results for k in r.metrics} - set(keys))
        for m in keys:
            values = [r.metrics[m] for r in results if m in r.metrics and r.metrics[m] == r.metrics[m]]
            if not values:
                continue
            mean = sum(values) / len(values)
            row[m] = mean
            row[f"{m}:sd"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)
            n = next((r.counts[m][1] for r in results if m in r.counts), None)
            if n:
                row[f"{m}:n"] = n
                row[f"{m}:lo"], row[f"{m}:hi"] = wilson(mean * n, n)
        rows.append(row)
    return pd.DataFrame(rows).set_index("intervention")


def cell(frame: pd.DataFrame, name: str, metric: str) -> str:
    """'0.933 ± 0.012 [0.87, 0.97]' (sd only over several seeds; interval only for rates)."""
    if metric not in frame.columns or pd.isna(frame.at[name, metric]):
        return "–"
    text = f"{frame.at[name, metric]:.3f}"
    if frame.at[name, "seeds"] > 1 and f"{metric}:sd" in frame.columns and not pd.isna(frame.at[name, f"{metric}:sd"]):
        text += f" ± {frame.at[name, f'{metric}:sd']:.3f}"
    if f"{metric}:lo" in frame.columns and not pd.isna(frame.at[name, f"{metric}:lo"]):
        text += f" [{frame.at[name, f'{metric}:lo']:.2f}, {frame.at[name, f'{metric}:hi']:.2f}]"
    return text


def markdown(frame: pd.DataFrame, blocks: dict[str, Sequence[str]] | None = None, metrics: Sequence[str] = HEADLINE) -> str:
    """A markdown table of `metrics` (mean ± sd [Wilson 95 %]), rows grouped in titled blocks."""
    blocks = blocks or {"": list(frame.index)}
    cols = [m for m in metrics if m in frame.columns]
    lines = ["| | " + " | ".join(LABELS.get(m, m) for m in cols) + " |", "|---|" + "---|" * len(cols)]
    for title, names in blocks.items():
        names = [n for n in names if n in frame.index]
        if not names:
            continue
        if title:
            lines.append(f"| **{title}** |" + " |" * len(cols))
        lines += ["| " + name + " | " + " | ".join(cell(frame, name, m) for m in cols) + " |" for name in names]
    return "\n".join(lines)
