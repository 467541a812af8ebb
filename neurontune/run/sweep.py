"""Sweep the selection thresholds (k_safety, k_utility): select, train, evaluate each setting, draw the
safety / over-refusal trade-off with the baselines on the same axes, and write it all to a folder."""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import plotly.graph_objects as go

from ..config import RunConfig, SelectionConfig
from ..data.splits import build_splits
from ..eval.proxy import proxy_metrics
from ..infra.progress import Progress, check_cancel
from ..interventions.modulation import Modulation
from ..method.metalearn import train_gains
from ..method.neuron_scores import NeuronScores, run_attribution
from ..method.selection import Selection, select
from .folder import RunFolder

X_COLUMNS = ("benign_over_refusal", "benign_over_refusal_proxy")
Y_COLUMNS = ("harmful_refusal", "harmful_refusal_proxy")
BASELINE_SYMBOLS = ("diamond", "square", "triangle-up", "x", "star", "cross", "triangle-down", "pentagon")


def sweep(lm, scores, grid: Sequence[tuple[int, int]], train_fn: Callable[[Selection], object],
          eval_fn: Callable[[object], dict], progress: Progress | None = None, cancel: threading.Event | None = None,
          *, selection: SelectionConfig = SelectionConfig()) -> pd.DataFrame:
    """For each (k_safety, k_utility): select with `selection` (its other fields kept), `train_fn(selection)`
    -> a Modulation (or any intervention), `eval_fn(intervention)` -> metrics dict (or an EvalResult).
    Returns one row per grid point: k's, selection counts, seconds, and the metrics."""
    rows = []
    for i, (k_safety, k_utility) in enumerate(grid):
        check_cancel(cancel, "The sweep")
        start = time.perf_counter()
        sel = select(scores, dataclasses.replace(selection, k_safety=int(k_safety), k_utility=int(k_utility)))
        intervention = train_fn(sel)
        metrics = eval_fn(intervention)
        metrics = getattr(metrics, "metrics", metrics)  # an EvalResult is fine too
        rows.append({"k_safety": int(k_safety), "k_utility": int(k_utility),
                     **{f"n_{k}": v for k, v in sel.counts().items()},
                     "n_modulated": getattr(intervention, "n_modulated", None),
                     "seconds": time.perf_counter() - start, **dict(metrics)})
        if progress:
            progress(i + 1, len(grid), f"k_safety={k_safety}, k_utility={k_utility}")
    frame = pd.DataFrame(rows)
    frame.attrs["model"] = getattr(lm, "name", "")
    return frame


def _pick(frame: pd.DataFrame, wanted: str | None, options: Sequence[str], axis: str) -> str:
    if wanted is not None:
        if wanted not in frame.columns:
            raise KeyError(f"No column '{wanted}' for the {axis} axis; columns: {list(frame.columns)}.")
        return wanted
    for c in options:
        if c in frame.columns:
            return c
    raise KeyError(f"None of {list(options)} in the frame for the {axis} axis; pass {axis}= a column name.")


def tradeoff_figure(frame: pd.DataFrame, baselines: pd.DataFrame | None = None, *, x: str | None = None,
                    y: str | None = None, title: str = "Safety vs over-refusal") -> go.Figure:
    """x = benign over-refusal, y = harmful refusal (the judged metrics, or their proxies when only those
    exist); one labelled point per sweep setting; each baseline (a row of `baselines`, named by its index
    or a `name` column, e.g. `evaluate.compare(...)`) as its own marker and legend entry."""
    x, y = _pick(frame, x, X_COLUMNS, "x"), _pick(frame, y, Y_COLUMNS, "y")
    labels = [f"ks={int(a)}, ku={int(b)}" for a, b in zip(frame["k_safety"], frame["k_utility"])]
    fig = go.Figure(go.Scatter(x=frame[x], y=frame[y], mode="markers+text", text=labels, textposition="top center",
                               name="NeuronTune sweep", marker=dict(size=10)))
    if baselines is not None and len(baselines):
        names = baselines["name"] if "name" in baselines.columns else baselines.index.astype(str)
        for j, (name, (_, row)) in enumerate(zip(names, baselines.iterrows())):
            fig.add_trace(go.Scatter(x=[row[x]], y=[row[y]], mode="markers", name=str(name),
                                     marker=dict(size=13, symbol=BASELINE_SYMBOLS[j % len(BASELINE_SYMBOLS)])))
    fig.update_layout(title=title, xaxis_title=f"{x} (lower is better)", yaxis_title=f"{y} (higher is better)",
                      template="plotly_white")
    xs = pd.concat([frame[x], baselines[x]]) if baselines is not None and x in baselines else frame[x]
    lo, hi = float(xs.min()), float(xs.max())
    pad = 0.12 * (hi - lo) or 0.05
    fig.update_xaxes(range=[lo - pad, hi + pad])  # room for the point labels at both ends
    return fig


def sweep_run(lm, cfg: RunConfig, grid: Sequence[tuple[int, int]], out: str | Path | RunFolder, *, scores: NeuronScores | None = None,
              split: str = "validation", cache_dir=None, progress=None, cancel=None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Select + train + proxy-evaluate each grid point (fast: no generation), with the base model on the same
    axes; writes sweep.csv and tradeoff.html. A sweep is for choosing thresholds, so it reads the validation
    split; the test split is refused (it is read once, for the reported table)."""
    if split == "test":
        raise ValueError("The sweep chooses thresholds, so it reads the validation split only; the test split is read "
                         "once, for the table you report (`python -m neurontune evaluate --run DIR`).")
    scores = scores or run_attribution(lm, cfg, cache_dir=cache_dir)
    splits = build_splits(cfg.data)

    def train_fn(selection: Selection) -> Modulation:
        return train_gains(lm, selection, cfg, splits=splits, cache_dir=cache_dir, cancel=cancel).modulation

    def eval_fn(intervention) -> dict:
        return proxy_metrics(lm, intervention, splits, n=48, split=split)

    frame = sweep(lm, scores, grid, train_fn, eval_fn, progress=progress, cancel=cancel, selection=cfg.selection)
    frame["split"] = split
    base = pd.DataFrame([{"name": "base", **proxy_metrics(lm, None, splits, n=48, split=split), "split": split}])
    RunFolder(out).write_sweep(frame, base, tradeoff_figure(frame, base))
    log(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    return frame
