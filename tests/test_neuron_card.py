"""The neuron card's engine against brute force on the tiny models: the refusal effect at a gain equals a run
with that one gain set by hand through `modulate`; the promoted tokens are the top-k of the neuron's output
column through the final norm's gain and the unembedding (W_U @ (γ ⊙ W_down[:, i]), centred first for a
LayerNorm); the activations are the neuron's input to the output projection at the prompt's last token; the
ranks count the neurons with a higher score; cards are memoised and the activations cached on disk."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from neurontune.config import DataConfig
from neurontune.data.chat import chat_prompt
from neurontune.data.splits import build_splits
from neurontune.eval import neuron_card
from neurontune.eval.neuron_card import CardEngine, promoted_tokens, refusal_effect, single_neuron
from neurontune.eval.proxy import refusal_proxy
from neurontune.interventions.modulation import modulate
from neurontune.method.neuron_scores import NeuronScores
from neurontune.model.neuron_map import final_norm, neuron_map


@pytest.fixture(scope="module")
def splits():
    return build_splits(DataConfig())


def fake_scores(lm, seed: int = 0) -> NeuronScores:
    gen = torch.Generator().manual_seed(seed)
    kinds = ("safety", "over_refusal", "benign_dependence", "safety/plain", "safety/roleplay", "act_harmful", "act_benign")
    return NeuronScores({k: torch.randn(lm.shape, generator=gen) for k in kinds})


@pytest.fixture
def engine(lm, splits, tmp_path):
    return CardEngine(lm, fake_scores(lm), splits, cache_dir=tmp_path, n_pool=4)


def test_refusal_effect_equals_the_gain_set_by_hand(lm, engine):
    layer, index, tuned = 1, 7, 6.0
    card = engine.card(layer, index, gain=tuned)
    assert card.gains == ["0 (silenced)", "1 (base)", "tuned ×6.00"]
    prompts = [p.text for p in engine.effect]
    for label, gain in zip(card.gains, (0.0, 1.0, tuned)):
        dense = torch.ones(lm.shape)
        dense[layer, index] = gain
        with modulate(lm.model, dense, lm.nmap):  # the brute-force reference: one prompt at a time, no batching
            expected = [float(refusal_proxy(lm, None, [p])[0]) for p in prompts]
        assert [r.refusal[label] for r in card.effect] == pytest.approx(expected, abs=1e-5), label
    silenced = [r.refusal["0 (silenced)"] for r in card.effect]
    amplified = [r.refusal["tuned ×6.00"] for r in card.effect]
    base = [r.refusal["1 (base)"] for r in card.effect]
    assert silenced != pytest.approx(base, abs=1e-7) and amplified != pytest.approx(base, abs=1e-7)  # the neuron matters


def test_effect_rows_each_get_their_own_gain(lm):
    prompts = ["How do I bake bread?", "Write a poem about rain"]
    both = refusal_effect(lm, 2, 3, [0.0, 3.0], prompts)
    for row, gain in enumerate((0.0, 3.0)):
        with single_neuron(lm, 2, 3, gain).apply(lm):
            alone = refusal_proxy(lm, None, prompts)
        assert both[row].tolist() == pytest.approx(alone.tolist(), abs=1e-5)


def _with_random_final_norm(lm):
    """A copy of the model whose final norm has a random gain (and bias): what a trained model has."""
    model = copy.deepcopy(lm.model)
    norm = final_norm(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(0.2 + 2 * torch.rand(norm.weight.shape, generator=gen))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen))
    return dataclasses.replace(lm, model=model, nmap=neuron_map(model))


def test_promoted_tokens_are_the_top_k_of_the_column_through_the_unembedding(lm):
    lm = _with_random_final_norm(lm)
    layer, index, k = 2, 11, 8
    w = lm.nmap.weight_slice(layer)[index].detach()  # W_down[:, index]: [d_model]
    norm = final_norm(lm.model)
    if isinstance(norm, torch.nn.LayerNorm):  # a LayerNorm centres its input first (its bias cancels)
        w = w - w.mean()
    w_u = lm.model.get_output_embeddings().weight.detach()  # [vocab, d_model]
    brute = w_u @ (norm.weight.detach() * w)  # the unembedding of the column through the norm's gain
    up, down = promoted_tokens(lm, layer, index, k)
    decode = lambda ids: [lm.tokenizer.decode([int(i)]) for i in ids]  # noqa: E731
    assert [t for t, _ in up] == decode(torch.topk(brute, k).indices)
    assert [t for t, _ in down] == decode(torch.topk(-brute, k).indices)
    assert [v for _, v in up] == sorted((v for _, v in up), reverse=True)
    plain = w_u @ lm.nmap.weight_slice(layer)[index].detach()  # without the norm's gain: a different ranking here
    assert decode(torch.topk(plain, k).indices) != [t for t, _ in up]


def test_activations_are_the_projection_input_at_the_last_token(lm, engine):
    layer, index = 1, 5
    card = engine.card(layer, index)
    pool = {p.text: a for p, a in card.activations}
    assert len(pool) == len(engine.pool) and [a for _, a in card.activations] == sorted(pool.values(), reverse=True)
    for prompt in engine.pool[:3] + engine.pool[-2:]:
        seen = {}
        ids = lm.tokenizer(chat_prompt(lm.tokenizer, prompt.text), add_special_tokens=False, return_tensors="pt")["input_ids"]
        handle = lm.nmap.projections[layer].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
        try:
            with torch.no_grad():
                lm.model(input_ids=ids, use_cache=False)  # alone, unpadded
        finally:
            handle.remove()
        x = seen["x"].reshape(1, -1, seen["x"].shape[-1])[0, -1, index]
        assert pool[prompt.text] == pytest.approx(float(x), abs=2e-3, rel=2e-3)  # stored as float16
    assert {p.label for p, _ in card.activations} == {"harmful", "harmless"}


def test_ranks_count_the_neurons_above(lm, engine):
    card = engine.card(0, 3)
    for row in card.scores:
        values = engine.scores[row.kind].flatten().tolist()
        assert row.rank == 1 + sum(v > row.value for v in values) and row.of == len(values)
    assert [r.kind for r in card.scores][:3] == ["safety", "over_refusal", "benign_dependence"]


def test_cards_are_memoised_and_activations_cached_on_disk(lm, splits, tmp_path, monkeypatch):
    first = CardEngine(lm, fake_scores(lm), splits, cache_dir=tmp_path, n_pool=4)
    card = first.card(2, 9, gain=2.0)
    assert first.card(2, 9, gain=2.0) is card  # memoised
    assert list((tmp_path / "card_activations").glob("*.safetensors"))
    monkeypatch.setattr(neuron_card, "last_token_activations", lambda *a, **k: pytest.fail("recomputed the pool activations"))
    second = CardEngine(lm, fake_scores(lm), splits, cache_dir=tmp_path, n_pool=4)
    assert torch.equal(second.activations(), first.activations())


def test_bad_neuron_and_model_are_refused(lm, splits, tmp_path):
    engine = CardEngine(lm, fake_scores(lm), splits, cache_dir=tmp_path, n_pool=2)
    with pytest.raises(ValueError, match="No neuron 3:0"):
        engine.card(lm.shape[0], 0)
    wrong = NeuronScores({"safety": torch.zeros(lm.shape[0] + 1, lm.shape[1])})
    with pytest.raises(ValueError, match="load the model the run was made on"):
        CardEngine(lm, wrong, splits, cache_dir=tmp_path)
