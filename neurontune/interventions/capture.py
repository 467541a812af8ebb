"""One capture primitive: activations at the last token of formatted prompts, read in one unmodulated pass.

Four sites of a decoder layer can be read (`SITES`):
- "neurons": the MLP neurons, i.e. the input of the MLP output projection ([n_neurons] per layer): what the gains
  multiply, what the gate and the neuron card read;
- "mlp_input": the input of the MLP's input projection, after the layer norm ([d_model]): what a neuron's input-side
  term reads (`modulation.InputTerms`);
- "residual": the residual stream entering the decoder layer ([d_model]): what the refusal direction is made of;
- "attention_input": the input of the attention's value projection, after the layer norm ([d_model]; LLaMA family):
  what a key-value group rewritten into a turn mean averages (`turn_mean.TurnMean`).

Every reader of "the activations at the end of the prompt" (the input gate, the neuron card, the direction baseline,
the separability ceiling, the input terms' directions) goes through `read_ids`, so they all read the same token the
same way. With `pool_from=k` a reader gets instead the mean over each prompt's tokens from its k-th real token on
(k = `template_prefix_len`: the user's turn, without the chat template's fixed opening), what a gate that reads the
whole request rather than its last token uses; with `pool_last=w` as well, over the last w of those tokens only (the
end of the turn, where a request inside a long template usually sits). Hooks are scoped to the call (`hooks.scoped_pre_hooks`); the model is
never changed.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..data.chat import chat_prompt
from ..infra.devices import cat_to_host
from ..infra.progress import SILENT, Reporter
from ..model.logprobs import encode_pairs, last_token_index
from ..model.neuron_map import decoder_layers
from .generation import PROMPT_CAP, encode_left
from .hooks import scoped_pre_hooks

SITES = ("neurons", "mlp_input", "residual", "attention_input")


def site_modules(lm, site: str) -> list:
    """The module whose forward input is the site, one per layer."""
    if site == "neurons":
        return list(lm.nmap.projections)
    if site == "mlp_input":
        if not lm.nmap.input_projections:
            raise ValueError(f"'{lm.nmap.model_type}' models have no known MLP input projection (model/neuron_map.py INPUT_PROJECTIONS).")
        return list(lm.nmap.input_projections)
    if site == "residual":
        return list(decoder_layers(lm.model))
    if site == "attention_input":
        layers = decoder_layers(lm.model)
        if not all(hasattr(getattr(layer, "self_attn", None), "v_proj") for layer in layers):
            raise ValueError(f"'{lm.nmap.model_type}' models have no separate attention value projection to read.")
        return [layer.self_attn.v_proj for layer in layers]
    raise ValueError(f"Unknown capture site {site!r}; use one of {SITES}.")


def template_prefix_len(tokenizer) -> int:
    """Tokens every formatted prompt starts with (the chat template's system turn and user header): the common
    prefix of two prompts that differ from their first character on; 0 for a model without a chat template."""
    a, b = (tokenizer(chat_prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in ("x", "?"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def pool_weights(mask: torch.Tensor, pool_from: int, pool_last: int | None = None) -> torch.Tensor:
    """[B, T] weights of a mean over each left-padded row's real tokens from its `pool_from`-th on, or over the last
    `pool_last` of those (a row no longer than `pool_from` keeps its last token)."""
    first = mask.shape[1] - mask.sum(1, keepdim=True)  # index of each row's first real token
    pos = torch.arange(mask.shape[1]).unsqueeze(0)
    start = first + pool_from
    if pool_last is not None:
        start = torch.maximum(start, torch.full_like(start, mask.shape[1] - pool_last))
    w = ((pos >= start) & (mask > 0)).float()
    w[w.sum(1) == 0, -1] = 1.0
    return w / w.sum(1, keepdim=True)


@torch.no_grad()
def read_ids(lm, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor | None, site: str, layers: Sequence[int],
             index: dict[int, torch.Tensor] | None = None, pool_from: int | None = None,
             pool_last: int | None = None) -> dict[int, torch.Tensor]:
    """{layer: [B, k] float32} activations of `site` at position `last[b]` of each row (default: the final position,
    the end of a left-padded prompt), or with `pool_from` their mean over the row's tokens from that real token on
    (`pool_weights`; the last `pool_last` of them), left on the layer's device; `index[layer]` keeps only those units."""
    modules = site_modules(lm, site)
    last = torch.full((ids.shape[0],), ids.shape[1] - 1) if last is None else last
    if pool_last is not None and pool_from is None:
        raise ValueError("pool_last counts the last tokens of the pooled span: give pool_from as well.")
    weights = None if pool_from is None else pool_weights(mask, pool_from, pool_last)
    store: dict[int, torch.Tensor] = {}

    def make(layer: int):
        def hook(module, args):
            x = args[0]
            x = x.reshape(ids.shape[0], -1, x.shape[-1])  # OPT flattens [B, T, N] to [B*T, N]
            if weights is not None:
                picked = torch.einsum("bt,btn->bn", weights.to(x.device, torch.float32), x.float())
            else:
                picked = x[torch.arange(x.shape[0], device=x.device), last.to(x.device)]
            if index is not None:
                picked = picked.index_select(-1, index[layer].to(x.device))
            store[layer] = picked.float()
        return hook

    device = lm.model.get_input_embeddings().weight.device
    with scoped_pre_hooks([(modules[layer], make(layer)) for layer in layers]):
        lm.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                 position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False, logits_to_keep=1)
    return store


def iter_last_token(lm, texts: Sequence[str], site: str = "neurons", *, layers: Sequence[int] | None = None,
                    index: dict[int, torch.Tensor] | None = None, targets: Sequence[str] | None = None,
                    batch_size: int = 16, max_length: int = PROMPT_CAP, reporter: Reporter | None = None,
                    stage: str = "reading activations", pool_from: int | None = None,
                    pool_last: int | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Per batch of formatted prompts, `read_ids` at each row's last token: the prompt's end, or with `targets` the
    last token of prompt + target, or with `pool_from` the prompt's mean from that token on. Layers: every layer,
    `layers`, or those of `index`."""
    if pool_from is not None and targets is not None:
        raise ValueError("A pooled read covers the prompt alone: pass targets or pool_from, not both.")
    reporter = reporter or SILENT
    n_layers = len(site_modules(lm, site))
    wanted = sorted(int(l) for l in (index if index is not None else (layers if layers is not None else range(n_layers))))
    for start in range(0, len(texts), batch_size):
        reporter.check("Reading activations")
        chunk = list(texts[start:start + batch_size])
        if targets is None:
            ids, mask = encode_left(lm.tokenizer, chunk, max_length)
            last = None
        else:
            batch = encode_pairs(lm.tokenizer, chunk, list(targets[start:start + batch_size]), max_length)
            ids, mask, last = batch.input_ids, batch.attention_mask, last_token_index(batch)
        yield read_ids(lm, ids, mask, last, site, wanted, index, pool_from, pool_last)
        reporter.progress(min(start + batch_size, len(texts)), len(texts), stage)


def last_token(lm, texts: Sequence[str], site: str = "neurons", *, layers: Sequence[int] | None = None,
               targets: Sequence[str] | None = None, batch_size: int = 16, max_length: int = PROMPT_CAP,
               dtype: torch.dtype = torch.float32, reporter: Reporter | None = None,
               pool_from: int | None = None, pool_last: int | None = None) -> torch.Tensor:
    """[n, n_layers_read, width] activations of `site` at each formatted prompt's last token (or pooled from
    `pool_from`, as `read_ids`) (every layer, or `layers` in ascending order), on the host in `dtype`."""
    parts = []
    for store in iter_last_token(lm, texts, site, layers=layers, targets=targets, batch_size=batch_size,
                                 max_length=max_length, reporter=reporter, pool_from=pool_from, pool_last=pool_last):
        parts.append(torch.stack([x.to("cpu") for _, x in sorted(store.items())], 1).to(dtype))
    return torch.cat(parts)


def unit_features(lm, texts: Sequence[str] | None, layers: torch.Tensor, units: torch.Tensor, *, site: str = "neurons",
                  ids: tuple[torch.Tensor, torch.Tensor] | None = None, batch_size: int = 16, max_length: int = PROMPT_CAP,
                  reporter: Reporter | None = None, pool_from: int | None = None,
                  pool_last: int | None = None) -> torch.Tensor:
    """[n, k] the units (layers[i], units[i]) of `site` at each formatted prompt's last token, or pooled from
    `pool_from` (as `read_ids`), of the prompts or of the left-padded `ids` = (input ids, mask) of one forward: what a
    gate reads. Each hook keeps only its layer's units; the pieces reach the host once per batch and device."""
    needed = sorted(set(layers.tolist()))
    picks = {layer: (layers == layer).nonzero().flatten() for layer in needed}  # layer -> positions in the feature vector
    index = {layer: units[picks[layer]] for layer in needed}
    order = torch.cat([picks[layer] for layer in needed])
    stores = ([read_ids(lm, ids[0], ids[1], None, site, needed, index, pool_from, pool_last)] if ids is not None else
              iter_last_token(lm, texts, site, index=index, batch_size=batch_size, max_length=max_length, reporter=reporter,
                              pool_from=pool_from, pool_last=pool_last))
    out = []
    for store in stores:
        feats = torch.empty(next(iter(store.values())).shape[0], len(layers))
        feats[:, order] = cat_to_host([store[layer] for layer in needed], 1)
        out.append(feats)
    return torch.cat(out) if out else torch.zeros(0, len(layers))


@torch.no_grad()
def last_and_sampled(lm, texts: Sequence[str], site: str, layers: Sequence[int], *, per_prompt: int = 4, seed: int = 0,
                     batch_size: int = 16, max_length: int = PROMPT_CAP,
                     running_mean: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """({layer: [n, width]} at each formatted prompt's last token, {layer: [m, width]} at up to `per_prompt` of its other
    real tokens drawn at random), on the host, in one pass: the end of a prompt and a sample of what came before it,
    what a reader that runs on every token (the folded switch) must tell apart. With `running_mean`, each token's value
    is the mean of the site over the prompt's real tokens up to it (what a zero-query attention head computes)."""
    modules = site_modules(lm, site)
    wanted = sorted(int(l) for l in layers)
    gen = torch.Generator().manual_seed(seed)
    last: dict[int, list] = {l: [] for l in wanted}
    sampled: dict[int, list] = {l: [] for l in wanted}
    device = lm.model.get_input_embeddings().weight.device
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_left(lm.tokenizer, list(texts[start:start + batch_size]), max_length)
        earlier = mask.bool().clone()
        earlier[:, -1] = False
        picks = []
        for b in range(len(ids)):
            pos = earlier[b].nonzero().flatten()
            picks += [(b, int(p)) for p in pos[torch.randperm(len(pos), generator=gen)[:per_prompt]]]
        rows, cols = (torch.tensor([p[i] for p in picks], dtype=torch.long) for i in (0, 1))
        store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def make(layer: int):
            def hook(module, args):
                x = args[0].reshape(ids.shape[0], -1, args[0].shape[-1])
                if running_mean:
                    m = mask.to(x.device, torch.float32)[..., None]
                    x = (x.float() * m).cumsum(1) / m.cumsum(1).clamp(min=1)
                store[layer] = (x[:, -1].float().cpu(), x[rows.to(x.device), cols.to(x.device)].float().cpu())
            return hook
        with scoped_pre_hooks([(modules[l], make(l)) for l in wanted]):
            lm.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False, logits_to_keep=1)
        for layer in wanted:
            last[layer].append(store[layer][0])
            sampled[layer].append(store[layer][1])
    return {l: torch.cat(v) for l, v in last.items()}, {l: torch.cat(v) for l, v in sampled.items()}
