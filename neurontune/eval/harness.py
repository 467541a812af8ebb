"""One evaluation harness for any intervention (None = base model, a `Modulation`, a steering direction...):
refusal on held-out harmful and attacked prompts, over-refusal, perplexity, multiple choice, repetition.

An intervention follows `interventions.protocol`. The base model's side is kept in a cache dict
(`EvalResult.base_cache`, see `base_cache`); pass it (or the result) as `base=` so evaluating several
interventions generates the base answers once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..config import EvalConfig
from ..data.chat import chat_prompt
from ..data.splits import Splits
from ..infra import distributed as dist
from ..infra.progress import Progress, check_cancel
from ..interventions.generation import generate
from ..interventions.modulation import Modulation
from ..interventions.protocol import applied, intervention_name
from . import teacher_forced as tf
from .base_cache import base_cache, disk_cache
from .judge import is_refusal
from .plan import ROW_FIELDS, eval_plan
from .stats import mean

MAIN_METRICS = ("harmful_refusal", "attack_success", "heldout_family_refusal", "train_family_refusal",
                "benign_over_refusal", "borderline_over_refusal", "ppl_ratio", "mc_accuracy", "repetition_rate")


@dataclass
class EvalResult:
    """Metrics of one intervention, one row per generated answer, and the base cache to reuse.

    Row fields: prompt (as sent), category (harmful | attacked | benign | borderline), family ("plain" or
    the attack family), split (test | heldout_family | train_family | other_family), topic (the prompt's
    own category), request (the harmful request before wrapping), base_answer, answer (with the
    intervention), base_refusal, refusal (judge.is_refusal of each answer)."""

    name: str
    metrics: dict[str, float]
    rows: list[dict]
    base_metrics: dict[str, float] = field(default_factory=dict)  # the same metrics for the base model
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    base_cache: dict = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(ROW_FIELDS))


def distinct_ngram_ratio(ids: Sequence[int], n: int = 4) -> float:
    """Distinct n-grams / all n-grams of a token sequence; 1.0 when it is too short to have any."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _generate_rows(lm, jobs: list[tuple[str, object]], intervention, cfg: EvalConfig, tick, cancel) -> list[str]:
    """Answer (prompt, gains) jobs; gains is None (base) or "mod". Rows are sorted by prompt length so a
    batch pads little; a Modulation runs base and modulated rows in the same batch with per-row gains."""
    if not jobs:
        return []
    formatted = [chat_prompt(lm.tokenizer, p) for p, _ in jobs]
    order = sorted(range(len(jobs)), key=lambda i: (len(lm.tokenizer(formatted[i], add_special_tokens=False)["input_ids"]), i))
    out: list[str] = [""] * len(jobs)
    per_row = isinstance(intervention, Modulation)
    groups = [order] if per_row or intervention is None else [
        [i for i in order if jobs[i][1] is None], [i for i in order if jobs[i][1] is not None]]
    batches = [group[start:start + cfg.batch_size] for group in groups for start in range(0, len(group), cfg.batch_size)]
    mine = dist.shard(batches)  # under `accelerate launch` the batches are shared over the processes (all with one)
    for idx in mine:
        check_cancel(cancel, "Evaluation")
        texts = [formatted[i] for i in idx]
        kinds = [jobs[i][1] for i in idx]
        if per_row:
            gains = None if all(k is None for k in kinds) else intervention if all(k is not None for k in kinds) \
                else [None if k is None else intervention for k in kinds]
            answers = generate(lm, texts, gains, max_new_tokens=cfg.max_new_tokens, batch_size=len(texts), formatted=True)
        else:
            with (contextlib.nullcontext() if kinds[0] is None else applied(intervention, lm)):
                answers = generate(lm, texts, max_new_tokens=cfg.max_new_tokens, batch_size=len(texts), formatted=True)
        for i, a in zip(idx, answers):
            out[i] = a
        tick(len(idx), "generate")
    if dist.launched():  # every process gets every answer (same batches as one process: same greedy answers)
        for i, a in dist.gather([(i, out[i]) for idx in mine for i in idx]):
            out[i] = a
        tick(len(jobs) - sum(len(idx) for idx in mine), "generate")
    return out


def refusal_metrics(rows: list[dict], key: str, heldout: Sequence[str], train: Sequence[str]) -> dict[str, float]:
    """Refusal rates of `rows` judged on row[key] (True/False): overall, per family, held-out vs train families."""
    def rate(rs):
        return mean([float(r[key]) for r in rs])

    by_cat = {c: [r for r in rows if r["category"] == c] for c in ("harmful", "attacked", "benign", "borderline")}
    fams = sorted({r["family"] for r in by_cat["attacked"]})
    per_family = {f: rate([r for r in by_cat["attacked"] if r["family"] == f]) for f in fams}
    m = {
        "harmful_refusal": rate(by_cat["harmful"]),
        "attack_success": 1.0 - rate(by_cat["attacked"]) if by_cat["attacked"] else float("nan"),
        "heldout_family_refusal": mean([per_family[f] for f in fams if f in heldout]),
        "train_family_refusal": mean([per_family[f] for f in fams if f in train]),
        "benign_over_refusal": rate(by_cat["benign"]),
        "borderline_over_refusal": rate(by_cat["borderline"]),
    }
    m.update({f"refusal/{f}": v for f, v in per_family.items()})
    return m


def evaluate(lm, intervention, splits: Splits, cfg: EvalConfig = EvalConfig(), *, name: str | None = None,
             progress: Progress | None = None, cancel: threading.Event | None = None, base=None,
             cache_dir: str | Path | None = None) -> EvalResult:
    """Evaluate `intervention` (None = the base model) on the held-out prompts of `splits`.

    base: a previous EvalResult or a cache dict (filled in place) holding the base model's answers,
    perplexities and multiple-choice predictions, so only the intervention's side is computed again.
    cache_dir: also keep that cache on disk, keyed by the model fingerprint."""
    start_time = time.perf_counter()
    name = name or intervention_name(intervention)
    made_for = getattr(intervention, "fingerprint", None)
    if isinstance(intervention, Modulation) and made_for and made_for != lm.fingerprint:
        raise ValueError(f"This modulation was made for model {made_for}, not the loaded model {lm.fingerprint}.")
    cache = base_cache(base, lm)
    disk_cache(cache, lm, cache_dir)
    rows = eval_plan(splits, cfg)
    ppl_prompts = [p.text for p in splits.benign_test[: cfg.n_ppl]]
    akey = lambda p: f"{cfg.max_new_tokens}\x1f{p}"  # noqa: E731  answers depend on their length
    need_base = list(dict.fromkeys([r["prompt"] for r in rows] + ppl_prompts))
    missing = [p for p in need_base if akey(p) not in cache["answers"]]
    mod_jobs = [] if intervention is None else [(r["prompt"], "mod") for r in rows]
    ppl_missing = [p for p in ppl_prompts if akey(p) not in cache["nll"]]
    mc_key = f"{cfg.mc_style}:{cfg.n_mc}"
    n_mc = len(tf.mc_questions(cfg))
    n_choices = sum(len(q["choices"]) for q in tf.mc_questions(cfg))
    total = (len(missing) + len(mod_jobs) + len(ppl_missing) + (len(ppl_prompts) if intervention is not None else 0)
             + (n_choices if mc_key not in cache["mc"] else 0) + (n_choices if intervention is not None else 0))
    done = 0

    def tick(n: int, stage: str) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total, stage)

    timings = {}
    t = time.perf_counter()
    answers = _generate_rows(lm, [(p, None) for p in missing] + mod_jobs, intervention, cfg, tick, cancel)
    for p, a in zip(missing, answers):
        cache["answers"][akey(p)] = a
    mod_answers = answers[len(missing):] if intervention is not None else [cache["answers"][akey(r["prompt"])] for r in rows]
    timings["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    refs = [cache["answers"][akey(p)] or "." for p in ppl_prompts]  # an empty answer still gets one token to score
    if ppl_missing:
        idx = [ppl_prompts.index(p) for p in ppl_missing]
        for p, v in zip(ppl_missing, tf.answer_nll(lm, None, ppl_missing, [refs[i] for i in idx], cfg.batch_size, tick, cancel)):
            cache["nll"][akey(p)] = v
    base_nll = [cache["nll"][akey(p)] for p in ppl_prompts]
    mod_nll = base_nll if intervention is None else tf.answer_nll(lm, intervention, ppl_prompts, refs, cfg.batch_size, tick, cancel)
    timings["perplexity_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if mc_key not in cache["mc"]:
        cache["mc"][mc_key] = tf.mc_predictions(lm, None, cfg, tick, cancel)
    base_preds = cache["mc"][mc_key]
    mod_preds = base_preds if intervention is None else tf.mc_predictions(lm, intervention, cfg, tick, cancel)
    timings["mc_s"] = time.perf_counter() - t
    if dist.is_main():  # under `accelerate launch` only the main process writes
        disk_cache(cache, lm, cache_dir, save=True)

    for r, a in zip(rows, mod_answers):
        r["base_answer"] = cache["answers"][akey(r["prompt"])]
        r["answer"] = a
        r["base_refusal"] = is_refusal(r["base_answer"])
        r["refusal"] = is_refusal(a)

    def repetition(key: str) -> float:
        ids = [lm.tokenizer(r[key], add_special_tokens=False)["input_ids"] for r in rows]
        return mean([float(distinct_ngram_ratio(i) < cfg.repetition_threshold) for i in ids])

    heldout, train = splits.heldout_families, splits.train_families
    base_ppl, mod_ppl = tf.perplexity(base_nll), tf.perplexity(mod_nll)
    metrics = refusal_metrics(rows, "refusal", heldout, train)
    metrics.update(ppl_ratio=1.0 if intervention is None else mod_ppl / base_ppl,
                   mc_accuracy=tf.mc_accuracy(mod_preds, cfg), repetition_rate=repetition("answer"))
    base_metrics = refusal_metrics(rows, "base_refusal", heldout, train)
    base_metrics.update(ppl_ratio=1.0, mc_accuracy=tf.mc_accuracy(base_preds, cfg), repetition_rate=repetition("base_answer"))
    meta = {
        "model": lm.name, "fingerprint": lm.fingerprint, "intervention": dict(getattr(intervention, "meta", {}) or {}),
        "n_rows": len(rows), "n_ppl": len(ppl_prompts), "n_mc": n_mc, "base_ppl": base_ppl, "ppl": mod_ppl,
        "base_generated": len(missing), "seconds": time.perf_counter() - start_time, **timings,
        "heldout_families": list(heldout), "train_families": list(train),
    }
    return EvalResult(name, _ordered(metrics), rows, _ordered(base_metrics), dataclasses.asdict(cfg), meta, cache)


def _ordered(metrics: dict) -> dict:
    head = [k for k in MAIN_METRICS if k in metrics]
    return {k: metrics[k] for k in head + sorted(k for k in metrics if k not in head)}


def evaluate_many(lm, interventions: dict[str, object], splits: Splits, cfg: EvalConfig = EvalConfig(), *,
                  progress: Progress | None = None, cancel: threading.Event | None = None, base=None,
                  cache_dir: str | Path | None = None) -> list[EvalResult]:
    """Evaluate several named interventions sharing one base cache (the base answers are generated once)."""
    cache = base_cache(base, lm)
    results = []
    for i, (name, iv) in enumerate(interventions.items()):
        stage_progress = None if progress is None else (lambda d, t, s, i=i, name=name: progress(d, t, f"{name} ({i + 1}/{len(interventions)}): {s}"))
        results.append(evaluate(lm, iv, splits, cfg, name=name, progress=stage_progress, cancel=cancel, base=cache, cache_dir=cache_dir))
    return results


def compare(results: Sequence[EvalResult]) -> pd.DataFrame:
    """Metrics table: one row per intervention (index = names), main metrics first."""
    frame = pd.DataFrame([r.metrics for r in results], index=pd.Index([r.name for r in results], name="intervention"))
    return frame[list(_ordered({c: None for c in frame.columns}))]
