"""Where does the folded switch's probe fire on the validation split? (validation only; no generation.)

The probe of `method/switch_fit.py` (bias-free, the MLP input at a prompt's last token, fitted on the training harm
pools with every earlier token as a further negative) is refitted at each layer given, as shipped and with the
alarming-word negatives weighted ×3 and ×10 (`--weights`: the templated harmless prompts too); it then reads the ends of the validation prompts of each group. The switch
fires where the probe's logit exceeds `fold.switch_threshold` (default 0): rates at thresholds 0.5–3 are printed too.
`--ramps` also fits a nonlinear probe of the same input, sum_i c_i clamp(g_i.x + b_i, 0, T) + b (what 2H rewritten
neurons of one layer could compute, or H neurons of one layer feeding the switch of the next), H = 4, 16, 64, and
prints its firing at its own boundary and where it fires on 0.90 of the training-attack prompts (the linear probe's
rate at layer 15), with the share of earlier tokens of the validation prompts it fires on. `--pairs` prints where the
shipped probes of two layers both fire (what a switch could compute if it also read the flag of an earlier one).
Figures in docs/results.md ("Where the export's over-refusal comes from").

    python docs/switch_probe.py                  # layers 12, 15, 18, 21: about 4 min on a 2-core CPU
    python docs/switch_probe.py --layers 12,14,15 --ramps
    python docs/switch_probe.py --layers 8,10,12,13,14,15,21 --pairs   # both probes of a pair must fire (AND)
    python docs/switch_probe.py --layers 15 --weights 1:3,3:3,2:2,5:5    # the templated harmless prompts weighted too
    python docs/switch_probe.py --curve 15   # layer 15 fitted on fewer or more training prompts: would more data help?
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neurontune.config import load_preset  # noqa: E402
from neurontune.data.chat import chat_prompt  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.infra.probes import fit_bias_free, roc_auc  # noqa: E402
from neurontune.interventions.capture import last_and_sampled  # noqa: E402
from neurontune.method.switch_fit import PER_FAMILY, PROMPTS, _probe  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402

THRESHOLDS = (0.5, 1.0, 1.5, 2.0, 3.0)
CLAMP = 4.0  # the ramps' saturation, as the switch's


def validation_groups(sp, cap: int | None = None) -> dict[str, list[str]]:
    """The validation prompts each switch study reads, by group (`cap`: at most that many harmful and benign)."""
    return {"harmful": [p.text for p in sp.harmful["validation"]][:cap],
            "twins": [p.text for p in sp.contrast["validation"]],
            "attacks": [p.text for p in sp.attacked("harmful", "validation", 6, sp.train_families)],
            "benign": [p.text for p in sp.benign["validation"]][:cap],
            "borderline": [p.text for p in sp.borderline["validation"]],
            "alarming": [p.text for p in sp.alarming["validation"]],
            "templates": [p.text for p in sp.attacked("benign", "validation", 3, sp.train_families)]}


def _ramp(z: torch.Tensor) -> torch.Tensor:
    return F.silu(z) - F.silu(z - CLAMP)  # about clamp(z, 0, T): what two SiLU neurons compute


def fit_ramps(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, hidden: int, wd: float, steps: int = 600):
    """A weighted logistic fit of sum_i c_i ramp(g_i.x + b_i) + b (Adam, seed 0); returns the scoring function."""
    torch.manual_seed(0)
    d = x.shape[1]
    s = x.pow(2).mean().sqrt()
    xs = x / s
    g = (torch.randn(hidden, d) / d ** 0.5).requires_grad_()
    gb = torch.zeros(hidden, requires_grad=True)
    c = (torch.randn(hidden) * 0.1).requires_grad_()
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([g, gb, c, b], lr=1e-2)
    wn = weight / weight.sum()
    for _ in range(steps):
        opt.zero_grad()
        z = _ramp(xs @ g.T + gb) @ c + b
        loss = (F.binary_cross_entropy_with_logits(z, y, reduction="none") * wn).sum() + wd * g.pow(2).sum()
        loss.backward()
        opt.step()
    g, gb, c, b = (t.detach() for t in (g, gb, c, b))
    return lambda v: _ramp((v / s) @ g.T + gb) @ c + b


def learning_curve(layer: int) -> None:
    """The shipped probe's firing on the validation groups when fitted on fewer or more training prompts (alarming-word
    pairs, plain harmful requests); every fit shares one sample of earlier tokens. "alarming@attacks 0.9": alarming
    words over the threshold at which the probe fires on 0.90 of the training-attack prompts (the shipped rate)."""
    lm = load_model("embedded")
    sp = build_splits(load_preset("balanced").data)
    fmt = lambda texts: [chat_prompt(lm.tokenizer, t) for t in texts]  # noqa: E731
    harmful, harmless = sp.harm_pools("train", len(sp.harmful["train"]), PER_FAMILY, pairs=len(sp.alarming["train"]))
    texts = list(dict.fromkeys(harmful + harmless))
    last, sampled = last_and_sampled(lm, fmt(texts), "mlp_input", [layer])
    row = {t: i for i, t in enumerate(texts)}
    groups = validation_groups(sp)
    vlast, _ = last_and_sampled(lm, fmt([t for g in groups.values() for t in g]), "mlp_input", [layer])
    for n, pairs in [(400, 0), (400, 50), (400, 100), (400, 150), (400, 200), (200, 100), (300, 150), (400, 214), (647, 214)]:
        pos, neg = sp.harm_pools("train", n, PER_FAMILY, pairs=pairs)
        z, logits, i = vlast[layer] @ _probe(last[layer][[row[t] for t in pos + neg]], sampled[layer], len(pos)), {}, 0
        for g, ts in groups.items():
            logits[g], i = z[i: i + len(ts)], i + len(ts)
        rates = {g: round(float((v > 0).float().mean()), 3) for g, v in logits.items()}
        att = logits["attacks"].sort(descending=True).values
        rates["alarming@attacks 0.9"] = round(float((logits["alarming"] > float(att[int(0.9 * len(att)) - 1]) - 1e-6).float().mean()), 3)
        rates["auc twins vs alarming"] = round(roc_auc(logits["twins"], logits["alarming"]), 3)
        print(f"layer {layer}, {n} plain harmful, {pairs} alarming-word pairs: {json.dumps(rates)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="12,15,18,21")
    ap.add_argument("--ramps", action="store_true", help="also fit the nonlinear (ramp) probes")
    ap.add_argument("--pairs", action="store_true", help="also print where the probes of two layers both fire")
    ap.add_argument("--weights", default="", help="further weightings of the harmless pool's alarming-word and templated "
                    "prompts, as A:T pairs (e.g. 3:3,2:2); the shipped probe, alarming x3 and x10 are always fitted")
    ap.add_argument("--curve", type=int, metavar="LAYER", help="only the learning curve of this layer's probe, fitted with "
                    "0-214 alarming-word pairs and 200-647 plain harmful prompts in the training pools")
    ap.add_argument("--json", help="also write the rates here")
    args = ap.parse_args()
    if args.curve is not None:
        return learning_curve(args.curve)
    weightings = [("as shipped", 1.0, 1.0), ("alarming x3", 3.0, 1.0), ("alarming x10", 10.0, 1.0)]
    for pair in filter(None, args.weights.split(",")):
        a, t = (float(v) for v in pair.split(":"))
        weightings.append((f"alarming x{a:g}, templates x{t:g}", a, t))
    layers = [int(x) for x in args.layers.split(",")]
    lm = load_model("embedded")
    sp = build_splits(load_preset("balanced").data)
    harmful, harmless = sp.harm_pools("train", PROMPTS, PER_FAMILY)
    n_alarm = len(sp.alarming["train"][: PROMPTS // 2])  # harm_pools puts them after the plain benign and borderline
    n_plain = len(sp.benign["train"][: PROMPTS * 7 // 10]) + len(sp.borderline["train"][: PROMPTS * 3 // 10])
    last, sampled = last_and_sampled(lm, [chat_prompt(lm.tokenizer, t) for t in harmful + harmless], "mlp_input", layers)
    groups = validation_groups(sp)
    vlast, vtok = last_and_sampled(lm, [chat_prompt(lm.tokenizer, t) for g in groups.values() for t in g], "mlp_input", layers)
    n_pos, out, shipped = len(harmful), {}, {}
    for layer in layers:
        x = torch.cat([last[layer], sampled[layer]])
        y = torch.cat([torch.ones(n_pos), torch.zeros(len(x) - n_pos)])
        for name, alarm_weight, template_weight in weightings:
            wneg = torch.ones(len(harmless))
            wneg[n_plain: n_plain + n_alarm] = alarm_weight
            wneg[n_plain + n_alarm:] = template_weight
            weight = torch.cat([torch.full((n_pos,), 1.0 / n_pos), 0.5 * wneg / wneg.sum(),
                                torch.full((len(sampled[layer]),), 0.5 / len(sampled[layer]))])
            z, logits, i = vlast[layer] @ fit_bias_free(x, y, weight), {}, 0
            for g, texts in groups.items():
                logits[g], i = z[i: i + len(texts)], i + len(texts)
            if name == "as shipped":
                shipped[layer] = logits
            for t in (0.0,) + (THRESHOLDS if name == "as shipped" else ()):
                rates = {g: round(float((v > t).float().mean()), 3) for g, v in logits.items()}
                if t == 0.0:
                    rates["auc harmful vs alarming"] = round(roc_auc(logits["harmful"], logits["alarming"]), 3)
                out[f"layer {layer}, {name}, threshold {t}"] = rates
                print(f"layer {layer}, {name}, threshold {t}: {json.dumps(rates)}", flush=True)
        if args.ramps:
            weight = torch.cat([torch.full((n_pos,), 1.0 / n_pos), torch.full((len(harmless),), 0.5 / len(harmless)),
                                torch.full((len(sampled[layer]),), 0.5 / len(sampled[layer]))])
            for hidden in (4, 16, 64):
                for wd in (1e-3, 1e-2):
                    score = fit_ramps(x, y, weight, hidden, wd)
                    z, zt, logits, i = score(vlast[layer]), score(vtok[layer]), {}, 0
                    for g, texts in groups.items():
                        logits[g], i = z[i: i + len(texts)], i + len(texts)
                    att = logits["attacks"].sort(descending=True).values
                    for where, t in (("boundary", 0.0), ("attacks 0.9", float(att[int(0.9 * len(att)) - 1]) - 1e-6)):
                        rates = {g: round(float((v > t).float().mean()), 3) for g, v in logits.items()}
                        rates["earlier tokens"] = round(float((zt > t).float().mean()), 4)
                        rates["auc harmful vs alarming"] = round(roc_auc(logits["harmful"], logits["alarming"]), 3)
                        key = f"layer {layer}, ramps H{hidden} wd {wd}, at {where}"
                        out[key] = rates
                        print(f"{key}: {json.dumps(rates)}", flush=True)
    if args.pairs:
        for a in layers:
            for b in (b for b in layers if b > a):
                rates = {g: round(float(((shipped[a][g] > 0) & (shipped[b][g] > 0)).float().mean()), 3) for g in groups}
                out[f"layers {a} and {b}"] = rates
                print(f"layers {a} and {b}, both fire: {json.dumps(rates)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
