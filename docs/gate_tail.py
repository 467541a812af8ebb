"""How much of the user's turn should the gate average? The leave-one-family-out gate study (`docs/gate_lofo.py`) for
the mean over the whole turn against the mean over its last 24, 32 or 48 tokens, both means side by side in one
probe, and the larger of the whole-turn and last-32 probes' logits (`meta.gate_features: "residual_either"`)
(validation only; held-out test families never read).

Each prompt's residual stream entering layer 18 (the layer every pooled fit of `docs/gate_lofo.py` chose) is read once
per token of the user's turn; for each training family F left out, one probe per reading is fitted on the training
pools without F (`best_layer_probe`) and read inside F, on the plain validation prompts and on benign requests inside
the remaining training families. Prints one row per (reading, F) and the means.

    python docs/gate_tail.py      # about 3 to 10 min on a 2-core CPU
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

LAYER = 18
TAILS = (None, 24, 32, 48)  # None: the whole turn


def main() -> None:
    lm, cfg = load_model("embedded"), load_preset("balanced")
    full = build_splits(cfg.data)
    families, first = list(cfg.data.train_families), template_prefix_len(lm.tokenizer)
    turns: dict[str, torch.Tensor] = {}  # prompt -> [tokens of the user's turn, d] at LAYER

    @torch.no_grad()
    def read(texts: list[str]) -> None:
        todo, module = [t for t in dict.fromkeys(texts) if t not in turns], site_modules(lm, "residual")[LAYER]
        for start in range(0, len(todo), 16):
            chunk = todo[start:start + 16]
            ids, mask = encode_left(lm.tokenizer, [chat_prompt(lm.tokenizer, t) for t in chunk], PROMPT_CAP)
            keep, store = pool_weights(mask, first) > 0, {}
            with scoped_pre_hooks([(module, lambda m, args: store.__setitem__("x", args[0].float()))]):
                lm.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=False, logits_to_keep=1)
            for b, t in enumerate(chunk):
                turns[t] = store["x"][b][keep[b]].half()

    def feats(texts: list[str], tail: int | None) -> torch.Tensor:
        return torch.stack([(turns[t].float() if tail is None else turns[t].float()[-tail:]).mean(0) for t in texts])

    text = lambda prompts: [p.text for p in prompts]  # noqa: E731
    plain_pos = text(full.harmful["validation"]) + text(full.contrast["validation"])
    alarming, benign = text(full.alarming["validation"]), text(full.benign["validation"])
    borderline = text(full.borderline["validation"])
    plain_neg = benign + borderline + alarming
    rows = []
    for held in families:
        kept = tuple(f for f in families if f != held)
        splits = build_splits(cfg.replace(data={"train_families": kept}).data)
        tp, tn = splits.harm_pools("train", 400, 40)
        vp, vn = splits.harm_pools("validation", 48, 6)
        fp = text(full.attacked("harmful", "validation", 48, (held,)))
        fn = text(full.attacked("benign", "validation", 24, (held,))) + text(full.attacked("borderline", "validation", 12, (held,)))
        templates = text(splits.attacked("benign", "validation", 24, kept))
        read(tp + tn + vp + vn + fp + fn + plain_pos + plain_neg + templates)
        y = torch.tensor([1.0] * len(tp) + [0.0] * len(tn))
        probes = {}
        for tail in TAILS:
            auc, _, (mean, std, w, b) = best_layer_probe(feats(tp + tn, tail)[:, None], y, feats(vp + vn, tail)[:, None], len(vp))
            probes["whole turn" if tail is None else f"last {tail}"] = (
                auc, lambda texts, tail=tail, mean=mean, std=std, w=w, b=b: ((feats(texts, tail) - mean) / std) @ w + b)
        both = lambda texts: torch.cat([feats(texts, None), feats(texts, 32)], -1)  # noqa: E731
        auc, _, (mean, std, w, b) = best_layer_probe(both(tp + tn)[:, None], y, both(vp + vn)[:, None], len(vp))
        probes["both side by side"] = (auc, lambda texts: ((both(texts) - mean) / std) @ w + b)
        whole, last = probes["whole turn"][1], probes["last 32"][1]
        probes["either (residual_either)"] = (float("nan"), lambda texts: torch.maximum(whole(texts), last(texts)))
        for reads, (auc, logit) in probes.items():
            opens = lambda texts: round(float((torch.sigmoid(3 * logit(texts)) > 0.5).float().mean()), 3)  # noqa: E731
            z_f, z_neg = logit(fp), logit(plain_neg + fn)
            row = {"reads": reads, "left_out": held, "val_auc": round(auc, 3),
                   "left_out_auc": round(roc_auc(z_f, z_neg), 3), "left_out_recall@5%": round(recall_at_fpr(z_f, z_neg, 0.05)[0], 3),
                   "opens_harmful_in_F": opens(fp), "opens_harmless_in_F": opens(fn), "opens_plain_harmful": opens(plain_pos),
                   "opens_benign": opens(benign), "opens_alarming": opens(alarming), "opens_borderline": opens(borderline),
                   "opens_benign_in_training_templates": opens(templates)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(pd.DataFrame(rows).groupby("reads").mean(numeric_only=True).round(3).to_string())


if __name__ == "__main__":
    main()
