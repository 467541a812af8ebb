"""GGUF export: the file `transformers` reloads holds the tuned weights, layout mistakes are caught before anything is
saved, a GGUF model is copied with only its changed tensors re-quantised, and (embedded model) llama.cpp itself
answers with the GGUF like the hooked model does."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import encode, logits, random_modulation

from neurontune.cli import main
from neurontune.interventions.modulation import modulate
from neurontune.model.loading import load_model
from neurontune.run import gguf_export
from neurontune.run.export import ExportError, export, up_projections
from neurontune.run.folder import RunFolder

Q = gguf.GGMLQuantizationType


def _gguf(result: dict) -> Path:
    return Path(result["path"]) / result["gguf"]["file"]


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_tiny_gguf_holds_the_tuned_model(lm, tmp_path, gguf_type):
    """transformers' own GGUF loader gets back the tuned model: its logits sit near the hooked model's and far
    from the base model's (the gains are in the file), and every weight is within its type's rounding."""
    from transformers import AutoModelForCausalLM

    mod = random_modulation(lm.shape, 60, seed=3, low=0.0, high=3.0, fingerprint=lm.fingerprint)
    result = export(lm, mod, tmp_path, "t", format="gguf", gguf_type=gguf_type, preset={"name": "balanced"})
    g, path = result["gguf"], _gguf(result)
    assert path.name == f"t.{gguf_type.upper()}.gguf" and path.is_file()
    assert set(g["changed_types"]) == {gguf_type.upper()} and g["weights_checked"] > 20
    assert 0 < g["max_weight_error"] < (2e-3 if gguf_type == "f16" else 3e-2)
    given = {"config": lm.model.config} if lm.model.config.model_type == "gpt2" else {}  # see gguf_export.check_gguf
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **given).eval()
    ids = encode(lm, "a quick test of the export")
    with modulate(lm.model, mod):
        hooked = logits(lm, ids)
    base, plain = logits(lm, ids), logits(lm, ids, reloaded)
    to_tuned, to_base = float((plain - hooked).abs().max()), float((plain - base).abs().max())
    assert to_tuned < to_base / 10, (to_tuned, to_base)
    card = (path.parent / "README.md").read_text()
    assert "library_name: gguf" in card and path.name in card and f"{g['weights_checked']} weights compared" in card
    assert RunFolder(path.parent).modulation(lm.fingerprint) is not None  # the export still reads as a run folder
    meta = gguf.GGUFReader(path).fields
    assert str(meta["neurontune.base_fingerprint"].contents()) == lm.fingerprint
    assert str(meta["tokenizer.chat_template"].contents()) == lm.tokenizer.chat_template


def test_a_measured_gguf_export_carries_the_figures_of_the_file_read_back(lm, tmp_path):
    """With a measurement, a GGUF export's card carries the figures of the GGUF file as transformers reads it back, not
    those of the float weights it was written from: the same modulation exported as a float32 checkpoint measures the
    same prompts with another perplexity (q8_0 rounds the changed tensors), close to it."""
    mod = random_modulation(lm.shape, 60, seed=3, low=0.0, high=3.0, fingerprint=lm.fingerprint)
    result = export(lm, mod, tmp_path, "q", format="gguf", gguf_type="q8_0", preset={"name": "balanced"}, measure="validation")
    own = result["measured"]
    assert own["read_back"] == "gguf" and own["split"] == "validation" and own["form"] == "static"
    card = (Path(result["path"]) / "README.md").read_text()
    assert "Measured on **this GGUF file, read back by plain `transformers`**" in card and "| this checkpoint |" in card
    assert json.loads((Path(result["path"]) / RunFolder.EXPORT_CHECK).read_text())["measured"]["read_back"] == own["read_back"]
    float32 = export(lm, mod, tmp_path, "f", preset={"name": "balanced"}, measure="validation")["measured"]
    assert float32["read_back"] == "checkpoint"

    def ppl(m):
        return next(r["ppl_ratio"] for r in m["table"] if r["intervention"] == "this checkpoint")
    assert ppl(own) != ppl(float32) and abs(ppl(own) / ppl(float32) - 1) < 0.05, (ppl(own), ppl(float32))


def test_gated_mlp_folds_into_up_rows(tiny_llama, tiny_gpt2):
    """A gain on neuron i of a gated MLP is row i of up_proj scaled (what keeps block quantisation exact); GPT-2 has
    no gate, so its gains stay in the output projection."""
    assert up_projections(tiny_llama) == [f"model.layers.{i}.mlp.up_proj" for i in range(tiny_llama.nmap.n_layers)]
    assert up_projections(tiny_gpt2) is None


def test_a_layout_mistake_is_caught_and_nothing_is_saved(tiny_llama, tmp_path, monkeypatch):
    """Writing llama's q/k without llama.cpp's permutation: transformers' loader un-permutes them, the weights no
    longer match, the export is refused and leaves no folder behind."""
    mod = random_modulation(tiny_llama.shape, 30, seed=1, fingerprint=tiny_llama.fingerprint)
    monkeypatch.setattr(gguf_export, "_gguf_layout", lambda arch, key, w, config: w)
    with pytest.raises(ExportError, match="differs from the folded weights"):
        export(tiny_llama, mod, tmp_path, "broken", format="gguf")
    assert not any(tmp_path.iterdir())


def test_gguf_source_is_copied_with_only_changed_tensors_requantised(tiny_llama, tmp_path, monkeypatch):
    """A model loaded from a GGUF: the export is that file with its metadata, unchanged tensors byte for byte, the
    changed ones in their own type; a type gguf cannot quantise goes to Q8_0 with a note."""
    src = _gguf(export(tiny_llama, random_modulation(tiny_llama.shape, 1, fingerprint=tiny_llama.fingerprint), tmp_path, "src",
                       format="gguf", gguf_type="f16"))
    lm = load_model(str(src))
    mod = random_modulation(lm.shape, 40, seed=5, fingerprint=lm.fingerprint)
    result = export(lm, mod, tmp_path, "again", format="gguf")
    g = result["gguf"]
    assert g["source"] == f"gguf:{src.name}" and g["changed_types"] == {"F16": 3} and g["copied"] == 27
    old, new = gguf.GGUFReader(src), gguf.GGUFReader(_gguf(result))
    changed = set(g["changed"])
    assert changed == {f"blk.{i}.ffn_up.weight" for i in range(3)}
    for a, b in zip(old.tensors, new.tensors):
        assert a.name == b.name and a.tensor_type == b.tensor_type
        assert np.array_equal(a.data, b.data) != (a.name in changed), a.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "llama.block_count", "general.architecture"):
        assert old.fields[key].contents() == new.fields[key].contents()

    monkeypatch.setattr(gguf_export, "requantisable", lambda qtype: qtype != Q.F16)
    g = export(lm, mod, tmp_path, "fallback", format="gguf")["gguf"]
    assert g["changed_types"] == {"Q8_0": 3} and "cannot quantise: written as Q8_0" in g["notes"][0]


def test_requantisable_types():
    assert all(gguf_export.requantisable(t) for t in (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0))
    assert not any(gguf_export.requantisable(t) for t in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL))


def test_unsupported_models_are_refused_with_a_message(tiny_llama, tmp_path, monkeypatch):
    mod = random_modulation(tiny_llama.shape, 10, fingerprint=tiny_llama.fingerprint)
    with pytest.raises(ExportError, match="not one of"):
        export(tiny_llama, mod, tmp_path, "x", format="onnx")
    monkeypatch.setattr(tiny_llama.model.config, "model_type", "opt")
    with pytest.raises(ExportError, match="export --format transformers"):
        export(tiny_llama, mod, tmp_path, "x", format="gguf")
    assert not any(tmp_path.iterdir())


def test_cli_exports_gguf(tiny_llama, tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    run.write_modulation(random_modulation(tiny_llama.shape, 20, fingerprint=tiny_llama.fingerprint))
    from neurontune.config import load_preset
    run.write_config(load_preset("balanced").replace(model="tiny-llama"))
    assert main(["export", "--model", "tiny-llama", "--run", str(run.path), "--name", "g", "--root", str(tmp_path / "ex"),
                 "--format", "gguf", "--gguf-type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "g.Q8_0.gguf" in out and "llama-cli -m" in out
    check = json.loads((tmp_path / "ex" / "g" / "export_check.json").read_text())
    assert check["gguf"]["changed_types"] == {"Q8_0": 3}
    assert check["measured"]["split"] == "test" and check["measured"]["read_back"] == "gguf"  # measured by default
