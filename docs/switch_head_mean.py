"""Could a folded switch read the whole turn? (validation only; no head is changed, no generation.)

An attention head whose query rows are zero scores every earlier position alike, so it outputs the running mean of
its values over the prompt so far: a whole-turn mean made of existing weights. On this model a query head shares its
values with two others (9 query heads, 3 key-value heads of 64 dims), so what such a head could average is one
key-value head's 64 value dims. Here those running means are captured at layers 4, 8, 12 and 15, and bias-free
probes (an explicit constant feature) are fitted on the training harm pools as the switch's is: on the running mean
alone, and on the mean beside the prompt end's layer-15 MLP input (the switch's reading); each is read on validation
where it fires on 0.90 of the training-attack prompts.
Then the same for the running mean of a whole layer's attention input (576 dims, system prompt included: what a
key-value group of three zero-query heads with rewritten values could average), beside the mean over the user's turn
only (what the gate reads, which no head computes), and what giving up each key-value group of those layers costs in
perplexity on the base model's own answers to 48 validation benign prompts. Figures in docs/results.md ("Where the
export's over-refusal comes from").

    python docs/switch_head_mean.py     # about 7 min on a 2-core CPU
"""
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from neurontune.config import load_preset  # noqa: E402
from neurontune.data.chat import chat_prompt  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.infra.probes import fit_bias_free, roc_auc  # noqa: E402
from neurontune.interventions.capture import site_modules, template_prefix_len  # noqa: E402
from neurontune.interventions.generation import encode_left  # noqa: E402
from neurontune.interventions.hooks import scoped_pre_hooks  # noqa: E402
from neurontune.method.switch_fit import PER_FAMILY, PROMPTS, group_costs  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402
from neurontune.model.neuron_map import decoder_layers  # noqa: E402
from switch_probe import validation_groups  # noqa: E402

HEAD_LAYERS = (4, 8, 12, 15)
MEAN_LAYERS = (8, 12, 15)
SWITCH_LAYER = 15
HEAD_DIM = 64
SCALE = 10.0  # the value means' scale against the MLP input's


@torch.no_grad()
def capture(lm, texts, per_prompt: int = 4, seed: int = 0):
    """(MLP input at each prompt's end, at 4 earlier tokens; per head layer: the running mean of the values there)."""
    gen = torch.Generator().manual_seed(seed)
    ends, toks = [], []
    mend = {layer: [] for layer in HEAD_LAYERS}
    mtok = {layer: [] for layer in HEAD_LAYERS}
    lmean = {layer: {"all": [], "tok": [], "user": []} for layer in MEAN_LAYERS}
    prefix = template_prefix_len(lm.tokenizer)
    mlp_in = site_modules(lm, "mlp_input")[SWITCH_LAYER]
    for s in range(0, len(texts), 16):
        ids, mask = encode_left(lm.tokenizer, [chat_prompt(lm.tokenizer, t) for t in texts[s:s + 16]], 512)
        store, values = {}, {}

        def pre(module, args):
            store["x"] = args[0].float()
        handles = [decoder_layers(lm.model)[layer].self_attn.v_proj.register_forward_hook(
            lambda module, args, out, layer=layer: values.__setitem__(layer, out.float())) for layer in HEAD_LAYERS]
        handles += [decoder_layers(lm.model)[layer].input_layernorm.register_forward_hook(
            lambda module, args, out, layer=layer: values.__setitem__(("in", layer), out.float())) for layer in MEAN_LAYERS]
        try:
            with scoped_pre_hooks([(mlp_in, pre)]):
                lm.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        m = mask.float()
        count = m.cumsum(1).clamp(min=1)
        for b in range(len(ids)):
            pos = mask[b].nonzero().flatten()[:-1]
            pick = pos[torch.randperm(len(pos), generator=gen)[:per_prompt]]
            ends.append(store["x"][b, -1])
            toks.append(store["x"][b, pick])
            for layer in HEAD_LAYERS:
                running = (values[layer][b] * m[b, :, None]).cumsum(0) / count[b, :, None]
                mend[layer].append(running[-1])
                mtok[layer].append(running[pick])
            start = int(pos[0]) if len(pos) else int(mask[b].nonzero()[0])
            for layer in MEAN_LAYERS:
                x = values[("in", layer)][b]
                running = (x * m[b, :, None]).cumsum(0) / count[b, :, None]
                lmean[layer]["all"].append(running[-1])
                lmean[layer]["tok"].append(running[pick])
                # the user's text: after the template's prefix, before "<|im_end|>\n<|im_start|>assistant\n"
                user = x[start + prefix: -5]
                lmean[layer]["user"].append(user.mean(0) if len(user) else x[-1])
    return (torch.stack(ends), torch.cat(toks), {k: torch.stack(v) for k, v in mend.items()},
            {k: torch.cat(v) for k, v in mtok.items()},
            {k: {part: torch.stack(v) if part != "tok" else torch.cat(v) for part, v in d.items()} for k, d in lmean.items()})


def features(captured, layer: int, which: str, head: int = 0):
    """(prompt ends' features, earlier tokens' features or None), each with a constant 1: the switch's reading ("end"),
    one head's value mean ("mean"), a layer's running mean ("all") or its mean over the user's turn ("user", which has
    no running form, so no earlier tokens)."""
    end, tok, mend, mtok, lmean = captured
    dims = slice(HEAD_DIM * head, HEAD_DIM * (head + 1))
    parts = {"end": lambda: (end, tok),
             "mean": lambda: (SCALE * mend[layer][:, dims], SCALE * mtok[layer][:, dims]),
             "all": lambda: (lmean[layer]["all"], lmean[layer]["tok"]),
             "user": lambda: (lmean[layer]["user"], None)}
    chosen = [parts[name]() for name in which.split("+")]
    ends = torch.cat([e for e, _ in chosen] + [torch.ones(len(chosen[0][0]), 1)], 1)
    if any(t is None for _, t in chosen):
        return ends, None
    return ends, torch.cat([t for _, t in chosen] + [torch.ones(len(chosen[0][1]), 1)], 1)


def perplexity_without_groups(lm, prompts: list[str]) -> dict[int, list[float]]:
    """{layer: [perplexity ratio with key-value group g's three query heads removed, for each g]} on the base model's
    own 32-token answers (`switch_fit.group_costs`, what the turn mean's fit chooses its group by)."""
    texts = [chat_prompt(lm.tokenizer, p) for p in prompts]
    return {layer: [round(c, 3) for c in group_costs(lm, layer, texts, tokens=32)] for layer in MEAN_LAYERS}


def main() -> None:
    lm = load_model("embedded")
    sp = build_splits(load_preset("balanced").data)
    harmful, harmless = sp.harm_pools("train", PROMPTS, PER_FAMILY)
    pos, neg = capture(lm, harmful), capture(lm, harmless)
    groups = validation_groups(sp)
    val = {g: capture(lm, t) for g, t in groups.items()}

    def run(label: str, layer: int, which: str, head: int = 0) -> None:
        """Fit the probe on train (prompt ends, and earlier tokens where the reading has them), read validation where
        it fires on 0.90 of the training-attack prompts."""
        pe, pt = features(pos, layer, which, head)
        ne, nt = features(neg, layer, which, head)
        parts = [(pe, 1.0, 1.0), (ne, 0.0, 0.5 if pt is not None else 1.0)]
        if pt is not None:
            parts.append((torch.cat([pt, nt]), 0.0, 0.5))
        w = fit_bias_free(torch.cat([p[0] for p in parts]), torch.cat([torch.full((len(p[0]),), p[1]) for p in parts]),
                          torch.cat([torch.full((len(p[0]),), p[2] / len(p[0])) for p in parts]))
        z = {g: features(val[g], layer, which, head)[0] @ w for g in groups}
        att = z["attacks"].sort(descending=True).values
        t = float(att[int(0.9 * len(att)) - 1]) - 1e-6
        rates = {g: round(float((v > t).float().mean()), 3) for g, v in z.items()}
        if pt is not None:
            zt = torch.cat([features(val[g], layer, which, head)[1] for g in groups]) @ w
            rates["earlier tokens"] = round(float((zt > t).float().mean()), 4)
        rates["auc harmful vs alarming"] = round(roc_auc(z["harmful"], z["alarming"]), 3)
        print(f"{label}: {json.dumps(rates)}", flush=True)

    run("prompt end only", HEAD_LAYERS[0], "end")
    for layer in HEAD_LAYERS:
        for head in range(3):
            run(f"mean, value head {head} of layer {layer}", layer, "mean", head)
            run(f"end+mean, value head {head} of layer {layer}", layer, "end+mean", head)
    for layer in MEAN_LAYERS:
        for which in ("user", "all", "end+all"):
            run(f"{which}, layer {layer}'s attention input", layer, which)
    costs = perplexity_without_groups(lm, [p.text for p in sp.benign["validation"]][:48])
    for layer, ratios in costs.items():
        print(f"perplexity ratio without one key-value group of layer {layer} (groups 0, 1, 2): {ratios}", flush=True)


if __name__ == "__main__":
    main()
