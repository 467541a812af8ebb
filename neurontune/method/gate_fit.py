"""Fitting the input gate (`interventions.gating.GateProbe`) of a run, from its training split, choices on validation.

Positives are harmful requests (plain, the unsafe twins of the alarming-word pairs, and inside the training attack
families); negatives are benign, borderline-safe and the safe alarming-word requests, plain AND inside the same
families (`Splits.harm_pools`), so neither a template nor an alarming word alone opens the gate. What the gate
reads (`GATE_FEATURES`):
- "amplified": the `max_features` neurons the modulation amplifies most (or, before any gains exist, the selected
  safety neurons with the highest safety score);
- "layer": every MLP neuron of the one layer whose probe separates the validation pools best;
- "residual": the residual stream entering the one layer whose probe separates the validation pools best, at the
  prompt's last token;
- "residual_mean": the same, averaged over the user's turn (every token after the chat template's fixed opening).
  Chosen by leaving each training attack family out in turn (docs/results.md): a reading of the whole request
  opens more often inside a family the gate never saw, and less often on safe requests with alarming words;
- "residual_tail": the same mean over the last `TAIL` tokens of the user's turn only (the whole turn when it is
  shorter): a request inside a long template usually sits at its end, where a mean over the whole turn is diluted
  by the template (docs/gate_tail.py: the gate opens on more harmful prompts inside an unseen family, and the
  preset on more alarming-word requests, so it is an option, not `balanced`'s choice);
- "residual_either": both means, each probe at its own best layer, and the gate opens where either reads harmful
  (`GateProbe.either`): the tail catches a request at the end of a long frame, the whole turn one that the frame's
  last instruction hides (docs/gate_tail.py: leaving each training family out, it opens on more harmful prompts
  inside the family it never saw than either mean alone, at a little more over-refusal).
The gate reads activations of the unmodulated model, so it can be fitted before the gains are trained.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from ..config import GATE_FEATURES
from ..data.chat import chat_prompt
from ..infra import files
from ..infra.probes import fit_probe, roc_auc
from ..infra.progress import Reporter
from ..interventions.capture import last_token, template_prefix_len, unit_features
from ..interventions.gating import GateProbe
from ..interventions.modulation import Modulation

EITHER = {"residual_either": ("residual_mean", "residual_tail")}  # gates that open where either of two fits reads harmful
LAYER_SITES = {"layer": ("neurons", False), "residual": ("residual", False), "residual_mean": ("residual", True),
               "residual_tail": ("residual", True)}  # site, pooled over the user's turn
TAIL = 32  # tokens "residual_tail" averages (chosen among 24, 32, 48 by docs/gate_pooling.py, validation)
POOL_LAST = {"residual_tail": TAIL}
SHIFTS = tuple(x / 2 for x in range(-8, 9))  # -4 .. 4 in steps of 0.5


def _formatted(lm, texts: Sequence[str]) -> list[str]:
    return [chat_prompt(lm.tokenizer, t) for t in texts]


def amplified_neurons(source, max_features: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, neurons) of at most `max_features` neurons: the most amplified ones of a modulation, or, for a
    selection (before training), its safety neurons ranked highest."""
    if not isinstance(source, Modulation):
        layers, neurons = source.top_safety(max_features)
        if len(layers) == 0:
            raise ValueError("The selection has no safety neuron: the gate's 'amplified' features need some.")
        return layers, neurons
    dense = source.dense()
    picked = (dense > 1).nonzero()
    if len(picked) == 0:
        raise ValueError("The modulation amplifies no neuron: nothing to gate on.")
    order = torch.argsort(dense[picked[:, 0], picked[:, 1]], descending=True, stable=True)[:max_features]
    return picked[order, 0], picked[order, 1]


def fit_gate(lm, modulation: Modulation | None, positive: Sequence[str], negative: Sequence[str], *, max_features: int = 256,
             steps: int = 100, l2: float = 1e-2, neurons: tuple[torch.Tensor, torch.Tensor] | None = None,
             reporter: Reporter | None = None) -> GateProbe:
    """A probe on neurons (the `max_features` most amplified by `modulation`, or the given `neurons`) fitted on user
    prompts (positive = should be modulated: harmful / attacked)."""
    layers, units = neurons if neurons is not None else amplified_neurons(modulation, max_features)
    x = unit_features(lm, _formatted(lm, list(positive) + list(negative)), layers, units, reporter=reporter)
    y = torch.tensor([1.0] * len(positive) + [0.0] * len(negative))
    mean, std, w, b = fit_probe(x, y, l2=l2, steps=steps, precise=False)
    acc = float(((((x - mean) / std) @ w + b > 0).float() == y).float().mean())
    return GateProbe(layers, units, mean, std, w, float(b), acc, getattr(lm, "fingerprint", None))


def fit_layer_gate(lm, positive: Sequence[str], negative: Sequence[str], val_positive: Sequence[str],
                   val_negative: Sequence[str], *, layers: Sequence[int] | None = None, site: str = "neurons",
                   pool_from: int | None = None, pool_last: int | None = None, reporter: Reporter | None = None) -> GateProbe:
    """A probe on every unit of one layer's `site` ("neurons": its MLP neurons; "residual": the residual stream
    entering it), at the prompt's last token or averaged from its `pool_from`-th token on (the last `pool_last` of
    them): for each candidate layer
    (default: every layer), fit on (positive, negative) and keep the layer with the highest ROC AUC on the validation
    prompts (ties: the lower). Why a whole layer: a linear probe of the prompt separates harmful from harmless far
    better at later layers than a few hundred amplified neurons do."""
    n_layers = lm.shape[0]
    candidates = sorted(layers) if layers is not None else list(range(n_layers))
    x = last_token(lm, _formatted(lm, list(positive) + list(negative)), site, layers=candidates, reporter=reporter,
                   pool_from=pool_from, pool_last=pool_last)
    xv = last_token(lm, _formatted(lm, list(val_positive) + list(val_negative)), site, layers=candidates, reporter=reporter,
                    pool_from=pool_from, pool_last=pool_last)
    y = torch.tensor([1.0] * len(positive) + [0.0] * len(negative))
    _, i, (mean, std, w, b) = best_layer_probe(x, y, xv, len(val_positive))
    width = x.shape[-1]
    train_acc = float(((((x[:, i] - mean) / std) @ w + b > 0).float() == y).float().mean())
    return GateProbe(torch.full((width,), candidates[i]), torch.arange(width), mean, std, w, float(b), train_acc,
                     getattr(lm, "fingerprint", None), site=site, pool_from=pool_from, pool_last=pool_last)


def best_layer_probe(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, n_val_positive: int) -> tuple[float, int, tuple]:
    """(validation ROC AUC, index, (mean, std, weight, bias)) of the probe, fitted on x[:, i] (labels y), whose
    validation scores rank xv's first `n_val_positive` rows above the rest best (ties: the lower index)."""
    best = None
    for i in range(x.shape[1]):
        probe = fit_probe(x[:, i], y)
        mean, std, w, b = probe
        z = ((xv[:, i] - mean) / std) @ w + b
        auc = roc_auc(z[:n_val_positive], z[n_val_positive:])
        if best is None or auc > best[0]:
            best = (auc, i, probe)
    return best


def choose_bias_shift(lm, probe: GateProbe, splits, shifts: tuple[float, ...] = SHIFTS, reporter: Reporter | None = None,
                      max_fpr: float | None = None) -> float:
    """The bias shift whose gate best separates harmful from harmless VALIDATION prompts (plain, in the training
    families, and the alarming-word pairs): the largest true-positive minus false-positive rate of s > 0.5, or with
    `max_fpr` the largest true-positive rate among the shifts that open the gate on at most that share of harmless
    prompts (ties: the smaller shift)."""
    positive, negative = splits.harm_pools("validation", 48, 6)
    z_pos = probe.logits(lm, _formatted(lm, positive), reporter=reporter) - probe.bias_shift
    z_neg = probe.logits(lm, _formatted(lm, negative), reporter=reporter) - probe.bias_shift
    tpr = {s: float((z_pos + s > 0).float().mean()) for s in shifts}
    fpr = {s: float((z_neg + s > 0).float().mean()) for s in shifts}
    if max_fpr is not None:
        allowed = [s for s in shifts if fpr[s] <= max_fpr] or [min(shifts)]
        return max(allowed, key=lambda s: (round(tpr[s], 6), -fpr[s], -abs(s)))
    return max(shifts, key=lambda s: (round(tpr[s] - fpr[s], 6), -abs(s)))


def fit_gate_for_run(lm, source, splits, *, bias_shift: float | None = 0.0, features: str = "amplified",
                     sharpness: float = 1.0, max_fpr: float | None = None, safety_pairs: bool = False,
                     reporter: Reporter | None = None, cache_dir: str | Path | None | bool = None) -> GateProbe:
    """The probe of a run, from its training split only (`Splits.harm_pools`). `source`: the trained modulation
    (its most amplified neurons) or, to fit the gate before training, the `Selection` (its top safety neurons).
    A gate fitted before on the same model, prompts and features is read back from `cache_dir` (default: the user
    cache; False: none) under `gates/`: a gate fitted before training depends on nothing else, so trying several
    trainings behind it fits it once. `bias_shift` > 0 makes the gate open more readily (more harmful refusal); None chooses it on the
    validation split (`choose_bias_shift`, by Youden's J or, with `max_fpr`, the best recall at that false-positive
    budget). `sharpness` > 1 multiplies the probe's logit, so a prompt the gate is unsure about gets less of the
    modulation (strong gains leak refusals through partly open gates). `safety_pairs`: the training pools also hold
    the safety pairs (`Splits.harm_pools`)."""
    if features not in GATE_FEATURES:
        raise ValueError(f"The gate's features must be one of {GATE_FEATURES}, not {features!r}.")
    neurons = amplified_neurons(source) if features == "amplified" else None
    probe, *others = [_cached_fit(lm, splits, f, neurons, reporter, cache_dir, safety_pairs)
                      for f in EITHER.get(features, (features,))]
    for other in others:
        probe.parts()[-1].either = other
    probe.sharpen(sharpness, 0.0)
    shift = choose_bias_shift(lm, probe, splits, reporter=reporter, max_fpr=max_fpr) if bias_shift is None else float(bias_shift)
    probe.sharpen(1.0, shift)
    return probe


def _cached_fit(lm, splits, features: str, neurons, reporter: Reporter | None, cache_dir,
                safety_pairs: bool = False) -> GateProbe:
    """The fitted probe before any sharpening or bias shift, read back from `cache_dir/gates/` when the same model,
    prompts and features were fitted before (False: no cache)."""
    big, small = splits.harm_pools("train", 400, 40, safety=safety_pairs), splits.harm_pools("train", 100, 16, safety=safety_pairs)
    val = splits.harm_pools("validation", 48, 6)
    path = None
    if cache_dir is not False:
        key = hashlib.sha256(json.dumps(["gate-v2", getattr(lm, "fingerprint", None),
                                         [features, POOL_LAST[features]] if features in POOL_LAST else features, [big, small, val],
                                         None if neurons is None else [t.tolist() for t in neurons]]).encode()).hexdigest()[:20]
        path = Path(cache_dir or files.default_cache_dir()) / "gates" / f"{key}.safetensors"
        if path.is_file():
            try:
                return GateProbe.load(path, shape=tuple(lm.shape), expected_fingerprint=getattr(lm, "fingerprint", None))
            except ValueError as exc:
                files.warn_bad(path, str(exc), "gate cache entry")
    if features in LAYER_SITES:
        site, pooled = LAYER_SITES[features]
        probe = fit_layer_gate(lm, *big, *val, site=site, pool_from=template_prefix_len(lm.tokenizer) if pooled else None,
                               pool_last=POOL_LAST.get(features), reporter=reporter)
    else:
        probe = fit_gate(lm, None, *small, neurons=neurons, reporter=reporter)
    if path is not None:
        probe.save(path)
    return probe
