"""How long does judging one variant on the validation split take? Before: the static gains and the gated gains, each
evaluated on its own with the reported table's settings (FULL_EVAL: 40 new tokens). After: the research loop's
`VALIDATION_EVAL` (the same prompts, a 24-token opening pass judged for refusal) with both forms answered in shared
batches (`evaluate_many(..., shared=True)`). Prints wall and process-CPU seconds of each, the ratio, and how often the
two agree on a refusal verdict.

    python bench/bench_validation.py [--run assets/default_run] [--threads 1]

Use --threads 1 on a shared machine: intra-op threads fighting other processes make runs several times slower and
very noisy; single-threaded CPU time is stable. The base model's answers are generated once, before timing (the
research loop keeps them in its cache), so both figures are the cost of a variant.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from neurontune.config import FULL_EVAL, VALIDATION_EVAL  # noqa: E402
from neurontune.data.splits import build_splits  # noqa: E402
from neurontune.eval.harness import evaluate, evaluate_many  # noqa: E402
from neurontune.eval.judge import REFUSALS  # noqa: E402
from neurontune.interventions.gating import Gated  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402
from neurontune.run.folder import RunFolder  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(Path(__file__).resolve().parent.parent / "assets" / "default_run"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("embedded")
    folder = RunFolder(args.run)
    cfg, mod, gate = folder.config(), folder.modulation(lm.fingerprint), folder.gate(lm)
    splits = build_splits(cfg.data)
    forms = {"static": mod.static(), **({"gated": Gated(mod, gate)} if gate is not None else {})}
    cache: dict = {}
    for ecfg in (FULL_EVAL, VALIDATION_EVAL):  # the base model's side, once per answer length
        evaluate(lm, None, splits, ecfg, split="validation", base=cache)

    def before():
        return [evaluate(lm, iv, splits, FULL_EVAL, split="validation", name=n, base=cache) for n, iv in forms.items()]

    def after():
        return evaluate_many(lm, forms, splits, VALIDATION_EVAL, split="validation", base=cache, shared=True)

    old, old_wall, old_cpu = timed(before)
    new, new_wall, new_cpu = timed(after)
    rows = sum(len(r.rows) for r in old)
    same = sum((a["verdict"] in REFUSALS) == (b["verdict"] in REFUSALS) for ro, rn in zip(old, new) for a, b in zip(ro.rows, rn.rows))
    print(f"threads {torch.get_num_threads()}; one variant = {len(forms)} forms x {len(old[0].rows)} validation prompts "
          f"(+ perplexity and multiple choice)")
    print(f"before (FULL_EVAL, {FULL_EVAL.max_new_tokens} tokens, one form at a time): {old_wall:7.1f} s wall, {old_cpu:7.1f} s CPU")
    print(f"after  (VALIDATION_EVAL, {VALIDATION_EVAL.max_new_tokens} tokens, shared batches): {new_wall:7.1f} s wall, {new_cpu:7.1f} s CPU")
    print(f"speed-up: {old_wall / new_wall:.2f}x wall, {old_cpu / new_cpu:.2f}x CPU; refusal verdicts equal on {same}/{rows} rows")
    for r_old, r_new in zip(old, new):
        keys = ("harmful_refusal", "benign_over_refusal", "template_over_refusal", "alarming_over_refusal", "ppl_ratio", "mc_accuracy")
        print(f"  {r_old.name:8s} before " + " ".join(f"{k}={r_old.metrics[k]:.3f}" for k in keys if k in r_old.metrics))
        print(f"  {r_new.name:8s} after  " + " ".join(f"{k}={r_new.metrics[k]:.3f}" for k in keys if k in r_new.metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
