"""Evaluate a run folder: the base model, NeuronTune and every baseline in one harness, each with its static
gains and behind the same input gate, over several training seeds, on one split (test for the reported
table, validation while choosing), with the style audit of the pools. Written back to the folder."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..config import FULL_EVAL, QUICK_EVAL, RunConfig
from ..data.splits import Splits, build_splits, check_split
from ..data.style_audit import StyleAudit, audit
from ..eval.baselines import BASELINES, build_baselines
from ..eval.harness import STRICT, EvalResult, evaluate_many
from ..eval.judges import Judge, describe, judge_from_spec
from ..eval.report import markdown, summarise
from ..infra import distributed as dist
from ..infra.progress import SILENT, Reporter
from ..interventions.gating import GATED, Gated
from ..method.gate_fit import fit_gate_for_run
from ..method.metalearn import train_gains
from ..method.selection import select
from .folder import RunFolder


def style_audit(splits: Splits, split: str) -> StyleAudit:
    """Can the training pools' form predict harmful vs harmless on the evaluated split? (plain requests)"""
    def texts(kind: str, part: str) -> list[str]:
        return [p.text for p in getattr(splits, kind)[part]]
    return audit(texts("harmful", "train") + texts("contrast", "train"),
                 texts("benign", "train") + texts("borderline", "train") + texts("alarming", "train"),
                 texts("harmful", split) + texts("contrast", split),
                 texts("benign", split) + texts("borderline", split) + texts("alarming", split))


def evaluate_run(lm, run: str | Path | RunFolder, cfg: RunConfig | None = None, *, baselines: Sequence[str] = BASELINES,
                 quick: bool = False, seeds: int = 1, split: str = "test", cache_dir=None,
                 reporter: Reporter | None = None, judge: Judge | str | None = None) -> pd.DataFrame:
    """Evaluate the run's gains (and gate) against the base model and `baselines` on `split`; with `seeds` > 1,
    train NeuronTune and the trained baselines again with seeds meta.seed+1, ... and report mean ± sd over seeds.
    Returns the summary table (one row per intervention); writes eval.json, eval_table.csv, generations.jsonl.
    judge: what reads the answers (default the rules; a spec such as "model:PATH" is built here); eval.json names it."""
    check_split(split)
    judge = judge_from_spec(judge, cache_dir=cache_dir)
    reporter = reporter or SILENT
    reporter.phase("evaluate")
    start = time.perf_counter()
    folder = RunFolder(run)
    cfg = cfg or folder.config()
    tuned = folder.modulation(lm.fingerprint)
    if tuned is None:
        raise FileNotFoundError(f"{folder.path} holds no trained gains ({RunFolder.MODULATION}); run `tune` first.")
    scores = folder.scores()
    if scores is None and (baselines or seeds > 1):
        raise FileNotFoundError(f"{folder.path} holds no neuron scores ({RunFolder.SCORES}): the baselines and other seeds "
                                "re-select from them. Run `tune` (or `attribute --out` into this folder) first.")
    splits = build_splits(cfg.data)
    ecfg = QUICK_EVAL if quick else FULL_EVAL
    audit_result = style_audit(splits, split)
    reporter.say(audit_result.summary())
    groups: dict[str, list[EvalResult]] = {}
    results: list[EvalResult] = []
    cache: dict = {}
    directions = None
    for k in range(max(1, seeds)):
        seed = cfg.meta.seed + k
        scfg = cfg.replace(meta={"seed": seed})
        if k == 0:
            mod, gate = tuned, folder.gate(lm)
        else:
            reporter.say(f"Training NeuronTune again with seed {seed}...")
            mod = train_gains(lm, select(scores, cfg.selection), scfg, splits=splits, cache_dir=cache_dir, reporter=reporter.muted()).modulation
            gate = fit_gate_for_run(lm, mod, splits, bias_shift=cfg.meta.gate_bias_shift,
                                    features=cfg.meta.gate_features, reporter=reporter.muted()) if cfg.meta.gate else None
        static: dict = {"neurontune": mod}
        if baselines:
            built = build_baselines(lm, scfg, scores, mod, splits, baselines, cache_dir=cache_dir, reporter=reporter,
                                    directions=directions)
            fresh = {n: iv for n, iv in built.items() if not (directions and n in directions)}
            directions = directions or {n: iv for n, iv in built.items() if n.startswith("direction:")}
            static.update(fresh)  # a direction does not depend on the seed: its static row is evaluated once
        interventions: dict = {"base": None} if k == 0 else {}
        interventions.update(static)
        if gate is not None:  # the same gate, read from each prompt, in front of every method: gates with gates
            interventions["neurontune" + GATED] = Gated(mod, gate, name="neurontune" + GATED)
            for name, iv in {**static, **(directions or {})}.items():
                if name != "neurontune":
                    interventions[name + GATED] = Gated(iv, gate, name=name + GATED)
        reporter.say(f"Evaluating {len(interventions)} interventions on the {split} split (seed {seed})...")
        done = evaluate_many(lm, interventions, splits, ecfg, split=split, reporter=reporter, base=cache,
                             cache_dir=cache_dir, judge=judge)
        for r in done:
            r.meta["seed"] = seed
            groups.setdefault(r.name, []).append(r)
        results += done
    table = summarise(groups)
    blocks = table_blocks(list(table.index))
    if not dist.is_main():  # under `accelerate launch` (generation shared over processes) the main process writes
        return table
    rows = [{"intervention": name, **{k: (None if v != v else v) for k, v in row.items()}} for name, row in table.to_dict(orient="index").items()]
    folder.write_eval({"split": split, "seeds": max(1, seeds), "table": rows, "blocks": blocks, "eval_config": ecfg.__dict__,
                       "style_audit": {"accuracy": audit_result.accuracy, "n_train": audit_result.n_train,
                                       "n_eval": audit_result.n_eval, "top_features": audit_result.top_features},
                       "heldout_families": list(splits.heldout_families), "train_families": list(splits.train_families),
                       "directions": {n: {"layer": d.layer, "coef": d.coef, "reached": d.meta.get("reached"),
                                          "target": d.meta.get("target")} for n, d in (directions or {}).items()},
                       "judge": judge.name, "second_judge": getattr(judge.second, "name", None),
                       "judge_note": describe(judge), "seconds": time.perf_counter() - start}, table)
    folder.write_generations(results)
    reporter.say(f"{describe(judge)}.\n" + markdown(table, blocks))
    for title, prefixes in (("by phrasing group", ("harmful_refusal/", "benign_over_refusal/", "borderline_over_refusal/")),
                            ("refusal by attack family", ("refusal/",)),
                            ("full refusals only (partial refusals not counted)", (STRICT,))):
        columns = [c for c in table.columns if c.startswith(prefixes) and ":" not in c]
        if columns:
            reporter.say(f"\n{split} split, {title}:\n" + markdown(table, blocks, columns))
    reporter.say(f"{split} split, {max(1, seeds)} seed(s); {audit_result.summary()}")
    reporter.say(f"Evaluation took {time.perf_counter() - start:.0f} s; wrote {folder.file(RunFolder.EVAL)} and {RunFolder.GENERATIONS}")
    return table


def table_blocks(names: Sequence[str]) -> dict[str, list[str]]:
    """Rows grouped so that like is compared with like: static (exportable) gains, then everything behind the gate."""
    return {"static (what export folds)": [n for n in names if not n.endswith(GATED)],
            "gated (the same input gate in front of each)": [n for n in names if n.endswith(GATED)]}
