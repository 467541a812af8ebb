"""The NeuronTune run as steps that write a run folder; the CLI and the studio both call these.

Run folder (`tune --out DIR`): preset.json, scores.safetensors, top_neurons.csv, layer_summary.csv,
selection.json, modulation.safetensors, train_log.jsonl, and after evaluation eval.json,
eval_table.csv and generations.jsonl.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from . import distributed as dist
from .attribution import Progress
from .config import RunConfig
from .metalearn import StepCallback, TrainResult, train_gains
from .modulation import Modulation
from .neuron_scores import NeuronScores, run_attribution
from .selection import Selection, select
from .splits import build_splits


log = logging.getLogger(__name__)


def model_context(lm) -> int | None:
    """The longest input the model was built for (positions), when its config says."""
    config = lm.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_context(lm, cfg: RunConfig) -> RunConfig:
    """Shorten attribution.max_length to the model's context (a longer input would crash or be garbage), and say so."""
    context = model_context(lm)
    if context and cfg.attribution.max_length > context:
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


def write_json(path: Path, obj) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def attribute_step(lm, cfg: RunConfig, out: Path, *, progress: Progress | None = None,
                   cancel: threading.Event | None = None, cache_dir=None) -> NeuronScores:
    """Attribution, plus the tables a reader wants first: top neurons and score mass per layer.
    Under `accelerate launch` the prompts are shared over the processes; only the main one writes."""
    cfg = fit_context(lm, cfg)
    scores = run_attribution(lm, cfg, cache_dir=cache_dir, progress=progress, cancel=cancel)
    if not dist.is_main():
        return scores
    if (note := truncation_note(scores, cfg)) is not None:
        log.warning(note)
    out.mkdir(parents=True, exist_ok=True)
    scores.save(out / "scores.safetensors")
    cfg.save(out / "preset.json")
    tables = [scores.table(kind, 100).assign(kind=kind) for kind in ("safety", "over_refusal", "benign_dependence") if kind in scores.scores]
    import pandas as pd
    pd.concat(tables).to_csv(out / "top_neurons.csv", index=False)
    layers = scores.layer_summary("safety").rename(columns=lambda c: c if c == "layer" else f"safety_{c}")
    layers = layers.merge(scores.layer_summary("over_refusal").rename(columns=lambda c: c if c == "layer" else f"over_refusal_{c}"))
    layers.to_csv(out / "layer_summary.csv", index=False)
    write_json(out / "attribution.json", {"model": lm.name, "fingerprint": lm.fingerprint, "counts": scores.counts,
                                          "meta": scores.meta, "shape": list(scores.shape),
                                          "processes": dist.rank_and_size()[1]})
    return scores


def select_step(scores: NeuronScores, cfg: RunConfig, out: Path | None = None) -> Selection:
    selection = select(scores, cfg.selection)
    if out is not None:
        write_json(out / "selection.json", {"counts": selection.counts(), "rules": selection.rules,
                                            "per_layer": selection.per_layer().to_dict(orient="list")})
    return selection


def train_step(lm, selection: Selection, cfg: RunConfig, out: Path, *, progress: StepCallback | None = None,
               cancel: threading.Event | None = None, cache_dir=None) -> TrainResult:
    cfg = fit_context(lm, cfg)
    result = train_gains(lm, selection, cfg, splits=build_splits(cfg.data), cache_dir=cache_dir, progress=progress, cancel=cancel)
    result.modulation.meta["preset"] = cfg.name
    result.modulation.save(out / "modulation.safetensors")
    with open(out / "train_log.jsonl", "w", encoding="utf-8") as f:
        for entry in result.log:
            f.write(json.dumps(entry) + "\n")
    if cfg.meta.gate and result.stopped != "cancelled":
        from .gating import fit_gate_for_run
        fit_gate_for_run(lm, result.modulation, build_splits(cfg.data), bias_shift=cfg.meta.gate_bias_shift).save(out / "gate.safetensors")
    return result


def load_run(run_dir: str | Path) -> tuple[RunConfig, Modulation | None, NeuronScores | None]:
    """Read back what a run folder holds (missing parts are None)."""
    run = Path(run_dir)
    if not (run / "preset.json").exists():
        raise FileNotFoundError(f"{run} is not a NeuronTune run folder (no preset.json). Run `python -m neurontune tune --out {run}` first.")
    cfg = RunConfig.from_dict(json.loads((run / "preset.json").read_text(encoding="utf-8")))
    mod = Modulation.load(run / "modulation.safetensors") if (run / "modulation.safetensors").exists() else None
    scores = NeuronScores.load(run / "scores.safetensors") if (run / "scores.safetensors").exists() else None
    return cfg, mod, scores
