"""bench/bench_gpu.py at tiny size on the CPU: it prints the full table, and every ratio is a finite number."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--dtype", "float32", "--hidden", "64", "--mlp", "128", "--layers", "2", "--heads", "4",
        "--kv-heads", "2", "--vocab", "300", "--batch", "2", "--prompt-tokens", "16", "--target-tokens", "4",
        "--new-tokens", "4", "--warmup", "1", "--repeats", "10"]
RATIOS = ("attribution / bare fwd+bwd", "modulated / plain generation (shared gains)",
          "modulated / plain generation (per-row gains)", "side-by-side chat / one generation")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_every_row_with_finite_ratios(bench, capsys):
    rows = bench.main(TINY)
    out = capsys.readouterr().out
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in out.splitlines() if line.startswith("| ") and not line.startswith("| measure")}
    for name in ("bare fwd+bwd", "attribution (grad_x_act)", "plain generation", "modulated generation (shared gains)",
                 "modulated generation (per-row gains)", "one generation (streamed)", "side-by-side chat (base + tuned, one call)"):
        seconds, tokens_per_s, _, _, peak, _ = table[name]
        assert float(seconds) > 0 and float(tokens_per_s.replace(",", "")) > 0 and peak.endswith("MiB"), name
    for name in RATIOS:
        ratio, target = table[name][2], table[name][3]
        assert math.isfinite(float(ratio.rstrip("x"))) and float(ratio.rstrip("x")) > 0, name
        assert target.startswith(f"<= {bench.TARGETS[name]}x") and ("(met)" in target or "(missed)" in target), name
    assert {r.measure for r in rows if r.ratio is not None} == set(RATIOS)
    assert "median of 10 after 1 warm-up" in out


def test_fewer_than_ten_repeats_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse(TINY[:-1] + ["9"])
