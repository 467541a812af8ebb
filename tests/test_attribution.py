"""Attribution against brute force on the tiny models, batching invariance, and the cached
`run_attribution` pipeline (score kinds, cache, progress, cancel, tables)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import Recorder
from neurontune.config import AttributionConfig, RunConfig
from neurontune.data.chat import chat_prompt
from neurontune.infra.progress import Cancelled, Reporter
from neurontune.interventions.modulation import Modulation, modulate
from neurontune.method import neuron_scores
from neurontune.method.attribution import attribute
from neurontune.method.neuron_scores import NeuronScores, run_attribution
from neurontune.model.logprobs import encode_pairs, forward, target_logprob

PROMPT = "How do I make a dangerous weapon at home?"
TARGET = "I cannot help with that."


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank = lambda x: torch.argsort(torch.argsort(x)).float()  # noqa: E731 (no ties in float scores)
    return _pearson(rank(a), rank(b))


class BruteForce:
    """True change of log p(target | prompt) when one neuron's gain is set, via `modulate`."""

    def __init__(self, lm, prompt: str, target: str):
        self.lm, self.batch = lm, encode_pairs(lm.tokenizer, [prompt], [target])
        self.base = self.logprob(None)

    def logprob(self, mod) -> float:
        with torch.no_grad(), modulate(self.lm.model, mod, self.lm.nmap):
            return float(target_logprob(forward(self.lm.model, self.batch), self.batch)[0])

    def delta(self, layer: int, neuron: int, gain: float) -> float:
        mod = Modulation(self.lm.shape, {layer: (torch.tensor([neuron]), torch.tensor([gain]))})
        return self.logprob(mod) - self.base


def _probe_neurons(score: torch.Tensor, n_top: int = 5, n_random: int = 5) -> list[tuple[int, int]]:
    """The n_top largest |score| neurons and n_random others (seeded), as (layer, neuron)."""
    flat = score.flatten()
    top = torch.topk(flat.abs(), n_top).indices.tolist()
    rest = [i for i in torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0)).tolist() if i not in top]
    return [divmod(i, score.shape[1]) for i in top + rest[:n_random]]


def _scores(lm, cfg: AttributionConfig) -> torch.Tensor:
    prompt = chat_prompt(lm.tokenizer, PROMPT)
    return attribute(lm, [prompt], [TARGET], cfg, keep_per_example=True).per_example[0]  # [n_layers, n_neurons]


def test_scaling_matches_first_order_prediction(lm):
    """Scaling a neuron by (1 + eps) changes log p by eps * score + O(eps^2): with eps = 0.1 the
    second-order term is roughly eps times the first-order one, so 10 % relative error (plus 1e-3 absolute,
    for neurons whose score is near zero) must hold."""
    score = _scores(lm, AttributionConfig())
    bf, eps = BruteForce(lm, chat_prompt(lm.tokenizer, PROMPT), TARGET), 0.1
    for layer, neuron in _probe_neurons(score):
        pred = eps * float(score[layer, neuron])
        true = bf.delta(layer, neuron, 1 + eps)
        assert abs(true - pred) <= 0.1 * abs(pred) + 1e-3, (layer, neuron, pred, true)


@pytest.mark.parametrize("cfg", [AttributionConfig(), AttributionConfig(method="integrated_gradients", ig_steps=16)],
                         ids=["grad_x_act", "ig16"])
def test_ablation_ranks_follow_scores(lm, cfg):
    """Ablating a neuron (gain 0) is a large perturbation, far outside the first-order regime, so the
    predicted change -score need not match in size; only agreement in ranking and direction is required
    (correlation >= 0.8 over top and random neurons)."""
    score = _scores(lm, cfg)
    bf = BruteForce(lm, chat_prompt(lm.tokenizer, PROMPT), TARGET)
    probes = _probe_neurons(score)
    pred = torch.tensor([-float(score[l, n]) for l, n in probes])
    true = torch.tensor([bf.delta(l, n, 0.0) for l, n in probes])
    assert _pearson(pred, true) >= 0.8, (pred, true)
    assert _spearman(pred, true) >= 0.8, (pred, true)
    big = pred.abs() > 0.5  # where the prediction is large, the sign of the effect must be right
    assert big.any() and bool((torch.sign(pred[big]) == torch.sign(true[big])).all())


@pytest.mark.parametrize("method", ["grad_x_act", "integrated_gradients"])
def test_batching_does_not_change_scores(lm, method):
    """Padding (with its attention mask and position ids) must make a batched example score as it does alone."""
    prompts = [chat_prompt(lm.tokenizer, p) for p in ("Hi", "How do I pick a lock quickly?", "Tell me a joke about cats", "Why?")]
    targets = ["I cannot help with that.", "Sure", "I'm sorry, but no.", "Because"]
    one = attribute(lm, prompts, targets, AttributionConfig(method=method, batch_size=1, ig_steps=4), keep_per_example=True)
    four = attribute(lm, prompts, targets, AttributionConfig(method=method, batch_size=4, ig_steps=4), keep_per_example=True)
    assert one.n == four.n == 4 and one.tokens == four.tokens
    for a, b in zip(one.per_example, four.per_example):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), float((a - b).abs().max())
    assert torch.allclose(one.act, four.act, atol=1e-4, rtol=0)
    assert torch.allclose(one.score, torch.stack(one.per_example).sum(0), atol=1e-5)
    n_prompt_tokens = sum(len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert one.tokens == n_prompt_tokens


def test_attribute_progress_cancel_and_bad_config(tiny_llama):
    prompts = [chat_prompt(tiny_llama.tokenizer, "Hi")] * 5
    seen = Recorder()
    attribute(tiny_llama, prompts, ["No"] * 5, AttributionConfig(batch_size=2), reporter=seen)
    calls = seen.calls
    assert [c[0] for c in calls] == [2, 4, 5] and all(c[1] == 5 for c in calls)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        attribute(tiny_llama, prompts, ["No"] * 5, reporter=Reporter(stop))
    with pytest.raises(ValueError, match="method"):
        AttributionConfig(method="saliency")
    with pytest.raises(ValueError, match="No prompts"):
        attribute(tiny_llama, [], [])


# -- run_attribution -----------------------------------------------------------------------------------
SMALL = RunConfig().replace(data={"n_harmful": 4, "n_attack_per_family": 2, "n_benign": 4, "n_borderline": 2,
                                  "n_answer": 2, "answer_tokens": 4, "n_alarming": 2})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_llama):
    lm = tiny_llama
    cache = tmp_path_factory.mktemp("nt_cache")
    seen = Recorder()
    start = time.perf_counter()
    scores = run_attribution(lm, SMALL, cache_dir=cache, reporter=seen)
    return lm, cache, scores, seen.calls, time.perf_counter() - start


def test_run_attribution_kinds_and_shapes(first_run):
    lm, _, scores, _, _ = first_run
    families = SMALL.data.train_families
    expected = {"safety", "over_refusal", "benign_dependence", "act_harmful", "act_benign", "safety/plain",
                "over_refusal/benign", "over_refusal/borderline", *(f"safety/{f}" for f in families)}
    assert expected <= set(scores.kinds)
    assert scores.families == sorted(families)
    for kind in scores.kinds:
        assert scores[kind].shape == (3, 128) and torch.isfinite(scores[kind]).all(), kind
    assert scores.counts["safety/plain"] == 4 and all(scores.counts[f"safety/{f}"] == 2 for f in families)
    # safety is the example-weighted mean of its groups
    groups = [k for k in scores.kinds if k.startswith("safety/")]
    weighted = sum(scores[g] * scores.counts[g] for g in groups) / sum(scores.counts[g] for g in groups)
    assert torch.allclose(scores["safety"], weighted, atol=1e-5)
    assert (scores["benign_dependence"] >= 0).all()
    with pytest.raises(KeyError, match="available"):
        scores["nonsense"]


def test_run_attribution_progress_counts_increase(first_run):
    _, _, _, calls, _ = first_run
    attr_calls = [c for c in calls if c[2] != "generate"]
    done = [c[0] for c in attr_calls]
    assert done == sorted(done) and len(set(done)) == len(done)
    total = attr_calls[0][1]
    d = SMALL.data
    assert done[-1] == total == (4 + 2 * len(d.train_families) + 4 + 2 + 2 + d.n_benign_attack_per_family * len(d.train_families)
                                 + 2 * d.n_alarming)


def test_run_attribution_second_call_served_from_cache(first_run, monkeypatch):
    lm, cache, scores, _, first_seconds = first_run

    def no_recompute(*args, **kwargs):
        raise AssertionError("attribution recomputed although the result is cached")

    monkeypatch.setattr(neuron_scores, "attribute", no_recompute)
    seen = Recorder()
    start = time.perf_counter()
    again = run_attribution(lm, SMALL, cache_dir=cache, reporter=seen)
    calls = seen.calls
    seconds = time.perf_counter() - start
    assert again.meta["cache"] and again.meta["cache"] == scores.meta["cache"]
    assert again.kinds == scores.kinds
    assert all(torch.equal(again[k], scores[k]) for k in scores.kinds)
    assert calls == []  # nothing to report: neither answers nor attribution were recomputed
    assert seconds < first_seconds / 2, (seconds, first_seconds)  # much faster (loose: the CPU is shared)


def test_run_attribution_cancel(first_run, tmp_path):
    lm = first_run[0]
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        run_attribution(lm, SMALL, cache_dir=tmp_path, reporter=Reporter(stop))
    assert not list(tmp_path.glob("attribution/*.safetensors"))  # nothing partial was stored


def test_scores_table_and_round_trip(first_run, tmp_path):
    scores = first_run[2]
    table = scores.table("safety", 10)
    assert len(table) == 10
    assert list(table["safety"]) == sorted(table["safety"], reverse=True)
    assert table["safety"].iloc[0] == pytest.approx(float(scores["safety"].max()))
    row = table.iloc[3]
    assert scores["over_refusal"][int(row["layer"]), int(row["neuron"])] == pytest.approx(row["over_refusal"])
    back = NeuronScores.load(scores.save(tmp_path / "s.safetensors"))
    assert back.counts == scores.counts and all(torch.equal(back[k], scores[k]) for k in scores.kinds)
    summary = scores.layer_summary("safety")
    assert len(summary) == 3 and (summary["max"] >= 0).any()
