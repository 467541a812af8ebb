"""Evaluate a run folder: the base model, NeuronTune in every form the run offers (static, gated, the exported
checkpoint reloaded) and every baseline in one harness, over several training seeds, on one split (test for the
reported table, validation while choosing), with the style audit of the pools. Written back to the folder."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..config import FULL_EVAL, QUICK_EVAL, VALIDATION_EVAL, RunConfig
from ..data.splits import Splits, build_splits, check_split
from ..eval.baselines import BASELINES, build_baselines
from ..eval.harness import STRICT, EvalResult, evaluate_many
from ..eval.judges import Judge, describe, judge_from_spec
from ..eval.report import markdown, summarise
from ..infra import distributed as dist
from ..infra.progress import SILENT, Reporter
from ..eval.reloaded import Reloaded
from ..interventions.gating import GATED, Gated
from ..interventions.modulation import Modulation
from ..interventions.protocol import FORM_TITLES
from ..method.recipe import Trained, train_run
from ..method.selection import select
from .export import EXPORTED, export
from .folder import RunFolder


def _products(lm, folder: RunFolder, cfg: RunConfig, k: int, scores, splits: Splits, cache_dir, reporter: Reporter) -> Trained:
    """Seed k's trained modulation, gate and foldable modulation: the run's own files for k = 0, else trained again."""
    if k == 0:
        return Trained(folder.modulation(lm.fingerprint), folder.gate(lm), None, folder.foldable(lm.fingerprint))
    reporter.say(f"Training NeuronTune again with seed {cfg.meta.seed}...")
    return train_run(lm, select(scores, cfg.selection), cfg, splits, cache_dir=cache_dir, reporter=reporter.muted())


def _as_exported(lm, mod: Modulation, name: str, reporter: Reporter) -> Reloaded:
    """`mod` as export writes it: folded into a checkpoint in a temporary folder, then reloaded with plain transformers."""
    with tempfile.TemporaryDirectory(prefix="neurontune-eval-export-") as tmp:
        export(lm, mod, tmp, "checkpoint", reporter=reporter.muted())
        reloaded = Reloaded.load(Path(tmp) / "checkpoint", lm, name=name)
    reloaded.meta["folds"] = "conditional" if mod.conditional else "static"
    return reloaded


def evaluate_run(lm, run: str | Path | RunFolder, cfg: RunConfig | None = None, *, baselines: Sequence[str] = BASELINES,
                 quick: bool = False, seeds: int = 1, split: str = "test", cache_dir=None,
                 reporter: Reporter | None = None, judge: Judge | str | None = None) -> pd.DataFrame:
    """Evaluate the run in every form it offers against the base model and `baselines` on `split`; with `seeds` > 1,
    train the run and the trained baselines again with seeds meta.seed+1, ... and report mean ± sd over seeds.

    Rows: the run's gains as they are (unless they were trained behind the gate: then only gated), behind their gate,
    and the foldable modulation as the export checkpoint reloaded with plain transformers (when the run trained one);
    each baseline trained and gated the way the run is (the same gate in front of every method). Returns the summary
    table (one row per intervention); writes eval.json, eval_table.csv, generations.jsonl.
    judge: what reads the answers (default the rules; a spec such as "model:PATH" is built here); eval.json names it."""
    check_split(split)
    judge = judge_from_spec(judge, cache_dir=cache_dir)
    reporter = reporter or SILENT
    reporter.phase("evaluate")
    start = time.perf_counter()
    folder = RunFolder(run)
    cfg = cfg or folder.config()
    if folder.modulation(lm.fingerprint) is None:
        raise FileNotFoundError(f"{folder.path} holds no trained gains ({RunFolder.MODULATION}); run `tune` first.")
    scores = folder.scores()
    if scores is None and (baselines or seeds > 1):
        raise FileNotFoundError(f"{folder.path} holds no neuron scores ({RunFolder.SCORES}): the baselines and other seeds "
                                "re-select from them. Run `tune` (or `attribute --out` into this folder) first.")
    splits = build_splits(cfg.data)
    ecfg = QUICK_EVAL if quick else (VALIDATION_EVAL if split == "validation" else FULL_EVAL)
    audit_result = splits.style_audit(split)
    reporter.say(audit_result.summary())
    groups: dict[str, list[EvalResult]] = {}
    results: list[EvalResult] = []
    cache: dict = {}
    directions = None
    behind = cfg.meta.gate and cfg.meta.gate_first  # gains trained behind the gate are evaluated behind it only
    for k in range(max(1, seeds)):
        scfg = cfg.replace(meta={"seed": cfg.meta.seed + k})
        run_k = _products(lm, folder, scfg, k, scores, splits, cache_dir, reporter)
        mod, gate = run_k.modulation, run_k.gate
        trained: dict = {"neurontune": mod}
        if baselines:
            built = build_baselines(lm, scfg, scores, mod, splits, baselines, cache_dir=cache_dir, reporter=reporter,
                                    directions=directions, gate=gate if behind else None,
                                    target=Gated(mod, gate) if gate is not None else mod)
            fresh = {n: iv for n, iv in built.items() if not (directions and n in directions)}
            directions = directions or {n: iv for n, iv in built.items() if n.startswith("direction:")}
            trained.update(fresh)  # a direction does not depend on the seed: its ungated row is evaluated once
        interventions: dict = {"base": None} if k == 0 else {}
        if not (behind and gate is not None):
            interventions.update(trained)
        if gate is not None:  # the same gate, read from each prompt, in front of every method: gates with gates
            for name, iv in {**trained, **(directions or {})}.items():
                interventions[name + GATED] = Gated(iv, gate, name=name + GATED)
        if run_k.foldable is not None:
            interventions[EXPORTED] = _as_exported(lm, run_k.foldable, EXPORTED, reporter)
        reporter.say(f"Evaluating {len(interventions)} interventions on the {split} split (seed {scfg.meta.seed})...")
        done = evaluate_many(lm, interventions, splits, ecfg, split=split, reporter=reporter, base=cache,
                             cache_dir=cache_dir, judge=judge, shared=not dist.launched())
        for r in done:
            r.meta["seed"] = scfg.meta.seed
            groups.setdefault(r.name, []).append(r)
        results += done
    table = summarise(groups)
    blocks = table_blocks({name: rs[0].meta.get("form") for name, rs in groups.items()})
    if not dist.is_main():  # under `accelerate launch` (generation shared over processes) the main process writes
        return table
    rows = [{"intervention": name, **{k: (None if v != v else v) for k, v in row.items()}} for name, row in table.to_dict(orient="index").items()]
    folder.write_eval({"split": split, "seeds": max(1, seeds), "table": rows, "blocks": blocks, "eval_config": ecfg.__dict__,
                       "forms": {name: rs[0].meta.get("form") for name, rs in groups.items()},
                       "style_audit": {"accuracy": audit_result.accuracy, "n_train": audit_result.n_train,
                                       "n_eval": audit_result.n_eval, "top_features": audit_result.top_features},
                       "heldout_families": list(splits.heldout_families), "train_families": list(splits.train_families),
                       "directions": {n: {"layer": d.layer, "coef": d.coef, "reached": d.meta.get("reached"),
                                          "target": d.meta.get("target")} for n, d in (directions or {}).items()},
                       "judge": judge.name, "second_judge": getattr(judge.second, "name", None),
                       "judge_note": describe(judge), "seconds": time.perf_counter() - start}, table)
    folder.write_generations(results)
    reporter.say(f"{describe(judge)}.\n" + markdown(table, blocks))
    for title, prefixes in (("by phrasing group", ("harmful_refusal/", "benign_over_refusal/", "borderline_over_refusal/",
                                                   "alarming_over_refusal/", "contrast_refusal/")),
                            ("refusal by attack family", ("refusal/",)),
                            ("full refusals only (partial refusals not counted)", (STRICT,))):
        columns = [c for c in table.columns if c.startswith(prefixes) and ":" not in c]
        if columns:
            reporter.say(f"\n{split} split, {title}:\n" + markdown(table, blocks, columns))
    reporter.say(f"{split} split, {max(1, seeds)} seed(s); {audit_result.summary()}")
    reporter.say(f"Evaluation took {time.perf_counter() - start:.0f} s; wrote {folder.file(RunFolder.EVAL)} and {RunFolder.GENERATIONS}")
    return table


def table_blocks(forms: dict[str, str | None]) -> dict[str, list[str]]:
    """Rows grouped by the form they apply, so that like is compared with like (the base model heads the first block)."""
    out: dict[str, list[str]] = {title: [] for title in FORM_TITLES.values()}
    for name, form in forms.items():
        out[FORM_TITLES.get(form or "static", FORM_TITLES["static"])].append(name)
    return {title: names for title, names in out.items() if names}
