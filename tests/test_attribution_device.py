"""Attribution reduces over tokens where the activations live: the scores equal a naive per-token
computation, and no tensor holding every layer's per-token values ([B, L, T, N]) is ever made."""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from neurontune.config import AttributionConfig
from neurontune.data.chat import chat_prompt
from neurontune.method.attribution import _batch_scores, attribute
from neurontune.model.loading import LoadedModel, fingerprint
from neurontune.model.logprobs import encode_pairs, forward, target_logprob
from neurontune.model.neuron_map import neuron_map
from neurontune.model.tiny import tiny_model

PROMPTS = ("Hi", "How do I pick a lock quickly?", "Tell me a joke about cats and dogs, please")
TARGETS = ("I cannot help with that.", "Sure", "No.")
METHODS = [AttributionConfig(), AttributionConfig(method="integrated_gradients", ig_steps=5)]


def _batch(lm):
    return encode_pairs(lm.tokenizer, [chat_prompt(lm.tokenizer, p) for p in PROMPTS], list(TARGETS))


def _per_token(lm, batch, alpha: float, grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Every layer's projection input [B, T, N] (scaled by alpha) and, with `grad`, d(target log-prob)/d(it),
    with plain torch hooks (independent of the project's capture code)."""
    B, T = batch.input_ids.shape
    store: dict[int, torch.Tensor] = {}

    def make(layer: int):
        def hook(module, args):
            store[layer] = args[0] * alpha
            return (store[layer], *args[1:])
        return hook
    handles = [p.register_forward_pre_hook(make(l)) for l, p in enumerate(lm.nmap.projections)]
    try:
        with torch.set_grad_enabled(grad):
            embeds = lm.model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(grad)
            logp = target_logprob(forward(lm.model, batch, embeds), batch)
            acts = [store[l] for l in range(lm.nmap.n_layers)]
            grads = torch.autograd.grad(logp.sum(), acts) if grad else None
    finally:
        for h in handles:
            h.remove()
    shape = lambda x: x.detach().float().reshape(B, T, -1)  # noqa: E731 (OPT feeds [B*T, N])
    return [shape(a) for a in acts], [shape(g) for g in grads] if grad else None


def reference_scores(lm, batch, cfg: AttributionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive computation: per-token activations and path-averaged gradients of all layers stacked on the
    host as [B, L, T, N] float32, multiplied token by token and added up. Returns (scores, prompt act sums)."""
    alphas = [1.0] if cfg.method == "grad_x_act" else [(k + 0.5) / cfg.ig_steps for k in range(cfg.ig_steps)]
    grads = sum(torch.stack(_per_token(lm, batch, a, True)[1], 1) for a in alphas) / len(alphas)  # [B, L, T, N]
    acts = torch.stack(_per_token(lm, batch, 1.0, False)[0], 1)  # [B, L, T, N]
    mask = batch.attention_mask.float()
    prompt = (batch.attention_mask.bool() & ~batch.target_mask).float()
    scores, act_sums = torch.zeros(acts[:, :, 0].shape), torch.zeros(acts[:, :, 0].shape)
    for t in range(acts.shape[2]):
        scores += acts[:, :, t] * grads[:, :, t] * mask[:, t, None, None]
        act_sums += acts[:, :, t] * prompt[:, t, None, None]
    return scores, act_sums


@pytest.mark.parametrize("cfg", METHODS, ids=["grad_x_act", "integrated_gradients"])
def test_scores_equal_the_per_token_computation(lm, cfg):
    batch = _batch(lm)
    scores, acts, count = _batch_scores(lm, batch, cfg)
    ref_scores, ref_acts = reference_scores(lm, batch, cfg)
    assert scores.device.type == acts.device.type == "cpu" and scores.dtype == torch.float32
    for got, want in ((scores, ref_scores), (acts, ref_acts)):
        scale = float(want.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale)
    assert count.tolist() == (batch.attention_mask.bool() & ~batch.target_mask).sum(1).tolist()


class LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor an operator returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [(str(func), t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def largest(self) -> int:
        return max(n for _, n in self.sizes)


@pytest.fixture(scope="module")
def deep_llama() -> LoadedModel:
    """8 layers, so all layers' per-token values are 8x a single layer's and stand apart from any tensor
    the model itself makes (attention scores, logits of the target positions)."""
    model, tok = tiny_model("llama", n_layers=8)
    nmap = neuron_map(model.requires_grad_(False))
    return LoadedModel(model, tok, "tiny-llama-8", fingerprint(model, nmap), nmap)


@pytest.mark.parametrize("cfg", METHODS, ids=["grad_x_act", "integrated_gradients"])
def test_no_tensor_of_all_layers_per_token_values(deep_llama, cfg):
    """Host memory stays O(layers x neurons) per batch: no operator returns a tensor with B*L*T*N elements.
    The same counter catches the per-token stack of the naive computation, so it would catch a return of it."""
    lm, batch = deep_llama, _batch(deep_llama)
    B, T = batch.input_ids.shape
    L, N = lm.shape
    per_token_all_layers = B * L * T * N
    with LargestTensor() as seen:
        _batch_scores(lm, batch, cfg)
    assert seen.largest() >= B * T * N  # it does see the per-layer activations and their gradients
    assert seen.largest() < per_token_all_layers, [s for s in seen.sizes if s[1] >= per_token_all_layers][:3]
    assert any("mm" in name for name, _ in seen.sizes)  # and the model's own matmuls (forward or backward)
    with LargestTensor() as naive:
        reference_scores(lm, batch, cfg)
    assert naive.largest() >= per_token_all_layers


def test_attribute_sums_match_the_reference_over_batches(tiny_gpt2):
    """Group sums over two batches (sizes 2 + 1) are the per-example reference scores added up."""
    lm = tiny_gpt2
    cfg = AttributionConfig(batch_size=2)
    out = attribute(lm, [chat_prompt(lm.tokenizer, p) for p in PROMPTS], list(TARGETS), cfg)
    ref = sum(reference_scores(lm, encode_pairs(lm.tokenizer, [chat_prompt(lm.tokenizer, p)], [t]), cfg)[0].sum(0)
              for p, t in zip(PROMPTS, TARGETS))
    torch.testing.assert_close(out.score, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_results_reach_the_host_in_order():
    """`cat_to_host` / `stack_to_host` equal torch.cat / torch.stack (order kept), on the CPU."""
    from neurontune.infra.devices import cat_to_host, stack_to_host
    parts = [torch.randn(2, k) for k in (3, 1, 4)]
    assert torch.equal(cat_to_host(parts, 1), torch.cat(parts, 1))
    same = [torch.randn(2, 3) for _ in range(4)]
    assert torch.equal(stack_to_host(same, 1), torch.stack(same, 1)) and stack_to_host(same).device.type == "cpu"
    with pytest.raises(ValueError):
        cat_to_host([])
