"""Does the export's switch read alarming words less when it also reads the whole prompt? (validation only.)

The shipped run's selection (assets/default_run, preset `balanced`) is kept; only the foldable modulation is trained
again, with `fold` settings given as JSON (e.g. '{"switch_mean": true}' for a switch that also reads a turn mean,
`interventions/turn_mean.py`), and evaluated on the validation split as the export checkpoint reloaded with plain
transformers, beside the base model and the gated run. `--mean-size` overrides `switch_fit.MEAN_SIZE`. Figures in
docs/results.md ("The switch reads the whole prompt").

    python docs/switch_mean.py --fold '{"switch_mean": false}' --out runs/val-switch        # about 10 min on 2 cores
    python docs/switch_mean.py --fold '{"switch_mean": true}' --out runs/val-switch-mean
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neurontune.config import load_preset  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.method import switch_fit  # noqa: E402
from neurontune.method.recipe import train_foldable  # noqa: E402
from neurontune.method.selection import select  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402
from neurontune.run.evaluate_run import evaluate_run  # noqa: E402
from neurontune.run.folder import RunFolder  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "default_run"
COLUMNS = {"harmful_refusal": "harmful", "train_family_refusal": "training attacks", "contrast_refusal": "twins",
           "benign_over_refusal": "benign", "template_over_refusal": "benign in templates",
           "borderline_over_refusal": "borderline", "alarming_over_refusal": "alarming words", "ppl_ratio": "ppl",
           "mc_accuracy": "MC"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fold", default="{}", help="fold settings over the preset's, as JSON")
    ap.add_argument("--mean-size", type=float, default=None, help="switch_fit.MEAN_SIZE")
    ap.add_argument("--out", required=True, help="a new run folder (a copy of the shipped run)")
    args = ap.parse_args()
    if args.mean_size is not None:
        switch_fit.MEAN_SIZE = args.mean_size
    lm = load_model("embedded")
    cfg = load_preset("balanced")
    cfg = cfg.replace(fold=json.loads(args.fold))
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
