"""Sweep the selection thresholds (k_safety, k_utility): select, train, evaluate each setting, draw the
safety / over-refusal trade-off with the baselines on the same axes, and write it all to a folder. Every
point keeps its gains (a run folder per point), so a researcher can pick one off the plot and use it; the
frame's `split` column says which prompt split the figures were measured on."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import plotly.graph_objects as go

from ..config import VALIDATION_EVAL, RunConfig, SelectionConfig
from ..data.splits import build_splits
from ..eval.harness import evaluate
from ..eval.proxy import proxy_metrics
from ..infra.progress import SILENT, Reporter
from ..interventions.gating import Gated
from ..method.neuron_scores import NeuronScores, run_attribution
from ..method.recipe import train_run
from ..method.selection import Selection, select
from .folder import RunFolder

X_COLUMNS = ("benign_over_refusal", "benign_over_refusal_proxy")
Y_COLUMNS = ("harmful_refusal", "harmful_refusal_proxy")
BASELINE_SYMBOLS = ("diamond", "square", "triangle-up", "x", "star", "cross", "triangle-down", "pentagon")


GRID_HELP = "write k_safety:k_utility pairs of whole numbers >= 0, separated by commas, e.g. 250:0, 750:250"


def parse_grid(text: str) -> list[tuple[int, int]]:
    """'250:0, 750:250' -> [(250, 0), (750, 250)]: the sweep grid as the CLI's --grid and the studio's box take it;
    ValueError with what to write otherwise."""
    points = [point.split(":") for point in (text or "").replace(" ", "").split(",") if point]
    if not points or not all(len(p) == 2 and all(x.isdigit() for x in p) for p in points):
        raise ValueError(f"The sweep grid {text!r} is not readable: {GRID_HELP}.")
    return [(int(a), int(b)) for a, b in points]


def sweep(lm, scores, grid: Sequence[tuple[int, int]], train_fn: Callable[[Selection], object],
          eval_fn: Callable[[object], dict], reporter: Reporter | None = None,
          *, selection: SelectionConfig = SelectionConfig(), keep: Callable[[Selection, object], None] | None = None) -> pd.DataFrame:
    """For each (k_safety, k_utility): select with `selection` (its other fields kept), `train_fn(selection)`
    -> a Modulation (or any intervention), `keep(selection, intervention)` (to save it), `eval_fn(intervention)`
    -> metrics dict (or an EvalResult). Returns one row per grid point: k's, selection counts, seconds, metrics."""
    rows, reporter = [], reporter or SILENT
    for i, (k_safety, k_utility) in enumerate(grid):
        reporter.check("The sweep")
        start = time.perf_counter()
        sel = select(scores, dataclasses.replace(selection, k_safety=int(k_safety), k_utility=int(k_utility)))
        intervention = train_fn(sel)
        if keep is not None:
            keep(sel, intervention)
        metrics = eval_fn(intervention)
        metrics = getattr(metrics, "metrics", metrics)  # an EvalResult is fine too
        rows.append({"k_safety": int(k_safety), "k_utility": int(k_utility),
                     **{f"n_{k}": v for k, v in sel.counts().items()},
                     "n_modulated": getattr(getattr(intervention, "inner", intervention), "n_modulated", None),
                     "gated": isinstance(intervention, Gated),
                     "seconds": time.perf_counter() - start, **dict(metrics)})
        reporter.progress(i + 1, len(grid), f"k_safety={k_safety}, k_utility={k_utility}")
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


def split_of(frame: pd.DataFrame) -> str | None:
    """The prompt split a sweep frame was measured on (None for a sweep written before frames said so)."""
    if "split" not in frame.columns or not len(frame):
        return None
    return str(frame["split"].iloc[0])


def tradeoff_figure(frame: pd.DataFrame, baselines: pd.DataFrame | None = None, *, x: str | None = None,
                    y: str | None = None, title: str = "Safety vs over-refusal",
                    current: tuple[int, int] | None = None) -> go.Figure:
    """x = benign over-refusal, y = harmful refusal (the judged metrics, or their proxies when only those
    exist); one labelled point per sweep setting (its row number in `customdata`, for click handlers); each
    baseline (a row of `baselines`, named by its index or a `name` column) as its own marker and legend entry.
    The title and axes name the split the figures were measured on; `current` (k_safety, k_utility) rings
    that sweep point as the operating point in use."""
    x, y = _pick(frame, x, X_COLUMNS, "x"), _pick(frame, y, Y_COLUMNS, "y")
    split = split_of(frame)
    on = f" ({split} split)" if split else ""
    if split:
        title = f"{title}: {'first-token proxy' if x.endswith('_proxy') else 'judged'} on the {split} split"
    labels = [f"ks={int(a)}, ku={int(b)}" for a, b in zip(frame["k_safety"], frame["k_utility"])]
    fig = go.Figure(go.Scatter(x=frame[x], y=frame[y], mode="markers+text", text=labels, textposition="top center",
                               name="NeuronTune sweep (click a point)", marker=dict(size=12), customdata=list(range(len(frame))),
                               hovertemplate="%{text}<br>" + x + " %{x:.3f}<br>" + y + " %{y:.3f}<extra>point %{customdata}</extra>"))
    if current is not None:
        hit = frame.index[(frame["k_safety"] == int(current[0])) & (frame["k_utility"] == int(current[1]))]
        if len(hit):
            row = frame.loc[hit[0]]
            fig.add_trace(go.Scatter(x=[row[x]], y=[row[y]], mode="markers", name="current operating point", hoverinfo="skip",
                                     marker=dict(size=24, symbol="circle-open", color="#d62728", line=dict(width=3))))
    if baselines is not None and len(baselines):
        names = baselines["name"] if "name" in baselines.columns else baselines.index.astype(str)
        for j, (name, (_, row)) in enumerate(zip(names, baselines.iterrows())):
            fig.add_trace(go.Scatter(x=[row[x]], y=[row[y]], mode="markers", name=str(name),
                                     marker=dict(size=13, symbol=BASELINE_SYMBOLS[j % len(BASELINE_SYMBOLS)])))
    fig.update_layout(title=title, xaxis_title=f"{x}{on} (lower is better)", yaxis_title=f"{y}{on} (higher is better)",
                      template="plotly_white")
    xs = pd.concat([frame[x], baselines[x]]) if baselines is not None and x in baselines else frame[x]
    lo, hi = float(xs.min()), float(xs.max())
    pad = 0.12 * (hi - lo) or 0.05
    fig.update_xaxes(range=[lo - pad, hi + pad])  # room for the point labels at both ends
    return fig


SWEEP_METRICS = ("harmful_refusal", "train_family_refusal", "heldout_family_refusal", "contrast_refusal", "benign_over_refusal",
                 "template_over_refusal", "borderline_over_refusal", "alarming_over_refusal", "ppl_ratio", "mc_accuracy")


def sweep_run(lm, cfg: RunConfig, grid: Sequence[tuple[int, int]], out: str | Path | RunFolder, *, scores: NeuronScores | None = None,
              split: str = "validation", judged: bool = False, cache_dir=None, reporter: Reporter | None = None) -> pd.DataFrame:
    """Select + train + evaluate each grid point on the validation split, with the base model on the same axes;
    writes sweep.csv (with a `split` column), tradeoff.html and, for each point, a run folder with its preset,
    selection, gains and, when the preset fits one, input gate (`RunFolder(out).point(k_safety, k_utility)`).

    Each point is trained the way `tune` trains the preset (`method.recipe.train_run`: with `meta.gate_first` the
    gate first, then the gains behind it) and measured in the form the studio shows: behind its gate when it has
    one. The export's foldable modulation is not trained (a sweep chooses the dial). judged=False: first-token
    refusal proxies (one forward, fast, relative); judged=True: the validation evaluation (`VALIDATION_EVAL`:
    24-token answers judged, every prompt group, perplexity and multiple choice; minutes a point).
    A sweep is for choosing thresholds, so the test split is refused (it is read once, for the reported table)."""
    if split == "test":
        raise ValueError("The sweep chooses thresholds, so it reads the validation split only; the test split is read "
                         "once, for the table you report (`python -m neurontune evaluate --run DIR`).")
    reporter = reporter or SILENT
    if scores is None:
        reporter.phase("attribution")
        scores = run_attribution(lm, cfg, cache_dir=cache_dir, reporter=reporter)
    reporter.phase("sweep", len(grid))
    splits = build_splits(cfg.data)
    folder = RunFolder(out)
    train_cfg = cfg.replace(fold={"form": "none"})
    base_cache: dict = {}

    def train_fn(selection: Selection):
        trained = train_run(lm, selection, train_cfg, splits, cache_dir=cache_dir, reporter=reporter.muted())
        return Gated(trained.modulation, trained.gate) if trained.gate is not None else trained.modulation

    def keep(selection: Selection, intervention) -> None:
        s = selection.config
        point = folder.point(s.k_safety, s.k_utility)
        point.write_config(cfg.replace(selection={"k_safety": s.k_safety, "k_utility": s.k_utility}))
        point.write_selection(selection)
        point.write_modulation(getattr(intervention, "inner", intervention))
        if isinstance(intervention, Gated):
            point.write_gate(intervention.probe)

    def eval_fn(intervention) -> dict:
        if not judged:
            return proxy_metrics(lm, intervention, splits, n=48, split=split)
        metrics = evaluate(lm, intervention, splits, VALIDATION_EVAL, split=split, base=base_cache, cache_dir=cache_dir).metrics
        return {k: metrics[k] for k in SWEEP_METRICS if k in metrics}

    frame = sweep(lm, scores, grid, train_fn, eval_fn, reporter=reporter, selection=cfg.selection, keep=keep)
    frame["split"] = split
    base = pd.DataFrame([{"name": "base", **eval_fn(None), "split": split}])
    folder.write_sweep(frame, base, tradeoff_figure(frame, base))
    reporter.say(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    return frame
