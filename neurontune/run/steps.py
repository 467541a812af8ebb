"""The NeuronTune run as steps that fill a run folder (`RunFolder`); the CLI and the studio both call these."""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import RunConfig
from ..data.splits import build_splits
from ..infra import distributed as dist
from ..infra.progress import SILENT, Reporter
from ..method.metalearn import TrainResult
from ..method.recipe import train_run
from ..method.neuron_scores import NeuronScores, run_attribution
from ..method.selection import Selection, select
from ..model.context import context_length
from .folder import RunFolder

log = logging.getLogger(__name__)


def fit_context(lm, cfg: RunConfig) -> RunConfig:
    """Shorten attribution.max_length to the model's context (a longer input would crash or be garbage), and say so."""
    context = context_length(lm)
    if cfg.attribution.max_length > context:
        log.warning("attribution.max_length=%d is longer than %s's context of %d tokens; using %d (longer prompts are "
                    "truncated, keeping their end).", cfg.attribution.max_length, lm.name, context, context)
        return cfg.replace(attribution={"max_length": context})
    return cfg


def truncation_note(scores: NeuronScores, cfg: RunConfig) -> str | None:
    """What the user should hear when attribution had to cut prompts to fit max_length."""
    n = int(scores.meta.get("truncated") or 0)
    if not n:
        return None
    return (f"{n} prompt(s) were longer than attribution.max_length={cfg.attribution.max_length} tokens (prompt + target) "
            "and were truncated, keeping their end (the request and the answer header). Raise attribution.max_length "
            "in the preset (up to the model's context) to keep them whole.")


def attribute_step(lm, cfg: RunConfig, out: str | Path | RunFolder, *, reporter: Reporter | None = None,
                   cache_dir=None) -> NeuronScores:
    """Attribution into the run folder: scores, top neurons, score mass per layer, the config.
    Under `accelerate launch` the prompts are shared over the processes; only the main one writes."""
    cfg, reporter = fit_context(lm, cfg), reporter or SILENT
    reporter.phase("attribution")
    scores = run_attribution(lm, cfg, cache_dir=cache_dir, reporter=reporter)
    if not dist.is_main():
        return scores
    if (note := truncation_note(scores, cfg)) is not None:
        log.warning(note)
    folder = RunFolder(out)
    folder.write_config(cfg)
    folder.write_attribution(scores, {"model": lm.name, "fingerprint": lm.fingerprint, "counts": scores.counts,
                                      "meta": scores.meta, "shape": list(scores.shape), "processes": dist.rank_and_size()[1]})
    return scores


def select_step(scores: NeuronScores, cfg: RunConfig, out: str | Path | RunFolder | None = None) -> Selection:
    selection = select(scores, cfg.selection)
    if out is not None:
        RunFolder(out).write_selection(selection)
    return selection


def train_step(lm, selection: Selection, cfg: RunConfig, out: str | Path | RunFolder, *, reporter: Reporter | None = None,
               cache_dir=None) -> TrainResult:
    """Train the gains and fit the input gate, in the order the preset asks (`method.recipe.train_run`), into the folder."""
    cfg, reporter = fit_context(lm, cfg), reporter or SILENT
    folder = RunFolder(out)
    trained = train_run(lm, selection, cfg, build_splits(cfg.data), cache_dir=cache_dir, reporter=reporter)
    trained.modulation.meta["preset"] = cfg.name
    folder.write_modulation(trained.modulation)
    folder.write_train_log(trained.training.log)
    if trained.gate is not None:
        folder.write_gate(trained.gate)
    if trained.foldable is not None:
        trained.foldable.meta["preset"] = cfg.name
        folder.write_foldable(trained.foldable)
    return trained.training
