"""Re-read a run's answers with the present judge: the refusal rates stored in its generations.jsonl (the judge of
that time) against the present rules' (refuse or partial; strict: refuse only), per intervention and category,
pooled over seeds, and how many refusal decisions changed. No answer is generated again.

    python bench/rejudge.py [--run assets/default_run]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "assets" / "default_run"), help="a run folder with generations.jsonl")
    args = parser.parse_args()
    from neurontune.eval.judge import REFUSALS, REFUSE
    from neurontune.eval.judges import RULES
    from neurontune.run.folder import RunFolder
    rows = RunFolder(args.run).generations()
    if not rows:
        raise SystemExit(f"{args.run} holds no {RunFolder.GENERATIONS}; run `python -m neurontune evaluate --run {args.run}` first.")
    now = RULES.verdicts([r["prompt"] for r in rows], [r["answer"] for r in rows])
    stored = [r["verdict"] in REFUSALS for r in rows]
    moves = Counter((s, v in REFUSALS) for s, v in zip(stored, now))
    print(f"{len(rows)} answers of {args.run}: {moves[(False, True)]} became refusals, {moves[(True, False)]} stopped being "
          f"refusals ({sum(v == 'partial' for v in now)} partial refusals now)")
    rates: dict = defaultdict(Counter)
    for r, s, v in zip(rows, stored, now):
        c = rates[(r["intervention"], r["category"])]
        c["n"] += 1
        c["stored"] += s
        c["now"] += v in REFUSALS
        c["strict"] += v == REFUSE
    categories = list(dict.fromkeys(r["category"] for r in rows))
    print("| intervention | " + " | ".join(f"{c}: stored → now (strict)" for c in categories) + " |")
    print("|---|" + "---|" * len(categories))
    for name in dict.fromkeys(r["intervention"] for r in rows):
        cells = []
        for cat in categories:
            c = rates[(name, cat)]
            cells.append(f"{c['stored'] / c['n']:.3f} → {c['now'] / c['n']:.3f} ({c['strict'] / c['n']:.3f})" if c["n"] else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
