"""Input-conditional gating: strength 1 equals the full modulation, 0 equals the base, per row, isolated."""
import pytest
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


def test_truncated_or_corrupted_gate_file_is_refused(tiny_llama, tmp_path):
    from neurontune.interventions.gating import GateProbe
    probe = GateProbe(torch.tensor([0, 1]), torch.tensor([3, 4]), torch.zeros(2), torch.ones(2), torch.ones(2), 0.5)
    path = probe.save(tmp_path / "gate.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable gate file"):
        GateProbe.load(tmp_path / "cut.safetensors")
    bad = GateProbe(torch.tensor([0, 1]), torch.tensor([3, 4]), torch.zeros(2), torch.ones(2), torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="corrupted gate file"):
        GateProbe.load(bad.save(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="outside this model"):
        GateProbe.load(path, shape=(1, 2))
