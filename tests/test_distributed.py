"""Scaling past one process: `accelerate launch` shares attribution and evaluation over processes and the
result equals a single-process run; hooks follow the device of the activation they touch (device_map="auto").

Runs on the CPU with the gloo backend. `accelerate launch --cpu --num_processes 2` starts ONE process (CPU
multi-process needs mpirun); `--multi_gpu --num_processes 2` starts two through torchrun and, with no GPU
visible, they join over gloo.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_modulation
from safetensors import safe_open
from safetensors.torch import load_file

from neurontune.cli import main
from neurontune.config import DataConfig
from neurontune.infra import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTE = ["attribute", "--model", "tiny-llama", "--n-prompts", "6", "--batch-size", "2"]


def _counts(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {})["counts"])


def _cache_names(cache: Path, kind: str) -> list[str]:
    return sorted(p.name for p in (cache / kind).iterdir() if not p.name.startswith(".") and not p.name.endswith(".sha256"))


def test_accelerate_launch_two_processes_equals_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(ATTRIBUTE + ["--out", str(one / "run"), "--cache-dir", str(one / "cache")]) == 0

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "neurontune", *ATTRIBUTE, "--out", str(two / "run"), "--cache-dir", str(two / "cache")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Scored ") == 1, proc.stdout  # only the main process reports
    assert json.loads((two / "run" / "attribution.json").read_text())["processes"] == 2  # really split, not run twice

    a = load_file(str(one / "run" / "scores.safetensors"))
    b = load_file(str(two / "run" / "scores.safetensors"))
    assert sorted(a) == sorted(b)
    for kind in a:
        scale = float(a[kind].abs().max()) or 1.0
        assert torch.allclose(a[kind], b[kind], rtol=1e-5, atol=1e-5 * scale), (kind, float((a[kind] - b[kind]).abs().max()), scale)
    assert _counts(one / "run" / "scores.safetensors") == _counts(two / "run" / "scores.safetensors")
    # The cache keys do not depend on the number of processes (one file each, written by the main process).
    for kind in ("attribution", "answers"):
        names = _cache_names(one / "cache", kind)
        assert names and names == _cache_names(two / "cache", kind), kind


def test_unshared_commands_are_refused_under_a_launcher(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.launched()
    assert main(["tune", "--model", "tiny-llama", "--out", str(tmp_path / "r")]) == 2
    assert "only attribute and evaluate" in capsys.readouterr().err


# -- evaluation and the collectives, in two forked processes (accelerate's debug_launcher, gloo) -------------

def _tiny_eval_config():
    from neurontune.config import EvalConfig
    from neurontune.data import attacks
    return EvalConfig(n_harmful=3, n_per_family=1, families=tuple(sorted(attacks.attack_families()))[:2], n_benign=3,
                      n_borderline=2, n_ppl=2, n_mc=2, max_new_tokens=5, batch_size=2)


def _evaluate_in_process(lm, mod, out_dir: Path, cache_dir: Path) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: a forked child never reuses the parent's thread pool
    from accelerate import PartialState
    PartialState._reset_state()  # the child joins the 2-process group, whatever the parent saw
    from neurontune.data.splits import build_splits
    from neurontune.eval.harness import evaluate
    from neurontune.method.attribution import GroupScores
    rank, size = dist.rank_and_size()
    result = evaluate(lm, mod, build_splits(DataConfig()), _tiny_eval_config(), cache_dir=cache_dir)
    part = GroupScores(torch.full((2, 3), float(rank + 1)), torch.zeros(2, 3), torch.ones(2, 3), n=rank + 1, tokens=10)
    total = dist.sum_groups({"g": part})["g"]
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "size": size, "answers": [r["answer"] for r in result.rows], "base": [r["base_answer"] for r in result.rows],
        "metrics": result.metrics, "all_true_split": dist.all_true(rank == 0), "all_true": dist.all_true(True),
        "sum": total.score.tolist(), "n": total.n, "tokens": total.tokens, "mine": dist.shard(list(range(5)))}))


def test_evaluation_generation_shared_over_two_processes(tiny_llama, tmp_path):
    from accelerate import debug_launcher

    from neurontune.data.splits import build_splits
    from neurontune.eval.harness import evaluate

    mod = random_modulation(tiny_llama.shape, 40, seed=3, low=0.0, high=3.0, fingerprint=tiny_llama.fingerprint)
    single = evaluate(tiny_llama, mod, build_splits(DataConfig()), _tiny_eval_config())
    debug_launcher(_evaluate_in_process, args=(tiny_llama, mod, tmp_path, tmp_path / "cache"), num_processes=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["size"] == r1["size"] == 2
    for r in (r0, r1):  # every process has every answer, the same as one process gives
        assert r["answers"] == [row["answer"] for row in single.rows]
        assert r["base"] == [row["base_answer"] for row in single.rows]
        assert r["metrics"] == pytest.approx(single.metrics, nan_ok=True)
        assert r["all_true_split"] is False and r["all_true"] is True
        assert r["sum"] == [[3.0] * 3] * 2 and r["n"] == 3 and r["tokens"] == 20  # sums of sums, sums of counts
    assert r0["mine"] == [0, 2, 4] and r1["mine"] == [1, 3]
    assert (tmp_path / "cache" / "eval_base" / f"{tiny_llama.fingerprint}.json").exists()  # written by the main process


# -- device_map="auto": hooks work on whichever device a layer lives ---------------------------------------

HOOK_MODULES = ("interventions/hooks", "interventions/modulation", "interventions/gating", "interventions/direction",
                "interventions/generation", "method/attribution", "method/metalearn", "model/logprobs", "eval/harness",
                "eval/direction", "eval/proxy", "eval/teacher_forced")
FACTORIES = {"zeros", "ones", "full", "empty", "tensor", "arange", "rand", "randn", "eye", "linspace"}


def test_hooks_never_hard_code_a_device():
    """Inside every hook, new tensors take the activation's device and `.to()` never names a device other than
    "cpu" (results leave the model for the CPU); no engine module names an accelerator."""
    for name in HOOK_MODULES:
        source = (ROOT / "neurontune" / f"{name}.py").read_text(encoding="utf-8")
        assert ".cuda(" not in source and '"cuda' not in source and "'cuda" not in source, name
        for fn in ast.walk(ast.parse(source)):
            if not (isinstance(fn, ast.FunctionDef) and ("hook" in fn.name or fn.name == "pre")) or fn.name == "scoped_pre_hooks":
                continue
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
                attr, owner = call.func.attr, call.func.value
                if isinstance(owner, ast.Name) and owner.id == "torch" and attr in FACTORIES:
                    assert any(k.arg == "device" for k in call.keywords), f"{name}.{fn.name}: torch.{attr} without device="
                if attr == "to":
                    literals = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                    assert all(v == "cpu" for v in literals), f"{name}.{fn.name}: .to({literals})"


def test_gain_hook_follows_the_activation_dtype_and_device(tiny_llama):
    """Gains are kept once on the CPU in float32 and moved lazily to each (device, dtype) a layer runs on."""
    from neurontune.interventions.modulation import _gain_hook
    g = torch.linspace(0.5, 1.5, tiny_llama.shape[1])
    hook = _gain_hook(g, per_row=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):  # stand-ins for layers on different devices
        x = torch.randn(2, 3, tiny_llama.shape[1], dtype=dtype)
        (y,) = hook(None, (x,))
        assert y.dtype == x.dtype and y.device == x.device
        torch.testing.assert_close(y, x * g.to(dtype))
    per_row = _gain_hook(torch.stack([g, torch.ones_like(g)]), per_row=True)
    x = torch.randn(2, 3, tiny_llama.shape[1], dtype=torch.bfloat16)
    (y,) = per_row(None, (x,))
    assert y.dtype == torch.bfloat16 and torch.equal(y[1], x[1])


def test_attribution_sums_live_on_the_cpu(tiny_llama):
    """Gradients and scores leave each layer's device for the CPU, where groups (and processes) are added up."""
    from neurontune.data.chat import chat_prompt
    from neurontune.method.attribution import attribute
    prompts = [chat_prompt(tiny_llama.tokenizer, p) for p in ("hello", "how do I bake bread")]
    out = attribute(tiny_llama, prompts, ["Sure.", "No."])
    for t in out.tensors().values():
        assert t.device.type == "cpu"
    whole = out.tensors()
    parts = attribute(tiny_llama, prompts[:1], ["Sure."]).add(attribute(tiny_llama, prompts[1:], ["No."]))
    assert parts.n == out.n == 2 and parts.tokens == out.tokens
    torch.testing.assert_close(parts.score, whole["score"], rtol=1e-4, atol=1e-5 * float(whole["score"].abs().max()))
