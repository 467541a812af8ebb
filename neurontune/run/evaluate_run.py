"""Evaluate a run folder: the base model, the tuned modulation (static and gated) and the baselines in one
harness, written back to the folder (the evaluation table and every generation). Used by the CLI and the studio."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from ..config import FULL_EVAL, QUICK_EVAL, RunConfig
from ..data.splits import build_splits
from ..eval.baselines import BASELINES, build_baselines
from ..eval.harness import compare, evaluate_many
from ..infra import distributed as dist
from ..interventions.gating import GatedModulation
from .folder import RunFolder


def evaluate_run(lm, run: str | Path | RunFolder, cfg: RunConfig | None = None, *, baselines: Sequence[str] = BASELINES,
                 quick: bool = False, cache_dir=None, progress=None, cancel: threading.Event | None = None,
                 log: Callable[[str], None] = print) -> pd.DataFrame:
    """Evaluate base, NeuronTune (static, and gated when the run has a gate) and baselines on held-out prompts;
    write the table and every generation into the run folder."""
    start = time.perf_counter()
    folder = RunFolder(run)
    cfg = cfg or folder.config()
    tuned = folder.modulation(lm.fingerprint)
    if tuned is None:
        raise FileNotFoundError(f"{folder.path} holds no trained gains ({RunFolder.MODULATION}); run `tune` first.")
    splits = build_splits(cfg.data)
    interventions: dict = {"base": None, "neurontune": tuned}
    if (gate := folder.gate(lm)) is not None:
        interventions["neurontune-gated"] = GatedModulation(tuned, gate)
    if baselines:
        scores = folder.scores()
        if scores is None:
            raise FileNotFoundError(f"{folder.path} holds no neuron scores ({RunFolder.SCORES}); the baselines re-select from them.")
        interventions.update(build_baselines(lm, cfg, scores, tuned, splits, baselines, cache_dir=cache_dir, cancel=cancel, log=log))
    ecfg = QUICK_EVAL if quick else FULL_EVAL
    results = evaluate_many(lm, interventions, splits, ecfg, progress=progress, cancel=cancel, cache_dir=cache_dir)
    table = compare(results)
    rows = [{"intervention": name, **{k: (None if v != v else v) for k, v in r.items()}} for name, r in table.to_dict(orient="index").items()]
    if not dist.is_main():  # under `accelerate launch` (generation shared over processes) the main process writes
        return table
    folder.write_eval({"table": rows, "eval_config": ecfg.__dict__, "heldout_families": list(splits.heldout_families),
                       "seconds": time.perf_counter() - start}, table)
    folder.write_generations(results)
    main = [c for c in ("harmful_refusal", "heldout_family_refusal", "train_family_refusal", "benign_over_refusal",
                        "borderline_over_refusal", "ppl_ratio", "mc_accuracy", "repetition_rate") if c in table.columns]
    log(table[main].to_string(float_format=lambda v: f"{v:.3f}"))
    log(f"Evaluation took {time.perf_counter() - start:.0f} s; wrote {folder.file(RunFolder.EVAL)} and {RunFolder.GENERATIONS}")
    return table
