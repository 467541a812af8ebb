"""Engine benchmark on the embedded model: attribution cost vs a bare forward+backward, modulated vs
plain generation speed, and cold (GGUF) vs cached model load. Prints medians of a few runs.

    python bench/bench_engine.py [--repeats 5] [--threads N] [--skip-load]

On a small shared machine use --threads 1: intra-op threads fighting other processes make runs
several times slower and very noisy; single-threaded CPU time is stable.
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from neurontune.config import AttributionConfig  # noqa: E402
from neurontune.data import prompts as sets  # noqa: E402
from neurontune.data.chat import chat_prompt  # noqa: E402
from neurontune.interventions.generation import _generate_kwargs, encode_left  # noqa: E402
from neurontune.interventions.modulation import Modulation, modulate  # noqa: E402
from neurontune.method.attribution import attribute  # noqa: E402
from neurontune.model.loading import load_model  # noqa: E402
from neurontune.model.logprobs import encode_pairs, forward, target_logprob  # noqa: E402

GOALS = {"attribution / bare fwd+bwd": 1.25, "modulated / plain generate time": 1.05, "selection (ms)": 100}


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. On a shared machine the CPU time of a
    single-threaded run barely moves with other load, so ratios are taken from it."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Warm each function up, then time them in turn `repeats` times so load changes hit all alike."""
    for fn in fns.values():
        fn()
    out = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = timed(fn)
            out[name][0].append(wall)
            out[name][1].append(cpu)
    return out


med = statistics.median


def bench_attribution(lm, repeats: int) -> dict:
    """(a) grad_x_act and IG-8 on 8 harmful prompts with a refusal target, vs a bare forward+backward."""
    prompts = [chat_prompt(lm.tokenizer, p.text) for p in sets.harmful()[:8]]
    targets = [sets.targets()["refusal"][0]] * len(prompts)
    batch = encode_pairs(lm.tokenizer, prompts, targets)
    embed = lm.model.get_input_embeddings()

    def bare() -> None:  # same tokens, same loss, no hooks: gradient w.r.t. the input embeddings only
        embeds = embed(batch.input_ids).detach().requires_grad_(True)
        with torch.enable_grad():
            logp = target_logprob(forward(lm.model, batch, embeds), batch)
            torch.autograd.grad(logp.sum(), embeds)

    gxa = AttributionConfig(method="grad_x_act", batch_size=8)
    ig = AttributionConfig(method="integrated_gradients", ig_steps=8, batch_size=8)
    t = interleaved({"bare": bare, "attr": lambda: attribute(lm, prompts, targets, gxa)}, repeats)
    ig_wall, ig_cpu = zip(*(timed(lambda: attribute(lm, prompts, targets, ig)) for _ in range(min(2, repeats))))
    return {"tokens": int(batch.attention_mask.sum()), "bare": t["bare"], "attr": t["attr"], "ig": (list(ig_wall), list(ig_cpu))}


def bench_generate(lm, repeats: int, n_prompts: int = 8, new_tokens: int = 48, n_neurons: int = 1500) -> dict:
    """(b) greedy generation of exactly `new_tokens` per prompt, with a modulation of `n_neurons` vs none."""
    gen = torch.Generator().manual_seed(0)
    dense = torch.ones(lm.shape)
    dense.view(-1)[torch.randperm(dense.numel(), generator=gen)[:n_neurons]] = 0.5 + 1.5 * torch.rand(n_neurons, generator=gen)
    mod = Modulation.from_dense(dense, lm.fingerprint)
    texts = [chat_prompt(lm.tokenizer, p.text) for p in sets.benign()[:n_prompts]]
    ids, mask = encode_left(lm.tokenizer, texts)
    kwargs = _generate_kwargs(lm, new_tokens, False, 0.7, 0.9, None)
    kwargs["min_new_tokens"] = new_tokens  # both runs produce the same token count, whatever they say

    def run(gains) -> None:  # what neurontune.generation.generate does, minus decoding
        with modulate(lm.model, gains, lm.nmap), torch.no_grad():
            out = lm.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert out.shape[1] - ids.shape[1] == new_tokens

    t = interleaved({"plain": lambda: run(None), "mod": lambda: run(mod)}, repeats)
    return {"n_modulated": mod.n_modulated, "n_layers_hooked": len(mod.layers), "n_tokens": n_prompts * new_tokens,
            "plain": t["plain"], "mod": t["mod"]}


def bench_load(repeats: int) -> dict:
    """(c) embedded model: dequantise the GGUF into a fresh cache folder, then load from that cache."""
    cold, cached = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="nt_bench_cache_") as tmp:
            start = time.perf_counter()
            lm = load_model("embedded", cache_dir=tmp)
            cold.append(time.perf_counter() - start)
            assert lm.source.startswith("gguf:"), lm.source
            del lm
            gc.collect()
            start = time.perf_counter()
            lm = load_model("embedded", cache_dir=tmp)
            cached.append(time.perf_counter() - start)
            assert lm.source.startswith("cache:"), lm.source
            del lm
            gc.collect()
    return {"cold_s": statistics.median(cold), "cached_s": statistics.median(cached), "cold_all": cold, "cached_all": cached}


def bench_selection(shape: tuple[int, int], repeats: int) -> float:
    """Median seconds of one `select` on scores of the model's size (the studio's slider path)."""
    from neurontune.config import SelectionConfig
    from neurontune.method.selection import select
    gen = torch.Generator().manual_seed(0)
    scores = {k: torch.randn(shape, generator=gen) for k in ("safety", "over_refusal", "benign_dependence")}
    cfg = SelectionConfig(k_safety=1500, k_utility=500, protect_top=500)
    select(scores, cfg)
    times = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        select(scores, cfg)
        times.append(time.perf_counter() - start)
    return med(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure, median reported (IG: 2, load: 3 at most)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-load", action="store_true", help="skip the cold/cached load timing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model("embedded")
    print(f"# NeuronTune engine benchmark — {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"model: {lm.name} {lm.shape} ({lm.source}); torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.processor() or platform.machine()}; median of {args.repeats}")
    a = bench_attribution(lm, args.repeats)
    g = bench_generate(lm, args.repeats)
    wall = lambda t: med(t[0])  # noqa: E731
    cpu = lambda t: med(t[1])  # noqa: E731
    ratio = lambda x, y: f"{cpu(x) / cpu(y):.3f}x CPU ({wall(x) / wall(y):.2f}x wall)"  # noqa: E731
    n_tok = g["n_tokens"]
    rows = [
        ("bare fwd+bwd (grad w.r.t. inputs_embeds), 8 prompts", f"{wall(a['bare']):.2f} s", f"{cpu(a['bare']):.2f} s",
         f"{a['tokens']} tokens", ""),
        ("attribution grad_x_act, 8 prompts", f"{wall(a['attr']):.2f} s", f"{cpu(a['attr']):.2f} s",
         f"{cpu(a['attr']) / 8 * 1000:.0f} ms CPU per prompt", ""),
        ("attribution / bare fwd+bwd", ratio(a["attr"], a["bare"]), "",
         "CPU runs: " + ", ".join(f"{x / y:.3f}" for x, y in zip(a["attr"][1], a["bare"][1])),
         f"goal <= {GOALS['attribution / bare fwd+bwd']}x"),
        ("attribution IG 8 steps, 8 prompts", f"{wall(a['ig']):.2f} s", f"{cpu(a['ig']):.2f} s",
         f"{cpu(a['ig']) / 8 * 1000:.0f} ms CPU per prompt", f"{cpu(a['ig']) / cpu(a['attr']):.1f}x grad_x_act"),
        ("generate, no modulation", f"{n_tok / wall(g['plain']):.1f} tok/s", f"{n_tok / cpu(g['plain']):.1f} tok/CPU-s",
         "8 x 48 new tokens, greedy", ""),
        (f"generate, {g['n_modulated']} neurons in {g['n_layers_hooked']} layers", f"{n_tok / wall(g['mod']):.1f} tok/s",
         f"{n_tok / cpu(g['mod']):.1f} tok/CPU-s", "same tokens, per-layer gain hooks", ""),
        ("modulated / plain generate time", ratio(g["mod"], g["plain"]), "",
         "CPU runs: " + ", ".join(f"{x / y:.3f}" for x, y in zip(g["mod"][1], g["plain"][1])),
         f"goal <= {GOALS['modulated / plain generate time']}x"),
    ]
    sel = bench_selection(lm.shape, args.repeats)
    rows.append((f"selection of {lm.shape[0] * lm.shape[1]:,} neurons (1500 / 500 / protect 500)", f"{sel * 1000:.1f} ms", "",
                 "from cached scores: what a slider move costs", f"goal <= {GOALS['selection (ms)']} ms"))
    if not args.skip_load:
        del lm
        gc.collect()
        ld = bench_load(min(3, args.repeats))
        rows += [("load, cold (GGUF -> fresh cache)", f"{ld['cold_s']:.1f} s", "", "runs: " + ", ".join(f"{t:.1f}" for t in ld["cold_all"]), ""),
                 ("load, cached (safetensors)", f"{ld['cached_s']:.2f} s", "", "runs: " + ", ".join(f"{t:.2f}" for t in ld["cached_all"]),
                  f"{ld['cold_s'] / ld['cached_s']:.0f}x faster than cold")]
    print()
    print("| measure | median wall | median CPU | detail | goal / note |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
