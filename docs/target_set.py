"""Train a preset with fewer refusal targets for the gains (exploratory; issue 17, docs/log.md "one refusal target"):
the training objective's refusal targets cut to the first N of `assets/refusal_targets.json` (attribution, the
gate and the evaluation keep all of them); then `tune` runs as the CLI runs it.

    python docs/target_set.py --keep 1 --preset P.json --seed 0 --out runs/val-target1
    python -m neurontune evaluate --run runs/val-target1 --split validation --seeds 1 --baselines none
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from neurontune import cli  # noqa: E402
from neurontune.method import metalearn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=int, default=1, help="how many refusal targets the gains train on, in file order")
    parser.add_argument("--preset", required=True, help="preset file to tune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="run folder to write")
    args = parser.parse_args()
    init = metalearn.Objective.__init__

    def cut(self, *a, **k):
        init(self, *a, **k)
        self.refusals = self.refusals[: args.keep]

    metalearn.Objective.__init__ = cut
    return cli.main(["tune", "--preset", args.preset, "--seed", str(args.seed), "--out", args.out, "--no-eval"])


if __name__ == "__main__":
    sys.exit(main())
