"""Does the folded switch's probe keep reading "harmful" while the model answers? (validation only.)

The switch runs on every token, but its probe was fitted on prompt ends (`method/switch_fit.py`). Here the shipped
run's export (its foldable modulation, hooked) and the base model answer the validation prompts of each group (16
tokens, greedy); the layer-15 MLP input is read at the prompt's end and at every answer token. Three probes read them:
the shipped switch's, the same fit again on the training pools, and a fit that also takes the base model's answer
tokens of the training prompts (harmful conversations positive, harmless negative). Printed: the share of prompt ends
and of answer tokens each fires on. Figures in docs/results.md ("Where the export's over-refusal comes from").

    python docs/switch_answers.py     # about 9 min on a 2-core CPU
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from neurontune.config import load_preset  # noqa: E402
from neurontune.data.chat import chat_prompt  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.infra.probes import fit_bias_free  # noqa: E402
from neurontune.interventions.capture import site_modules  # noqa: E402
from neurontune.interventions.generation import generate  # noqa: E402
from neurontune.interventions.hooks import scoped_pre_hooks  # noqa: E402
from neurontune.interventions.modulation import Modulation  # noqa: E402
from neurontune.method.switch_fit import SHARPNESS  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402
from switch_probe import validation_groups  # noqa: E402

RUN = Path(__file__).resolve().parents[1] / "assets" / "default_run"  # the shipped `balanced` run
N_ANSWER = 16


@torch.no_grad()
def read(lm, layer: int, texts: list[str], modulation: Modulation | None, batch: int = 16):
    """Per prompt: (MLP input at its end, at 4 earlier tokens drawn at random, at each answer token)."""
    prompts = [chat_prompt(lm.tokenizer, t) for t in texts]
    answers = generate(lm, texts, modulation, max_new_tokens=N_ANSWER, batch_size=batch)
    module, gen, out = site_modules(lm, "mlp_input")[layer], torch.Generator().manual_seed(0), []
    for s in range(0, len(prompts), batch):
        p_ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[s:s + batch]]
        a_ids = [lm.tokenizer(a, add_special_tokens=False)["input_ids"][:N_ANSWER] for a in answers[s:s + batch]]
        full = [p + a for p, a in zip(p_ids, a_ids)]
        width = max(map(len, full))
        ids = torch.zeros(len(full), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(full):
            ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), 1
        store = {}

        def hook(m, args):
            store["x"] = args[0].reshape(len(full), width, -1).float()
        with scoped_pre_hooks([(module, hook)]):
            lm.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                     logits_to_keep=1)
        for b in range(len(full)):
            start = width - len(full[b])
            end = start + len(p_ids[b]) - 1
            earlier = torch.arange(start, end)
            out.append((store["x"][b, end], store["x"][b, earlier[torch.randperm(len(earlier), generator=gen)[:4]]],
                        store["x"][b, end + 1:]))
    return out


def fit(pos, neg, with_answers: bool) -> torch.Tensor:
    """The switch's probe (its weights), optionally with answer tokens as further positives and negatives."""
    ends_p, ends_n = torch.stack([e for e, _, _ in pos]), torch.stack([e for e, _, _ in neg])
    tokens = torch.cat([t for _, t, _ in pos + neg])
    parts = [(ends_p, 1.0, 1.0), (ends_n, 0.0, 0.5), (tokens, 0.0, 0.5)]
    if with_answers:
        parts += [(torch.cat([a for _, _, a in pos]), 1.0, 1.0), (torch.cat([a for _, _, a in neg]), 0.0, 1.0)]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([torch.full((len(p[0]),), p[1]) for p in parts])
    w = torch.cat([torch.full((len(p[0]),), p[2] / len(p[0])) for p in parts])
    return fit_bias_free(x, y, w)


def main() -> None:
    lm = load_model("embedded")
    sp = build_splits(load_preset("balanced").data)
    mod = Modulation.load(RUN / "foldable.safetensors")
    layer = mod.switch.layer
    harmful, harmless = sp.harm_pools("train", 200, 16)
    pos, neg = read(lm, layer, harmful, None), read(lm, layer, harmless, None)
    groups = validation_groups(sp, cap=100)
    val = {g: {src: read(lm, layer, texts, m) for src, m in (("base", None), ("export", mod))} for g, texts in groups.items()}
    probes = {"shipped": mod.switch.gate_rows[0] / SHARPNESS, "refit, prompt ends": fit(pos, neg, False),
              "refit, with answer tokens": fit(pos, neg, True)}
    out = {}
    for name, w in probes.items():
        for src in ("base", "export"):
            row = {}
            for g in groups:
                items = val[g][src]
                ends = torch.stack([e for e, _, _ in items]) @ w
                answers = torch.cat([a for _, _, a in items]) @ w
                row[g] = {"ends": round(float((ends > 0).float().mean()), 2), "answer tokens": round(float((answers > 0).float().mean()), 2)}
            out[f"{name}, answers of the {src} model"] = row
            print(f"{name}, answers of the {src} model: {json.dumps(row)}", flush=True)


if __name__ == "__main__":
    main()
