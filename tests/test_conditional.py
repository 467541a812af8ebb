"""Input-side (conditional) terms of a modulation: exact identities, the fold, per-row forms, the file round trip."""
from __future__ import annotations

import copy

import pytest
import torch

from neurontune.interventions.modulation import InputTerms, Modulation, fold_into_weights, folded_state_dict, modulate
from neurontune.model.loading import LoadedModel
from neurontune.model.neuron_map import neuron_map
from neurontune.model.tiny import tiny_model

ARCHS = ("llama", "gpt2")


def _lm(arch: str) -> LoadedModel:
    model, tok = tiny_model(arch, seed=3)
    return LoadedModel(model, tok, f"tiny-{arch}", f"tiny-{arch}-test", neuron_map(model))


def _ids(lm, n: int = 3, length: int = 12) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 250, (n, length))


def _conditional(lm, *, offset: bool, seed: int = 0, scale: float = 1.0) -> Modulation:
    """Random gains on a few neurons and input terms on others, with a random direction per layer."""
    g = torch.Generator().manual_seed(seed)
    n_layers, n_neurons = lm.shape
    d = lm.nmap.input_rows(0).shape[1]
    dense = torch.ones(n_layers, n_neurons)
    dense[:, :8] = 1 + torch.rand(n_layers, 8, generator=g)
    inputs = {l: InputTerms(torch.arange(4, 20), scale * torch.randn(16, generator=g), torch.randn(d, generator=g),
                            float(torch.randn((), generator=g)) if offset else 0.0) for l in range(n_layers)}
    return Modulation.from_dense(dense, lm.fingerprint, inputs=inputs)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_terms_are_the_static_model_bit_for_bit(arch):
    lm = _lm(arch)
    ids = _ids(lm)
    mod = _conditional(lm, offset=arch == "gpt2")
    zero = Modulation(mod.shape, mod.layers, mod.fingerprint, {},
                      {l: InputTerms(t.indices, torch.zeros_like(t.coef), t.direction, t.offset) for l, t in mod.inputs.items()})
    with modulate(lm.model, mod.static(), lm.nmap):
        static = _logits(lm.model, ids)
    with modulate(lm.model, zero, lm.nmap):
        zeroed = _logits(lm.model, ids)
    assert torch.equal(static, zeroed)
    assert not Modulation.from_dense(zero.dense(), inputs=zero.inputs).conditional  # zero terms are not kept


@pytest.mark.parametrize("arch", ARCHS)
def test_terms_change_the_output_and_match_a_brute_force_reference(arch):
    """The hooked input projection equals the projection computed by hand with rows + coef * direction."""
    lm = _lm(arch)
    ids = _ids(lm)
    mod = _conditional(lm, offset=arch == "gpt2")
    layer, terms = 1, mod.inputs[1]
    module = lm.nmap.input_projections[layer]
    seen = {}
    with modulate(lm.model, mod, lm.nmap):  # registered after the modulation's hook: sees the edited output
        handle = module.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach(), out=out.detach()))
        try:
            _logits(lm.model, ids)
        finally:
            handle.remove()
    x = seen["x"]
    rows = lm.nmap.input_rows(layer).detach().clone()
    bias = lm.nmap.input_bias(layer)
    bias = torch.zeros(rows.shape[0]) if bias is None else bias.detach().clone()
    rows[terms.indices] += terms.coef[:, None] * terms.direction[None]
    bias[terms.indices] -= terms.coef * terms.offset
    expected = x @ rows.t() + bias
    got = seen["out"][..., lm.nmap.input_offset:lm.nmap.input_offset + lm.shape[1]]
    assert torch.allclose(got, expected, atol=1e-4)
    with modulate(lm.model, mod.static(), lm.nmap):
        static = _logits(lm.model, ids)
    with modulate(lm.model, mod, lm.nmap):
        conditional = _logits(lm.model, ids)
    assert (static - conditional).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_weights_reproduce_the_hooked_logits(arch):
    lm = _lm(arch)
    ids = _ids(lm)
    mod = _conditional(lm, offset=arch == "gpt2")
    with modulate(lm.model, mod, lm.nmap):
        hooked = _logits(lm.model, ids)
    folded = fold_into_weights(copy.deepcopy(lm.model), mod)
    assert torch.allclose(_logits(folded, ids), hooked, atol=1e-4)
    clone = copy.deepcopy(lm.model)
    clone.load_state_dict(folded_state_dict(lm.model, mod, lm.nmap))
    assert torch.allclose(_logits(clone, ids), hooked, atol=1e-4)
    assert torch.equal(_logits(lm.model, ids), _logits(_lm(arch).model, ids))  # the shared model was not changed


def test_an_offset_needs_a_bias_to_fold():
    lm = _lm("llama")  # up_proj has no bias
    mod = _conditional(lm, offset=True)
    with pytest.raises(ValueError, match="no bias"):
        fold_into_weights(copy.deepcopy(lm.model), mod)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_at_strength_one_and_zero_are_the_modulation_and_the_base(arch):
    lm = _lm(arch)
    ids = _ids(lm, n=4)
    mod = _conditional(lm, offset=arch == "gpt2")
    with modulate(lm.model, mod, lm.nmap):
        full = _logits(lm.model, ids)
    base = _logits(lm.model, ids)
    s = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with mod.apply_rows(lm, s):
        mixed = _logits(lm.model, ids)
    assert torch.allclose(mixed[s == 1], full[s == 1], atol=1e-5)
    assert torch.allclose(mixed[s == 0], base[s == 0], atol=1e-5)
    half = mod.scaled(0.5)
    with modulate(lm.model, half, lm.nmap):
        at_half = _logits(lm.model, ids)
    with mod.apply_rows(lm, torch.full((4,), 0.5)):
        rows_half = _logits(lm.model, ids)
    assert torch.allclose(at_half, rows_half, atol=1e-5)
    with modulate(lm.model, [mod, None, half, None], lm.nmap):  # one modulation per row, as generation passes them
        listed = _logits(lm.model, ids)
    assert torch.allclose(listed[0], full[0], atol=1e-5) and torch.allclose(listed[1], base[1], atol=1e-5)
    assert torch.allclose(listed[2], at_half[2], atol=1e-5)


def test_two_modulations_with_different_directions_in_one_batch():
    lm = _lm("llama")
    ids = _ids(lm, n=2)
    a, b = _conditional(lm, offset=False, seed=1), _conditional(lm, offset=False, seed=2)
    with modulate(lm.model, [a, b], lm.nmap):
        both = _logits(lm.model, ids)
    with modulate(lm.model, a, lm.nmap):
        only_a = _logits(lm.model, ids)
    with modulate(lm.model, b, lm.nmap):
        only_b = _logits(lm.model, ids)
    assert torch.allclose(both[0], only_a[0], atol=1e-5) and torch.allclose(both[1], only_b[1], atol=1e-5)


def test_trainable_coefficients_get_gradients():
    lm = _lm("llama")
    ids = _ids(lm)
    d = lm.nmap.input_rows(0).shape[1]
    coef = torch.zeros(5, requires_grad=True)
    inputs = {0: InputTerms(torch.arange(5), coef, torch.randn(d), 0.0)}
    with modulate(lm.model, torch.ones(lm.shape), lm.nmap, inputs=inputs):
        loss = lm.model(input_ids=ids).logits.logsumexp(-1).mean()
    loss.backward()
    assert coef.grad is not None and bool((coef.grad != 0).any())


def test_file_round_trip_keeps_the_terms(tmp_path):
    lm = _lm("gpt2")
    mod = _conditional(lm, offset=True)
    back = Modulation.load(mod.save(tmp_path / "m.safetensors"), lm.fingerprint)
    assert back.conditional and sorted(back.inputs) == sorted(mod.inputs)
    for layer, t in mod.inputs.items():
        u = back.inputs[layer]
        assert torch.equal(u.indices, t.indices) and torch.equal(u.coef, t.coef) and torch.equal(u.direction, t.direction)
        assert u.offset == pytest.approx(t.offset)
    assert torch.equal(back.dense(), mod.dense())


def test_the_neuron_map_knows_every_input_projection():
    for arch in ARCHS:
        model, _ = tiny_model(arch)
        nmap = neuron_map(model)
        assert len(nmap.input_projections) == nmap.n_layers
        assert nmap.input_rows(0).shape == (nmap.n_neurons, model.config.hidden_size)


def test_the_exported_conditional_checkpoint_reloads_and_answers_like_the_hooked_model(tmp_path):
    """Export writes the input terms into the input projection's own rows; plain transformers reloads the folder,
    its logits match the hooked model within the export tolerance, and the harness's `Reloaded` rows (the checkpoint,
    no hooks) answer the evaluation prompts exactly as the hooked modulation does."""
    from neurontune.config import DataConfig, EvalConfig
    from neurontune.data.splits import build_splits
    from neurontune.eval.harness import evaluate
    from neurontune.eval.reloaded import Reloaded
    from neurontune.model.loading import load_model
    from neurontune.run.export import export

    lm = load_model("tiny-llama")
    mod = _conditional(lm, offset=False, scale=0.5)
    result = export(lm, mod, tmp_path, "cond")
    assert result["max_logit_diff"] <= result["tolerance"]
    reloaded = Reloaded.load(result["path"], lm)
    changed = {k for k, v in reloaded.lm.model.state_dict().items() if not torch.equal(v, lm.model.state_dict()[k])}
    assert any("up_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert not any(k for k in changed if "mlp" not in k)  # only the MLP weights the modulation names
    splits = build_splits(DataConfig())
    cfg = EvalConfig(n_harmful=2, n_per_family=1, families=("roleplay",), n_benign=2, n_borderline=1, n_benign_per_family=2,
                     n_alarming=1, n_ppl=3, n_mc=4, max_new_tokens=6, batch_size=8)
    hooked = evaluate(lm, mod, splits, cfg, split="validation")
    folded = evaluate(lm, reloaded, splits, cfg, split="validation", base=hooked)
    assert [r["answer"] for r in folded.rows] == [r["answer"] for r in hooked.rows]
    assert folded.metrics["ppl_ratio"] == pytest.approx(hooked.metrics["ppl_ratio"], rel=1e-4)
    assert folded.base_metrics == hooked.base_metrics
