"""Export a tuned model: fold the gains into the weights and save a standard checkpoint or a GGUF file.

`format="transformers"`: safetensors weights, config and tokenizer (plain `transformers` loads it with no project
code). `format="gguf"`: one GGUF file for llama.cpp, Ollama and LM Studio (`gguf_export`). Either way the folder
also holds the modulation file, the preset used and a model card with the evaluation table. The export is
written to a temporary folder, reloaded and checked against the folded or hooked model, and only then moved into
place: a failure leaves no half-written export.
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
from . import gguf_export
from .folder import RunFolder

EXPORTED = "neurontune export"  # the row of the foldable modulation, evaluated as the checkpoint export writes (reloaded)

FORMATS = ("transformers", "gguf")
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


def up_projections(lm) -> list[str] | None:
    """Each layer's up projection (module name) when every MLP computes down(act(gate(x)) * up(x)) with a separate
    `up_proj` (the llama family: `NeuronMap.gated`), else None. There a gain on neuron i equals scaling row i of
    `up_proj`: exact, and block-quantised formats (GGUF blocks run along rows) re-quantise a scaled row to the same
    codes, where scaling a column of the output projection spreads over the blocks of every row."""
    if not lm.nmap.gated or lm.nmap.input_offset:
        return None
    names = {id(mod): name for name, mod in lm.model.named_modules()}
    return [names[id(m)] for m in lm.nmap.input_projections]


def _folded_state_dict(lm, modulation: Modulation, into_up: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict with the modulation folded into copies of the weights it changes (the shared model
    itself is never modified): `modulation.folded_state_dict`. `into_up` (a gated MLP, see `up_projections`): the
    gains go into the rows of the up projections instead of the columns of the output projections."""
    into = "up" if into_up and up_projections(lm) is not None else "down"
    return folded_state_dict(lm.model, modulation, lm.nmap, gains_into=into)


def _measured(own: dict) -> str:
    """The card's figures when the export measured itself: this checkpoint, reloaded, beside the base model."""
    frame = pd.DataFrame(own["table"]).set_index("intervention")
    what = ("this GGUF file, read back by plain `transformers`** (dequantised to float, no NeuronTune code, no hook; "
            "llama.cpp computes in the file's own types)" if own.get("read_back") == "gguf"
            else "this checkpoint, reloaded with plain `transformers`** (no NeuronTune code, no hook)")
    return (f"Measured on **{what} beside the base "
            f"model, on the held-out {own['split']} split ({own['n_rows']} generated answers of {own['max_new_tokens']} tokens, "
            f"{'attack families never seen in tuning included; ' if own['split'] == 'test' else 'training attack families only; '}"
            f"{own['n_ppl']} answers for perplexity, {own['n_mc']} multiple-choice "
            f"questions): rate [Wilson 95 % interval]. The checkpoint is the `{own['row']}` row ({own['form']}).\n\n"
            + markdown(frame, {"": list(frame.index)})
            + f"\n\nEvery refusal figure above comes from the {own['judge']}. Style audit of these pools: a classifier of surface "
              f"features alone tells harmful from harmless with balanced accuracy {own['style_audit']:.3f} (0.5 is chance).")


def _evaluation(summary: dict | None, gated: bool, own: dict | None = None) -> str:
    """The model card's evaluation section: the checkpoint's own figures when the export measured it (`own`), else the
    static gains' row of the run's evaluation beside the base model; what the gate did is said but not claimed."""
    if own is not None:
        text = _measured(own)
        if gated:
            text += ("\n\nThe run also has an **input gate** (a probe that scales the gains per prompt). A gate cannot be folded "
                     "into weights, so it is **not in this checkpoint**, and the run's gated figures do not describe this model.")
        return text
    rows = (summary or {}).get("table") or []
    frame = pd.DataFrame(rows).set_index("intervention") if rows and "intervention" in rows[0] else None
    # the row that is this checkpoint: the foldable modulation reloaded when the run trained one, else the static gains
    own_row = next((n for n in (EXPORTED, "neurontune") if frame is not None and n in frame.index), None)
    if frame is None or own_row is None or "seeds" not in frame.columns:
        return "_Not evaluated: run `python -m neurontune evaluate --run DIR` before exporting to have the figures here._"
    split, seeds = summary.get("split", "test"), summary.get("seeds", 1)
    unseen = "attack families never seen in tuning included" if split == "test" else "training attack families only"
    if own_row == EXPORTED and seeds > 1:
        what = (f"The `{own_row}` row is the mean of {seeds} checkpoints, one per training seed, this one (the run's own) among "
                "them; export with a measurement (the default of `neurontune export`) to have this checkpoint's own figures.")
    elif own_row == EXPORTED:
        what = f"The `{own_row}` row is this checkpoint, reloaded with plain `transformers`."
    else:
        what = (f"The `{own_row}` row is the run's gains applied by hooks; folded, they compute the same logits (the reload "
                "check above).")
    text = (f"Quoted from the run's evaluation, not measured on this export: held-out {split} prompts ({unseen}), {seeds} "
            f"training seed(s): mean{' ± sd' if seeds > 1 else ''} [Wilson 95 % interval]. {what}\n\n"
            + markdown(frame, {"": [n for n in ("base", own_row) if n in frame.index]}))
    if gated:
        gated_row = next((n for n in frame.index if n.startswith("neurontune") and n not in ("neurontune", EXPORTED)), None)
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


def model_card(lm, modulation: Modulation, name: str, eval_summary: dict | None, preset: dict | None, gated: bool = False,
               gguf: dict | None = None, own: dict | None = None) -> str:
    """The README.md beside the export; `gguf`: the GGUF export's figures (`_gguf_fill`), for a GGUF export."""
    base = EMBEDDED_BASE if lm.name == "embedded" else lm.name
    s = modulation.summary()
    load, files_section = _load_section(name), _files_section(modulation)
    if gguf is not None:
        load = _gguf_section(gguf)
        files_section = _files_section(modulation, f"`{gguf['file']}`: the tuned model as one GGUF file ({gguf['size_mb']:.1f} MB).")
    return f"""---
library_name: {"gguf" if gguf else "transformers"}
base_model: {base}
tags:
- neurontune
- safety
- refusal{chr(10) + "- gguf" if gguf else ""}
---
# {name}

`{base}` with a NeuronTune modulation folded into its own MLP weights ({s['n_amplified']} safety neurons amplified,
{s['n_suppressed']} over-refusal neurons suppressed, gains {s['min_gain']:.3f}–{s['max_gain']:.3f}, layers
{s['layers'][:1]}…{s['layers'][-1:]}{_conditional_text(s)}). Same architecture and config: only MLP weights changed.
Made with NeuronTune Studio (method: Pan et al., 2025, "Fine-Grained Neuron Modulation for Balanced
Safety-Utility Alignment in LLMs").

{load}

## Evaluation

{_evaluation(eval_summary, gated, own)}

## Files

{files_section}

Base model fingerprint: `{lm.fingerprint}`. Preset: `{(preset or {}).get('name', 'custom')}`.
"""


def _conditional_text(summary: dict) -> str:
    if not summary.get("n_conditional"):
        return ""
    if summary.get("switch_layer") is not None:
        reads = "the end of the prompt"
        if summary.get("switch_mean") is not None:
            layer, group = summary["switch_mean"]
            reads = (f"the end of the prompt and the whole prompt (key-value group {group} of layer {layer}'s attention is "
                     "rewritten to average a probe over every token so far)")
        if summary.get("switch_earlier") is not None:
            reads = (f"the end of the prompt at two depths (it fires only where two neurons of layer {summary['switch_earlier']}, "
                     "rewritten into a probe of their own, read harmful too)")
        return (f"; two neurons of layer {summary['switch_layer']} are rewritten into a switch that reads {reads} "
                f"and raises a flag in the residual stream where it reads harmful, and {summary['n_conditional']} neurons of "
                f"later layers read that flag through their input projection (input-side terms up to {summary['max_abs_coef']:.2f}): "
                "a modulation that depends on the input, folded exactly into the weights")
    return (f"; {summary['n_conditional']} neurons also read a harm direction of their layer through their input projection "
            f"(input-side terms up to {summary['max_abs_coef']:.2f}), so they fire more on harmful requests and less on harmless "
            "ones: a modulation that depends on the input, folded exactly into the weights")


def _load_section(name: str) -> str:
    return f"""## Load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/{name}")
tokenizer = AutoTokenizer.from_pretrained("path/to/{name}")
```"""


def _files_section(modulation: Modulation, weights: str = "`model.safetensors`, `config.json`, tokenizer files: the folded checkpoint.") -> str:
    return (f"- {weights}\n- `modulation.safetensors`: the gains themselves, for `neurontune` (base model fingerprint "
            f"`{modulation.fingerprint}`).\n- `preset.json`: the configuration that produced them.")


def _gguf_section(g: dict) -> str:
    """The GGUF card's "Run it" section: what was written, how it was checked, how to run it."""
    f = g["file"]
    kinds = ", ".join(f"{n} as {t}" for t, n in sorted(g["changed_types"].items())) or "none"
    if g["source"].startswith("gguf:"):
        what = (f"A copy of `{g['source'][5:]}` with every metadata key (architecture, tokenizer, chat template) carried over; "
                f"{g['copied']} unchanged tensors copied byte for byte; the {len(g['changed'])} tensors the gains changed "
                f"re-quantised ({kinds}).")
    else:
        what = (f"Converted from the `transformers` weights with the `gguf` package: matrices as {g['label']}, norms as F32; "
                f"the {len(g['changed'])} tensors the gains changed: {kinds}.")
    notes = "".join(f"\n\n{n}" for n in g["notes"])
    check = (f"Reloaded with `transformers`' GGUF loader: {g['weights_checked']} weights compared with the folded ones (copied "
             f"tensors bit for bit, re-quantised ones within their type's own rounding; largest difference {g['max_weight_error']:.2e} "
             f"in `{g['worst_tensor']}`). Against the hooked float32 model on {len(CHECK_PROMPTS)} check prompts (harmless and harmful): max logit difference "
             f"{g['max_logit_diff']:.3f}, same top token at {g['top1_agreement']:.1%} of positions (what quantisation moves).")
    load = f"""## Run it

{what}{notes}

```bash
llama-cli -m {f}                            # llama.cpp (llama-server -m {f} for its web UI and API)
ollama create my-model -f Modelfile          # Ollama, with `FROM ./{f}` in the Modelfile
```

```python
import xllamacpp as xlc                      # pip install xllamacpp (prebuilt llama.cpp)
params = xlc.CommonParams(); params.model.path = "path/to/{f}"
print(xlc.Server(params).handle_chat_completions({{"messages": [{{"role": "user", "content": "Hi"}}]}}))

from transformers import AutoModelForCausalLM  # transformers dequantises it
model = AutoModelForCausalLM.from_pretrained("path/to/folder", gguf_file="{f}")
```

{check} The evaluation below is the run's, of the float32 modulation this file folds, not of this file: the check above
says how far the two part."""
    return load

def measure_checkpoint(lm, path: str | Path, modulation: Modulation, preset: dict | None, split: str = "test", *,
                       judge=None, reporter: Reporter | None = None, model=None) -> dict:
    """The figures of the checkpoint in `path`, reloaded with plain transformers (`eval.reloaded.Reloaded`), beside the
    base model, on `split` of the preset's prompts (FULL_EVAL on test, VALIDATION_EVAL on validation): what the model
    card reports. `model`: the checkpoint as transformers already read it back (a GGUF file, dequantised)."""
    from ..config import FULL_EVAL, VALIDATION_EVAL, RunConfig
    from ..data.splits import build_splits
    from ..eval.harness import evaluate_many
    from ..eval.judges import describe, judge_from_spec
    from ..eval.reloaded import Reloaded
    from ..eval.report import summarise
    from ..interventions.protocol import form_of

    cfg = RunConfig.from_dict({k: v for k, v in (preset or {}).items()}) if preset else RunConfig()
    splits, ecfg = build_splits(cfg.data), (VALIDATION_EVAL if split == "validation" else FULL_EVAL)
    judge = judge_from_spec(judge)
    row = "this checkpoint"
    reloaded = Reloaded.load(path, lm, name=row) if model is None else Reloaded.of_model(model, lm, path, name=row)
    reloaded.meta["folds"] = "conditional" if modulation.conditional else "static"
    results = evaluate_many(lm, {"base": None, row: reloaded}, splits, ecfg, split=split, reporter=reporter, judge=judge)
    table = summarise({r.name: [r] for r in results})
    rows = [{"intervention": n, **{k: (None if v != v else v) for k, v in r.items()}} for n, r in table.to_dict(orient="index").items()]
    return {"table": rows, "split": split, "row": row, "form": form_of(reloaded), "n_rows": len(results[1].rows),
            "max_new_tokens": ecfg.max_new_tokens, "n_ppl": results[1].meta["n_ppl"], "n_mc": results[1].meta["n_mc"],
            "judge": describe(judge), "style_audit": splits.style_audit(split).accuracy,
            "read_back": "checkpoint" if model is None else "gguf"}  # what transformers read: the folder, or the GGUF file


# Prompts (and answer openings) the reloaded checkpoint is compared on: harmless ones and a harmful one, so that a
# conditional modulation (a folded switch, input-side terms) is checked where it fires as well as where it stays quiet.
CHECK_PROMPTS = (("How do I make a cake?", "Sure"), ("Write a short poem about the sea.", "Here"),
                 ("How do I pick a lock to break into my neighbour's house?", "I"))


def _check_batch(lm):
    prompts = [chat_prompt(lm.tokenizer, p) for p, _ in CHECK_PROMPTS]
    return encode_pairs(lm.tokenizer, prompts, [a for _, a in CHECK_PROMPTS], max_length=128)


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
    batch = _check_batch(lm)
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


def _logit_agreement(lm, modulation: Modulation, reloaded) -> dict:
    """Max logit difference and share of positions with the same top token, reloaded vs hooked, on the check prompts."""
    batch = _check_batch(lm)
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        with modulate(lm.model, modulation, lm.nmap):
            hooked = forward(lm.model, batch, all_logits=True).float().cpu()[mask]
        plain = forward(reloaded, batch, all_logits=True).float().cpu()[mask]
    return {"max_logit_diff": float((plain - hooked).abs().max()),
            "top1_agreement": float((plain.argmax(-1) == hooked.argmax(-1)).float().mean())}


def _gguf_fill(lm, modulation: Modulation, tmp: Path, name: str, gguf_type: str) -> tuple:
    """Write `name.TYPE.gguf` into `tmp` from the folded state dict and check it; returns (the file as transformers read
    it back, the figures for the card)."""
    state = _folded_state_dict(lm, modulation, into_up=True)
    notes = []
    if gguf_type == "auto" and modulation.switch is not None:  # a switch is a probe: block-quantised, it fires where it should not
        gguf_type = "f16"
        notes.append("The modulation holds a folded switch, so the tensors it changes are written in F16: re-quantised in "
                     "Q4_1 the switch's probe moved the logits by up to 6.4 and changed 5 % of top tokens (embedded model).")
    meta = {"base_fingerprint": lm.fingerprint, "modulation_fingerprint": modulation.fingerprint or "",
            "n_modulated": str(modulation.summary()["n_modulated"])}
    try:
        out = gguf_export.write_gguf(lm, state, tmp / f"{name}.gguf", gguf_type=gguf_type, metadata=meta)
        out.path = out.path.rename(tmp / f"{name}.{out.label}.gguf")  # the usual name: model.Q4_1.gguf
        checked, reloaded = gguf_export.check_gguf(lm, state, out)
    except gguf_export.GGUFExportError as exc:
        raise ExportError(str(exc)) from None
    return reloaded, {"file": out.path.name, "size_mb": out.path.stat().st_size / 1e6, "source": out.source, "label": out.label,
            "changed": out.changed, "changed_types": out.changed_types(), "copied": out.copied, "notes": notes + list(out.notes),
            **checked, **_logit_agreement(lm, modulation, reloaded)}


def export(lm, modulation: Modulation, root: str | Path, name: str, *, format: str = "transformers", gguf_type: str = "auto",
           preset: dict | None = None, eval_summary: dict | None = None, gated: bool = False, overwrite: bool = False,
           tolerance: float | None = None, push_to_hub: str | None = None, token: str | None = None,
           reporter: Reporter | None = None, measure: str | None = None, judge=None) -> dict:
    """Write the export folder; returns {"path", "format", "max_logit_diff", "tolerance", "rounding", "pushed",
    "push_error", "gate_left_out", "gguf", "measured"} (the reload check's figures: see `_check_reload` for how the tolerance
    follows the model's dtype; for a GGUF export, `gguf` holds `check_gguf`'s figures and what was written).

    `format`: "transformers" (a safetensors checkpoint) or "gguf" (one GGUF file; `gguf_type` "auto", "f16" or
    "q8_0": see `gguf_export.write_gguf`). `eval_summary`: the run's eval.json (the model card shows its static row
    with intervals). `gated`: the gains came with an input gate, which cannot be folded: the checkpoint holds the
    static gains, and the card says so. The hub token is used for the push only: it is never written, logged or kept."""
    if format not in FORMATS:
        raise ExportError(f"Export format {format!r} is not one of {', '.join(FORMATS)}.")
    if gguf_type not in gguf_export.GGUF_TYPES:
        raise ExportError(f"GGUF type {gguf_type!r} is not one of {', '.join(gguf_export.GGUF_TYPES)}.")
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
        folder = RunFolder(tmp)  # an export also reads as a run folder: its gains and preset
        folder.write_modulation(modulation)
        folder.write_config(preset or {})
        reporter.progress(0, steps, "folding the modulation and saving")
        if format == "gguf":
            reloaded, figures = _gguf_fill(lm, modulation, tmp, path.name, gguf_type)
            own = None
            if measure is not None:  # the card's figures: this file as transformers reads it, beside the base model
                reporter.progress(1, steps, f"measuring the GGUF file, read back, on the {measure} split")
                own = measure_checkpoint(lm, tmp / figures["file"], modulation, preset, measure, judge=judge,
                                         reporter=reporter.muted(), model=reloaded)
                check["measured"] = own
            folder.write_model_card(model_card(lm, modulation, name, eval_summary, preset, gated, gguf=figures, own=own))
            check.update(max_logit_diff=figures["max_logit_diff"], tolerance=None, rounding=None, gguf=figures)
            folder.write_export_check(check)
            return
        lm.model.save_pretrained(tmp, state_dict=_folded_state_dict(lm, modulation))
        lm.tokenizer.save_pretrained(tmp)
        folder.write_model_card(model_card(lm, modulation, name, eval_summary, preset, gated))
        reporter.progress(1, steps, "reloading and checking the logits")
        result = _check_reload(lm, modulation, tmp, tolerance)
        if measure is not None:  # the card's figures: this checkpoint, reloaded, beside the base model
            reporter.progress(1, steps, f"measuring the reloaded checkpoint on the {measure} split")
            own = measure_checkpoint(lm, tmp, modulation, preset, measure, judge=judge, reporter=reporter.muted())
            folder.write_model_card(model_card(lm, modulation, name, eval_summary, preset, gated, own=own))
            check["measured"] = own
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
    result = {"path": str(path), "format": format, "max_logit_diff": check["max_logit_diff"], "tolerance": check["tolerance"],
              "rounding": check["rounding"], "pushed": None, "push_error": None, "gate_left_out": gated, "gguf": check.get("gguf"),
              "measured": check.get("measured")}
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
