"""Does the gate open inside an attack family it never saw? Leave each training family out in turn (validation only).

For each training attack family F: the gate's probe is fitted on the training pools without F (`Splits.harm_pools`),
its layer chosen on the validation pools without F, then it reads the validation prompts inside F (harmful: should
open; benign and borderline: should not) and the plain validation prompts. Compared: what the gate reads
(`meta.gate_features`: "residual", the prompt's last token; "residual_mean", the mean over the user's turn;
"residual_tail", the mean over its last 32 tokens; "layer", a whole layer's MLP neurons at the last token;
"amplified", the 256 highest-ranked safety neurons of the shipped run's selection at the last token, what a gate-first
"amplified" gate reads before training; attribution saw every training family, a leak in its favour). Held-out
test families are never read. Prints one row per (F, features) and a mean row; `--json PATH` keeps them.

    python docs/gate_lofo.py                  # about 10 min on a 2-core CPU
    python docs/gate_lofo.py --features amplified,layer --sharpness 6   # the other readings of item 1 (~10 min)
    python docs/gate_lofo.py --features residual_mean \
        --extra-families translation,format_constraint,distractor,emotional_pressure   # does variety help? (~6 min)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurontune.config import load_preset  # noqa: E402
from neurontune.data.chat import chat_prompt  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.infra.probes import recall_at_fpr, roc_auc  # noqa: E402
from neurontune.interventions.capture import last_token, template_prefix_len, unit_features  # noqa: E402
from neurontune.method.gate_fit import LAYER_SITES, POOL_LAST, amplified_neurons, best_layer_probe  # noqa: E402
from neurontune.method.selection import select  # noqa: E402
from neurontune.run.folder import RunFolder  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402

LAYERS = list(range(8, 28, 2))  # candidate layers (every second one from 8 to 26 on SmolLM2-135M's 30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--features", default="residual,residual_mean")
    ap.add_argument("--sharpness", type=float, default=3.0, help="the preset's gate sharpness (s = sigmoid(sharpness × logit))")
    ap.add_argument("--extra-families", default="", help="comma-separated families added to every fit (never left out); "
                    "the attack prompts per fit stay as many as without them (fewer per family)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = load_model("embedded")
    cfg = load_preset(args.preset)
    full = build_splits(cfg.data)
    families = list(cfg.data.train_families)
    extra = tuple(f for f in args.extra_families.split(",") if f)
    reads: dict[tuple[str, str], torch.Tensor] = {}

    picked = None
    if "amplified" in args.features:
        picked = amplified_neurons(select(RunFolder("assets/default_run").scores(), cfg.selection))

    def read(texts: list[str], features: str) -> torch.Tensor:
        """[n, len(LAYERS), d] what the gate reads (amplified: [n, 1, 256]), every prompt read once per feature kind."""
        todo = [t for t in dict.fromkeys(texts) if (features, t) not in reads]
        if todo and features == "amplified":
            x = unit_features(lm, [chat_prompt(lm.tokenizer, t) for t in todo], *picked)[:, None, :]
        elif todo:
            site, pooled = LAYER_SITES[features]
            x = last_token(lm, [chat_prompt(lm.tokenizer, t) for t in todo], site, layers=LAYERS,
                           pool_from=template_prefix_len(lm.tokenizer) if pooled else None, pool_last=POOL_LAST.get(features))
        if todo:
            reads.update({(features, t): row for t, row in zip(todo, x)})
        return torch.stack([reads[(features, t)] for t in texts])

    text = lambda prompts: [p.text for p in prompts]  # noqa: E731
    plain_pos = text(full.harmful["validation"]) + text(full.contrast["validation"])
    alarming, benign = text(full.alarming["validation"]), text(full.benign["validation"])
    plain_neg = benign + text(full.borderline["validation"]) + alarming
    rows = []
    for features in args.features.split(","):
        for held in families:
            kept = tuple(f for f in families if f != held) + extra
            per = 40 * (len(families) - 1) // len(kept)  # the same number of attack prompts, spread over more families
            splits = build_splits(cfg.replace(data={"train_families": kept}).data)
            tp, tn = splits.harm_pools("train", 400, per)
            vp, vn = splits.harm_pools("validation", 48, max(1, 6 * (len(families) - 1) // len(kept)))
            fp = text(full.attacked("harmful", "validation", 48, (held,)))
            fn = text(full.attacked("benign", "validation", 24, (held,))) + text(full.attacked("borderline", "validation", 12, (held,)))
            x, xv = read(tp + tn, features), read(vp + vn, features)
            y = torch.tensor([1.0] * len(tp) + [0.0] * len(tn))
            auc, i, (mean, std, w, b) = best_layer_probe(x, y, xv, len(vp))
            logit = lambda texts: ((read(texts, features)[:, i] - mean) / std) @ w + b  # noqa: E731
            opens = lambda texts: float((torch.sigmoid(args.sharpness * logit(texts)) > 0.5).float().mean())  # noqa: E731
            z_f, z_neg = logit(fp), logit(plain_neg + fn)
            row = {"features": features, "extra": ",".join(extra), "left_out": held,
                   "layer": "selected" if features == "amplified" else LAYERS[i], "val_auc": round(auc, 3),
                   "left_out_auc": round(roc_auc(z_f, z_neg), 3), "left_out_recall@5%": round(recall_at_fpr(z_f, z_neg, 0.05)[0], 3),
                   "opens_harmful_in_F": round(opens(fp), 3), "opens_harmless_in_F": round(opens(fn), 3),
                   "opens_plain_harmful": round(opens(plain_pos), 3), "opens_benign": round(opens(benign), 3),
                   "opens_alarming": round(opens(alarming), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        mine = [r for r in rows if r["features"] == features]
        mean_row = {k: round(sum(r[k] for r in mine) / len(mine), 3) for k in mine[0] if k not in ("features", "extra", "left_out", "layer")}
        print(json.dumps({"features": features, "extra": ",".join(extra), "left_out": "mean", **mean_row}), flush=True)
        rows.append({"features": features, "extra": ",".join(extra), "left_out": "mean", **mean_row})
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
