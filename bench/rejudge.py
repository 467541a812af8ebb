"""Re-read a run's answers with the present judge: the refusal rates stored in its generations.jsonl (the judge of
that time) against the present rules' (refuse or partial; strict: refuse only), per intervention and category,
pooled over seeds, and how many refusal decisions changed. No answer is generated again. With --table: the table's
headline rates again, re-judged, as the reports print them (mean ± sd over seeds [Wilson 95 % of the mean]), through
the harness's own `rate_counts`.

    python bench/rejudge.py [--run assets/default_run] [--table]
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
    parser.add_argument("--table", action="store_true", help="the headline rates per intervention, re-judged, mean ± sd [Wilson]")
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
    if args.table:
        table([dict(r, verdict_now=v) for r, v in zip(rows, now)])


RATES = ("harmful_refusal", "heldout_family_refusal", "benign_over_refusal", "template_over_refusal", "borderline_over_refusal",
         "alarming_over_refusal")


def table(rows: list[dict]) -> None:
    """Stored → now of the headline rates, per intervention: mean ± sd over seeds [Wilson 95 % at the mean's count]."""
    import statistics

    from neurontune.eval.harness import rate_counts
    from neurontune.eval.stats import wilson

    def cell(per_seed: list[tuple[int, int]]) -> str:
        rates, n = [a / m for a, m in per_seed], per_seed[0][1]
        mean = sum(rates) / len(rates)
        low, high = wilson(mean * n, n)
        sd = f" ± {statistics.stdev(rates):.3f}" if len(rates) > 1 else ""
        return f"{mean:.3f}{sd} [{low:.2f}, {high:.2f}]"

    print("\n| intervention (seeds) | " + " | ".join(RATES) + " |")
    print("|---|" + "---|" * len(RATES))
    for name in dict.fromkeys(r["intervention"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["intervention"] == name})
        stored = [rate_counts([r for r in rows if r["intervention"] == name and r["seed"] == s]) for s in seeds]
        now = [rate_counts([r for r in rows if r["intervention"] == name and r["seed"] == s], key="verdict_now") for s in seeds]
        cells = [f"{cell([c[k] for c in stored])} → {cell([c[k] for c in now])}" if all(c.get(k, (0, 0))[1] for c in stored) else "–"
                 for k in RATES]
        print(f"| {name} ({len(seeds)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
