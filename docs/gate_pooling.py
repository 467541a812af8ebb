"""Mean or max over the user's turn, with or without more training families? The leave-one-family-out gate study
(`docs/gate_lofo.py`) for three poolings of the residual stream (validation only; held-out test families never read).

Each prompt's residual stream entering layers 14, 18 and 22 is read once per token (one scoped hook per layer) and
pooled three ways over the user's turn: the mean (what `meta.gate_features: "residual_mean"` reads), the max per
dimension, and both side by side. For each training family F left out (and, second, with the four extra families
added to every fit, the attack prompts per fit kept as many), the probe and its layer are chosen as the gate's fit
chooses them (`best_layer_probe`), then read inside F. Prints one row per (extras, pooling, F) and the means.

    python docs/gate_pooling.py      # about 10 min on a 2-core CPU
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurontune.config import load_preset  # noqa: E402
from neurontune.data.chat import chat_prompt  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.infra.probes import recall_at_fpr, roc_auc  # noqa: E402
from neurontune.interventions.capture import pool_weights, site_modules, template_prefix_len  # noqa: E402
from neurontune.interventions.generation import PROMPT_CAP, encode_left  # noqa: E402
from neurontune.interventions.hooks import scoped_pre_hooks  # noqa: E402
from neurontune.method.gate_fit import best_layer_probe  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402

LAYERS = [14, 18, 22]
EXTRA = ("translation", "format_constraint", "distractor", "emotional_pressure")
POOLINGS = ("mean", "max", "mean+max")


def main() -> None:
    lm, cfg = load_model("embedded"), load_preset("balanced")
    full = build_splits(cfg.data)
    families, first = list(cfg.data.train_families), template_prefix_len(lm.tokenizer)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def read(texts: list[str]) -> None:
        todo, modules = [t for t in dict.fromkeys(texts) if t not in cache], site_modules(lm, "residual")
        for start in range(0, len(todo), 16):
            chunk = todo[start:start + 16]
            ids, mask = encode_left(lm.tokenizer, [chat_prompt(lm.tokenizer, t) for t in chunk], PROMPT_CAP)
            w = pool_weights(mask, first)
            store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

            def make(layer: int):
                def hook(module, args):
                    x = args[0].float()
                    store[layer] = (torch.einsum("bt,btn->bn", w, x), x.masked_fill(~(w > 0).unsqueeze(-1), -1e9).max(1).values)
                return hook

            with scoped_pre_hooks([(modules[layer], make(layer)) for layer in LAYERS]):
                lm.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=False, logits_to_keep=1)
            for b, t in enumerate(chunk):
                cache[t] = {"mean": torch.stack([store[layer][0][b] for layer in LAYERS]),
                            "max": torch.stack([store[layer][1][b] for layer in LAYERS])}

    def feats(texts: list[str], pooling: str) -> torch.Tensor:
        if pooling == "mean+max":
            return torch.cat([feats(texts, "mean"), feats(texts, "max")], -1)
        return torch.stack([cache[t][pooling] for t in texts])

    text = lambda prompts: [p.text for p in prompts]  # noqa: E731
    plain_pos = text(full.harmful["validation"]) + text(full.contrast["validation"])
    alarming, benign = text(full.alarming["validation"]), text(full.benign["validation"])
    plain_neg = benign + text(full.borderline["validation"]) + alarming
    rows = []
    for extra in ((), EXTRA):
        for held in families:
            kept = tuple(f for f in families if f != held) + extra
            splits = build_splits(cfg.replace(data={"train_families": kept}).data)
            tp, tn = splits.harm_pools("train", 400, 40 * (len(families) - 1) // len(kept))
            vp, vn = splits.harm_pools("validation", 48, max(1, 24 // len(kept)))
            fp = text(full.attacked("harmful", "validation", 48, (held,)))
            fn = text(full.attacked("benign", "validation", 24, (held,))) + text(full.attacked("borderline", "validation", 12, (held,)))
            read(tp + tn + vp + vn + fp + fn + plain_pos + plain_neg)
            y = torch.tensor([1.0] * len(tp) + [0.0] * len(tn))
            for pooling in POOLINGS:
                auc, i, (mean, std, w, b) = best_layer_probe(feats(tp + tn, pooling), y, feats(vp + vn, pooling), len(vp))
                logit = lambda texts: ((feats(texts, pooling)[:, i] - mean) / std) @ w + b  # noqa: E731
                opens = lambda texts: round(float((torch.sigmoid(3 * logit(texts)) > 0.5).float().mean()), 3)  # noqa: E731
                z_f, z_neg = logit(fp), logit(plain_neg + fn)
                row = {"extra": bool(extra), "pooling": pooling, "left_out": held, "layer": LAYERS[i], "val_auc": round(auc, 3),
                       "left_out_auc": round(roc_auc(z_f, z_neg), 3), "left_out_recall@5%": round(recall_at_fpr(z_f, z_neg, 0.05)[0], 3),
                       "opens_harmful_in_F": opens(fp), "opens_harmless_in_F": opens(fn), "opens_plain_harmful": opens(plain_pos),
                       "opens_benign": opens(benign), "opens_alarming": opens(alarming)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(pd.DataFrame(rows).groupby(["extra", "pooling"]).mean(numeric_only=True).round(3).to_string())


if __name__ == "__main__":
    main()
