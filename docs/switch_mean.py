"""Does the export's switch read alarming words less when it also reads the whole prompt? (validation only.)

The shipped run's selection (assets/default_run, preset `balanced`) is kept; only the foldable modulation is trained
again, with `fold` settings given as JSON (e.g. '{"switch_mean": true}' for a switch that also reads a turn mean,
`interventions/turn_mean.py`), and evaluated on the validation split as the export checkpoint reloaded with plain
transformers, beside the base model and the gated run. `--mean-size` overrides `switch_fit.MEAN_SIZE`, `--and-margin`
`switch_fit.AND_MARGIN`. Figures in
docs/results.md ("The switch reads the whole prompt").

    python docs/switch_mean.py --fold '{"switch_mean": false}' --out runs/val-switch        # about 10 min on 2 cores
    python docs/switch_mean.py --fold '{"switch_mean": true}' --out runs/val-switch-mean
    python docs/switch_mean.py --read runs/val-switch runs/val-switch-mean                   # about 2 min a run
    python docs/switch_mean.py --fold '{"kl_answers": "harmless"}' --seed 1 --out runs/val-switch-kl-1
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from neurontune.config import load_preset  # noqa: E402
from neurontune.data.chat import chat_prompt  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.interventions.capture import last_and_sampled, site_modules  # noqa: E402
from neurontune.interventions.hooks import scoped_pre_hooks  # noqa: E402
from neurontune.interventions.modulation import Modulation, modulate  # noqa: E402
from neurontune.method import switch_fit  # noqa: E402
from neurontune.method.recipe import train_foldable  # noqa: E402
from neurontune.method.selection import select  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402
from neurontune.run.evaluate_run import evaluate_run  # noqa: E402
from neurontune.run.folder import RunFolder  # noqa: E402
from switch_probe import validation_groups  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "default_run"
COLUMNS = {"harmful_refusal": "harmful", "train_family_refusal": "training attacks", "contrast_refusal": "twins",
           "benign_over_refusal": "benign", "template_over_refusal": "benign in templates",
           "borderline_over_refusal": "borderline", "alarming_over_refusal": "alarming words", "ppl_ratio": "ppl",
           "mc_accuracy": "MC"}


ANSWER_GROUPS = ("harmful", "attacked", "benign", "benign_attacked", "borderline", "alarming")  # generations' categories


@torch.no_grad()
def fires(lm, sw, groups: dict[str, list[str]]) -> dict[str, float]:
    """Where a switch fires (its first gate row reads > 0), with it in place: at the ends of each group's prompts and
    on their earlier tokens."""
    ends = {}
    with modulate(lm.model, Modulation(lm.nmap.shape, switch=sw), lm.nmap):
        for group, texts in groups.items():
            last, earlier = last_and_sampled(lm, [chat_prompt(lm.tokenizer, t) for t in texts], "mlp_input", [sw.layer])
            ends[group] = round(float((last[sw.layer] @ sw.gate_rows[0] > 0).float().mean()), 3)
            ends[group + " (earlier tokens)"] = round(float((earlier[sw.layer] @ sw.gate_rows[0] > 0).float().mean()), 4)
    return ends


@torch.no_grad()
def read(lm, run: Path) -> None:
    """Where the run's switch fires: prompt ends and earlier tokens of the validation groups, and its export's answers."""
    sw = RunFolder(run).foldable().switch
    w = sw.gate_rows[0]
    with_switch = Modulation(lm.nmap.shape, switch=sw)
    print(f"{run} prompt ends: {json.dumps(fires(lm, sw, validation_groups(build_splits(load_preset('balanced').data))))}",
          flush=True)
    rows = [r for r in RunFolder(run).generations() if r["intervention"] == "neurontune export"]
    store, answers = {}, {}
    mlp_in = site_modules(lm, "mlp_input")[sw.layer]
    silent = {}
    for group in ANSWER_GROUPS:
        fired = n = silent[group] = 0
        for r in (r for r in rows if r["category"] == group):
            p = lm.tokenizer(chat_prompt(lm.tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]
            a = lm.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
            with modulate(lm.model, with_switch, lm.nmap), scoped_pre_hooks([(mlp_in, lambda m, args: store.__setitem__("x", args[0][0].float()))]):
                lm.model(input_ids=torch.tensor([p + a]), use_cache=False)
            z = store["x"][len(p) - 1:] @ w  # the prompt's end, then the answer's tokens
            fired += int((z[1:] > 0).sum())
            n += len(a)
            silent[group] += int(bool(r["refusal"]) and not bool((z > 0).any()))
        answers[group] = round(fired / max(n, 1), 3)
    print(f"{run} answer tokens: {json.dumps(answers)}", flush=True)
    print(f"{run} refused with the flag down at the prompt's end and through the answer: {json.dumps(silent)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fold", default="{}", help="fold settings over the preset's, as JSON")
    ap.add_argument("--mean-size", type=float, default=None, help="switch_fit.MEAN_SIZE")
    ap.add_argument("--and-margin", type=float, default=None, help="switch_fit.AND_MARGIN (with fold.switch_earlier)")
    ap.add_argument("--seed", type=int, default=None, help="meta.seed of the foldable training (default: the preset's)")
    ap.add_argument("--out", help="a new run folder (a copy of the shipped run)")
    ap.add_argument("--read", nargs="+", help="run folders this script made: where their switch fires")
    args = ap.parse_args()
    if args.read:
        lm = load_model("embedded")
        for run in args.read:
            read(lm, Path(run))
        return
    if not args.out:
        ap.error("give --out (a new run folder) or --read RUN ...")
    if args.mean_size is not None:
        switch_fit.MEAN_SIZE = args.mean_size
    if args.and_margin is not None:
        switch_fit.AND_MARGIN = args.and_margin
    lm = load_model("embedded")
    cfg = load_preset("balanced")
    cfg = cfg.replace(fold=json.loads(args.fold), **({"meta": {"seed": args.seed}} if args.seed is not None else {}))
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(SHIPPED, out)
    folder = RunFolder(out)
    splits = build_splits(cfg.data)
    result = train_foldable(lm, select(folder.scores(), cfg.selection), cfg, splits)
    folder.write_foldable(result.modulation)
    print("switch:", json.dumps(result.modulation.meta.get("switch")), flush=True)
    table = evaluate_run(lm, folder, cfg, baselines=(), split="validation")
    print(table[list(COLUMNS)].rename(columns=COLUMNS).round(3).to_string(), flush=True)


if __name__ == "__main__":
    main()
