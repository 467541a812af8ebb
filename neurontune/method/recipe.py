"""A run's trained modulation and input gate, in the order its configuration asks, and its foldable modulation: one
home for "how a run is trained", called by `tune`, the studio, every extra seed of an evaluation, the trained
baselines and the sweep.

- `meta.gate_first` (gate-aware): the gate is fitted first on the unmodulated model (it reads the prompt, not the
  gains), then the gains are trained behind it, each training prompt at the strength the gate reads from it;
- otherwise the gains are trained as if no gate existed and, when `meta.gate` asks, a gate is fitted on them after;
- `fold.form` "static" / "conditional" / "switch": a second modulation is trained without any gate, for export
  (`FoldConfig`; "switch" fits the folded switch first, `switch_fit`); `fold.seeds` > 1 trains it from several
  seeds and exports their average (`Modulation.average`: it folds to the average of their checkpoints).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..data.splits import Splits
from ..infra.progress import SILENT, Cancelled, Reporter
from ..interventions.gating import GateProbe
from ..interventions.modulation import Modulation
from .gate_fit import fit_gate_for_run
from .metalearn import TrainResult, train_gains
from .selection import Selection
from .switch_fit import fit_switch


@dataclass
class Trained:
    modulation: Modulation
    gate: GateProbe | None
    training: TrainResult
    foldable: Modulation | None = None  # the modulation export folds, when trained apart (`fold.form`)
    fold_training: TrainResult | None = None


def train_run(lm, selection: Selection, cfg: RunConfig, splits: Splits, *, cache_dir=None, reporter: Reporter | None = None,
              gate: GateProbe | None = None) -> Trained:
    """Train the modulation of `selection` (and fit the gate) as `cfg.meta` says. With `meta.gate_first`, a given
    `gate` is used instead of fitting one (the controls of an evaluation train behind the run's own gate). A cancelled
    training keeps its best gains; a gate whose fitting was cancelled is left out."""
    m, reporter = cfg.meta, reporter or SILENT
    gate = gate if (m.gate and m.gate_first) else None
    if m.gate and m.gate_first and gate is None:
        reporter.phase("input gate")
        gate = fit_gate_for_run(lm, selection, splits, bias_shift=m.gate_bias_shift, features=m.gate_features,
                                sharpness=m.gate_sharpness, max_fpr=m.gate_max_fpr, safety_pairs=m.gate_safety_pairs,
                                reporter=reporter, cache_dir=cache_dir)
    reporter.phase("training", m.steps)  # the step total is known: a bar fills as steps come
    result = train_gains(lm, selection, cfg, splits=splits, cache_dir=cache_dir, reporter=reporter, gate=gate)
    if m.gate and not m.gate_first and result.stopped != "cancelled":
        reporter.phase("input gate")
        try:
            gate = fit_gate_for_run(lm, result.modulation, splits, bias_shift=m.gate_bias_shift, features=m.gate_features,
                                    sharpness=m.gate_sharpness, max_fpr=m.gate_max_fpr,
                                    safety_pairs=m.gate_safety_pairs, reporter=reporter)
        except Cancelled:  # stopped while fitting the gate: the trained gains are kept, without a gate
            result.stopped = "cancelled"
    trained = Trained(result.modulation, gate, result)
    if cfg.fold.form != "none" and result.stopped != "cancelled":
        reporter.phase("foldable modulation", cfg.fold.steps or m.steps)
        trained.fold_training = train_foldable(lm, selection, cfg, splits, cache_dir=cache_dir, reporter=reporter)
        trained.foldable = trained.fold_training.modulation
    return trained


def train_foldable(lm, selection: Selection, cfg: RunConfig, splits: Splits, *, cache_dir=None,
                   reporter: Reporter | None = None) -> TrainResult:
    """The modulation a run exports: trained without any gate, with `cfg.fold`'s terms (input-side terms for
    "conditional"; a fitted switch and input-side terms that read its flag for "switch")."""
    meta, switch, readers = cfg.fold.meta(cfg.meta), None, None
    if cfg.fold.form == "switch" and not (lm.nmap.gated and not lm.nmap.input_offset):
        (reporter or SILENT).say(f"fold.form 'switch' rewrites a gated MLP's rows; '{lm.nmap.model_type}' models have none, so "
                                 "the exported modulation reads a harm direction instead (fold.form 'conditional').")
    elif cfg.fold.form == "switch":
        layer = lm.nmap.n_layers // 2 if cfg.fold.switch_layer is None else cfg.fold.switch_layer
        switch = fit_switch(lm, splits, layer, exclude=selection.safety | selection.utility, threshold=cfg.fold.switch_threshold,
                            mean=cfg.fold.switch_mean, earlier=cfg.fold.switch_earlier, reporter=reporter)
        meta = dataclasses.replace(meta, input_from_layer=layer + 1)
        if cfg.fold.switch_readers == "all":
            readers = torch.zeros(selection.shape, dtype=torch.bool)
            readers[layer + 1:] = True
    n, results = cfg.fold.seeds, []
    for i in range(n):  # n = 1: meta.seed itself
        seeded = dataclasses.replace(meta, seed=meta.seed * n + i)
        if i:
            (reporter or SILENT).phase(f"foldable modulation, seed {i + 1} of {n}", seeded.steps)
        results.append(train_gains(lm, selection, cfg.replace(meta=seeded), splits=splits, cache_dir=cache_dir,
                                   reporter=reporter, switch=switch, readers=readers))
        if results[-1].stopped == "cancelled":
            break
    result = results[0] if n == 1 else _averaged(results, [meta.seed * n + i for i in range(len(results))])
    result.modulation.meta["role"] = "foldable"
    return result


def _averaged(results: list[TrainResult], seeds: list[int]) -> TrainResult:
    """One foldable modulation from several seeds' (`fold.seeds`): their average, each step's log tagged with its seed."""
    mod = Modulation.average([r.modulation for r in results], {"fold_seeds": seeds, "best_steps": [r.best_step for r in results]})
    log = [{**entry, "seed": s} for r, s in zip(results, seeds) for entry in r.log]
    stopped = next((r.stopped for r in results if r.stopped == "cancelled"), results[-1].stopped)
    return TrainResult(mod, log, stopped, results[-1].best_step)
