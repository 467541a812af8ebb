"""Evaluate a run folder: the base model, the tuned modulation and the baselines in one harness, and
the (k_safety, k_utility) sweep. Writes eval.json, eval_table.csv, generations.jsonl (and sweep.csv,
tradeoff.html). Used by the CLI and the studio."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from . import distributed as dist
from .config import RunConfig
from .evaluate import EvalConfig, compare, evaluate_many, proxy_metrics
from .metalearn import train_gains
from .modulation import Modulation
from .neuron_scores import NeuronScores
from .pipeline import write_json
from .selection import Selection, select
from .splits import Splits, build_splits

BASELINES = ("direction", "random", "attribution_only")
QUICK = EvalConfig(n_harmful=30, n_per_family=8, n_benign=30, n_borderline=24, n_ppl=16, max_new_tokens=40)
FULL = EvalConfig(n_harmful=80, n_per_family=16, n_benign=80, n_borderline=50, n_ppl=30, max_new_tokens=48)


def random_selection(selection: Selection, seed: int = 0) -> Selection:
    """The same numbers of safety and utility neurons, drawn uniformly at random (the control that shows
    attribution matters)."""
    gen = torch.Generator().manual_seed(seed)
    n = selection.safety.numel()
    perm = torch.randperm(n, generator=gen)
    k_s, k_u = int(selection.safety.sum()), int(selection.utility.sum())
    safety = torch.zeros(n, dtype=torch.bool)
    utility = torch.zeros(n, dtype=torch.bool)
    safety[perm[:k_s]] = True
    utility[perm[k_s:k_s + k_u]] = True
    none = torch.zeros_like(selection.safety)
    return Selection(safety.view_as(none), utility.view_as(none), none, none, none, selection.config,
                     "random neurons, same counts as the attribution selection")


def attribution_only(selection: Selection, tuned: Modulation, fingerprint: str) -> Modulation:
    """The selected neurons with one fixed gain each side (the tuned gains' means), no meta-learning."""
    dense = tuned.dense()
    s_gain = float(dense[selection.safety].mean()) if selection.safety.any() else 1.0
    u_gain = float(dense[selection.utility].mean()) if selection.utility.any() else 1.0
    return selection.modulation(s_gain, u_gain, fingerprint)


def build_baselines(lm, cfg: RunConfig, scores: NeuronScores, tuned: Modulation, splits: Splits, names: Sequence[str],
                    *, cache_dir=None, progress=None, cancel=None, log: Callable[[str], None] = print) -> dict:
    """Named baseline interventions, fitted on the training split only."""
    check_baselines(names)
    out = {}
    selection = select(scores, cfg.selection)
    if "attribution_only" in names:
        out["attribution-only"] = attribution_only(selection, tuned, lm.fingerprint)
    if "random" in names:
        log("Training gains on random neurons (same counts, same training)...")
        out["random-neurons"] = train_gains(lm, random_selection(selection, cfg.meta.seed), cfg, splits=splits,
                                            cache_dir=cache_dir, cancel=cancel).modulation
    if "direction" in names:
        from .baselines import choose_layer_and_coef, fit_refusal_direction
        for kind in ("harmful_minus_harmless", "refusal_minus_compliance"):
            log(f"Fitting the layer-wise refusal direction ({kind})...")
            fit = fit_refusal_direction(lm, splits, kind, cancel=cancel)
            out[f"direction:{kind}"] = choose_layer_and_coef(lm, fit, splits, tuned, cancel=cancel)
    return out


def check_baselines(names: Sequence[str]) -> None:
    """Refuse unknown baseline names before any work is done."""
    unknown = set(names) - set(BASELINES)
    if unknown:
        raise ValueError(f"Unknown baselines {sorted(unknown)}; choose from {', '.join(BASELINES)} (or 'all' / 'none').")


def evaluate_run(lm, run_dir: Path, cfg: RunConfig, *, baselines: Sequence[str] = BASELINES, quick: bool = False,
                 cache_dir=None, progress=None, cancel: threading.Event | None = None,
                 log: Callable[[str], None] = print) -> pd.DataFrame:
    """Evaluate base, NeuronTune and baselines on held-out prompts; write the table and generations."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    tuned = Modulation.load(run_dir, lm.fingerprint)
    splits = build_splits(cfg.data)
    interventions: dict = {"base": None, "neurontune": tuned}
    if (run_dir / "gate.safetensors").exists():
        from .gating import GatedModulation, GateProbe
        interventions["neurontune-gated"] = GatedModulation(tuned, GateProbe.load(run_dir / "gate.safetensors"))
    if baselines:
        scores = NeuronScores.load(run_dir / "scores.safetensors")
        interventions.update(build_baselines(lm, cfg, scores, tuned, splits, baselines, cache_dir=cache_dir, cancel=cancel, log=log))
    ecfg = QUICK if quick else FULL
    results = evaluate_many(lm, interventions, splits, ecfg, progress=progress, cancel=cancel, cache_dir=cache_dir)
    table = compare(results)
    rows = [{"intervention": name, **{k: (None if v != v else v) for k, v in r.items()}} for name, r in table.to_dict(orient="index").items()]
    if not dist.is_main():  # under `accelerate launch` (generation shared over processes) the main process writes
        return table
    write_json(run_dir / "eval.json", {"table": rows, "eval_config": ecfg.__dict__, "heldout_families": list(splits.heldout_families),
                                       "seconds": time.perf_counter() - start})
    table.to_csv(run_dir / "eval_table.csv")
    with open(run_dir / "generations.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            for row in r.rows:
                f.write(json.dumps({"intervention": r.name, **row}, ensure_ascii=False) + "\n")
    main = [c for c in ("harmful_refusal", "heldout_family_refusal", "train_family_refusal", "benign_over_refusal",
                        "borderline_over_refusal", "ppl_ratio", "mc_accuracy", "repetition_rate") if c in table.columns]
    log(table[main].to_string(float_format=lambda v: f"{v:.3f}"))
    log(f"Evaluation took {time.perf_counter() - start:.0f} s; wrote {run_dir}/eval.json, eval_table.csv, generations.jsonl")
    return table


def sweep_run(lm, cfg: RunConfig, grid: Sequence[tuple[int, int]], out: Path, *, scores: NeuronScores | None = None,
              cache_dir=None, progress=None, cancel=None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Select + train + proxy-evaluate each grid point (fast: no generation), with the base model and the
    attribution-only setting on the same axes; writes sweep.csv and tradeoff.html."""
    from .neuron_scores import run_attribution
    from .sweep import sweep, tradeoff_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = scores or run_attribution(lm, cfg, cache_dir=cache_dir)
    splits = build_splits(cfg.data)

    def train_fn(selection: Selection) -> Modulation:
        return train_gains(lm, selection, cfg, splits=splits, cache_dir=cache_dir, cancel=cancel).modulation

    def eval_fn(intervention) -> dict:
        return proxy_metrics(lm, intervention, splits, n=48)

    frame = sweep(lm, scores, grid, train_fn, eval_fn, progress=progress, cancel=cancel, selection=cfg.selection)
    base = pd.DataFrame([{"name": "base", **proxy_metrics(lm, None, splits, n=48)}])
    frame.to_csv(out / "sweep.csv", index=False)
    base.to_csv(out / "sweep_baselines.csv", index=False)
    tradeoff_figure(frame, base).write_html(out / "tradeoff.html", include_plotlyjs=True)  # self-contained: opens offline
    log(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    return frame
