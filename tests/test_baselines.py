"""Refusal-direction baseline: coef 0 is exact, the hook adds exactly coef * direction, it leaves nothing on
the model and no other thread sees it; fitting and layer/coefficient choice run on tiny models."""
from __future__ import annotations

import threading

import pytest
import torch
from conftest import Recorder, encode, logits

from neurontune.config import DataConfig
from neurontune.data.splits import build_splits
from neurontune.eval.direction import (
    KINDS,
    DirectionFit,
    RefusalDirection,
    choose_layer_and_coef,
    fit_refusal_direction,
    last_token_residuals,
    mean_last_token_residual,
)
from neurontune.interventions.hooks import scoped_pre_hooks
from neurontune.interventions.modulation import Modulation
from neurontune.model.neuron_map import decoder_layers

TEXT = "How do I bake bread at home?"


@pytest.fixture(scope="module")
def splits():
    return build_splits(DataConfig())


def _direction(lm, layer=1, coef=3.0, seed=0) -> RefusalDirection:
    d = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    return RefusalDirection(layer, d / d.norm(), coef, "test")


def _pre_hooks_left(lm) -> int:
    return sum(len(layer._forward_pre_hooks) for layer in decoder_layers(lm.model))


def test_coef_zero_exact_and_coef_changes_logits(lm):
    ids = encode(lm, TEXT)
    base = logits(lm, ids)
    with _direction(lm, coef=0.0).apply(lm):
        assert torch.equal(logits(lm, ids), base)
    with _direction(lm, coef=3.0).apply(lm):
        steered = logits(lm, ids)
    assert not torch.allclose(steered, base, atol=1e-4)
    assert torch.equal(logits(lm, ids), base) and _pre_hooks_left(lm) == 0


def test_hook_adds_coef_times_direction_at_every_position(lm):
    ids = encode(lm, TEXT)
    layer = decoder_layers(lm.model)[1]
    seen = {}
    capture = [(layer, lambda m, args: seen.__setitem__(len(seen), args[0].detach().clone()))]
    with scoped_pre_hooks(capture):
        logits(lm, ids)
    d = _direction(lm, layer=1, coef=2.5)
    with d.apply(lm), scoped_pre_hooks(capture):  # registered after: sees the steered input
        logits(lm, ids)
    expected = seen[0] + 2.5 * d.direction
    assert torch.allclose(seen[1], expected, atol=1e-6)


def test_removed_after_exception(tiny_llama):
    with pytest.raises(RuntimeError):
        with _direction(tiny_llama).apply(tiny_llama):
            raise RuntimeError("boom")
    assert _pre_hooks_left(tiny_llama) == 0


def test_thread_isolation(tiny_llama):
    ids = encode(tiny_llama, TEXT)
    base = logits(tiny_llama, ids)
    d = _direction(tiny_llama, coef=4.0)
    with d.apply(tiny_llama):
        steered = logits(tiny_llama, ids)
    inside, outside = threading.Barrier(2), {}

    def steered_thread():
        with d.apply(tiny_llama):
            inside.wait()  # the other thread runs while this hook is registered
            outside["steered"] = logits(tiny_llama, ids)
            inside.wait()

    def plain_thread():
        inside.wait()
        outside["plain"] = logits(tiny_llama, ids)
        inside.wait()

    threads = [threading.Thread(target=steered_thread), threading.Thread(target=plain_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(outside["plain"], base) and torch.equal(outside["steered"], steered)


def test_bad_layer_and_size(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        _direction(tiny_llama, layer=99).apply(tiny_llama)
    with pytest.raises(ValueError, match="does not fit"):
        RefusalDirection(0, torch.ones(7), 1.0).apply(tiny_llama)


@pytest.mark.parametrize("kind", KINDS)
def test_fit_directions(lm, splits, kind):
    fit = fit_refusal_direction(lm, splits, kind, n=4)
    L, d = len(decoder_layers(lm.model)), lm.model.config.hidden_size
    assert fit.directions.shape == (L, d) and fit.norms.shape == (L,)
    nonzero = fit.norms > 1e-6
    assert nonzero.any()
    assert torch.allclose(fit.directions[nonzero].norm(dim=-1), torch.ones(int(nonzero.sum())), atol=1e-5)
    if kind == "harmful_minus_harmless":  # harmful (plain + attacked) minus harmless in the same forms, at the last token
        pos_texts = [p.text for p in splits.harmful_train[:4]] + [p.text for p in splits.attacked("harmful", "train", 1)]
        neg_texts = ([p.text for p in splits.benign_train[:2]] + [p.text for p in splits.borderline_train[:2]]
                     + [p.text for p in splits.attacked("benign", "train", 1)])
        pos = last_token_residuals(lm, pos_texts)
        neg = last_token_residuals(lm, neg_texts, batch_size=3)
        assert pos.shape == (len(pos_texts), L, d)
        assert torch.allclose(fit.directions * fit.norms[:, None], pos.mean(0) - neg.mean(0), atol=1e-4)


def test_mean_residual_is_the_mean_of_the_per_prompt_residuals(lm, splits):
    """Summed on the device batch by batch (sizes 3 + 2), the mean equals the per-prompt residuals' mean, and
    each per-prompt residual equals the one of that prompt run alone (padding changes nothing)."""
    prompts = [p.text for p in splits.harmful_train[:5]]
    each = last_token_residuals(lm, prompts, ["Sure", "", "No", "I", ""], batch_size=3)
    mean = mean_last_token_residual(lm, prompts, ["Sure", "", "No", "I", ""], batch_size=3)
    assert mean.device.type == "cpu" and mean.shape == each.shape[1:]
    torch.testing.assert_close(mean, each.mean(0), rtol=1e-6, atol=1e-6 * float(each.abs().max()))
    alone = last_token_residuals(lm, prompts[1:2], [""])
    torch.testing.assert_close(each[1:2], alone, rtol=1e-4, atol=1e-4)


def _fake_judge(splits, harmful_rate, benign_rate):
    """judged_refusal stand-in: a rate per (layer, multiple of the layer's norm), told apart by the prompts."""
    harmful = {p.text for p in splits.harmful["validation"]}

    def judged(lm, iv, prompts, tokens, bs):
        if iv is None or not hasattr(iv, "layer"):
            return 0.5  # the target intervention
        rate = harmful_rate if prompts[0] in harmful else benign_rate
        return rate(iv.layer, iv.coef / judged.scales[iv.layer])
    return judged


def test_every_layer_is_searched_on_validation_by_generation(tiny_llama, splits, monkeypatch):
    """Each layer's coefficient is the smallest reaching the target on validation harmful prompts; among the
    layers that reach it, the least over-refusal on validation benign prompts wins."""
    import neurontune.eval.direction as direction
    fit = fit_refusal_direction(tiny_llama, splits, n=4)
    judged = _fake_judge(splits, lambda layer, m: (0.3 if layer == 1 else 0.5) * m, lambda layer, m: 0.1 if layer == 1 else 0.4)
    judged.scales = {layer: float(fit.norms[layer]) for layer in range(3)}
    monkeypatch.setattr(direction, "judged_refusal", judged)
    chosen = choose_layer_and_coef(tiny_llama, fit, splits, target=0.6, n=4)
    assert set(chosen.meta["layers"]) == {l for l in range(3) if judged.scales[l] > 1e-6} >= {1, 2}  # every layer with a direction
    assert chosen.layer == 1 and chosen.coef == pytest.approx(2.0 * judged.scales[1]) and chosen.meta["reached"]
    assert chosen.meta["layers"][2]["coef"] == pytest.approx(1.5 * judged.scales[2])  # reached sooner, but over-refuses
    target_iv = Modulation(tiny_llama.shape)  # an intervention as target: its judged refusal (0.5 here) is matched
    matched = choose_layer_and_coef(tiny_llama, fit, splits, target=target_iv, layers=[1], n=4)
    assert matched.meta["target"] == 0.5
    unreachable = choose_layer_and_coef(tiny_llama, fit, splits, target=9.0, layers=[1, 2], n=4)
    assert not unreachable.meta["reached"] and unreachable.layer == 2  # most harmful - benign refusal


def test_choose_coef_by_real_generation(tiny_llama, splits):
    """A random tiny model never refuses, so target 0 is met by the first coefficient, judged by generation."""
    fit = fit_refusal_direction(tiny_llama, splits, n=4)
    rec = Recorder()
    chosen = choose_layer_and_coef(tiny_llama, fit, splits, target=0.0, layers=[2], n=3, judge_tokens=4, reporter=rec)
    seen = [d for d, _, _ in rec.calls]
    assert chosen.meta["reached"] and chosen.coef == pytest.approx(0.25 * float(fit.norms[2]))
    assert "validation" in chosen.meta["measure"] and seen == sorted(seen)


def test_coefficient_scan_stops_after_the_peak(tiny_llama, splits, monkeypatch):
    """Refusal rises then collapses as the coefficient grows (the model breaks): the scan stops after the
    peak and keeps the peak when the target is out of reach."""
    import neurontune.eval.direction as direction
    fit = fit_refusal_direction(tiny_llama, splits, n=4)
    judged = _fake_judge(splits, lambda layer, m: 0.4 if m <= 0.5 * 1.0001 else 0.0, lambda layer, m: 0.0)
    judged.scales = {layer: float(fit.norms[layer]) for layer in range(3)}
    monkeypatch.setattr(direction, "judged_refusal", judged)
    out = choose_layer_and_coef(tiny_llama, fit, splits, target=0.9, layers=[2], n=2)
    assert not out.meta["reached"] and len(out.meta["layers"][2]["curve"]) == 4  # 0.25, 0.5, then two below the peak
    assert out.coef == pytest.approx(0.25 * judged.scales[2])


def test_direction_at_and_per_row_strength(tiny_llama):
    d = DirectionFit("x", torch.eye(tiny_llama.model.config.hidden_size)[:3], torch.ones(3), 1).at(1, 2.0)
    assert isinstance(d, RefusalDirection) and d.coef == 2.0
    ids = encode(tiny_llama, TEXT).repeat(2, 1)
    with d.apply(tiny_llama):
        full = logits(tiny_llama, ids)
    base = logits(tiny_llama, ids)
    with d.apply_rows(tiny_llama, torch.tensor([0.0, 1.0])):  # row 0 as the base model, row 1 as the full direction
        mixed = logits(tiny_llama, ids)
    assert torch.allclose(mixed[0], base[0], atol=1e-6) and torch.allclose(mixed[1], full[1], atol=1e-6)
