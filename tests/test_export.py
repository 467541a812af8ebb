"""Export round trip: the folded checkpoint, loaded by plain transformers, reproduces the hooked model."""

import pytest
import torch
from conftest import random_modulation
from transformers import AutoModelForCausalLM

from neurontune.interventions.modulation import modulate
from neurontune.run.export import ExportError, export, export_path, slugify
from neurontune.run.folder import RunFolder


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_export_round_trip(request, tmp_path, name):
    lm = request.getfixturevalue(name)
    mod = random_modulation(lm.shape, 60, seed=3, fingerprint=lm.fingerprint)
    summary = {"split": "test", "seeds": 3, "table": [
        {"intervention": "base", "seeds": 1, "harmful_refusal": 0.1, "harmful_refusal:lo": 0.05, "harmful_refusal:hi": 0.2},
        {"intervention": "neurontune", "seeds": 3, "harmful_refusal": 0.9, "harmful_refusal:sd": 0.02, "harmful_refusal:lo": 0.83,
         "harmful_refusal:hi": 0.94}],
        "judge": "model:embedded", "second_judge": "rules",
        "judge_note": "refusal judge: model:embedded (partial refusals counted as refusals; strict rates: full refusals only); "
                      "second opinion: rules"}
    result = export(lm, mod, tmp_path, "tuned-1", preset={"name": "balanced"}, eval_summary=summary)
    folder = tmp_path / "tuned-1"
    assert result["max_logit_diff"] < 1e-4
    for f in ("model.safetensors", "config.json", "modulation.safetensors", "preset.json", "README.md", "export_check.json"):
        assert (folder / f).exists(), f
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = lm.tokenizer(["a quick test of the export"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), modulate(lm.model, mod):
        hooked = lm.model(ids).logits
    with torch.no_grad():
        plain = reloaded(ids).logits
    assert (plain - hooked).abs().max() < 1e-4
    card = (folder / "README.md").read_text()
    assert "| neurontune | 0.900 ± 0.020 [0.83, 0.94]" in card and "| base | 0.100 [0.05, 0.20]" in card
    assert "input gate" not in card
    assert "comes from the refusal judge: model:embedded (partial refusals counted" in card and "`judges agree`" in card
    assert "Quoted from the run's evaluation, not measured on this export" in card and "applied by hooks" in card
    # the row of the run's exported checkpoints, over 3 seeds: a mean of three checkpoints, and the card says so
    summary["table"].append({**summary["table"][1], "intervention": "neurontune export"})
    export(lm, mod, tmp_path, "tuned-2", preset={"name": "balanced"}, eval_summary=summary)
    card = (tmp_path / "tuned-2" / "README.md").read_text()
    assert "`neurontune export` row is the mean of 3 checkpoints, one per training seed" in card
    assert "| neurontune export | 0.900" in card and "| neurontune | 0.900" not in card
    # the shared model itself was not modified by the export
    with torch.no_grad():
        assert not torch.allclose(lm.model(ids).logits, hooked)


@pytest.mark.parametrize("bad", ["../up", "a/b", "/abs", "..", ".hidden", "x" * 101, "semi;colon", "", "sp ace"])
def test_unsafe_names_refused(tmp_path, bad):
    with pytest.raises(ExportError, match="not allowed|leave"):
        export_path(tmp_path, bad)
    assert export_path(tmp_path, slugify(bad)).parent == tmp_path.resolve()


def test_existing_export_not_overwritten_and_failure_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    mod = random_modulation(tiny_llama.shape, 10, fingerprint=tiny_llama.fingerprint)
    export(tiny_llama, mod, tmp_path, "one")
    with pytest.raises(ExportError, match="already exists"):
        export(tiny_llama, mod, tmp_path, "one")
    export(tiny_llama, mod, tmp_path, "one", overwrite=True)
    from neurontune.run import export as export_mod
    monkeypatch.setattr(export_mod, "model_card", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        export(tiny_llama, mod, tmp_path, "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]


def test_wrong_model_refused_and_gate_said_to_be_left_out(tiny_llama, tmp_path):
    mod = random_modulation(tiny_llama.shape, 10, fingerprint="someothermodel")
    with pytest.raises(ExportError, match="made for model"):
        export(tiny_llama, mod, tmp_path, "x")
    gains = random_modulation(tiny_llama.shape, 10, fingerprint=tiny_llama.fingerprint)
    result = export(tiny_llama, gains, tmp_path, "x", gated=True)
    card = (tmp_path / "x" / "README.md").read_text()
    assert result["gate_left_out"] and "not in this checkpoint" not in card  # no evaluation: nothing to say yet
    summary = {"table": [{"intervention": "neurontune", "seeds": 1, "harmful_refusal": 0.5},
                         {"intervention": "neurontune + gate", "seeds": 1, "harmful_refusal": 0.9}]}
    export(tiny_llama, gains, tmp_path, "y", gated=True, eval_summary=summary)
    card = (tmp_path / "y" / "README.md").read_text()
    assert "**not in this checkpoint**" in card and "`neurontune + gate`" in card and "| neurontune | 0.500" in card


def test_failed_push_keeps_local_export_and_hides_token(tiny_llama, tmp_path):
    mod = random_modulation(tiny_llama.shape, 10, fingerprint=tiny_llama.fingerprint)
    token = "hf_plantedSECRETtoken123"
    result = export(tiny_llama, mod, tmp_path, "pushed", push_to_hub="nobody/none", token=token)
    assert result["pushed"] is None and result["push_error"]
    assert token not in result["push_error"]
    assert (tmp_path / "pushed" / "model.safetensors").exists()
    for f in (tmp_path / "pushed").iterdir():
        if f.suffix in (".json", ".md", ".txt", ".jinja"):
            assert token not in f.read_text(errors="ignore")


# -- low precision -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def bf16(request):
    from neurontune.model.loading import load_model
    return load_model(request.param, dtype="bfloat16")


def test_load_model_honours_dtype_for_tiny_models(tiny_llama):
    from neurontune.model.loading import load_model
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        lm = load_model("tiny-llama", dtype=dtype)
        assert lm.model.dtype == torch_dtype and all(p.dtype == torch_dtype for p in lm.model.parameters())
        ref = tiny_llama.model.get_input_embeddings().weight.to(torch_dtype)  # the float32 model, cast
        assert torch.equal(lm.model.get_input_embeddings().weight, ref)
    assert load_model("tiny-llama", dtype="bfloat16").fingerprint == tiny_llama.fingerprint


def _modulation(lm):
    """Gains 0.5-2 on 5 % of the neurons (at least 60), the setting in which bf16 folds were refused before."""
    return random_modulation(lm.shape, max(60, lm.shape[0] * lm.shape[1] // 20), seed=5, low=0.5, high=2.0,
                             fingerprint=lm.fingerprint)


def test_bf16_export_reloads_within_its_rounding(bf16, tmp_path):
    """A bfloat16 model exports: the fold is made in float32 and rounded once, the reloaded checkpoint is
    bfloat16 and its logits are within 3x the bf16 rounding of the hooked logits (measured against float32)."""
    mod = _modulation(bf16)
    result = export(bf16, mod, tmp_path, "half")
    check = RunFolder(tmp_path / "half").export_check()
    assert check["dtype"] == "bfloat16" and check["rounding"] > 0
    assert check["tolerance"] == pytest.approx(max(3 * check["rounding"], 1e-3))
    assert result["max_logit_diff"] == check["max_logit_diff"] <= check["tolerance"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "half").eval()
    assert reloaded.dtype == torch.bfloat16
    ids = bf16.tokenizer(["a quick test of the export"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with modulate(bf16.model, mod):
            hooked = bf16.model(ids).logits.float()
        assert (reloaded(ids).logits.float() - hooked).abs().max() <= check["tolerance"]
        assert (bf16.model(ids).logits.float() - hooked).abs().max() > check["tolerance"]  # the gains matter


def test_wrong_bf16_fold_is_caught(bf16, tmp_path, monkeypatch):
    """Gains folded twice (gain squared) differ from the hooked model far beyond the bf16 rounding: refused,
    nothing written."""
    from neurontune.run import export as export_mod
    right = export_mod._folded_state_dict
    from neurontune.interventions.modulation import Modulation
    monkeypatch.setattr(export_mod, "_folded_state_dict",
                        lambda lm, mod: right(lm, Modulation.from_dense(mod.dense() * mod.dense(), mod.fingerprint)))
    with pytest.raises(ExportError, match=r"differs from the hooked model .*3 x the bfloat16 rounding"):
        export(bf16, _modulation(bf16), tmp_path, "twice")
    assert not (tmp_path / "twice").exists()


def test_float16_export(tmp_path):
    from neurontune.model.loading import load_model
    lm = load_model("tiny-llama", dtype="float16")
    result = export(lm, _modulation(lm), tmp_path, "fp16")
    assert 0 < result["rounding"] and result["max_logit_diff"] <= result["tolerance"]
