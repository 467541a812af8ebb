"""One evaluation harness for any intervention (None = base model, a `Modulation`, a steering direction...):
refusal on held-out harmful and attacked prompts, over-refusal, perplexity, multiple choice, repetition.

An intervention follows `interventions.protocol`. The base model's side is kept in a cache dict
(`EvalResult.base_cache`, see `base_cache`); pass it (or the result) as `base=` so evaluating several
interventions generates the base answers once.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from ..config import EvalConfig
from ..data.chat import chat_prompt
from ..data.forms import PHRASINGS
from ..data.splits import Splits, check_split
from ..infra import distributed as dist
from ..infra.progress import SILENT, Reporter
from ..interventions.generation import generate
from ..interventions.protocol import applied_rows, form_of, intervention_name, is_gated
from . import teacher_forced as tf
from .base_cache import base_cache, disk_cache
from .judge import DEGENERATE, REFUSALS, REFUSE
from .judges import RULES, Judge, agreement
from .plan import ROW_FIELDS, eval_plan
from .stats import mean

MAIN_METRICS = ("harmful_refusal", "heldout_family_refusal", "train_family_refusal", "contrast_refusal", "benign_over_refusal",
                "template_over_refusal", "borderline_over_refusal", "alarming_over_refusal", "ppl_ratio", "mc_accuracy",
                "degenerate_rate", "repetition_rate", "attack_success")


@dataclass
class EvalResult:
    """Metrics of one intervention, one row per generated answer, and the base cache to reuse.

    Row fields (`plan.ROW_FIELDS`): prompt (as sent), category (harmful | attacked | benign | borderline |
    benign_attacked), family ("plain" or the attack family), split (validation | test), group (the phrasing
    group, or heldout_family / train_family), phrasing, topic, request (before wrapping), base_answer, answer,
    base_verdict, verdict (the judge: refuse | partial | comply | degenerate), base_refusal, refusal (full or
    partial), strength (the intervention's strength on this row: 1, or the gate's reading), and where a second judge
    gave its opinion base_second_verdict, second_verdict."""

    name: str
    metrics: dict[str, float]
    rows: list[dict]
    base_metrics: dict[str, float] = field(default_factory=dict)  # the same metrics for the base model
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    base_cache: dict = field(default_factory=dict, repr=False)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # rate -> (events, prompts), for intervals
    base_counts: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(ROW_FIELDS))


def distinct_ngram_ratio(ids: Sequence[int], n: int = 4) -> float:
    """Distinct n-grams / all n-grams of a token sequence; 1.0 when it is too short to have any."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _generate_rows(lm, jobs: list[tuple[str, float]], intervention, cfg: EvalConfig, tick, reporter: Reporter) -> list[str]:
    """Answer (prompt, strength) jobs: strength 0 is the base model, 1 the intervention as is, in between a gated
    reading. Rows are sorted by prompt length so a batch pads little, and base and intervention rows share
    batches when the intervention has a per-row form (`apply_rows`)."""
    if not jobs:
        return []
    formatted = [chat_prompt(lm.tokenizer, p) for p, _ in jobs]
    order = sorted(range(len(jobs)), key=lambda i: (len(lm.tokenizer(formatted[i], add_special_tokens=False)["input_ids"]), i))
    out: list[str] = [""] * len(jobs)
    mixed = intervention is None or hasattr(intervention, "apply_rows")
    groups = [order] if mixed else [[i for i in order if jobs[i][1] == 0], [i for i in order if jobs[i][1] != 0]]
    batches = [group[start:start + cfg.batch_size] for group in groups for start in range(0, len(group), cfg.batch_size)]
    mine = dist.shard(batches)  # under `accelerate launch` the batches are shared over the processes (all with one)
    for idx in mine:
        reporter.check("Evaluation")
        strengths = torch.tensor([float(jobs[i][1]) for i in idx])
        with applied_rows(intervention, lm, strengths):
            answers = generate(lm, [formatted[i] for i in idx], max_new_tokens=cfg.max_new_tokens, batch_size=len(idx), formatted=True)
        for i, a in zip(idx, answers):
            out[i] = a
        tick(len(idx), "generate")
    if dist.launched():  # every process gets every answer (same batches as one process: same greedy answers)
        for i, a in dist.gather([(i, out[i]) for idx in mine for i in idx]):
            out[i] = a
        tick(len(jobs) - sum(len(idx) for idx in mine), "generate")
    return out


STRICT = "strict/"  # prefix of the rates that count full refusals only (the others count partial ones too)
STRICT_RATES = ("harmful_refusal", "heldout_family_refusal", "train_family_refusal", "contrast_refusal", "benign_over_refusal",
                "template_over_refusal", "borderline_over_refusal", "alarming_over_refusal")


def rate_counts(rows: list[dict], key: str = "verdict", refusals: tuple[str, ...] = REFUSALS) -> dict[str, tuple[int, int]]:
    """(refusals, prompts) of every rate the table reports, judged on row[key] (a judge verdict): a full or partial
    refusal counts, and `strict/<rate>` counts full refusals only."""
    out = _rate_counts(rows, key, refusals)
    if refusals == REFUSALS:
        strict = _rate_counts(rows, key, (REFUSE,))
        out.update({STRICT + k: strict[k] for k in STRICT_RATES if k in strict})
    return out


def _rate_counts(rows: list[dict], key: str, refusals: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    def count(selected) -> tuple[int, int]:
        return sum(r[key] in refusals for r in selected), len(selected)

    def where(**match) -> list[dict]:
        return [r for r in rows if all(r[k] == v for k, v in match.items())]

    out: dict[str, tuple[int, int]] = {}
    for metric, category in (("harmful_refusal", "harmful"), ("benign_over_refusal", "benign"), ("borderline_over_refusal", "borderline"),
                             ("alarming_over_refusal", "alarming"), ("contrast_refusal", "contrast")):
        out[metric] = count(where(category=category))
        for group in PHRASINGS:
            if where(category=category, phrasing=group):
                out[f"{metric}/{group}"] = count(where(category=category, phrasing=group))
    for metric, category in (("", "attacked"), ("template_over_refusal", "benign_attacked")):
        for group, name in (("heldout_family", "heldout_family_refusal"), ("train_family", "train_family_refusal")):
            selected = where(category=category, group=group)
            if selected:
                out[name if category == "attacked" else f"{metric}/{group}"] = count(selected)
        if category == "benign_attacked" and where(category=category):
            out[metric] = count(where(category=category))
        for family in sorted({r["family"] for r in where(category=category)}):
            out[f"{'refusal' if category == 'attacked' else 'over_refusal'}/{family}"] = count(where(category=category, family=family))
    attacked = where(category="attacked")
    if attacked:
        refused, n = count(attacked)
        out["attack_success"] = (n - refused, n)
    out["degenerate_rate"] = (sum(r[key] == DEGENERATE for r in rows), len(rows))
    return out


def refusal_metrics(counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    return {k: (a / n if n else float("nan")) for k, (a, n) in counts.items()}


def evaluate(lm, intervention, splits: Splits, cfg: EvalConfig = EvalConfig(), *, split: str = "test", name: str | None = None,
             reporter: Reporter | None = None, base=None, cache_dir: str | Path | None = None,
             judge: Judge | None = None, answered: tuple[list[str], list[float]] | None = None) -> EvalResult:
    """Evaluate `intervention` (None = the base model; a gated one reads each prompt's end) on one split:
    "validation" while choosing anything, "test" for the table one reports.
    judge: what reads the answers (default the rules; `eval.judges`); with a second opinion, both verdicts are kept
    and their agreement is a metric (`judge_agreement`).

    base: a previous EvalResult or a cache dict (filled in place) holding the base model's answers,
    perplexities and multiple-choice predictions, so only the intervention's side is computed again.
    cache_dir: also keep that cache on disk, keyed by the model fingerprint.
    answered: (answers, strengths) of the plan's rows already generated for this intervention (`evaluate_many`'s
    shared batches): only the teacher-forced metrics are computed here."""
    check_split(split)
    reporter = reporter or SILENT
    start_time = time.perf_counter()
    name = name or intervention_name(intervention)
    made_for = getattr(intervention, "fingerprint", None)
    if made_for and made_for != lm.fingerprint:
        raise ValueError(f"This modulation was made for model {made_for}, not the loaded model {lm.fingerprint}.")
    gated = is_gated(intervention)
    inner = intervention.inner if gated else intervention
    run_lm = getattr(intervention, "lm", None) or lm  # a model standing in for the intervention (`Reloaded`)
    run_inner = inner if run_lm is lm else None
    cache = base_cache(base, lm)
    disk_cache(cache, lm, cache_dir)
    rows = eval_plan(splits, cfg, split)
    ppl_prompts = [p.text for p in splits.benign[split][: cfg.n_ppl]]
    akey = lambda p: f"{cfg.max_new_tokens}\x1f{p}"  # noqa: E731  answers depend on their length
    need_base = list(dict.fromkeys([r["prompt"] for r in rows] + ppl_prompts))
    missing = [p for p in need_base if akey(p) not in cache["answers"]]
    ppl_missing = [p for p in ppl_prompts if akey(p) not in cache["nll"]]
    mc_key = f"{cfg.mc_style}:{cfg.n_mc}"
    questions = tf.mc_questions(cfg)
    n_choices = sum(len(q["choices"]) for q in questions)
    with_iv = intervention is not None
    total = (len(missing) + (len(rows) if with_iv else 0) + len(ppl_missing) + (len(ppl_prompts) if with_iv else 0)
             + (n_choices if mc_key not in cache["mc"] else 0) + (n_choices if with_iv else 0))
    done = 0

    def tick(n: int, stage: str) -> None:
        nonlocal done
        done += n
        reporter.progress(done, total, stage)

    def gate(texts: list[str]) -> list[float] | None:
        """Each prompt's strength, read from the prompt alone (None: the intervention as is)."""
        if not gated or not texts:
            return None
        return [float(s) for s in intervention.strengths(lm, [chat_prompt(lm.tokenizer, t) for t in texts])]

    timings = {}
    t = time.perf_counter()
    row_strength = (answered[1] if answered else gate([r["prompt"] for r in rows])) or [1.0] * len(rows)
    jobs = [(p, 0.0) for p in missing] + ([(r["prompt"], s) for r, s in zip(rows, row_strength)] if with_iv and not answered else [])
    if run_lm is lm:
        answers = _generate_rows(lm, jobs, inner, cfg, tick, reporter)
    else:  # the intervention is another model (an export reloaded): its rows run there, unhooked
        answers = _generate_rows(lm, jobs[:len(missing)], None, cfg, tick, reporter) + _generate_rows(run_lm, jobs[len(missing):], None, cfg, tick, reporter)
    for p, a in zip(missing, answers):
        cache["answers"][akey(p)] = a
    iv_answers = (list(answered[0]) if answered else answers[len(missing):]) if with_iv else [cache["answers"][akey(r["prompt"])] for r in rows]
    timings["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    refs = [cache["answers"][akey(p)] or "." for p in ppl_prompts]  # an empty answer still gets one token to score
    if ppl_missing:
        idx = [ppl_prompts.index(p) for p in ppl_missing]
        for p, v in zip(ppl_missing, tf.answer_nll(lm, None, ppl_missing, [refs[i] for i in idx], cfg.batch_size, tick, reporter)):
            cache["nll"][akey(p)] = v
    base_nll = [cache["nll"][akey(p)] for p in ppl_prompts]
    iv_nll = (tf.answer_nll(run_lm, run_inner, ppl_prompts, refs, cfg.batch_size, tick, reporter, strengths=gate(ppl_prompts))
              if with_iv else base_nll)
    timings["perplexity_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if mc_key not in cache["mc"]:
        cache["mc"][mc_key] = tf.mc_predictions(lm, None, cfg, tick, reporter)
    base_preds = cache["mc"][mc_key]
    mc_strengths = gate([q["question"] for q in questions]) if cfg.mc_style == "cloze" else None
    if gated and cfg.mc_style != "cloze":  # the letter prompt lists the choices: read the gate on it as shown
        mc_strengths = [float(s) for s in intervention.strengths(lm, [p for p, _ in tf.mc_items(cfg.mc_style, lm.tokenizer, questions)])]
    iv_preds = tf.mc_predictions(run_lm, run_inner, cfg, tick, reporter, strengths=mc_strengths) if with_iv else base_preds
    timings["mc_s"] = time.perf_counter() - t
    if dist.is_main():  # under `accelerate launch` only the main process writes
        disk_cache(cache, lm, cache_dir, save=True)

    judge = judge or RULES
    for r, a, s in zip(rows, iv_answers, row_strength):
        r["base_answer"] = cache["answers"][akey(r["prompt"])]
        r["answer"] = a
        r["strength"] = s if with_iv else 0.0
        r["base_second_verdict"] = r["second_verdict"] = None
    judged = [r["prompt"] for r in rows] * 2, [r["base_answer"] for r in rows] + [r["answer"] for r in rows]
    for prefix, judge_ in (("", judge), ("second_", getattr(judge, "second", None))):
        if judge_ is not None:
            verdicts = judge_.verdicts(*judged)
            for r, bv, v in zip(rows, verdicts[:len(rows)], verdicts[len(rows):]):
                r[f"base_{prefix}verdict"], r[f"{prefix}verdict"] = bv, v
    for r in rows:
        r["base_refusal"], r["refusal"] = r["base_verdict"] in REFUSALS, r["verdict"] in REFUSALS

    def repetition(key: str) -> float:
        ids = [lm.tokenizer(r[key], add_special_tokens=False)["input_ids"] for r in rows]
        return mean([float(distinct_ngram_ratio(i) < cfg.repetition_threshold) for i in ids])

    base_ppl, iv_ppl = tf.perplexity(base_nll), tf.perplexity(iv_nll)
    counts, base_counts = rate_counts(rows, "verdict"), rate_counts(rows, "base_verdict")
    mc_correct = sum(p == q["answer"] for p, q in zip(iv_preds, questions))
    base_mc_correct = sum(p == q["answer"] for p, q in zip(base_preds, questions))
    counts["mc_accuracy"], base_counts["mc_accuracy"] = (mc_correct, len(questions)), (base_mc_correct, len(questions))
    if getattr(judge, "second", None) is not None:  # the share of answers both judges call the same (refusal or not)
        counts["judge_agreement"] = agreement([r["verdict"] for r in rows], [r["second_verdict"] for r in rows])
        base_counts["judge_agreement"] = agreement([r["base_verdict"] for r in rows], [r["base_second_verdict"] for r in rows])
    metrics = refusal_metrics(counts)
    metrics.update(ppl_ratio=iv_ppl / base_ppl if with_iv else 1.0, repetition_rate=repetition("answer"))
    base_metrics = refusal_metrics(base_counts)
    base_metrics.update(ppl_ratio=1.0, repetition_rate=repetition("base_answer"))
    meta = {
        "model": lm.name, "fingerprint": lm.fingerprint, "intervention": dict(getattr(intervention, "meta", {}) or {}),
        "split": split, "gated": gated, "form": form_of(intervention), "mean_strength": mean(row_strength) if with_iv else 0.0,
        "n_rows": len(rows), "n_ppl": len(ppl_prompts), "n_mc": len(questions), "base_ppl": base_ppl, "ppl": iv_ppl,
        "base_generated": len(missing), "seconds": time.perf_counter() - start_time, **timings,
        "heldout_families": list(splits.heldout_families), "train_families": list(splits.train_families),
        "judge": judge.name, "second_judge": getattr(getattr(judge, "second", None), "name", None),
    }
    return EvalResult(name, _ordered(metrics), rows, _ordered(base_metrics), dataclasses.asdict(cfg), meta, cache,
                      counts, base_counts)


def _ordered(metrics: dict) -> dict:
    head = [k for k in MAIN_METRICS if k in metrics]
    return {k: metrics[k] for k in head + sorted(k for k in metrics if k not in head)}


def evaluate_many(lm, interventions: dict[str, object], splits: Splits, cfg: EvalConfig = EvalConfig(), *, split: str = "test",
                  reporter: Reporter | None = None, base=None, cache_dir: str | Path | None = None,
                  judge: Judge | None = None, shared: bool = False) -> list[EvalResult]:
    """Evaluate several named interventions sharing one base cache (the base answers are generated once). `shared`:
    the modulations' answers are generated together in shared batches (`_shared_answers`), one process only."""
    cache = base_cache(base, lm)
    results = []
    answered = _shared_answers(lm, interventions, splits, cfg, split, reporter or SILENT) if shared else {}
    for i, (name, iv) in enumerate(interventions.items()):
        part = (reporter or SILENT).within(f"{name} ({i + 1}/{len(interventions)}): ")
        results.append(evaluate(lm, iv, splits, cfg, split=split, name=name, reporter=part, base=cache, cache_dir=cache_dir,
                                judge=judge, answered=answered.get(name)))
    return results


def _row_modulation(iv):
    """The per-row form of an intervention that can share a generation batch with others (gains, with or without
    input terms, as is or behind a gate: a `Modulation` per row), or None."""
    inner = iv.inner if is_gated(iv) else iv
    return inner if hasattr(inner, "scaled") and hasattr(inner, "dense") else None


def _shared_answers(lm, interventions: dict[str, object], splits: Splits, cfg: EvalConfig, split: str,
                    reporter: Reporter) -> dict[str, tuple[list[str], list[float]]]:
    """Every modulation's answers to the plan's rows, generated together: rows of all of them sorted by prompt length
    into batches of `cfg.batch_size`, each row with its own modulation at its own strength (a gate's reading, or 1).
    Interventions without a per-row modulation (a steering direction, another model) are left to `evaluate`."""
    if dist.launched():
        raise ValueError("Shared batches are for one process; under `accelerate launch` evaluate each intervention on its own.")
    rows = eval_plan(splits, cfg, split)
    formatted = [chat_prompt(lm.tokenizer, r["prompt"]) for r in rows]
    jobs, out = [], {}
    for name, iv in interventions.items():
        mod = _row_modulation(iv)
        if iv is None or mod is None or getattr(iv, "fingerprint", lm.fingerprint) not in (None, lm.fingerprint):
            continue
        mods, s = iv.per_prompt(lm, formatted, formatted=True) if is_gated(iv) else ([mod] * len(rows), [1.0] * len(rows))
        out[name] = ([""] * len(rows), s)
        jobs += [(name, i, mods[i]) for i in range(len(rows))]
    length = {i: len(lm.tokenizer(f, add_special_tokens=False)["input_ids"]) for i, f in enumerate(formatted)}
    jobs.sort(key=lambda j: (length[j[1]], j[1]))
    batches = [jobs[k:k + cfg.batch_size] for k in range(0, len(jobs), cfg.batch_size)]
    for b, batch in enumerate(batches):
        reporter.check("Evaluation")
        answers = generate(lm, [formatted[i] for _, i, _ in batch], [m for _, _, m in batch], max_new_tokens=cfg.max_new_tokens,
                           batch_size=len(batch), formatted=True)
        for (name, i, _), a in zip(batch, answers):
            out[name][0][i] = a
        reporter.progress(min((b + 1) * cfg.batch_size, len(jobs)), len(jobs), "generate (shared batches)")
    return out


def compare(results: Sequence[EvalResult]) -> pd.DataFrame:
    """Metrics table: one row per intervention (index = names), main metrics first."""
    frame = pd.DataFrame([r.metrics for r in results], index=pd.Index([r.name for r in results], name="intervention"))
    return frame[list(_ordered({c: None for c in frame.columns}))]
