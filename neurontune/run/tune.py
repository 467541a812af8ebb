"""`tune`: one NeuronTune run end to end into a run folder (attribution, selection, gains and gate, then the
evaluation and, if asked, the baselines), with every setting checked before the first forward pass."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..config import RunConfig
from ..eval.baselines import check_baselines
from ..eval.judges import Judge
from ..infra.progress import SILENT, Reporter
from ..method.metalearn import TrainResult
from ..method.neuron_scores import NeuronScores
from ..method.selection import Selection, check_counts
from .evaluate_run import evaluate_run
from .folder import RunFolder
from .steps import attribute_step, select_step, train_step


@dataclass
class TuneResult:
    folder: RunFolder
    scores: NeuronScores
    selection: Selection
    training: TrainResult
    table: pd.DataFrame | None = None  # the evaluation table, when evaluated


def check(cfg: RunConfig, shape: tuple[int, int] | None = None, baselines: Sequence[str] = ()) -> None:
    """Refuse bad thresholds (against the model's size when known) and unknown baselines before any work."""
    check_counts(cfg.selection, shape, training=True)
    check_baselines(baselines)


def tune(lm, cfg: RunConfig, out: str | Path | RunFolder, *, evaluate: bool = True, quick_eval: bool = False,
         baselines: Sequence[str] = (), eval_split: str = "validation", cache_dir=None,
         reporter: Reporter | None = None, judge: Judge | str | None = None) -> TuneResult:
    """Attribution -> selection -> gains (+ gate) -> evaluation, all written to the run folder `out`. The
    evaluation reads the validation split by default: a tune is a step of development, and the test split is
    kept for the reported table (`evaluate_run` with split="test"). judge: what reads the evaluation's answers
    (`eval.judges`; default the rules)."""
    reporter = reporter or SILENT
    check(cfg, tuple(lm.shape), baselines)
    folder = RunFolder(out)
    scores = attribute_step(lm, cfg, folder, reporter=reporter, cache_dir=cache_dir)
    selection = select_step(scores, cfg, folder)
    reporter.say(f"Selected {selection.counts()}")
    training = train_step(lm, selection, cfg, folder, reporter=reporter, cache_dir=cache_dir)
    s = training.modulation.summary()
    reporter.say(f"Training {training.stopped} after {len(training.log)} steps (best step {training.best_step}): "
                 f"{s['n_amplified']} amplified, {s['n_suppressed']} suppressed, gains {s['min_gain']:.3f}-{s['max_gain']:.3f}.")
    if training.stopped == "non_finite":
        reporter.say(f"warning: {training.log[-1].get('error', 'non-finite gains or loss')}")
    table = None
    if evaluate:
        table = evaluate_run(lm, folder, cfg, baselines=baselines, quick=quick_eval, split=eval_split, cache_dir=cache_dir,
                             reporter=reporter, judge=judge)
    return TuneResult(folder, scores, selection, training, table)
