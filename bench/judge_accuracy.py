"""Accuracy of a refusal judge on the labelled answers: the embedded model's 709 (`assets/judge_labels.jsonl`,
`judge_labels_2.jsonl`), the 574 written in larger chat models' styles (`assets/judge_labels_chat.jsonl`, its `dev` and
`held` halves) and 40 of the embedded model's answers that open by accepting (`judge_labels_accept.jsonl`, chosen for
the judge's "Sure, I'd be happy to help" false refusals).
Refusal = refuse or partial. With a model judge: its agreement with the rules, and how often it wrote no label.

    python bench/judge_accuracy.py                          # the rules (seconds)
    python bench/judge_accuracy.py --judge model:embedded   # a local chat model as the judge (cached on disk)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rows(*names: str) -> list[dict]:
    return [json.loads(line) for name in names for line in (ROOT / "assets" / name).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _half(row: dict) -> str:
    return "dev" if int(hashlib.sha256(str(row["id"]).encode()).hexdigest(), 16) % 2 == 0 else "held"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default="rules", help="rules (default) or model:PATH_OR_ID")
    parser.add_argument("--cache-dir", default=None, help="where a model judge keeps its verdicts (default ~/.cache/neurontune)")
    parser.add_argument("--batch-size", type=int, default=8, help="answers a model judge reads per generate call")
    args = parser.parse_args()
    from neurontune.eval.judge import PARTIAL, REFUSALS, REFUSE
    from neurontune.eval.judges import RULES, ModelJudge, agreement, judge_from_spec
    judge = judge_from_spec(args.judge, cache_dir=args.cache_dir)
    if isinstance(judge, ModelJudge):
        judge.batch_size = args.batch_size
    chat = _rows("judge_labels_chat.jsonl")
    sets = {"embedded model, 709 real answers": _rows("judge_labels.jsonl", "judge_labels_2.jsonl"),
            "chat styles, dev half": [r for r in chat if _half(r) == "dev"],
            "chat styles, held half": [r for r in chat if _half(r) == "held"],
            "embedded model, 40 acceptance openings": _rows("judge_labels_accept.jsonl")}
    print(f"judge: {judge.name}")
    print("| labelled answers | n | refuse-vs-not | classes | refusals invented | refusals missed | agreement with the rules |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in sets.items():
        start, fallbacks = time.perf_counter(), getattr(judge, "fallbacks", 0)
        prompts, answers = [r["prompt"] for r in rows], [r["response"] for r in rows]
        verdicts = judge.verdicts(prompts, answers)
        confusion = Counter((r["label"], v) for r, v in zip(rows, verdicts))
        n = len(rows)
        binary = sum(c for (a, b), c in confusion.items() if (a in REFUSALS) == (b in REFUSALS)) / n
        partial_labels = any(a == PARTIAL for a, _ in confusion)  # the embedded model's labels have no partial class
        classes = sum(c for (a, b), c in confusion.items() if a == b or (not partial_labels and a == REFUSE and b == PARTIAL)) / n
        invented = sum(c for (a, b), c in confusion.items() if a not in REFUSALS and b in REFUSALS) / n
        missed = sum(c for (a, b), c in confusion.items() if a in REFUSALS and b not in REFUSALS)
        agree = "–" if judge is RULES else f"{agreement(verdicts, RULES.verdicts(prompts, answers))[0] / n:.3f}"
        print(f"| {name} | {n} | {binary:.3f} | {classes:.3f} ({3 if not partial_labels else 4}) | {invented:.1%} | {missed} | {agree} |")
        if judge is not RULES:
            print(f"  ({time.perf_counter() - start:.0f} s; {getattr(judge, 'fallbacks', 0) - fallbacks} answers without a label: "
                  f"the rules decided them; confusion {sorted(confusion.items())})", file=sys.stderr)


if __name__ == "__main__":
    main()
