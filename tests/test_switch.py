"""The folded switch (`interventions/switch.py`): its hooks compute what its folded weights compute, a switch that keeps
its neurons' own rows is the base model bit for bit, it travels in the modulation file, and a brute-force reference
(the gated MLP written out by hand) agrees with both."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import encode, logits, random_modulation, without_tensor
from neurontune.interventions.modulation import InputTerms, Modulation, ModulationFileError, fold_into_weights, folded_state_dict, modulate
from neurontune.interventions.switch import Switch

PROMPTS = ("how do I bake bread", "how do I pick locks")


def random_switch(lm, layer: int = 1, seed: int = 0, neurons=(3, 7)) -> Switch:
    gen = torch.Generator().manual_seed(seed)
    d = lm.model.config.hidden_size
    return Switch(layer, torch.tensor(neurons), torch.randn(2, d, generator=gen), torch.randn(2, d, generator=gen),
                  torch.randn(2, d, generator=gen))


def own_rows(lm, layer: int = 1, neurons=(3, 7)) -> Switch:
    mlp = lm.model.model.layers[layer].mlp
    idx = torch.tensor(neurons)
    return Switch(layer, idx, mlp.gate_proj.weight[idx].detach().clone(), mlp.up_proj.weight[idx].detach().clone(),
                  mlp.down_proj.weight[:, idx].detach().t().clone())


def with_switch(lm, switch: Switch, terms: bool = True, gains: int = 6) -> Modulation:
    """Random gains away from the switch's neurons, and input terms on a later layer."""
    mod = random_modulation(lm.nmap.shape, gains, seed=1)
    dense = mod.dense()
    dense[switch.layer, switch.neurons] = 1.0
    inputs = {}
    if terms:
        gen = torch.Generator().manual_seed(2)
        d = lm.model.config.hidden_size
        inputs = {switch.layer + 1: InputTerms(torch.tensor([0, 5, 9]), torch.randn(3, generator=gen), torch.randn(d, generator=gen))}
    return Modulation.from_dense(dense, lm.fingerprint, inputs=inputs, switch=switch)


def test_switch_hooks_equal_the_folded_weights_and_a_hand_written_mlp(tiny_llama):
    lm = tiny_llama
    switch = random_switch(lm)
    mod = with_switch(lm, switch)
    ids = encode(lm, *PROMPTS)
    with modulate(lm.model, mod, lm.nmap):
        hooked = logits(lm, ids)
    folded = fold_into_weights(copy.deepcopy(lm.model), mod)
    assert torch.allclose(logits(lm, ids, folded), hooked, atol=1e-4)
    state = folded_state_dict(lm.model, mod, lm.nmap)
    other = copy.deepcopy(lm.model)
    other.load_state_dict(state)
    assert torch.allclose(logits(lm, ids, other), hooked, atol=1e-4)
    # brute force: the switch layer's MLP written out by hand, the two neurons replaced
    mlp = lm.model.model.layers[switch.layer].mlp
    x = torch.randn(4, lm.model.config.hidden_size)
    gate, up, down = mlp.gate_proj.weight.clone(), mlp.up_proj.weight.clone(), mlp.down_proj.weight.clone()
    gate[switch.neurons], up[switch.neurons], down[:, switch.neurons] = switch.gate_rows, switch.up_rows, switch.down_cols.t()
    by_hand = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    with modulate(lm.model, Modulation(lm.nmap.shape, switch=switch), lm.nmap), torch.no_grad():
        assert torch.allclose(mlp(x), by_hand, rtol=1e-5, atol=1e-4)
    assert not any(m._forward_hooks for m in lm.model.modules())  # nothing stays on the shared model


def test_a_switch_with_its_neurons_own_rows_is_the_base_model(tiny_llama):
    lm = tiny_llama
    ids = encode(lm, *PROMPTS)
    base = logits(lm, ids)
    mod = Modulation(lm.nmap.shape, switch=own_rows(lm))
    with modulate(lm.model, mod, lm.nmap):
        assert torch.equal(logits(lm, ids), base)
    assert torch.equal(logits(lm, ids, fold_into_weights(copy.deepcopy(lm.model), mod)), base)


def check_rows_at_strength_zero_and_one(lm, mod: Modulation) -> None:
    """One batch, rows at strengths 0 and 1: row 0 is the base model bit for bit, row 1 the full modulation."""
    ids = encode(lm, *PROMPTS)
    base = logits(lm, ids)
    with mod.apply_rows(lm, torch.tensor([0.0, 1.0])):
        mixed = logits(lm, ids)
    with modulate(lm.model, mod, lm.nmap):
        full = logits(lm, ids)
    assert torch.equal(mixed[0], base[0])  # row at strength 0: the switch is not applied there
    assert torch.allclose(mixed[1], full[1], atol=1e-5)


def test_strength_zero_rows_and_scaled_zero_leave_the_base_model(tiny_llama):
    lm = tiny_llama
    mod = with_switch(lm, random_switch(lm))
    check_rows_at_strength_zero_and_one(lm, mod)
    assert mod.scaled(0).switch is None and mod.scaled(0.5).switch is mod.switch and mod.static().switch is None
    assert mod.conditional and mod.summary()["switch_layer"] == 1


def test_switch_travels_in_the_modulation_file_and_a_bad_one_is_refused(tiny_llama, tmp_path):
    lm = tiny_llama
    mod = with_switch(lm, random_switch(lm))
    back = Modulation.load(mod.save(tmp_path / "m.safetensors"))
    assert back.switch.layer == 1 and torch.equal(back.switch.neurons, mod.switch.neurons)
    for name in ("gate_rows", "up_rows", "down_cols"):
        assert torch.equal(getattr(back.switch, name), getattr(mod.switch, name))
    ids = encode(lm, *PROMPTS)
    with modulate(lm.model, mod, lm.nmap):
        a = logits(lm, ids)
    with modulate(lm.model, back, lm.nmap):  # (the reloaded input terms' hook may round differently: 1 ulp)
        assert torch.allclose(logits(lm, ids), a, atol=1e-5)
    bad = Modulation(lm.nmap.shape, switch=Switch(1, torch.tensor([3, 10_000]), *[torch.zeros(2, 64) for _ in range(3)]))
    with pytest.raises(ModulationFileError, match="bad switch"):
        Modulation.load(bad.save(tmp_path / "bad.safetensors"))


def test_switch_refuses_gains_on_its_neurons_and_models_without_a_gated_mlp(tiny_llama, tiny_gpt2):
    switch = random_switch(tiny_llama)
    dense = torch.ones(tiny_llama.nmap.shape)
    dense[1, 3] = 2.0
    with pytest.raises(ValueError, match="switch's"):
        Modulation.from_dense(dense, switch=switch)
    mod = Modulation(tiny_gpt2.nmap.shape, switch=random_switch(tiny_gpt2))
    with pytest.raises(ValueError, match="gated MLP"):
        with modulate(tiny_gpt2.model, mod, tiny_gpt2.nmap):
            pass


def test_a_switch_that_reads_an_earlier_one_folds_exactly_and_travels_in_the_file(tiny_llama, tmp_path):
    """A switch with an earlier switch (an AND of two layers' probes): hooks = folded weights = reloaded state dict; an
    earlier switch with its neurons' own rows changes nothing bit for bit; rows at strength 0 are the base model; the
    file keeps both; a half-stored earlier switch, one after the switch, or gains on its neurons are refused."""
    lm = tiny_llama
    chained = dataclasses.replace(random_switch(lm, layer=1), earlier=random_switch(lm, layer=0, seed=5, neurons=(2, 11)))
    assert [s.layer for s in chained.chain()] == [0, 1]
    mod = with_switch(lm, chained)
    ids = encode(lm, *PROMPTS)
    with modulate(lm.model, mod, lm.nmap):
        hooked = logits(lm, ids)
    with modulate(lm.model, with_switch(lm, dataclasses.replace(chained, earlier=None)), lm.nmap):
        assert not torch.allclose(logits(lm, ids), hooked, atol=1e-3)  # the earlier switch does something
    assert torch.allclose(logits(lm, ids, fold_into_weights(copy.deepcopy(lm.model), mod)), hooked, atol=1e-4)
    other = copy.deepcopy(lm.model)
    other.load_state_dict(folded_state_dict(lm.model, mod, lm.nmap))
    assert torch.allclose(logits(lm, ids, other), hooked, atol=1e-4)
    assert not any(m._forward_hooks for m in lm.model.modules())
    # an earlier switch that keeps its neurons' own rows: the switch alone, bit for bit (hooked and folded)
    alone, own = with_switch(lm, random_switch(lm)), with_switch(lm, dataclasses.replace(random_switch(lm), earlier=own_rows(lm, 0, (2, 11))))
    with modulate(lm.model, alone, lm.nmap):
        a = logits(lm, ids)
    with modulate(lm.model, own, lm.nmap):
        assert torch.equal(logits(lm, ids), a)
    assert torch.equal(logits(lm, ids, fold_into_weights(copy.deepcopy(lm.model), own)),
                       logits(lm, ids, fold_into_weights(copy.deepcopy(lm.model), alone)))
    check_rows_at_strength_zero_and_one(lm, mod)
    # the file
    path = mod.save(tmp_path / "m.safetensors")
    back = Modulation.load(path)
    assert back.switch.same(mod.switch) and back.switch.earlier.layer == 0 and mod.summary()["switch_earlier"] == 0
    with modulate(lm.model, back, lm.nmap):
        assert torch.allclose(logits(lm, ids), hooked, atol=1e-5)
    with pytest.raises(ModulationFileError, match="earlier switch needs the tensors"):
        Modulation.load(without_tensor(path, "switch.earlier.up_rows", tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="earlier switch of layer 1"):
        dataclasses.replace(random_switch(lm, layer=1), earlier=random_switch(lm, layer=1))
    dense = torch.ones(lm.nmap.shape)
    dense[0, 11] = 2.0
    with pytest.raises(ValueError, match="Neurons \\[2, 11\\] of layer 0 are the switch's"):
        Modulation.from_dense(dense, switch=chained)


@pytest.fixture(scope="module")
def fitted(tiny_llama, tmp_path_factory):
    from neurontune.config import RunConfig
    from neurontune.data.splits import build_splits
    from neurontune.method.neuron_scores import run_attribution
    from neurontune.method.selection import select
    from neurontune.method.switch_fit import fit_switch
    from test_metalearn import SMALL

    cache = tmp_path_factory.mktemp("cache")
    cfg = RunConfig(model="tiny-llama").replace(**SMALL)
    selection = select(run_attribution(tiny_llama, cfg, cache_dir=cache), cfg.selection)
    splits = build_splits(cfg.data)
    exclude = (selection.safety | selection.utility)[1]
    return fit_switch(tiny_llama, splits, 1, exclude=exclude), cfg, selection, splits, cache, exclude


def test_fitted_switch_takes_unselected_neurons_and_its_flag_reads_one_at_harmful_prompt_ends(tiny_llama, fitted):
    from neurontune.data.chat import chat_prompt
    from neurontune.interventions.capture import last_token
    from neurontune.method import switch_fit

    fit, cfg, selection, splits, cache, exclude = fitted
    assert fit.switch.layer == 1 and len(set(fit.switch.neurons.tolist())) == 2
    assert not exclude[fit.switch.neurons].any()
    assert set(fit.directions) == {2} and all(offset == 0.0 for _, offset in fit.directions.values())
    assert fit.info["fires_harmful"] > fit.info["fires_harmless"]
    harmful, harmless = splits.harm_pools("train", switch_fit.PROMPTS, switch_fit.PER_FAMILY)
    texts = [chat_prompt(tiny_llama.tokenizer, t) for t in harmful[: switch_fit.READ_PROMPTS]]
    with modulate(tiny_llama.model, Modulation(tiny_llama.nmap.shape, switch=fit.switch), tiny_llama.nmap):
        x = last_token(tiny_llama, texts, "mlp_input", layers=[2])[:, 0]
    assert float((x @ fit.directions[2][0]).mean()) == pytest.approx(1.0, abs=1e-3)  # scaled to read 1 where it fired


def test_a_switch_threshold_shifts_the_probe_by_exactly_t_along_k_and_fires_on_fewer_prompts(tiny_llama, fitted):
    """threshold t rewrites the gate rows a w and a w - T k into a (w - t k) and a (w - t k) - T k (k: the direction that
    reads about 1 on every token), the up rows and output columns unchanged; the switch fires on no more prompts."""
    from neurontune.method import switch_fit
    from neurontune.method.switch_fit import fit_switch

    fit, cfg, selection, splits, cache, exclude = fitted
    t = 1.5
    shifted = fit_switch(tiny_llama, splits, 1, exclude=exclude, threshold=t)
    k = fit.switch.up_rows[0]
    assert torch.equal(shifted.switch.neurons, fit.switch.neurons) and torch.equal(shifted.switch.up_rows, fit.switch.up_rows)
    torch.testing.assert_close(shifted.switch.down_cols, fit.switch.down_cols)
    torch.testing.assert_close(shifted.switch.gate_rows, fit.switch.gate_rows - switch_fit.SHARPNESS * t * k, rtol=0, atol=1e-5)
    assert shifted.info["threshold"] == t
    assert shifted.info["fires_harmful"] <= fit.info["fires_harmful"] and shifted.info["fires_harmless"] <= fit.info["fires_harmless"]
    assert shifted.info["fires_harmful"] + shifted.info["fires_harmless"] < fit.info["fires_harmful"] + fit.info["fires_harmless"]
    with pytest.raises(ValueError, match="threshold"):
        fit_switch(tiny_llama, splits, 1, exclude=exclude, threshold=-1.0)


def test_switch_form_trains_terms_behind_the_switch_and_exports_a_checkpoint_that_reloads(tiny_llama, fitted, tmp_path):
    from neurontune.eval.reloaded import Reloaded
    from neurontune.method.recipe import train_foldable
    from neurontune.run.export import export

    fit, cfg, selection, splits, cache, exclude = fitted
    cfg = cfg.replace(fold={"form": "switch", "switch_layer": 1, "steps": 4, "outer_lr": 0.0, "input_lr": 0.5})
    mod = train_foldable(tiny_llama, selection, cfg, splits, cache_dir=cache).modulation
    assert mod.switch is not None and mod.switch.layer == 1 and mod.conditional
    assert set(mod.inputs) <= {2} and mod.inputs and bool((mod.inputs[2].coef != 0).any())
    assert (mod.dense() == 1).all()  # gains frozen (fold.outer_lr 0): the terms behind the switch do the work
    result = export(tiny_llama, mod, tmp_path, "switched")
    assert result["max_logit_diff"] <= result["tolerance"]
    reloaded = Reloaded.load(result["path"], tiny_llama)
    base = tiny_llama.model.state_dict()
    changed = {k for k, v in reloaded.lm.model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                       "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.up_proj.weight"}


def test_a_fitted_switch_with_an_earlier_layer_is_an_and_of_two_probes_and_exports_both(tiny_llama, fitted, tmp_path):
    """fold.switch_earlier: the earlier switch is the switch that layer would have (same probe, up rows and neurons; its
    ramp moved to end at the probe's boundary), both switches take unselected neurons, the later one's rows are its own probe's shifted by one vector
    (M (r - k) and the flag's imprint taken out, r reading the earlier flag as 1 at harmful prompt ends); trained and exported, the checkpoint changes both layers' switch matrices and reloads exactly."""
    from neurontune.eval.reloaded import Reloaded
    from neurontune.method import switch_fit
    from neurontune.method.recipe import train_foldable
    from neurontune.method.switch_fit import fit_switch
    from neurontune.run.export import export

    fit, cfg, selection, splits, cache, exclude = fitted
    both = selection.safety | selection.utility
    chained = fit_switch(tiny_llama, splits, 1, exclude=both, earlier=0)
    sw, alone0 = chained.switch, fit_switch(tiny_llama, splits, 0, exclude=both[0]).switch
    assert sw.layer == 1 and sw.earlier.layer == 0 and sw.earlier.earlier is None and sw.mean is None
    assert not both[0][sw.earlier.neurons].any() and not both[1][sw.neurons].any()
    assert torch.equal(sw.earlier.neurons, alone0.neurons) and torch.equal(sw.earlier.up_rows, alone0.up_rows)
    k0 = alone0.up_rows[0]  # its ramp ends where that switch's starts: full where the probe reads harmful
    torch.testing.assert_close(sw.earlier.gate_rows, alone0.gate_rows + switch_fit.CLAMP * k0, rtol=0, atol=1e-4)
    shift = sw.gate_rows - fit.switch.gate_rows  # the same probe (fitted without the earlier flag), shifted
    assert torch.equal(sw.neurons, fit.switch.neurons)
    # (row 2 is a w - T k: k, the direction that reads about 1, is refitted on the prompts with the earlier flag in place)
    torch.testing.assert_close(shift[0] - shift[1], switch_fit.CLAMP * (sw.up_rows[0] - fit.switch.up_rows[0]), rtol=0, atol=1e-4)
    assert float(shift[0].norm()) > 0.1 * float(fit.switch.gate_rows[0].norm())
    assert chained.info["earlier"]["flag_read"]["harmful"] == pytest.approx(1.0, abs=1e-3)
    # the margin is one vector's multiple: another margin moves both gate rows by (its difference) x and_step
    assert fit.and_step is None and chained.and_step is not None
    wide = fit_switch(tiny_llama, splits, 1, exclude=both, earlier=0, margin=3.0).switch
    torch.testing.assert_close(wide.gate_rows, sw.gate_rows + (3.0 - switch_fit.AND_MARGIN) * chained.and_step, rtol=0, atol=1e-4)
    assert torch.equal(wide.up_rows, sw.up_rows) and wide.earlier.same(sw.earlier)
    with pytest.raises(ValueError, match="AND's margin must be a logit of 0 or more"):
        fit_switch(tiny_llama, splits, 1, exclude=both, earlier=0, margin=-1.0)
    with pytest.raises(ValueError, match="earlier switch's layer must be before"):
        fit_switch(tiny_llama, splits, 1, exclude=both, earlier=1)
    with pytest.raises(ValueError, match="not both"):
        fit_switch(tiny_llama, splits, 1, exclude=both, earlier=0, mean=True)
    assert switch_fit.AND_MARGIN > 0
    cfg = cfg.replace(fold={"form": "switch", "switch_layer": 1, "switch_earlier": 0, "steps": 2, "outer_lr": 0.0, "input_lr": 0.5})
    mod = train_foldable(tiny_llama, selection, cfg, splits, cache_dir=cache).modulation
    assert mod.switch.earlier is not None and mod.switch.earlier.layer == 0 and mod.summary()["switch_earlier"] == 0
    result = export(tiny_llama, mod, tmp_path, "anded")
    assert result["max_logit_diff"] <= result["tolerance"]
    reloaded = Reloaded.load(result["path"], tiny_llama)
    base = tiny_llama.model.state_dict()
    changed = {k for k, v in reloaded.lm.model.state_dict().items() if not torch.equal(v, base[k])}
    assert {f"model.layers.{l}.mlp.{m}.weight" for l in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")} <= changed


def test_fold_seeds_export_the_average_of_each_seeds_modulation_and_it_folds_to_the_average_checkpoint(tiny_llama, fitted):
    """fold.seeds n trains the foldable modulation from seeds meta.seed * n + i under one switch and exports their
    average: its coefficients and gains are the mean of the seeds' own (each trained alone with fold.seeds 1), and its
    folded weights are the mean of their folded weights (the terms fold linearly). n = 1 is meta.seed itself; averages
    of different switches are refused; a bad count is refused with what to write."""
    from neurontune.interventions.modulation import Modulation, folded_state_dict
    from neurontune.method.recipe import train_foldable

    fit, cfg, selection, splits, cache, exclude = fitted
    cfg = cfg.replace(fold={"form": "switch", "switch_layer": 1, "steps": 3, "outer_lr": 0.1, "input_lr": 0.5})
    alone = [train_foldable(tiny_llama, selection, cfg.replace(meta={"seed": s}), splits, cache_dir=cache).modulation for s in (2, 3)]
    assert not torch.equal(alone[0].inputs[2].coef, alone[1].inputs[2].coef)  # the seeds differ
    both = train_foldable(tiny_llama, selection, cfg.replace(meta={"seed": 1}, fold={"seeds": 2}), splits, cache_dir=cache)
    mod = both.modulation
    assert mod.meta["fold_seeds"] == [2, 3] and {e["seed"] for e in both.log} == {2, 3}
    assert torch.allclose(mod.inputs[2].coef, (alone[0].inputs[2].coef + alone[1].inputs[2].coef) / 2, atol=1e-6)
    assert torch.allclose(mod.dense(), (alone[0].dense() + alone[1].dense()) / 2, atol=1e-6)
    states = [folded_state_dict(tiny_llama.model, m, tiny_llama.nmap) for m in (*alone, mod)]
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        assert torch.allclose(states[2][name], (states[0][name] + states[1][name]) / 2, atol=1e-5), name
    assert not torch.equal(states[2]["model.layers.2.mlp.up_proj.weight"], tiny_llama.model.state_dict()["model.layers.2.mlp.up_proj.weight"])
    one = Modulation.average([alone[0]])
    assert torch.equal(one.inputs[2].coef, alone[0].inputs[2].coef) and torch.equal(one.dense(), alone[0].dense())
    with pytest.raises(ValueError, match="different switches"):
        Modulation.average([alone[0], with_switch(tiny_llama, random_switch(tiny_llama), gains=0)])
    with pytest.raises(ValueError, match="fold.seeds must be a count"):
        cfg.replace(fold={"seeds": 0})


def test_switch_form_is_refused_for_a_model_without_a_gated_mlp(tiny_gpt2):
    from neurontune.config import DataConfig
    from neurontune.data.splits import build_splits
    from neurontune.method.switch_fit import fit_switch

    with pytest.raises(ValueError, match="gated MLP"):
        fit_switch(tiny_gpt2, build_splits(DataConfig()), 1)


def test_a_switch_is_written_into_a_gguf_file_too(tiny_llama, tmp_path):
    """GGUF export rewrites the tensors the switch changes (gate, up, down of its layer, and the later up rows): llama.cpp's
    format holds the same model; transformers' GGUF loader gets logits near the hooked model's and far from the base's."""
    from transformers import AutoModelForCausalLM

    from neurontune.run.export import export

    lm = tiny_llama
    mod = with_switch(lm, random_switch(lm), gains=0)
    result = export(lm, mod, tmp_path, "s", format="gguf", gguf_type="f16")
    g = result["gguf"]
    path = tmp_path / "s" / g["file"]
    assert {"blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight", "blk.2.ffn_up.weight"} <= set(g["changed"])
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = encode(lm, *PROMPTS)
    with modulate(lm.model, mod, lm.nmap):
        hooked = logits(lm, ids)
    base, plain = logits(lm, ids), logits(lm, ids, reloaded)
    assert float((plain - hooked).abs().max()) < float((plain - base).abs().max()) / 10


def test_switch_form_on_a_model_without_a_gated_mlp_falls_back_to_harm_directions(tiny_gpt2, tmp_path):
    from conftest import Recorder
    from neurontune.config import RunConfig
    from neurontune.data.splits import build_splits
    from neurontune.method.neuron_scores import run_attribution
    from neurontune.method.recipe import train_foldable
    from neurontune.method.selection import select
    from test_metalearn import SMALL

    cfg = RunConfig(model="tiny-gpt2").replace(**SMALL).replace(fold={"form": "switch", "steps": 2})
    selection = select(run_attribution(tiny_gpt2, cfg, cache_dir=tmp_path), cfg.selection)
    rec = Recorder()
    mod = train_foldable(tiny_gpt2, selection, cfg, build_splits(cfg.data), cache_dir=tmp_path, reporter=rec).modulation
    assert mod.switch is None and mod.inputs  # input-side terms along harm directions, said so
    assert any("'switch'" in m and "conditional" in m for m in rec.said)


def test_switch_settings_are_checked():
    from neurontune.config import RunConfig

    with pytest.raises(ValueError, match="fold.switch_readers must be 'selected' or 'all', not 'some'"):
        RunConfig().replace(fold={"form": "switch", "switch_readers": "some"})
    with pytest.raises(ValueError, match="switch_layer"):
        RunConfig().replace(fold={"form": "switch", "switch_layer": -1})
    with pytest.raises(ValueError, match="fold.switch_threshold must be a logit of 0 or more"):
        RunConfig().replace(fold={"form": "switch", "switch_threshold": -0.5})
    assert RunConfig().replace(fold={"form": "switch", "switch_threshold": 0.5}).fold.switch_threshold == 0.5
    with pytest.raises(ValueError, match="fold.form must be one of"):
        RunConfig().replace(fold={"form": "switched"})
    with pytest.raises(ValueError, match="fold.switch_earlier must be a layer index before the switch's"):
        RunConfig().replace(fold={"form": "switch", "switch_layer": 12, "switch_earlier": 12})
    with pytest.raises(ValueError, match="fold.switch_earlier and fold.switch_mean cannot both be set"):
        RunConfig().replace(fold={"form": "switch", "switch_earlier": 12, "switch_mean": True})
    assert RunConfig().replace(fold={"form": "switch", "switch_earlier": 12}).fold.switch_earlier == 12
