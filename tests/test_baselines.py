"""Refusal-direction baseline: coef 0 is exact, the hook adds exactly coef * direction, it leaves nothing on
the model and no other thread sees it; fitting and layer/coefficient choice run on tiny models."""
from __future__ import annotations

import threading

import pytest
import torch
from conftest import encode, logits

from neurontune.config import DataConfig
from neurontune.data.splits import build_splits
from neurontune.eval.direction import (
    KINDS,
    DirectionFit,
    RefusalDirection,
    choose_layer_and_coef,
    default_layers,
    fit_refusal_direction,
    last_token_residuals,
    mean_last_token_residual,
)
from neurontune.eval.proxy import refusal_proxy
from neurontune.interventions.hooks import scoped_pre_hooks
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
    if kind == "harmful_minus_harmless":  # the normalised difference of the last-token residual means
        pos = last_token_residuals(lm, [p.text for p in splits.harmful_train[:4]])
        neg = last_token_residuals(lm, [p.text for p in splits.benign_train[:4]], batch_size=3)
        assert pos.shape == (4, L, d)
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


def test_choose_layer_and_coef(tiny_llama, splits):
    fit = fit_refusal_direction(tiny_llama, splits, n=4)
    chosen = choose_layer_and_coef(tiny_llama, fit, splits, target=0.0, layers=[1, 2], n=4, by="proxy", refine_steps=2)
    assert chosen.layer in (1, 2) and chosen.meta["reached"] and chosen.coef >= 0
    assert set(chosen.meta["layer_scores"]) == {1, 2}
    unreachable = choose_layer_and_coef(tiny_llama, fit, splits, target=1.0, layers=[1], n=4, by="proxy", multipliers=(1.0, 2.0))
    assert not unreachable.meta["reached"] and unreachable.coef in [c for c, _ in unreachable.meta["curve"]]
    # an intervention as target: match its harmful proxy on the same training prompts
    target = fit.at(2, 2 * float(fit.norms[2]))
    matched = choose_layer_and_coef(tiny_llama, fit, splits, target=target, layers=[2], n=4, by="proxy")
    expected = float(refusal_proxy(tiny_llama, target, [p.text for p in splits.harmful_train[-4:]]).mean())
    assert matched.meta["target"] == pytest.approx(expected)


def test_choose_coef_by_judge(tiny_llama, splits):
    """The judged measure: a random tiny model never refuses, so target 0 is met by the first coefficient."""
    fit = fit_refusal_direction(tiny_llama, splits, n=4)
    seen = []
    chosen = choose_layer_and_coef(tiny_llama, fit, splits, target=0.0, layers=[2], n=3, judge_tokens=4,
                                   refine_steps=1, progress=lambda d, t, s: seen.append(d))
    assert chosen.meta["measure"] == "judge" and chosen.meta["reached"]
    assert chosen.meta["curve"][-1][1] == 0.0 and seen == sorted(seen)
    with pytest.raises(ValueError):
        choose_layer_and_coef(tiny_llama, fit, splits, target=0.0, layers=[2], n=3, by="vibes")


def test_coefficient_scan_stops_after_the_peak(tiny_llama, splits, monkeypatch):
    """Refusal rises then collapses as the coefficient grows (the model breaks): the scan stops after the
    peak, keeps the peak when the target is out of reach, and bisects when it is reached."""
    import neurontune.eval.direction as bl
    fit = fit_refusal_direction(tiny_llama, splits, n=4)
    scale = float(fit.norms[2])
    hump = lambda lm, iv, prompts, tokens, bs: 0.0 if iv is None else (0.4 if iv.coef <= 0.5 * scale * 1.0001 else 0.0)
    monkeypatch.setattr(bl, "judged_refusal", hump)
    out = choose_layer_and_coef(tiny_llama, fit, splits, target=0.9, layers=[2], n=2)
    assert not out.meta["reached"] and len(out.meta["curve"]) == 1 + 4 + 2  # up to 0.5x, then two below the peak
    assert out.coef == pytest.approx(0.125 * scale)  # the first coefficient at the peak value
    hit = choose_layer_and_coef(tiny_llama, fit, splits, target=0.3, layers=[2], n=2, refine_steps=3)
    assert hit.meta["reached"] and hit.coef == pytest.approx(0.125 * scale / 8)


def test_default_layers():
    assert default_layers(30) == [6, 9, 12, 15, 18, 21]
    assert len(default_layers(30, max_layers=8)) <= 8
    assert default_layers(3) == [1]
    assert isinstance(DirectionFit("x", torch.eye(3), torch.ones(3), 1).at(1), RefusalDirection)
