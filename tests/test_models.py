"""Model loading and the neuron map: tiny models, every dense family we claim to support (tiny random
configs), refusals of MoE and unknown architectures, and clear load errors."""
from __future__ import annotations

import copy
import types

import pytest
import torch
import transformers as T
from conftest import hooks_left
from torch import nn

from neurontune.config import AttributionConfig
from neurontune.data.chat import chat_prompt
from neurontune.interventions.modulation import Modulation, fold_into_weights, modulate
from neurontune.method.attribution import attribute
from neurontune.model.loading import (
    LoadedModel,
    ModelLoadError,
    fingerprint,
    load_model,
)
from neurontune.model.neuron_map import (
    UnsupportedModelError,
    neuron_map,
    supported_types,
)
from neurontune.model.tiny import tiny_tokenizer

TOK = tiny_tokenizer()
V, D, F, L = len(TOK), 32, 48, 2  # vocab, d_model, MLP width (neurons per layer), layers
_COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=4,
               max_position_embeddings=128, pad_token_id=TOK.pad_token_id)
CONFIGS = {
    "qwen2": lambda: T.Qwen2Config(**_COMMON, num_key_value_heads=2),
    "gemma2": lambda: T.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=8),
    "phi3": lambda: T.Phi3Config(**_COMMON, num_key_value_heads=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_COMMON),
    "opt": lambda: T.OPTConfig(vocab_size=V, hidden_size=D, ffn_dim=F, num_hidden_layers=L, num_attention_heads=4,
                               max_position_embeddings=128, word_embed_proj_dim=D, pad_token_id=TOK.pad_token_id),
    "phi": lambda: T.PhiConfig(**_COMMON),
    "mistral": lambda: T.MistralConfig(**_COMMON, num_key_value_heads=2),
    "gptj": lambda: T.GPTJConfig(vocab_size=V, n_embd=D, n_inner=F, n_layer=L, n_head=4, n_positions=128, rotary_dim=4,
                                 pad_token_id=TOK.pad_token_id),
    "falcon": lambda: T.FalconConfig(vocab_size=V, hidden_size=D, ffn_hidden_size=F, num_hidden_layers=L,
                                     num_attention_heads=4, pad_token_id=TOK.pad_token_id),
}


def _build(model_type: str) -> LoadedModel:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval().requires_grad_(False)
    with torch.no_grad():  # default init is so small that neurons barely matter; make them matter
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    nmap = neuron_map(model)
    return LoadedModel(model, TOK, model_type, fingerprint(model, nmap), nmap)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def arch(request) -> LoadedModel:
    return _build(request.param)


def _logits(lm: LoadedModel, ids: torch.Tensor, model=None) -> torch.Tensor:
    with torch.no_grad():
        return (model or lm.model)(input_ids=ids, use_cache=False).logits


def _mod(shape, n=40, seed=0) -> Modulation:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.ones(shape)
    dense.view(-1)[torch.randperm(dense.numel(), generator=gen)[:n]] = 2 * torch.rand(n, generator=gen)
    return Modulation.from_dense(dense)


# -- tiny models ---------------------------------------------------------------------------------------
def test_tiny_shapes(tiny_llama, tiny_gpt2):
    cfg = tiny_llama.model.config
    assert tiny_llama.shape == (cfg.num_hidden_layers, cfg.intermediate_size)
    assert not tiny_llama.nmap.transposed
    assert tiny_llama.nmap.projections[0] is tiny_llama.model.model.layers[0].mlp.down_proj
    cfg = tiny_gpt2.model.config
    assert tiny_gpt2.shape == (cfg.n_layer, cfg.n_inner)
    assert tiny_gpt2.nmap.transposed  # Conv1D stores [in, out]
    assert tiny_gpt2.nmap.projections[-1] is tiny_gpt2.model.transformer.h[-1].mlp.c_proj
    for lm in (tiny_llama, tiny_gpt2):
        n_layers, n_neurons = lm.shape
        assert len(lm.nmap.projections) == n_layers
        w = lm.nmap.weight_slice(0)
        assert w.shape == (n_neurons, lm.model.get_input_embeddings().weight.shape[1])  # [n_neurons, d_model]
        assert w.data_ptr() == lm.nmap.projections[0].weight.data_ptr()  # a view: folding edits the real weight
        assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training


def test_tiny_models_are_deterministic():
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    assert a.fingerprint == b.fingerprint
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(_logits(a, ids), _logits(b, ids))


def test_fingerprint_same_across_float32_and_bfloat16(lm):
    half = copy.deepcopy(lm.model).to(torch.bfloat16)
    assert fingerprint(half, neuron_map(half)) == lm.fingerprint


# -- every supported dense family, tiny and random ------------------------------------------------------
def test_arch_neuron_map_shape(arch):
    cfg = arch.model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    assert arch.nmap.shape == (n_layers, F)
    assert arch.nmap.model_type == cfg.model_type
    assert all(isinstance(p, nn.Module) and hasattr(p, "weight") for p in arch.nmap.projections)
    assert len({id(p) for p in arch.nmap.projections}) == n_layers


def test_arch_gain_one_bit_identical_and_fold(arch):
    ids = torch.randint(0, V - 4, (2, 9), generator=torch.Generator().manual_seed(1))
    base = _logits(arch, ids)
    with modulate(arch.model, torch.ones(arch.shape, requires_grad=True), arch.nmap):  # hooks on every layer
        assert hooks_left(arch) == arch.nmap.n_layers
        assert torch.equal(_logits(arch, ids), base)
    mod = _mod(arch.shape)
    with modulate(arch.model, mod, arch.nmap):
        hooked = _logits(arch, ids)
    assert (hooked - base).abs().max() > 1e-3
    folded = fold_into_weights(copy.deepcopy(arch.model), mod)
    assert (_logits(arch, ids, folded) - hooked).abs().max() < 1e-4
    assert hooks_left(arch) == 0 and torch.equal(_logits(arch, ids), base)


def test_arch_per_row_gains(arch):
    ids = torch.randint(0, V - 4, (2, 9), generator=torch.Generator().manual_seed(2))
    mod = _mod(arch.shape, seed=3)
    with modulate(arch.model, [None, mod], arch.nmap):
        both = _logits(arch, ids)
    with modulate(arch.model, mod, arch.nmap):
        alone = _logits(arch, ids[1:])
    assert torch.allclose(both[0], _logits(arch, ids[:1])[0], atol=1e-5, rtol=0)
    assert torch.allclose(both[1], alone[0], atol=1e-5, rtol=0)


def test_arch_attribution_runs_and_is_batch_invariant(arch):
    prompts = [chat_prompt(TOK, "How do I bake bread?"), chat_prompt(TOK, "Hi")]
    targets = ["I cannot help.", "Sure"]
    one = attribute(arch, prompts, targets, AttributionConfig(batch_size=1), keep_per_example=True)
    two = attribute(arch, prompts, targets, AttributionConfig(batch_size=2), keep_per_example=True)
    assert one.score.shape == arch.shape and torch.isfinite(one.score).all() and one.score.abs().sum() > 0
    for a, b in zip(one.per_example, two.per_example):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


# -- refusals ------------------------------------------------------------------------------------------
def _tiny_mixtral():
    cfg = T.MixtralConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64)
    return T.AutoModelForCausalLM.from_config(cfg)


def test_moe_refused():
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        neuron_map(_tiny_mixtral())


def test_moe_directory_refused_by_load_model(tmp_path):
    _tiny_mixtral().save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="mixture-of-experts"):
        load_model(str(tmp_path))


def test_unknown_model_type_refused_with_supported_list():
    class Strange(nn.Module):
        config = types.SimpleNamespace(model_type="xlstm")

    with pytest.raises(UnsupportedModelError) as err:
        neuron_map(Strange())
    msg = str(err.value)
    assert "xlstm" in msg and "llama" in msg and "gpt2" in msg and "ARCHITECTURES" in msg
    assert {"llama", "gpt2", "qwen2", "opt", "phi"} <= set(supported_types())


def test_load_from_local_directory(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.fingerprint == tiny_llama.fingerprint and lm.shape == tiny_llama.shape
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    assert torch.equal(_logits(lm, ids), _logits(tiny_llama, ids))
    assert lm.source.startswith("local:")


# -- load errors ---------------------------------------------------------------------------------------
def _assert_helpful(msg: str) -> None:
    for option in ("embedded", "tiny-llama", "tiny-gpt2", "local model directory", "Supported families", "llama"):
        assert option in msg, f"{option!r} missing from: {msg}"


def test_unknown_hub_id_lists_options():
    with pytest.raises(ModelLoadError) as err:
        load_model("no/such-model-xyz")
    assert "no/such-model-xyz" in str(err.value)
    _assert_helpful(str(err.value))


def test_missing_directory_lists_options(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "does" / "not" / "exist"))
    _assert_helpful(str(err.value))


def test_missing_gguf_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="No GGUF file"):
        load_model(str(tmp_path / "model.gguf"))


def test_bad_dtype_refused():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny-llama", dtype="float13")
