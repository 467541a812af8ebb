"""GPU benchmark of the engine on a random Llama built from a config (no download): attribution against a bare
forward+backward, modulated against plain generation (gains shared by all rows, and per row), and the studio's
side-by-side chat (base + tuned rows in one batched streamed call) against one streamed generation.

    python bench/bench_gpu.py                  # ~1.2 B Llama (hidden 2048, MLP 8192, 16 layers, vocab 128256), bf16, cuda
    python bench/bench_gpu.py --device cpu --dtype float32 --hidden 256 --mlp 1024 --layers 4 --vocab 4096 --threads 1

Each figure is the median of `--repeats` (>= 10) timed runs after `--warmup` untimed ones; compared functions
are timed in turn, run after run, so load changes hit both alike. On CUDA every timing is bracketed by
`torch.cuda.synchronize()` and ratios come from wall time; peak memory is `torch.cuda.max_memory_allocated`
per measure. On the CPU, ratios come from process CPU time (steady on a shared machine with --threads 1)
and the memory column is the process's peak resident set so far (`ru_maxrss`).
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import resource
import statistics
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from neurontune.config import AttributionConfig  # noqa: E402
from neurontune.interventions.generation import generate, stream_generate  # noqa: E402
from neurontune.interventions.modulation import Modulation  # noqa: E402
from neurontune.method.attribution import attribute  # noqa: E402
from neurontune.model.loading import LoadedModel, fingerprint  # noqa: E402
from neurontune.model.logprobs import encode_pairs, forward, target_logprob  # noqa: E402
from neurontune.model.neuron_map import neuron_map  # noqa: E402
from neurontune.model.tiny import tiny_tokenizer  # noqa: E402

TARGETS = {"attribution / bare fwd+bwd": 1.15, "modulated / plain generation (shared gains)": 1.03,
           "modulated / plain generation (per-row gains)": 1.03, "side-by-side chat / one generation": 1.2}


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak: int = 0  # bytes: max_memory_allocated on CUDA, peak RSS on the CPU


@dataclass
class Row:
    measure: str
    seconds: float | None = None
    tokens_per_s: float | None = None
    ratio: float | None = None
    target: float | None = None
    peak: str = ""
    detail: str = ""


class Clock:
    """Times functions on one device: synchronised wall time on CUDA, plus process CPU time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_memory(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def run(self, fn: Callable[[], object], timing: Timing) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.sync()
        timing.wall.append(time.perf_counter() - wall)
        timing.cpu.append(time.process_time() - cpu)
        timing.peak = max(timing.peak, self.peak_memory())

    def interleaved(self, fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, Timing]:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        out = {name: Timing() for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                self.run(fn, out[name])
        return out

    def seconds(self, t: Timing) -> float:
        """The figure ratios are taken from: wall time on CUDA, process CPU time on the CPU."""
        return statistics.median(t.wall if self.cuda else t.cpu)


def build_model(args: argparse.Namespace) -> LoadedModel:
    """A randomly initialised Llama of the requested size on the device, in the dtype, with the byte-level
    tokenizer of the tiny models. End-of-turn and pad never win a greedy step (their output rows are zero
    while the largest of the other logits is positive), so every run generates exactly --new-tokens tokens."""
    tok = tiny_tokenizer()
    if args.vocab < len(tok):
        raise SystemExit(f"--vocab must be at least {len(tok)} (the byte tokenizer's size).")
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    with torch.no_grad():
        model.get_output_embeddings().weight[[tok.eos_token_id, tok.pad_token_id]] = 0
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval().requires_grad_(False)
    nmap = neuron_map(model)
    return LoadedModel(model, tok, "random-llama", fingerprint(model, nmap), nmap)


def random_text(rng: random.Random, n: int) -> str:
    """n ASCII characters: n tokens for the byte-level tokenizer."""
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n))


def random_modulation(shape: tuple[int, int], fraction: float, seed: int) -> Modulation:
    """Gains uniform in [0.5, 2] on `fraction` of all neurons (spread over every layer)."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.ones(shape)
    n = max(1, int(fraction * dense.numel()))
    dense.view(-1)[torch.randperm(dense.numel(), generator=gen)[:n]] = 0.5 + 1.5 * torch.rand(n, generator=gen)
    return Modulation.from_dense(dense)


def bench(lm: LoadedModel, args: argparse.Namespace, clock: Clock) -> list[Row]:
    rng = random.Random(args.seed)
    B, new = args.batch, args.new_tokens
    prompts = [random_text(rng, args.prompt_tokens) for _ in range(B)]
    targets = [random_text(rng, args.target_tokens) for _ in range(B)]
    batch = encode_pairs(lm.tokenizer, prompts, targets, max_length=args.prompt_tokens + args.target_tokens)
    embed = lm.model.get_input_embeddings()
    device = embed.weight.device
    mod = random_modulation(lm.shape, args.modulated, args.seed)
    per_row = [None if b % 2 == 0 else mod for b in range(B)]  # base and tuned rows, as the studio's compare
    cfg = AttributionConfig(batch_size=B, max_length=args.prompt_tokens + args.target_tokens)

    def bare() -> None:  # same tokens and loss, no hooks: gradient w.r.t. the input embeddings only
        embeds = embed(batch.input_ids.to(device)).detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(target_logprob(forward(lm.model, batch, embeds), batch).sum(), embeds)

    def gen(gains) -> Callable[[], object]:
        return lambda: generate(lm, prompts, gains, max_new_tokens=new, batch_size=B, formatted=True)

    conv = [{"role": "user", "content": prompts[0]}]

    def chat(convs, gains) -> Callable[[], object]:
        return lambda: list(stream_generate(lm, convs, gains, max_new_tokens=new))

    r, w = args.repeats, args.warmup
    a = clock.interleaved({"bare": bare, "attr": lambda: attribute(lm, prompts, targets, cfg)}, r, w)
    g = clock.interleaved({"plain": gen(None), "shared": gen(mod), "per_row": gen(per_row)}, r, w)
    c = clock.interleaved({"one": chat([conv], None), "side": chat([conv, conv], [None, mod])}, r, w)
    mem = lambda t: f"{t.peak / 2**20:,.0f} MiB"  # noqa: E731
    s = clock.seconds
    n_gen, tokens = B * new, int(batch.attention_mask.sum())
    return [
        Row("bare fwd+bwd", s(a["bare"]), tokens / s(a["bare"]), peak=mem(a["bare"]), detail=f"{B} x {batch.input_ids.shape[1]} tokens"),
        Row("attribution (grad_x_act)", s(a["attr"]), tokens / s(a["attr"]), peak=mem(a["attr"]), detail="attribute(), one batch"),
        Row("attribution / bare fwd+bwd", ratio=s(a["attr"]) / s(a["bare"])),
        Row("plain generation", s(g["plain"]), n_gen / s(g["plain"]), peak=mem(g["plain"]), detail=f"{B} rows x {new} new tokens, greedy"),
        Row("modulated generation (shared gains)", s(g["shared"]), n_gen / s(g["shared"]), peak=mem(g["shared"]),
            detail=f"{mod.n_modulated:,} neurons in {len(mod.layers)} layers"),
        Row("modulated / plain generation (shared gains)", ratio=s(g["shared"]) / s(g["plain"])),
        Row("modulated generation (per-row gains)", s(g["per_row"]), n_gen / s(g["per_row"]), peak=mem(g["per_row"]),
            detail="rows alternate base / tuned"),
        Row("modulated / plain generation (per-row gains)", ratio=s(g["per_row"]) / s(g["plain"])),
        Row("one generation (streamed)", s(c["one"]), new / s(c["one"]), peak=mem(c["one"]), detail=f"1 row x {new} new tokens"),
        Row("side-by-side chat (base + tuned, one call)", s(c["side"]), 2 * new / s(c["side"]), peak=mem(c["side"]),
            detail="stream_generate, as the studio's Compare tab"),
        Row("side-by-side chat / one generation", ratio=s(c["side"]) / s(c["one"])),
    ]


def markdown(rows: list[Row]) -> str:
    """The table: one line per row; ratios carry their target and whether it is met."""
    def num(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)
    lines = ["| measure | median s | tokens/s | ratio | target | peak memory | detail |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        target = TARGETS.get(row.measure)
        met = "" if target is None or row.ratio is None else (" (met)" if row.ratio <= target else " (missed)")
        lines.append(f"| {row.measure} | {num(row.seconds, '.4f')} | {num(row.tokens_per_s, ',.1f')} | {num(row.ratio, '.3f')}"
                     f"{'x' if row.ratio is not None else ''} | {'' if target is None else f'<= {target}x{met}'} | {row.peak} | {row.detail} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=120)
    p.add_argument("--target-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--modulated", type=float, default=0.05, help="fraction of all neurons with a gain (default 5 %%)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per figure (at least 10), median reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs: 1 on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 10:
        p.error("--repeats must be at least 10 (medians of fewer runs are too noisy to call a 3 % target).")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)
    lm = build_model(args)
    n_params = sum(p.numel() for p in lm.model.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    rows = bench(lm, args, clock)
    print(f"# NeuronTune GPU benchmark — {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{where}; torch {torch.__version__}; random Llama {n_params / 1e9:.3f} B parameters (hidden {args.hidden}, MLP {args.mlp}, "
          f"{args.layers} layers, vocab {args.vocab}), {args.dtype}; median of {args.repeats} after {args.warmup} warm-up; "
          f"ratios from {'wall time (synchronised)' if clock.cuda else 'process CPU time'}; "
          f"memory: {'max_memory_allocated' if clock.cuda else 'process peak RSS'}")
    print()
    print(markdown(rows))
    bad = [r.measure for r in rows if r.ratio is not None and not math.isfinite(r.ratio)]
    if bad:
        raise SystemExit(f"Non-finite ratios: {bad}")
    return rows


if __name__ == "__main__":
    main()
