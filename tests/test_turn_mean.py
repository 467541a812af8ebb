"""The switch's turn mean (`interventions/turn_mean.py`): a key-value group whose heads' queries are zeroed averages its
values over every token so far. Its hooks compute what its folded weights compute, and both agree with attention
written out by hand; rows at strength 0 are the base model bit for bit; it travels in the modulation file."""
import copy

import pytest
import torch
from conftest import encode, logits, without_tensor
from test_switch import PROMPTS, check_rows_at_strength_zero_and_one, random_switch, with_switch

from neurontune.interventions.modulation import FORMAT_VERSION, Modulation, ModulationFileError, fold_into_weights, folded_state_dict, modulate
from neurontune.interventions.switch import Switch
from neurontune.interventions.turn_mean import TurnMean, groups


def random_mean(lm, layer: int = 1, group: int = 1, seed: int = 3) -> TurnMean:
    gen = torch.Generator().manual_seed(seed)
    d = lm.model.config.hidden_size
    return TurnMean(layer, group, torch.randn(d, generator=gen), torch.randn(d, generator=gen))


def switch_with_mean(lm, mean: TurnMean) -> Switch:
    s = random_switch(lm)
    return Switch(s.layer, s.neurons, s.gate_rows, s.up_rows, s.down_cols, mean)


def test_turn_mean_hooks_equal_the_folded_weights_and_attention_written_by_hand(tiny_llama):
    lm = tiny_llama
    mean = random_mean(lm)
    mod = with_switch(lm, switch_with_mean(lm, mean))
    ids = encode(lm, *PROMPTS)
    with modulate(lm.model, mod, lm.nmap):
        hooked = logits(lm, ids)
    assert not torch.allclose(hooked, logits(lm, ids), atol=1e-3)
    without = with_switch(lm, random_switch(lm))  # the same modulation without the turn mean differs
    with modulate(lm.model, without, lm.nmap):
        assert not torch.allclose(logits(lm, ids), hooked, atol=1e-3)
    assert torch.allclose(logits(lm, ids, fold_into_weights(copy.deepcopy(lm.model), mod)), hooked, atol=1e-4)
    other = copy.deepcopy(lm.model)
    other.load_state_dict(folded_state_dict(lm.model, mod, lm.nmap))
    assert torch.allclose(logits(lm, ids, other), hooked, atol=1e-4)
    # brute force: the layer's attention output = base output without the group's heads + running mean of the probe
    attn = lm.model.model.layers[mean.layer].self_attn
    kv, per, dim = groups(lm.model)
    seen = {}
    hook = lm.model.model.layers[mean.layer].input_layernorm.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    cut = lambda m, args: (args[0].index_fill(-1, torch.arange(mean.group * per * dim, (mean.group + 1) * per * dim), 0.0),)  # noqa: E731
    outs = {}
    keep = lambda m, a, out: outs.__setitem__("o", out)  # noqa: E731
    try:
        with torch.no_grad():
            pre, catch = attn.o_proj.register_forward_pre_hook(cut), attn.o_proj.register_forward_hook(keep)
            lm.model(input_ids=ids, use_cache=False)
            pre.remove()
            catch.remove()
            base_without_group, x = outs["o"], seen["x"]
            with modulate(lm.model, Modulation(lm.nmap.shape, switch=switch_with_mean(lm, mean)), lm.nmap):
                catch = attn.o_proj.register_forward_hook(keep)  # after the turn mean's own hook
                lm.model(input_ids=ids, use_cache=False)
                catch.remove()
    finally:
        hook.remove()
    running = (x @ mean.value_row).cumsum(-1) / torch.arange(1, ids.shape[1] + 1)
    by_hand = base_without_group + running[..., None] * mean.out_col
    assert torch.allclose(outs["o"], by_hand, rtol=1e-4, atol=1e-4)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())  # nothing stays on the model


def test_turn_mean_rows_at_strength_zero_are_the_base_model_and_the_folded_weights_change_only_its_units(tiny_llama):
    lm = tiny_llama
    check_rows_at_strength_zero_and_one(lm, with_switch(lm, switch_with_mean(lm, random_mean(lm))))
    state = folded_state_dict(lm.model, Modulation(lm.nmap.shape, switch=switch_with_mean(lm, random_mean(lm))), lm.nmap)
    attn = "model.layers.1.self_attn."
    kv, per, dim = groups(lm.model)
    base_state = lm.model.state_dict()
    q, v, o = state[attn + "q_proj.weight"], state[attn + "v_proj.weight"], state[attn + "o_proj.weight"]
    heads = slice(per * dim, 2 * per * dim)  # group 1's query heads
    assert (q[heads] == 0).all() and torch.equal(q[:per * dim], base_state[attn + "q_proj.weight"][:per * dim])
    assert torch.equal(v[dim + 1:2 * dim], torch.zeros(dim - 1, v.shape[1])) and torch.equal(v[:dim], base_state[attn + "v_proj.weight"][:dim])
    assert (o[:, per * dim + 1:2 * per * dim] == 0).all() and torch.equal(o[:, :per * dim], base_state[attn + "o_proj.weight"][:, :per * dim])
    assert torch.equal(state[attn + "k_proj.weight"], base_state[attn + "k_proj.weight"]) if attn + "k_proj.weight" in state else True


def test_turn_mean_travels_in_the_modulation_file_and_a_bad_one_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    lm = tiny_llama
    mod = with_switch(lm, switch_with_mean(lm, random_mean(lm)))
    path = mod.save(tmp_path / "m.safetensors")
    back = Modulation.load(path)
    assert back.switch.mean is not None and (back.switch.mean.layer, back.switch.mean.group) == (1, 1)
    assert torch.equal(back.switch.mean.value_row, mod.switch.mean.value_row) and torch.equal(back.switch.mean.out_col, mod.switch.mean.out_col)
    assert FORMAT_VERSION == 5 and mod.summary()["switch_mean"] == [1, 1]
    ids = encode(lm, *PROMPTS)
    with modulate(lm.model, mod, lm.nmap):
        a = logits(lm, ids)
    with modulate(lm.model, back, lm.nmap):
        assert torch.allclose(logits(lm, ids), a, atol=1e-5)
    # a group the model does not have, a mean after the switch's layer, a half-stored mean
    with pytest.raises(ValueError, match="group 5"):
        with modulate(lm.model, Modulation(lm.nmap.shape, switch=switch_with_mean(lm, random_mean(lm, group=5))), lm.nmap):
            pass
    with pytest.raises(ValueError, match="at or before"):
        switch_with_mean(lm, random_mean(lm, layer=2))
    with pytest.raises(ModulationFileError, match="turn mean"):
        Modulation.load(without_tensor(path, "switch.mean.out_col", tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="gated MLP|query, value and output"):
        with modulate(tiny_gpt2.model, Modulation(tiny_gpt2.nmap.shape, switch=switch_with_mean(tiny_gpt2, random_mean(tiny_gpt2))), tiny_gpt2.nmap):
            pass


def test_fitted_switch_with_a_turn_mean_reads_it_and_exports_a_checkpoint_that_reloads(tiny_llama, tmp_path):
    """fold.switch_mean: the fit rewrites the cheapest key-value group of the switch's layer into a turn mean (its value
    row a probe of the running mean that reads higher on harmful prompt ends), the switch's probe is fitted with it in
    place, and export writes exactly the switch's MLP rows, the turn mean's attention rows and the readers' rows."""
    from neurontune.config import RunConfig
    from neurontune.data.splits import build_splits
    from neurontune.eval.reloaded import Reloaded
    from neurontune.method.neuron_scores import run_attribution
    from neurontune.method.recipe import train_foldable
    from neurontune.method.selection import select
    from neurontune.run.export import export
    from test_metalearn import SMALL

    lm = tiny_llama
    cfg = RunConfig(model="tiny-llama").replace(**SMALL)
    cfg = cfg.replace(fold={"form": "switch", "switch_layer": 1, "switch_mean": True, "steps": 4, "outer_lr": 0.0, "input_lr": 0.5})
    selection = select(run_attribution(lm, cfg, cache_dir=tmp_path / "cache"), cfg.selection)
    mod = train_foldable(lm, selection, cfg, build_splits(cfg.data), cache_dir=tmp_path / "cache").modulation
    mean = mod.switch.mean
    info = mod.meta["switch"]["mean"]
    assert mean is not None and mean.layer == 1 and mean.group == info["group"] == min(range(2), key=lambda g: info["group_costs"][g])
    assert info["fires_harmful"] > info["fires_harmless"] and info["train_auc"] > 0.5
    result = export(lm, mod, tmp_path, "switched")
    assert result["max_logit_diff"] <= result["tolerance"]
    reloaded = Reloaded.load(result["path"], lm)
    base = lm.model.state_dict()
    changed = {k for k, v in reloaded.lm.model.state_dict().items() if not torch.equal(v, base[k])}
    attn = "model.layers.1.self_attn."
    assert changed == {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
                       "model.layers.2.mlp.up_proj.weight", attn + "q_proj.weight", attn + "v_proj.weight", attn + "o_proj.weight"}


def test_a_turn_mean_is_written_into_a_gguf_file_too(tiny_llama, tmp_path):
    """GGUF export writes the turn mean's query (in llama.cpp's permuted layout), value and output tensors: transformers'
    GGUF loader gets logits near the hooked model's and far from those of the same switch without the turn mean."""
    from transformers import AutoModelForCausalLM

    from neurontune.run.export import export

    lm = tiny_llama
    mod = with_switch(lm, switch_with_mean(lm, random_mean(lm)), gains=0)
    result = export(lm, mod, tmp_path, "s", format="gguf", gguf_type="f16")
    g = result["gguf"]
    assert {"blk.1.attn_q.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight"} <= set(g["changed"])
    path = tmp_path / "s" / g["file"]
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = encode(lm, *PROMPTS)
    with modulate(lm.model, mod, lm.nmap):
        hooked = logits(lm, ids)
    with modulate(lm.model, with_switch(lm, random_switch(lm), gains=0), lm.nmap):
        without = logits(lm, ids)
    plain = logits(lm, ids, reloaded)
    assert float((plain - hooked).abs().max()) < float((plain - without).abs().max()) / 10


def test_switch_mean_setting_is_checked():
    from neurontune.config import RunConfig

    with pytest.raises(ValueError, match="'switch_mean' in preset section 'fold' must be true or false, not 'yes'"):
        RunConfig().replace(fold={"form": "switch", "switch_mean": "yes"})
    assert RunConfig().replace(fold={"form": "switch", "switch_mean": True}).fold.switch_mean is True
