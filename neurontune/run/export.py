"""Export a tuned model: fold the gains into the weights and save a standard checkpoint.

The folder holds safetensors weights, config and tokenizer (plain `transformers` loads it with no
project code), the modulation file, the preset used and a model card with the evaluation table. The
export is written to a temporary folder, reloaded and checked against the hooked model, and only then
moved into place: a failure leaves no half-written export.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch

from ..data.chat import chat_prompt
from ..eval.report import markdown
from ..infra import files
from ..infra.progress import SILENT, Reporter
from ..interventions.modulation import Modulation, folded_state_dict, modulate
from ..model.logprobs import encode_pairs, forward
from ..model.neuron_map import neuron_map
from .folder import RunFolder

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ExportError(ValueError):
    """The export was refused or failed; nothing partial was left behind."""


def slugify(name: str) -> str:
    """A safe folder name from free text (what the UI suggests): letters, digits, '.', '_', '-'."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip(".-_")
    slug = re.sub(r"\.{2,}", ".", slug)[:100]
    return slug or "neurontune-export"


def export_path(root: str | Path, name: str) -> Path:
    """The export folder for `name` under `root`; refuses traversal, separators and odd characters."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ExportError(f"Export name {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit (for example {slugify(str(name))!r}).")
    root = Path(root).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise ExportError(f"Export name {name!r} would leave the export folder {root}.")
    return path


def _folded_state_dict(lm, modulation: Modulation) -> dict[str, torch.Tensor]:
    """The model's state dict with the modulation folded into copies of the weights it changes (the shared model
    itself is never modified): `modulation.folded_state_dict`."""
    return folded_state_dict(lm.model, modulation, lm.nmap)


def _evaluation(summary: dict | None, gated: bool) -> str:
    """The model card's evaluation section: the static gains' row (what this checkpoint computes) beside the base
    model, with intervals, from the run's evaluation; what the gate did is said but not claimed."""
    rows = (summary or {}).get("table") or []
    frame = pd.DataFrame(rows).set_index("intervention") if rows and "intervention" in rows[0] else None
    if frame is None or "neurontune" not in frame.index or "seeds" not in frame.columns:
        return "_Not evaluated: run `python -m neurontune evaluate --run DIR` before exporting to have the figures here._"
    split, seeds = summary.get("split", "test"), summary.get("seeds", 1)
    text = (f"Held-out {split} prompts (attack families never seen in tuning included), {seeds} training seed(s): mean"
            f"{' ± sd' if seeds > 1 else ''} [Wilson 95 % interval]. The `neurontune` row is what this checkpoint computes.\n\n"
            + markdown(frame, {"": [n for n in ("base", "neurontune") if n in frame.index]}))
    if gated:
        gated_row = next((n for n in frame.index if n.startswith("neurontune") and n != "neurontune"), None)
        text += ("\n\nThe run also has an **input gate** (a probe that scales the gains per prompt). A gate cannot be folded "
                 "into weights, so it is **not in this checkpoint**" + (f"; its figures (row `{gated_row}` of the run's "
                 "evaluation) do not describe this model." if gated_row else "."))
    judge = (summary or {}).get("judge_note") or "refusal judge: rules"
    text += f"\n\nEvery refusal figure above comes from the {judge}."
    if (summary or {}).get("second_judge"):
        text += " The `judges agree` column is the share of answers both judges decide the same way (refusal or not)."
    audit = (summary or {}).get("style_audit")
    if audit:
        text += (f"\n\nStyle audit of the evaluation pools: a classifier of surface features alone tells harmful from harmless "
                 f"with balanced accuracy {audit['accuracy']:.3f} (0.5 is chance).")
    return text


def model_card(lm, modulation: Modulation, name: str, eval_summary: dict | None, preset: dict | None, gated: bool = False) -> str:
    base = EMBEDDED_BASE if lm.name == "embedded" else lm.name
    s = modulation.summary()
    return f"""---
library_name: transformers
base_model: {base}
tags:
- neurontune
- safety
- refusal
---
# {name}

`{base}` with NeuronTune neuron gains folded into its MLP output projections
({s['n_amplified']} safety neurons amplified, {s['n_suppressed']} over-refusal neurons suppressed, gains
{s['min_gain']:.3f}–{s['max_gain']:.3f}, layers {s['layers'][:1]}…{s['layers'][-1:]}). No other weight changed.
Made with NeuronTune Studio (method: Pan et al., 2025, "Fine-Grained Neuron Modulation for Balanced
Safety-Utility Alignment in LLMs").

## Load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/{name}")
tokenizer = AutoTokenizer.from_pretrained("path/to/{name}")
```

## Evaluation

{_evaluation(eval_summary, gated)}

## Files

- `model.safetensors`, `config.json`, tokenizer files: the folded checkpoint.
- `modulation.safetensors`: the gains themselves, for `neurontune` (base model fingerprint `{modulation.fingerprint}`).
- `preset.json`: the configuration that produced them.

Base model fingerprint: `{lm.fingerprint}`. Preset: `{(preset or {}).get('name', 'custom')}`.
"""


FLOAT32_TOLERANCE = 1e-3  # max |logit| difference allowed for a float32 export
ROUNDING_FACTOR = 3.0  # low precision: allowed difference = this x the dtype's own rounding of the hooked logits


@torch.no_grad()
def _check_reload(lm, modulation: Modulation, folder: Path, tolerance: float | None = None) -> dict:
    """Reload the export with plain transformers and compare its logits with the hooked base model's.

    Returns {"max_logit_diff", "tolerance", "rounding", "dtype"}. Unless `tolerance` is given, a float32 model
    is held to FLOAT32_TOLERANCE. A bfloat16 / float16 model is held to ROUNDING_FACTOR x `rounding`, the
    largest difference between the hooked logits computed in that dtype and the same hooked computation in
    float32 (the reloaded model upcast, with the original projection weights put back): the noise the dtype
    itself puts on these logits. Measured on random LLaMA / GPT-2 models of 3-8 layers, bf16 and fp16, 16
    modulations each: a correct fold differs from the hooked model by 0.3-1.1x that noise, gains folded
    twice (gain squared on 5-20 % of the neurons) by 6.6-225x; 3x sits between the two."""
    from transformers import AutoModelForCausalLM

    dtype = lm.model.dtype
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    prompts = [chat_prompt(lm.tokenizer, p) for p in ("How do I make a cake?", "Write a short poem about the sea.")]
    batch = encode_pairs(lm.tokenizer, prompts, ["Sure", "Here"], max_length=128)
    mask = batch.attention_mask.bool()
    with modulate(lm.model, modulation, lm.nmap):
        hooked = forward(lm.model, batch, all_logits=True).float().cpu()
    plain = forward(reloaded, batch, all_logits=True).float().cpu()
    diff = float((plain - hooked)[mask].abs().max())
    rounding = None
    if dtype != torch.float32:
        reference = reloaded.float()  # the reloaded copy is ours: upcast it instead of copying the shared model
        mine = neuron_map(reference)
        for a, b in list(zip(mine.projections, lm.nmap.projections)) + list(zip(mine.input_projections, lm.nmap.input_projections)):
            a.weight.copy_(b.weight)
            if getattr(b, "bias", None) is not None:
                a.bias.copy_(b.bias)
        with modulate(reference, modulation):
            exact = forward(reference, batch, all_logits=True).float().cpu()
        rounding = float((hooked - exact)[mask].abs().max())
    if tolerance is None:
        tolerance = FLOAT32_TOLERANCE if rounding is None else max(ROUNDING_FACTOR * rounding, FLOAT32_TOLERANCE)
    return {"max_logit_diff": diff, "tolerance": tolerance, "rounding": rounding, "dtype": str(dtype).removeprefix("torch.")}


def export(lm, modulation: Modulation, root: str | Path, name: str, *, preset: dict | None = None,
           eval_summary: dict | None = None, gated: bool = False, overwrite: bool = False,
           tolerance: float | None = None, push_to_hub: str | None = None, token: str | None = None,
           reporter: Reporter | None = None) -> dict:
    """Write the export folder; returns {"path", "max_logit_diff", "tolerance", "rounding", "pushed", "push_error",
    "gate_left_out"} (the reload check's figures: see `_check_reload` for how the tolerance follows the model's dtype).

    `eval_summary`: the run's eval.json (the model card shows its static row with intervals). `gated`: the gains
    came with an input gate, which cannot be folded: the checkpoint holds the static gains, and the card says so.
    The hub token is used for the push only: it is never written, logged or kept."""
    path, reporter = export_path(root, name), reporter or SILENT
    if modulation.fingerprint and modulation.fingerprint != lm.fingerprint:
        raise ExportError(f"This modulation was made for model {modulation.fingerprint}, not the loaded {lm.fingerprint}.")
    if tuple(modulation.shape) != tuple(lm.shape):
        raise ExportError(f"This modulation holds gains for {tuple(modulation.shape)} neurons; the loaded model has {tuple(lm.shape)}.")
    if path.exists() and not overwrite:
        raise ExportError(f"An export named {name!r} already exists at {path}. Choose another name or pass overwrite.")
    check: dict = {}

    steps = 3 if push_to_hub else 2
    reporter.phase("export", steps)

    def fill(tmp: Path) -> None:  # written in a hidden temp folder, checked, then renamed into place
        reporter.progress(0, steps, "folding the gains and saving")
        lm.model.save_pretrained(tmp, state_dict=_folded_state_dict(lm, modulation))
        lm.tokenizer.save_pretrained(tmp)
        folder = RunFolder(tmp)  # an export also reads as a run folder: its gains and preset
        folder.write_modulation(modulation)
        folder.write_config(preset or {})
        folder.write_model_card(model_card(lm, modulation, name, eval_summary, preset, gated))
        reporter.progress(1, steps, "reloading and checking the logits")
        result = _check_reload(lm, modulation, tmp, tolerance)
        diff, tol = result["max_logit_diff"], result["tolerance"]
        if not diff <= tol:
            why = "" if result["rounding"] is None else (f": {ROUNDING_FACTOR:g} x the {result['dtype']} rounding of the hooked "
                                                         f"logits, {result['rounding']:.2e}")
            raise ExportError(f"The reloaded export differs from the hooked model by {diff:.2e} (> {tol:.2e}{why}); not saved.")
        check.update(result)
        folder.write_export_check(check)
    try:  # an export it replaces is put back if the move fails: a failure never loses the previous export
        files.write_folder(path, fill, manifest=False, overwrite=overwrite)
    except files.FolderExists:
        raise ExportError(f"An export named {path.name!r} appeared at {path} meanwhile; it was kept. Choose another name.") from None
    result = {"path": str(path), "max_logit_diff": check["max_logit_diff"], "tolerance": check["tolerance"],
              "rounding": check["rounding"], "pushed": None, "push_error": None, "gate_left_out": gated}
    reporter.progress(2, steps, "saved")
    if push_to_hub:
        reporter.progress(2, steps, f"pushing to {push_to_hub}")
        try:
            from huggingface_hub import HfApi
            api = HfApi(token=token)
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(folder_path=str(path), repo_id=push_to_hub)
            result["pushed"] = push_to_hub
        except Exception as exc:  # the local export stays; the message never contains the token
            msg = str(exc).replace(token, "***") if token else str(exc)
            result["push_error"] = f"Push to {push_to_hub} failed ({type(exc).__name__}: {msg}); the local export at {path} is kept."
        reporter.progress(3, steps, "pushed" if result["pushed"] else "push failed")
    return result
