"""Benchmark of the refusal judge's rules: seconds to judge N answers (the labelled answers of
`assets/judge_labels*.jsonl`, repeated to N, each with its prompt), best of several runs, on this CPU.
Target: 10,000 answers in under 2 s.

    python bench/bench_judge.py [--n 10000] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="answers judged per run (default 10,000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is reported (default 5)")
    args = parser.parse_args()
    from neurontune.eval.judge import verdict
    from neurontune.eval.judges import RulesJudge
    rows = [json.loads(line) for name in ("judge_labels.jsonl", "judge_labels_2.jsonl", "judge_labels_chat.jsonl")
            for line in (ROOT / "assets" / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    batch = [rows[i % len(rows)] for i in range(args.n)]
    prompts, answers = [r["prompt"] for r in batch], [r["response"] for r in batch]
    chars = sum(map(len, answers)) / len(answers)
    times, cpu, judge = [], [], RulesJudge()
    for _ in range(args.repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        verdicts = judge.verdicts(prompts, answers)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    assert verdicts == [verdict(a, p) for p, a in zip(prompts, answers)]
    best = min(times)
    print(f"rules judge: {args.n:,} answers ({len(rows)} distinct, mean {chars:.0f} characters) in {best:.3f} s "
          f"(best of {args.repeat}; median {sorted(times)[len(times) // 2]:.3f} s) = {args.n / best:,.0f} answers/s "
          f"[{'meets' if best * 10_000 / args.n < 2 else 'MISSES'} the target: 10,000 in < 2 s]")
    print(f"CPU time of the best run: {cpu[times.index(best)]:.3f} s; verdicts: {dict(Counter(verdicts))}")
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    print(f"({platform.processor() or platform.machine()}, Python {platform.python_version()}, one thread{load})")


if __name__ == "__main__":
    main()
