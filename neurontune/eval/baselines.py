"""The baselines NeuronTune is compared with, fitted on the training split (choices on validation): the same
neurons trained in the other mode (jointly, without meta-learning, or with FOMAML: what meta-learning adds or
costs; the run's own mode needs no control), the same neurons with one fixed gain
(attribution only), random neurons with the same training (what attribution adds), and the layer-wise
refusal direction (a different kind of intervention)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..config import RunConfig
from ..data.splits import Splits
from ..infra.progress import SILENT, Reporter
from ..interventions.gating import GateProbe
from ..interventions.modulation import Modulation
from ..method.neuron_scores import NeuronScores
from ..method.recipe import train_run
from ..method.selection import Selection, select

BASELINES = ("joint", "fomaml", "attribution_only", "random", "direction")
NAMES = {"joint": "joint-training", "fomaml": "meta-learning (FOMAML)", "attribution_only": "attribution-only",
         "random": "random-neurons"}


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
                    *, cache_dir=None, reporter: Reporter | None = None, directions: dict | None = None,
                    gate: GateProbe | None = None, target=None) -> dict:
    """Named baseline interventions for the training seed `cfg.meta.seed` (the same neurons, steps, data and recipe as
    `tuned`: with `gate`, the trained ones are trained behind it, as gains of a gate-first run are). `directions`:
    refusal directions chosen before (they do not depend on the seed), reused as given; otherwise each is chosen on
    validation to match the refusal of `target` (default `tuned`)."""
    check_baselines(names)
    reporter = reporter or SILENT
    out = {}
    selection = select(scores, cfg.selection)
    alone = cfg.replace(fold={"form": "none"})  # a baseline is one modulation, like the run's own

    def trained(selection_: Selection, cfg_: RunConfig) -> Modulation:
        return train_run(lm, selection_, cfg_, splits, cache_dir=cache_dir, reporter=reporter.muted(), gate=gate).modulation

    for mode, what in (("joint", "jointly, without meta-learning"), ("fomaml", "with FOMAML meta-learning")):
        if mode not in names:
            continue
        if cfg.meta.mode == mode:  # the run itself is this control: training it again would repeat the run's own row
            reporter.say(f"The run trains in mode '{mode}' itself: its own row is that control.")
            continue
        reporter.say(f"Training the same neurons {what} (seed {cfg.meta.seed})...")
        out[NAMES[mode]] = trained(selection, alone.replace(meta={"mode": mode}))
    if "attribution_only" in names:
        out[NAMES["attribution_only"]] = attribution_only(selection, tuned, lm.fingerprint)
    if "random" in names:
        reporter.say(f"Training gains on random neurons (same counts, same training, seed {cfg.meta.seed})...")
        out[NAMES["random"]] = trained(random_selection(selection, cfg.meta.seed), alone)
    if "direction" in names:
        out.update(directions if directions is not None else fit_directions(lm, splits, target or tuned, reporter=reporter))
    return out


DIRECTION_LAYERS = 2  # the direction search tries every DIRECTION_LAYERS-th layer (every layer costs twice the time)


def fit_directions(lm, splits: Splits, tuned, *, reporter: Reporter | None = None) -> dict:
    """Both refusal directions, each with its layer and coefficient chosen on validation to match the validation refusal
    of `tuned` (the run's modulation, gated when it has a gate; see `direction.choose_layer_and_coef`)."""
    from .direction import choose_layer_and_coef, fit_refusal_direction
    out, reporter = {}, reporter or SILENT
    for kind in ("harmful_minus_harmless", "refusal_minus_compliance"):
        reporter.say(f"Fitting the layer-wise refusal direction ({kind}) and searching every {DIRECTION_LAYERS}nd layer on validation...")
        fit = fit_refusal_direction(lm, splits, kind, reporter=reporter)
        chosen = choose_layer_and_coef(lm, fit, splits, tuned, reporter=reporter, layers=range(0, lm.shape[0], DIRECTION_LAYERS))
        reporter.say(f"Chose {chosen.name}: validation refusal {chosen.meta['layers'][chosen.layer]['harmful']:.2f} "
            f"(target {chosen.meta['target']:.2f}, {'reached' if chosen.meta['reached'] else 'not reached'}), "
            f"benign {chosen.meta['layers'][chosen.layer]['benign']:.2f}.")
        out[f"direction:{kind}"] = chosen
    return out


def check_baselines(names: Sequence[str]) -> None:
    """Refuse unknown baseline names before any work is done."""
    unknown = set(names) - set(BASELINES)
    if unknown:
        raise ValueError(f"Unknown baselines {sorted(unknown)}; choose from {', '.join(BASELINES)} (or 'all' / 'none').")
