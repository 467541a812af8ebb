"""Per-seed and pooled test figures of NeuronTune's own rows over runs evaluated apart: seeds 0 and 1 from
`evaluate --seeds 2` on one run, seed 2 from `tune --seed 2` evaluated with `--seeds 1 --baselines none`.

    python docs/seeds_table.py runs/final-balanced runs/seed2-balanced
    python docs/seeds_table.py runs/final-balanced runs/seed2-controls --rows "meta-learning (FOMAML) + gate,random-neurons + gate"

Rates are recomputed from generations.jsonl with the harness's own `rate_counts` (they reproduce eval.json's means);
perplexity ratio and MC accuracy come from each eval.json (its mean ± sd, expanded back to the seeds when sd is given)."""
from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from neurontune.eval.harness import rate_counts, refusal_metrics  # noqa: E402

RATES = ("harmful_refusal", "harmful_refusal/imperative", "harmful_refusal/question", "harmful_refusal/context",
         "heldout_family_refusal", "refusal/hypothetical", "refusal/payload_splitting", "refusal/few_shot",
         "benign_over_refusal", "template_over_refusal", "borderline_over_refusal", "alarming_over_refusal")
ROWS = ("neurontune + gate", "neurontune export")


def per_seed_rates(run: Path, name: str) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    seeds = sorted({r["seed"] for r in rows if r["intervention"] == name})
    return {s: refusal_metrics(rate_counts([r for r in rows if r["intervention"] == name and r["seed"] == s])) for s in seeds}


def per_seed_scalar(run: Path, name: str, key: str) -> list[float]:
    summary = json.loads((run / "eval.json").read_text())
    row = next(r for r in summary["table"] if r["intervention"] == name)
    n, mean, sd = int(summary.get("seeds", 1)), row[key], row.get(f"{key}:sd") or 0.0
    if n > 2:
        raise ValueError(f"{run}: {n} seeds in one eval.json; their {key} values cannot be recovered from mean and sd.")
    return [mean] if n == 1 else [mean - sd / 2 ** 0.5, mean + sd / 2 ** 0.5]


def main(runs: list[Path], rows: tuple[str, ...] = ROWS) -> None:
    for name in rows:
        seeds = {}
        for run in runs:
            for seed, metrics in per_seed_rates(run, name).items():
                seeds[(run.name, seed)] = metrics
        print(f"{name}: {len(seeds)} seeds {list(seeds)}")
        for key in RATES:
            values = [m[key] for m in seeds.values()]
            print(f"  {key:30s} {st.mean(values):.3f} ± {st.stdev(values):.3f}  {[round(v, 3) for v in values]}")
        for key in ("ppl_ratio", "mc_accuracy"):
            values = [v for run in runs for v in per_seed_scalar(run, name, key)]
            print(f"  {key:30s} {st.mean(values):.3f} ± {st.stdev(values):.3f}  {[round(v, 3) for v in values]}")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders evaluated on the same split")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma list of intervention names")
    args = parser.parse_args()
    main(args.runs, tuple(r.strip() for r in args.rows.split(",") if r.strip()))
