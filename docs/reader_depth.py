"""Which of the export's readers write its refusal? (validation only; hooked, no export.)

The run's foldable modulation is applied as trained, then with only the readers (input-side terms) of layers up to
`--split` and only those after it (gains and switch kept); the first `--n` validation prompts of the harmful, training
attack and alarming-word groups are answered (greedy, `--tokens` new tokens) and judged by the rules. Figures in
docs/results.md ("Where the folded switch reads": a later veto?) and docs/log.md (tenth session).

    python docs/reader_depth.py                       # the shipped run, split after layer 21: about 3 min on 2 cores
"""
import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from neurontune.config import load_preset  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.eval.judge import REFUSALS  # noqa: E402
from neurontune.eval.judges import judge_from_spec  # noqa: E402
from neurontune.interventions.generation import generate  # noqa: E402
from neurontune.interventions.modulation import Modulation  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402
from neurontune.run.folder import RunFolder  # noqa: E402
from switch_probe import validation_groups  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "default_run"


def with_readers(mod: Modulation, keep) -> Modulation:
    """`mod` with only the input-side terms of the layers `keep` accepts."""
    return Modulation(mod.shape, mod.layers, mod.fingerprint, mod.meta, {l: t for l, t in mod.inputs.items() if keep(l)}, mod.switch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(SHIPPED), help="a run folder with a foldable modulation")
    ap.add_argument("--split", type=int, default=21, help="the last layer of the first half of the readers")
    ap.add_argument("--n", type=int, default=30, help="prompts of each group")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    lm, judge = load_model("embedded"), judge_from_spec("rules")
    groups = validation_groups(build_splits(load_preset("balanced").data))
    mod = RunFolder(args.run).foldable()
    if mod is None:
        raise SystemExit(f"{args.run} holds no foldable modulation: give a run trained with fold.form 'switch'.")
    forms = {"all readers": mod, f"readers up to layer {args.split} only": with_readers(mod, lambda l: l <= args.split),
             f"readers after layer {args.split} only": with_readers(mod, lambda l: l > args.split)}
    for name, form in forms.items():
        row = {}
        for group in ("harmful", "attacks", "alarming"):
            texts = groups[group][: args.n]
            verdicts = judge.verdicts(texts, generate(lm, texts, form, max_new_tokens=args.tokens))
            row[group] = round(sum(v in REFUSALS for v in verdicts) / len(verdicts), 3)
        print(f"{name}: refusal {row}", flush=True)


if __name__ == "__main__":
    main()
