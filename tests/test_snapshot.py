"""The shipped run (`assets/default_run`, made by `python -m neurontune snapshot --preset balanced`) and the
snapshot machinery. `test_shipped_run_matches_the_code` FAILS when the shipped run no longer matches the code:
its format version, the config digest of the preset it claims against presets/*.json today, its own files and,
when the embedded model package is installed, the model fingerprint. Regenerate it with that command."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import random_modulation
from neurontune.config import load_preset
from neurontune.method.neuron_scores import NeuronScores
from neurontune.method.selection import select
from neurontune.run import snapshot as snap
from neurontune.run.folder import RunFolder
from neurontune.run.snapshot import SHIPPED_DIR, SNAPSHOT_COMMAND, SnapshotError, check_snapshot, load_snapshot, snapshot_run


def fake_run(tmp_path, lm, cfg):
    """A run folder as `tune --preset <cfg.name> --quick-eval` leaves it, with random scores and gains."""
    folder = RunFolder(tmp_path / "run").made()
    folder.write_config(cfg)
    gen = torch.Generator().manual_seed(0)
    scores = NeuronScores({k: torch.randn(lm.shape, generator=gen) for k in ("safety", "over_refusal", "benign_dependence")})
    folder.write_scores(scores)
    folder.write_selection(select(scores, cfg.selection))
    folder.write_modulation(random_modulation(lm.shape, 30, fingerprint=lm.fingerprint))
    import pandas as pd
    folder.write_eval({"table": [{"intervention": "base", "harmful_refusal": 0.0}], "heldout_families": ["few_shot"]},
                      pd.DataFrame([{"harmful_refusal": 0.0}], index=["base"]))
    folder.file(RunFolder.ATTRIBUTION).write_text(json.dumps({"model": lm.name, "fingerprint": lm.fingerprint}))
    return folder, scores


@pytest.fixture
def tiny_cfg(tiny_llama):
    """`balanced` with counts that fit the tiny model (selection is what the digest would catch)."""
    return load_preset("balanced").replace(model="tiny-llama", selection={"k_safety": 30, "k_utility": 10, "protect_top": 5})


def test_snapshot_roundtrip_and_what_it_checks(tmp_path, tiny_llama, tiny_cfg, monkeypatch):
    monkeypatch.setattr(snap, "load_preset", lambda name: tiny_cfg if name == "balanced" else load_preset(name))
    run, scores = fake_run(tmp_path, tiny_llama, tiny_cfg)
    out = tmp_path / "shipped"
    manifest = snapshot_run(run, out)
    assert manifest["format"] == snap.SNAPSHOT_FORMAT and manifest["fingerprint"] == tiny_llama.fingerprint
    assert manifest["scores_dtype"] == "float16" and manifest["selection_unchanged"] and manifest["max_relative_change"] < 1e-3
    assert manifest["command"] == SNAPSHOT_COMMAND and set(manifest["files"]) >= {"scores.safetensors", "modulation.safetensors"}
    assert check_snapshot(out, tiny_llama) == []
    shipped = load_snapshot(out, tiny_llama)
    assert shipped.scores["safety"].dtype == torch.float32
    assert torch.allclose(shipped.scores["safety"], scores["safety"], rtol=1e-3, atol=1e-4)
    assert torch.equal(select(shipped.scores, tiny_cfg.selection).safety, select(scores, tiny_cfg.selection).safety)
    # what makes it stale: another model, a changed preset, a new format
    assert any("the loaded model is" in p for p in check_snapshot(out, _other_model(tiny_llama)))
    changed = tiny_cfg.replace(meta={"steps": tiny_cfg.meta.steps + 1})
    monkeypatch.setattr(snap, "load_preset", lambda name: changed)
    assert any("has changed since the snapshot" in p for p in check_snapshot(out))
    with pytest.raises(SnapshotError, match="Regenerate it with"):
        load_snapshot(out)
    monkeypatch.setattr(snap, "load_preset", lambda name: tiny_cfg)
    monkeypatch.setattr(snap, "SNAPSHOT_FORMAT", snap.SNAPSHOT_FORMAT + 1)
    assert any("this code reads format" in p for p in check_snapshot(out))


def _other_model(lm):
    import dataclasses
    return dataclasses.replace(lm, fingerprint="0123456789abcdef")


def test_refuses_a_run_unlike_its_preset_and_a_folder_that_is_not_a_snapshot(tmp_path, tiny_llama, tiny_cfg):
    run, _ = fake_run(tmp_path, tiny_llama, tiny_cfg)  # counts differ from presets/balanced.json
    with pytest.raises(SnapshotError, match="differ from presets/balanced.json"):
        snapshot_run(run, tmp_path / "out")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(SnapshotError, match="not a snapshot"):
        _snapshot_into(run, keep, tiny_cfg)
    assert (keep / "notes.txt").read_text() == "mine"


def _snapshot_into(run, out, cfg):
    from unittest import mock
    with mock.patch.object(snap, "load_preset", lambda name: cfg):
        return snapshot_run(run, out)


def test_shipped_run_matches_the_code():
    """Fails when the shipped run is stale: regenerate it with `python -m neurontune snapshot --preset balanced`."""
    from neurontune.model.loading import embedded_dir, load_model
    assert RunFolder(SHIPPED_DIR).snapshot() is not None, f"no shipped run in {SHIPPED_DIR}: run `{SNAPSHOT_COMMAND}`"
    lm = load_model("embedded") if embedded_dir() is not None else None  # no package: the fingerprint part is skipped
    problems = check_snapshot(SHIPPED_DIR, lm)
    assert problems == [], f"The shipped run no longer matches the code: {problems}. Regenerate it: `{SNAPSHOT_COMMAND}`."
    shipped = load_snapshot(SHIPPED_DIR, lm)
    manifest = shipped.manifest
    assert manifest["bytes"] < 8_000_000, "the shipped run should stay a few MB (no weights)"
    assert not any(name.endswith((".bin", ".gguf")) or name == "model.safetensors" for name in manifest["files"])
    # float16 scores leave the selection exactly as the run made it (selection.json was written from float32)
    made = json.loads(RunFolder(SHIPPED_DIR).file(RunFolder.SELECTION).read_text())
    again = select(shipped.scores, shipped.cfg.selection)
    assert again.counts() == made["counts"]
    assert again.per_layer().to_dict(orient="list") == made["per_layer"]
    names = {r["intervention"] for r in shipped.eval_rows or []}
    assert "base" in names and ("neurontune" in names or "neurontune + gate" in names), names  # gains trained behind a gate: gated only
    assert shipped.gate is not None and shipped.modulation.n_modulated > 0
