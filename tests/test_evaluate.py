"""Evaluation harness on tiny models: metric keys and ranges, exact identities for the base model and
identity gains, per-row batching equal to separate calls, base-answer caching, jsonl, proxy, cancel."""
from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch
from conftest import Recorder, random_modulation

from neurontune.config import DataConfig, EvalConfig
from neurontune.data import prompts as sets
from neurontune.data.splits import build_splits
from neurontune.eval.harness import (
    MAIN_METRICS,
    EvalResult,
    compare,
    distinct_ngram_ratio,
    evaluate,
    evaluate_many,
)
from neurontune.eval.judge import verdict
from neurontune.eval.plan import ROW_FIELDS
from neurontune.eval.proxy import proxy_metrics, refusal_proxy, refusal_tokens
from neurontune.infra.progress import Cancelled, Reporter
from neurontune.interventions.generation import generate
from neurontune.interventions.modulation import Modulation
from neurontune.run.folder import RunFolder

CFG = EvalConfig(n_harmful=1, n_per_family=1, families=("roleplay", "few_shot", "hypothetical"), n_benign=1,
                 n_borderline=1, n_benign_per_family=2, n_ppl=3, n_mc=4, max_new_tokens=8, batch_size=8)


@pytest.fixture(scope="module")
def splits():
    return build_splits(DataConfig())


@pytest.fixture(scope="module")
def base_llama(tiny_llama, splits) -> EvalResult:
    return evaluate(tiny_llama, None, splits, CFG)


def _mod(lm, seed=0) -> Modulation:
    return random_modulation(lm.shape, n=lm.shape[0] * lm.shape[1] // 2, seed=seed, low=0.0, high=3.0, fingerprint=lm.fingerprint)


def test_metrics_present_and_in_range(lm, splits):
    res = evaluate(lm, _mod(lm), splits, CFG)
    expected = set(MAIN_METRICS) | {f"refusal/{f}" for f in CFG.families} | {f"over_refusal/{f}" for f in CFG.families}
    expected |= {f"{m}/{g}" for m in ("harmful_refusal", "benign_over_refusal") for g in ("imperative", "question", "context")}
    assert expected <= set(res.metrics) and expected <= set(res.base_metrics)
    for key, value in res.metrics.items():
        if key == "ppl_ratio":
            assert value > 0 and value != 1.0  # half the neurons scaled by U[0, 3) must change perplexity
        else:
            assert 0.0 <= value <= 1.0, (key, value)
    assert res.metrics["attack_success"] == pytest.approx(1 - sum(r["refusal"] for r in res.rows if r["category"] == "attacked") / 3)
    by = lambda c: [r for r in res.rows if r["category"] == c]  # noqa: E731
    assert len(by("harmful")) == len(by("benign")) == 3 and {r["phrasing"] for r in by("harmful")} == {"imperative", "question", "context"}
    assert len(by("attacked")) == 3 and len(by("benign_attacked")) == 2 * 3  # one benign + one borderline per family
    groups = {r["family"]: r["group"] for r in by("attacked")}
    assert groups == {"roleplay": "train_family", "few_shot": "heldout_family", "hypothetical": "heldout_family"}
    assert all(r["split"] == "test" for r in res.rows)
    assert res.metrics["heldout_family_refusal"] == pytest.approx((res.metrics["refusal/few_shot"] + res.metrics["refusal/hypothetical"]) / 2)
    assert res.counts["benign_over_refusal"][1] == 3 and res.counts["template_over_refusal"][1] == 6
    assert all(r["strength"] == 1.0 for r in res.rows)


def test_base_and_identity_gains_are_exact(tiny_llama, splits, base_llama):
    assert base_llama.metrics["ppl_ratio"] == 1.0
    assert all(r["answer"] == r["base_answer"] for r in base_llama.rows)
    assert base_llama.metrics == base_llama.base_metrics
    for identity in (Modulation(tiny_llama.shape), Modulation.from_dense(torch.ones(tiny_llama.shape))):
        res = evaluate(tiny_llama, identity, splits, CFG, base=base_llama)
        assert res.metrics["ppl_ratio"] == 1.0  # exactly: same batches, no hook registered
        assert res.metrics == base_llama.metrics
        assert [r["answer"] for r in res.rows] == [r["base_answer"] for r in base_llama.rows]


def test_per_row_batch_equals_separate_calls(lm, splits):
    mod = _mod(lm, seed=1)
    res = evaluate(lm, mod, splits, CFG)  # no cache: base and modulated rows share batches (per-row gains)
    ppl = {p.text for p in splits.benign["test"][: CFG.n_ppl]}
    assert res.meta["base_generated"] == len({r["prompt"] for r in res.rows} | ppl)  # every prompt answered once
    prompts = [r["prompt"] for r in res.rows]
    base = [generate(lm, [p], max_new_tokens=CFG.max_new_tokens)[0] for p in prompts]
    tuned = [generate(lm, [p], mod, max_new_tokens=CFG.max_new_tokens)[0] for p in prompts]
    assert [r["base_answer"] for r in res.rows] == base
    assert [r["answer"] for r in res.rows] == tuned
    assert base != tuned


def test_base_generated_once_for_many_interventions(tiny_llama, splits, monkeypatch):
    import neurontune.eval.harness as ev
    calls = []
    real = ev.generate

    def counting(lm, texts, gains=None, **kw):
        calls.append(len(texts))
        return real(lm, texts, gains, **kw)

    monkeypatch.setattr(ev, "generate", counting)
    ivs = {f"m{i}": _mod(tiny_llama, seed=i) for i in range(3)}
    results = evaluate_many(tiny_llama, {"base": None, **ivs}, splits, CFG)
    n = len(results[0].rows)
    unique = len({r["prompt"] for r in results[0].rows} | {p.text for p in splits.benign["test"][: CFG.n_ppl]})
    assert [r.meta["base_generated"] for r in results] == [unique, 0, 0, 0]
    assert sum(calls) == unique + 3 * n  # base once (rows and perplexity prompts), then only the modulated rows
    for r in results[1:]:
        assert [x["base_answer"] for x in r.rows] == [x["answer"] for x in results[0].rows]
    table = compare(results)
    assert list(table.index) == ["base", "m0", "m1", "m2"]
    assert list(table.columns[: len(MAIN_METRICS)]) == list(MAIN_METRICS)


def test_cache_from_other_model_is_ignored(tiny_llama, tiny_gpt2, splits, base_llama):
    res = evaluate(tiny_gpt2, None, splits, CFG, base=dict(base_llama.base_cache))
    assert res.meta["base_generated"] == len({r["prompt"] for r in res.rows} | {p.text for p in splits.benign["test"][: CFG.n_ppl]})


def test_jsonl_has_fields_and_rejudges(tmp_path, base_llama):
    folder = RunFolder(tmp_path / "eval")
    path = folder.write_generations([base_llama])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == folder.generations()
    assert len(rows) == len(base_llama.rows)
    for row in rows:
        assert set(row) == {"intervention", "seed", *ROW_FIELDS}
        assert row["verdict"] == verdict(row["answer"], row["prompt"]) and row["base_verdict"] == verdict(row["base_answer"], row["prompt"])
        assert row["refusal"] == (row["verdict"] in ("refuse", "partial"))
    frame = base_llama.to_frame()
    assert list(frame.columns) == list(ROW_FIELDS) and len(frame) == len(rows)


def test_refusal_proxy_range_and_identity(tiny_llama, splits):
    prompts = [p.text for p in splits.harmful_test[:5]]
    p0 = refusal_proxy(tiny_llama, None, prompts, batch_size=2)
    assert p0.shape == (5,) and bool(((p0 >= 0) & (p0 <= 1)).all())
    assert torch.equal(p0, refusal_proxy(tiny_llama, Modulation(tiny_llama.shape), prompts, batch_size=2))
    assert not torch.equal(p0, refusal_proxy(tiny_llama, _mod(tiny_llama), prompts, batch_size=2))
    tokens = refusal_tokens(tiny_llama.tokenizer)
    first = tiny_llama.tokenizer("Sure", add_special_tokens=False)["input_ids"][0]
    assert tokens and first not in tokens  # compliance openings never count
    m = proxy_metrics(tiny_llama, None, splits, n=3)
    assert set(m) == {"harmful_refusal_proxy", "benign_over_refusal_proxy", "borderline_over_refusal_proxy"}
    assert all(0 <= v <= 1 for v in m.values())


def test_progress_and_cancel(tiny_llama, splits):
    rec = Recorder()
    evaluate(tiny_llama, _mod(tiny_llama), splits, CFG, reporter=rec)
    seen = rec.calls
    assert seen[-1][0] == seen[-1][1] and {"generate", "perplexity", "multiple_choice"} <= {s for _, _, s in seen}
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        evaluate(tiny_llama, None, splits, CFG, reporter=Reporter(cancel))


def test_distinct_ngram_ratio():
    assert distinct_ngram_ratio([1, 2, 3, 4, 5, 6]) == 1.0
    assert distinct_ngram_ratio([7] * 20) == pytest.approx(1 / 17)
    assert distinct_ngram_ratio([1, 2]) == 1.0


def test_mc_letter_style_runs(tiny_llama, splits, base_llama):
    res = evaluate(tiny_llama, None, splits, dataclasses.replace(CFG, mc_style="letter"), base=base_llama)
    assert 0 <= res.metrics["mc_accuracy"] <= 1 and res.meta["base_generated"] == 0
    assert len(sets.multiple_choice()) >= 4


def test_modulation_for_another_model_is_refused(tiny_llama, splits):
    mod = random_modulation(tiny_llama.shape, n=4, fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="made for model"):
        evaluate(tiny_llama, mod, splits, CFG)


def test_shared_batches_answer_as_each_intervention_alone(tiny_llama, splits, base_llama):
    """evaluate_many(shared=True) generates every modulation's rows in shared batches (gated ones at each row's
    reading, a conditional one with its input terms): the answers, verdicts and every metric equal evaluating each
    on its own."""
    from neurontune.interventions.gating import Gated, GateProbe
    from neurontune.interventions.modulation import InputTerms
    lm = tiny_llama
    static = _mod(lm, seed=3)
    d = lm.nmap.input_rows(0).shape[1]
    conditional = Modulation(static.shape, static.layers, static.fingerprint, {},
                             {1: InputTerms(torch.arange(6), torch.full((6,), 0.7), torch.randn(d, generator=torch.Generator().manual_seed(0)), 0.0)})
    probe = GateProbe(torch.tensor([0, 1]), torch.tensor([2, 5]), torch.zeros(2), torch.ones(2), torch.tensor([0.8, -0.6]), 0.1)
    ivs = {"static": static, "conditional": conditional, "gated": Gated(static, probe)}
    cfg = dataclasses.replace(CFG, batch_size=5)  # batches mix interventions and prompts
    together = evaluate_many(lm, ivs, splits, cfg, base=base_llama, shared=True)
    for res in together:
        alone = evaluate(lm, ivs[res.name], splits, cfg, base=base_llama)
        assert [r["answer"] for r in res.rows] == [r["answer"] for r in alone.rows], res.name
        assert [r["strength"] for r in res.rows] == pytest.approx([r["strength"] for r in alone.rows])
        assert res.metrics == pytest.approx(alone.metrics, nan_ok=True)
    assert len({tuple(r["answer"] for r in res.rows) for res in together}) == 3  # the three differ
