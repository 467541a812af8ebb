"""The AND of two layers' probes swapped in behind readers trained with the plain switch (validation only).

`balanced` trains its export's readers behind the plain layer-15 switch. Here the AND switch of layers 12 and 15
(`switch_fit.fit_switch(earlier=12)`) is fitted once and swapped in for export: its gate and up rows and its earlier
switch replace the plain switch's, while the switch's neurons and its flag (output columns) stay, so the readers'
directions read the same flag; nothing is trained. `--own`: the AND as fitted, with its own flag and the reading
directions fitted with it in place, the readers' trained coefficients kept. `--margins` rebuilds the AND at other margins (without the earlier
flag the layer-15 probe must read above the margin to fire; `switch_fit.AND_MARGIN` is 8) from the same fit, prints
where each fires at the validation prompt ends, and evaluates the one chosen by the rule in docs/log.md (tenth
session). Figures in docs/results.md ("Where the folded switch reads").

    python docs/switch_swap.py --runs assets/default_run --out runs/val-swap           # about 15 min on 2 cores
"""
import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from neurontune.config import load_preset  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.interventions.modulation import InputTerms, Modulation  # noqa: E402
from neurontune.interventions.switch import Switch  # noqa: E402
from neurontune.method import switch_fit  # noqa: E402
from neurontune.method.selection import select  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402
from neurontune.run.evaluate_run import evaluate_run  # noqa: E402
from neurontune.run.folder import RunFolder  # noqa: E402
from switch_mean import COLUMNS, fires, read  # noqa: E402
from switch_probe import validation_groups  # noqa: E402


def fit_and(lm, cfg, splits, run: Path, layer: int, earlier: int) -> switch_fit.FittedSwitch:
    """The AND switch (the run's selected neurons excluded, as `train_foldable` does) with its reading directions."""
    sel = select(RunFolder(run).scores(), cfg.selection)
    fitted = switch_fit.fit_switch(lm, splits, layer, exclude=sel.safety | sel.utility, earlier=earlier)
    print("AND fitted:", json.dumps(fitted.info), flush=True)
    return fitted


def at_margin(fitted: switch_fit.FittedSwitch, margin: float) -> Switch:
    """The fitted AND (at `switch_fit.AND_MARGIN`) at another margin."""
    return dataclasses.replace(fitted.switch, gate_rows=fitted.switch.gate_rows + (margin - switch_fit.AND_MARGIN) * fitted.and_step)


def swapped(plain: Switch, sw: Switch) -> Switch:
    """`sw`'s decision (gate and up rows, earlier switch) on `plain`'s neurons, writing `plain`'s flag."""
    return dataclasses.replace(sw, neurons=plain.neurons, down_cols=plain.down_cols)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="run folders whose foldable readers were trained behind the plain switch")
    ap.add_argument("--out", required=True, help="prefix of the new run folders (one per run: OUT-0, OUT-1, ...)")
    ap.add_argument("--earlier", type=int, default=12)
    ap.add_argument("--margins", default="8,6,4,2", help="comma-separated margins whose prompt-end firing is printed")
    ap.add_argument("--own", action="store_true", help="swap in the AND with its own flag and the reading directions "
                    "fitted with it in place (the readers' coefficients kept); default: the plain switch's flag and directions")
    ap.add_argument("--margin", type=float, default=None, help="the margin evaluated (default: the rule in log.md)")
    args = ap.parse_args()
    lm = load_model("embedded")
    cfg = load_preset("balanced")
    splits = build_splits(cfg.data)
    groups = validation_groups(splits)
    plain = RunFolder(args.runs[0]).foldable().switch
    print("plain switch, prompt ends:", json.dumps(fires(lm, plain, groups)), flush=True)
    fitted = fit_and(lm, cfg, splits, Path(args.runs[0]), plain.layer, args.earlier)
    sw = fitted.switch
    cos = float(torch.nn.functional.cosine_similarity(sw.earlier.down_cols[0], plain.down_cols[0], dim=0))
    print(f"earlier flag against the switch's flag: cosine {cos:.3f}", flush=True)
    ends = {}
    for m in [float(x) for x in args.margins.split(",")]:
        ends[m] = fires(lm, swapped(plain, at_margin(fitted, m)), groups)
        print(f"AND at margin {m:g}, prompt ends:", json.dumps(ends[m]), flush=True)
    margin = args.margin
    if margin is None:  # log.md, tenth session: the smallest margin whose alarming words fire on at most 0.12
        ok = [m for m, e in ends.items() if e["alarming"] <= 0.12]
        margin = min(ok) if ok else max(ends)
    print(f"evaluating margin {margin:g}", flush=True)
    for i, run in enumerate(args.runs):
        out = Path(f"{args.out}-{i}")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(run, out)
        folder = RunFolder(out)
        mod = folder.foldable()
        new = at_margin(fitted, margin) if args.own else swapped(mod.switch, at_margin(fitted, margin))
        inputs = {l: InputTerms(t.indices, t.coef, *fitted.directions[l]) for l, t in mod.inputs.items()} if args.own else mod.inputs
        folder.write_foldable(Modulation(mod.shape, mod.layers, mod.fingerprint, {**mod.meta, "swapped_and": margin},
                                         inputs, new))
        table = evaluate_run(lm, folder, cfg, baselines=(), split="validation")
        print(f"{run} -> {out}:\n" + table[list(COLUMNS)].rename(columns=COLUMNS).round(3).to_string(), flush=True)
        read(lm, out)


if __name__ == "__main__":
    main()
