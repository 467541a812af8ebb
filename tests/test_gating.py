"""Input-conditional gating: strength 1 equals the full modulation, 0 equals the base, per row, isolated."""
import torch
from conftest import random_modulation

from neurontune.data import prompts as sets
from neurontune.data.chat import chat_prompt
from neurontune.interventions.gating import GatedModulation, fit_gate
from neurontune.interventions.modulation import modulate
from neurontune.model.logprobs import encode_pairs, forward


def test_gate_strength_extremes_and_rows(tiny_llama):
    lm = tiny_llama
    mod = random_modulation(lm.shape, 80, seed=1, low=1.5, high=3.0, fingerprint=lm.fingerprint)
    pos = [p.text for p in sets.harmful()[:16]]
    neg = [p.text for p in sets.benign()[:16]]
    probe = fit_gate(lm, mod, pos, neg)
    assert probe.train_accuracy >= 0.75
    gated = GatedModulation(mod, probe)
    batch = encode_pairs(lm.tokenizer, [chat_prompt(lm.tokenizer, x) for x in pos[:2] + neg[:2]], ["Sure"] * 4)
    with torch.no_grad():
        base = forward(lm.model, batch)
        with modulate(lm.model, mod):
            full = forward(lm.model, batch)
        with gated.apply(lm) as state:
            mixed = forward(lm.model, batch)
        s = state["s"]
        assert s.shape == (4,) and ((s >= 0) & (s <= 1)).all() and s[:2].mean() > s[2:].mean()
        probe.weight.zero_()
        probe.bias = 60.0
        with gated.apply(lm):
            assert torch.equal(forward(lm.model, batch), full)
        probe.bias = -60.0
        with gated.apply(lm):
            assert torch.equal(forward(lm.model, batch), base)
    # the mixed run sits between base and full for each row
    assert not torch.equal(mixed, base) and not torch.equal(mixed, full)
    # hooks are gone after the block
    assert all(not p._forward_pre_hooks for p in lm.nmap.projections) and not lm.model._forward_pre_hooks


def test_gate_features_equal_the_full_activations_at_the_last_token(lm):
    """The hooks keep only the feature neurons at the last position (on the layer's device); the values equal
    picking them out of every layer's full activations afterwards, exactly, in the probe's feature order."""
    from neurontune.interventions.gating import _last_token_acts
    gen = torch.Generator().manual_seed(0)
    layers = torch.tensor([2, 0, 2, 1, 0, 2])
    neurons = torch.randint(0, lm.shape[1], (len(layers),), generator=gen)
    texts = [chat_prompt(lm.tokenizer, p) for p in ("Hi", "How do I pick a lock?", "A longer request about bread")]
    got = _last_token_acts(lm, texts, layers, neurons, batch_size=2)
    full: dict[int, torch.Tensor] = {}
    handles = [p.register_forward_pre_hook(lambda m, a, l=l: full.__setitem__(l, a[0].reshape(1, -1, a[0].shape[-1])))
               for l, p in enumerate(lm.nmap.projections)]
    try:
        want = []
        for text in texts:  # one prompt at a time: no padding at all
            ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                lm.model(input_ids=ids, use_cache=False)
            want.append(torch.stack([full[int(l)][0, -1, int(n)] for l, n in zip(layers, neurons)]))
    finally:
        for h in handles:
            h.remove()
    assert got.shape == (3, len(layers)) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)


def test_gated_generation_makes_each_layers_gains_once_per_prompt(tiny_llama):
    """A gate forced open generates exactly what the static gains generate; the per-row gains of each layer are
    built once for the prompt (one entry per modulated layer) and reused at every decoding step."""
    from neurontune.interventions.gating import GateProbe
    from neurontune.interventions.generation import generate
    lm = tiny_llama
    mod = random_modulation(lm.shape, 60, seed=2, low=0.2, high=3.0, fingerprint=lm.fingerprint)
    probe = GateProbe(torch.tensor([0]), torch.tensor([0]), torch.zeros(1), torch.ones(1), torch.zeros(1), 60.0)
    prompts = ["Tell me about bread", "Hi"]
    with GatedModulation(mod, probe).apply(lm) as state:
        gated = generate(lm, prompts, max_new_tokens=8)
    assert gated == generate(lm, prompts, mod, max_new_tokens=8)
    assert gated != generate(lm, prompts, max_new_tokens=8)
    assert len(state["on"]) == len(mod.layers)  # (layer, device, dtype, rank): one per modulated layer
