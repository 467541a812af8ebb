"""Thin callbacks of the Model, Explore, Tune and Export tabs: each changes the `Session` through its methods,
then draws. Each returns a dict of the named updates it declares (`views.returns`)."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from ..data import prompts
from ..interventions.gating import GateProbe
from ..interventions.modulation import Modulation, ModulationFileError
from ..interventions.protocol import form_of
from ..method.selection import SelectionError
from ..model.errors import ModelLoadError
from ..run.export import ExportError, export, slugify
from ..run.folder import RunFolder
from .form_check import form_check
from .state import Session, Studio
from .uploads import gains_paths, upload_path
from .views import VIEW, View, counts_text, returns, views

LIMITS = ("k_safety", "k_utility", "protect_top", "steps", "mode", "lam_kl", "mu_over_refusal", "max_gain")  # what `slider_limits` sets
GAINS = (*VIEW, "gains_status", "active_gains", "use_gate")  # what `gains_views` returns
LOAD = ("model_status", *LIMITS, *VIEW, "left", "right", "active_gains", "use_gate", "form_check")  # what `load` may return


@returns(*VIEW)
def view(studio: Studio, session: Session, view: View = View()) -> dict:
    """The Explore tab for another score kind, layer or number of rows."""
    return views(session, view)


def model_text(session: Session, lm, note: str = "") -> str:
    L, N = lm.shape
    d = session.cfg.data
    files = [f"{k}: `{Path(v).name}`" for k, v in (("harmful", d.harmful_file), ("benign", d.benign_file), ("borderline", d.borderline_file)) if v]
    return (f"✓ **{lm.name}** ({lm.source or 'loaded'}) · {L} layers × {N:,} neurons = **{L * N:,}** · fingerprint `{lm.fingerprint}` · "
            f"{lm.load_seconds:.1f} s\n\nPreset **{session.cfg.name}**: {d.n_harmful} harmful + {d.n_attack_per_family}×{len(d.train_families)} "
            f"attacked + {d.n_benign} benign + {d.n_borderline} borderline prompts for attribution, {session.cfg.meta.steps} training steps"
            f"{' · ' + ', '.join(files) if files else ' · built-in prompt sets'}. {note}")


def slider_limits(lm, session: Session) -> dict:
    total = lm.shape[0] * lm.shape[1]
    s = session.cfg.selection
    top = min(total, 20_000)
    return {"k_safety": gr.update(maximum=top, value=min(s.k_safety, top)), "k_utility": gr.update(maximum=top, value=min(s.k_utility, top)),
            "protect_top": gr.update(maximum=top, value=min(s.protect_top, top)), "steps": gr.update(value=session.cfg.meta.steps),
            "mode": gr.update(value=session.cfg.meta.mode), "lam_kl": gr.update(value=session.cfg.meta.lam_kl),
            "mu_over_refusal": gr.update(value=session.cfg.meta.mu_over_refusal), "max_gain": gr.update(value=session.cfg.meta.max_gain)}


# -- Model & data --------------------------------------------------------------------------------
@returns(*LOAD)
def load(studio: Studio, session: Session, model: str, trust_remote_code: bool, preset: str, quick_mode: bool,
         harmful_file=None, benign_file=None, borderline_file=None, view: View = View()) -> dict:
    """Load (or reuse) the model and build the session's config; on any error the session is unchanged."""
    model = (model or studio.default_model).strip()
    try:
        lm = studio.models.get(model, bool(trust_remote_code))
        cfg = studio.config(preset, model, quick_mode=bool(quick_mode), n_neurons=lm.shape[0] * lm.shape[1])
        files, notes = {}, []
        for key, f in (("harmful_file", harmful_file), ("benign_file", benign_file), ("borderline_file", borderline_file)):
            if (path := upload_path(f)) is not None:
                prompts.load_prompts(path, notes=notes)  # a bad file is reported now, not in the middle of a job
                files[key] = path
        cfg = cfg.replace(data=files) if files else cfg
    except (ModelLoadError, ValueError, OSError) as exc:
        kept = f" The previous model (**{session.model}**) is still loaded and usable." if session.fingerprint else ""
        return {"model_status": f"✗ {exc}{kept}"}
    for note in notes:  # repairs made to the files (duplicates dropped, rows capped): shown, not fatal
        gr.Warning(note)
    changed = session.load_model(lm, cfg, model=model, preset=preset, scores=studio.known_scores(lm, cfg))
    note = "Neuron scores for this model and data were computed before: loaded from the cache." if session.scores is not None else ""
    if trust_remote_code:
        note += ("\n\n⚠ **trust_remote_code is on**: a model repository's own Python code may run on this machine. "
                 "Leave it off unless you trust the repository.")
    out = {"model_status": model_text(session, lm, note), **slider_limits(lm, session), **views(session, view),
           "form_check": form_check(cfg.data)}
    if changed:
        out.update(left=[], right=[], active_gains=gains_text(session), use_gate=gate_toggle(session))
    return out


# -- Tune: selection and gains -------------------------------------------------------------------
@returns(*VIEW)
def on_select(studio: Studio, session: Session, k_safety, k_utility, protect_top, view: View = View()) -> dict:
    if session.scores is None:
        return {"counts": "No neuron scores yet: score the neurons first (Explore tab or “Run the whole flow”)."}
    try:
        ms = session.reselect(k_safety, k_utility, protect_top)
    except (SelectionError, ValueError, TypeError) as exc:  # also a non-numeric value sent through the API
        return {"counts": f"✗ {exc}" if isinstance(exc, SelectionError) else f"✗ The thresholds must be whole numbers of neurons ({exc})."}
    return {**views(session, view), "counts": counts_text(session, ms)}


@returns()
def on_meta(studio: Studio, session: Session, mode, steps, lam_kl, mu_over_refusal, max_gain) -> dict:
    try:
        session.set_training(mode=mode, steps=int(steps), lam_kl=float(lam_kl), mu_over_refusal=float(mu_over_refusal),
                             max_gain=float(max_gain))
    except (ValueError, TypeError) as exc:  # the previous settings stay
        gr.Warning(f"Training settings not changed: {exc}")
    return {}


def _gate_reads(gate) -> str:
    """What one probe of a gate reads, in words."""
    layers = sorted({int(x) for x in gate.layers.tolist()})
    where = {"residual": "the residual stream entering layer", "mlp_input": "the MLP input of layer"}.get(gate.site)
    reads = (f"{where} {', '.join(map(str, layers))}, {len(gate.layers):,} units" if where
             else f"{len(gate.layers):,} neurons")
    return reads + (" at the prompt's last token" if gate.pool_from is None else ", averaged over the user's turn" if gate.pool_last is None
                    else f", averaged over the last {gate.pool_last} tokens of the user's turn")


def gains_text(session: Session) -> str:
    if session.modulation is None:
        return ("No gains yet: both panes answer with the base model. Train gains or apply fixed gains in **Tune**, "
                "or run the whole flow from **Model & data**.")
    s = session.modulation.summary()
    text = (f"Right pane uses **{session.gains_source}**: {s['n_amplified']:,} amplified, {s['n_suppressed']:,} suppressed, "
            f"gains {s['min_gain']:.2f}–{s['max_gain']:.2f}, scaled by the strength slider")
    gate = session.gate
    if gate is None:
        return text + f" (no input gate; {session.tuned_side(False)[2]})."
    accuracy = f", training accuracy {gate.train_accuracy:.0%}" if gate.train_accuracy else ""
    parts = gate.parts()
    reads = " and one on ".join(_gate_reads(part) for part in parts) + (", opening where either reads harmful" if len(parts) > 1 else "")
    text += (f" and by an **input gate** (a probe on {reads}{accuracy}): the right pane applies strength × s, s from 0 "
             "(prompt looks benign) to 1 (looks harmful), as “neurontune + gate” in the evaluation.")
    if session.foldable is not None:
        text += (" These gains were trained behind the gate; with the gate unticked the right pane shows the modulation "
                 "trained without it, which is what Export folds.")
    return text


def gate_props(session: Session) -> dict:
    """The Compare tab's gate checkbox: on and usable when the session's gains have a gate, else off and disabled."""
    if session.gate is None:
        return dict(value=False, interactive=False, label="input gate (none for these gains)")
    return dict(value=True, interactive=True, label="input gate: strength × s per prompt")


def gate_toggle(session: Session):
    return gr.update(**gate_props(session))


def load_gate(path: str | Path, lm) -> GateProbe:
    """A gate file checked against the loaded model (its neurons and fingerprint); ValueError otherwise."""
    return GateProbe.load(path, shape=tuple(lm.shape), expected_fingerprint=lm.fingerprint)


@returns(*GAINS)
def fixed_gains(studio: Studio, session: Session, safety_gain: float, utility_gain: float, view: View = View()) -> dict:
    if session.selection is None:
        return {"gains_status": "Select neurons first (score them, then move the sliders)."}
    sel = session.selection.config
    session.set_gains(session.selection.modulation(float(safety_gain), float(utility_gain), session.fingerprint),
                      f"fixed gains ×{float(safety_gain):g} / ×{float(utility_gain):g}", point=(sel.k_safety, sel.k_utility))
    return gains_views(session, view)


def gains_views(session: Session, view: View = View()) -> dict:
    """What changes on the page when the session's gains change."""
    return {**views(session, view), "gains_status": "✓ " + gains_text(session), "active_gains": gains_text(session),
            "use_gate": gate_toggle(session)}


@returns(*GAINS)
def gains_file(studio: Studio, session: Session, upload, view: View = View()) -> dict:
    """Gains from a modulation file or run folder, with the gate.safetensors beside it or uploaded with it;
    a file made for another model (gains or gate) is refused and the session keeps its gains."""
    path, gate_path = gains_paths(upload)
    if path is None:
        return {"gains_status": "Choose a modulation.safetensors file first (and its gate.safetensors, if it has one)."}
    lm = studio.model(session)
    try:
        mod = Modulation.load(path, expected_fingerprint=lm.fingerprint)
    except ModulationFileError as exc:
        return {"gains_status": f"✗ {exc}"}
    if tuple(mod.shape) != tuple(lm.shape):
        return {"gains_status": f"✗ This file holds gains for {mod.shape} neurons; the model has {lm.shape}."}
    try:
        gate = load_gate(gate_path, lm) if gate_path else None
    except ValueError as exc:
        return {"gains_status": f"✗ {exc} The gains were not loaded either; load the modulation file alone for static gains."}
    name = Path(path).name if Path(path).name != RunFolder.MODULATION else f"{Path(path).parent.name}/{Path(path).name}"
    session.set_gains(mod, f"gains from file {name}" + (" with its gate" if gate else ""), gate=gate)
    return gains_views(session, view)


@returns("recent_runs")
def recent_runs(studio: Studio, session: Session) -> dict:
    """Finished trainings of this model (any session, any earlier process) to reuse."""
    choices = []
    for job in studio.runner.jobs("train"):
        info = job.info or {}
        if job.status in ("done", "cancelled") and info.get("fingerprint") == session.fingerprint and info.get("modulation"):
            when = time.strftime("%m-%d %H:%M", time.localtime(job.finished or job.created))
            gated = " · gated" if info.get("run_dir") and RunFolder(info["run_dir"]).has(RunFolder.GATE) else ""
            choices.append((f"{when} · k {info.get('k_safety')}/{info.get('k_utility')} · {info.get('steps_run')} steps{gated} · {job.status}", job.id))
    return {"recent_runs": gr.update(choices=choices, value=choices[0][1] if choices else None)}


@returns("jobs_table")
def jobs_table(studio: Studio, session: Session | None = None) -> dict:
    """Every session's recent jobs, including those an earlier process left unfinished (interrupted)."""
    rows = []
    for job in studio.runner.jobs()[:30]:
        when = time.strftime("%m-%d %H:%M:%S", time.localtime(job.created))
        position = studio.runner.position(job)
        rows.append({"created": when, "job": job.kind, "status": job.status + (f" (#{position} in queue)" if position else ""),
                     "stage": job.stage, "step": f"{job.step}/{job.total}" if job.total else str(job.step or ""),
                     "note": (job.error or "")[:160]})
    return {"jobs_table": pd.DataFrame(rows, columns=["created", "job", "status", "stage", "step", "note"])}


@returns(*GAINS)
def use_run(studio: Studio, session: Session, job_id: str, view: View = View()) -> dict:
    job = studio.runner.get(job_id)
    if job is None or not job.info.get("modulation"):
        return {"gains_status": "Pick a finished training run first."}
    lm = studio.model(session)
    try:
        mod = Modulation.load(job.info["modulation"], expected_fingerprint=lm.fingerprint)
        gate = RunFolder(job.info["run_dir"]).gate(lm) if job.info.get("run_dir") else None
        foldable = RunFolder(job.info["run_dir"]).foldable(lm.fingerprint) if job.info.get("run_dir") else None
        session.set_gains(mod, f"trained gains from run {Path(job.info['run_dir']).name}", gate=gate, run_dir=job.info["run_dir"],
                          point=(job.info.get("k_safety"), job.info.get("k_utility")) if job.info.get("k_safety") is not None else None,
                          foldable=foldable)
    except (ModulationFileError, ValueError) as exc:
        return {"gains_status": f"✗ {exc}"}
    note = adopt_run_scores(session, job.info.get("run_dir"))
    out = gains_views(session, view)
    return {**out, "gains_status": out["gains_status"] + note}


def adopt_run_scores(session: Session, run_dir: str | None) -> str:
    """When the session has no scores, take the chosen run's (its folder keeps them) with the run's data,
    attribution and selection settings, so Explore and Tune show what these gains were made from.
    Returns a note for the status ("" when nothing changed)."""
    if session.scores is not None or not run_dir:
        return ""
    folder = RunFolder(run_dir)
    try:
        scores, cfg = folder.scores(), folder.config()
        if scores is None:
            return ""
        session.adopt_scores(scores, cfg)
    except (OSError, ValueError):  # unreadable, or made for another model's shape
        return ""
    return " Its neuron scores and selection settings came with it (this session had none for its own settings)."


# -- Export --------------------------------------------------------------------------------------
def suggest_name(session: Session) -> str:
    return slugify(f"{session.model}-neurontune-{session.cfg.name}")


def _gate_note(session: Session) -> str:
    """What the export status says about the input gate: not folded, and what the checkpoint holds instead."""
    if session.gate is None:
        return ""
    held = ("The checkpoint holds the run's conditional modulation instead (a folded switch or input-side terms that read the "
            "prompt): what the Compare tab shows with *input gate* unticked; README “Results” compares the two on test."
            if form_of(session.exported) == "conditional" else
            "The checkpoint holds the static gains only: what the Compare tab shows with *input gate* unticked (on the "
            "embedded model these refuse far more benign prompts than the gated right pane; README “Results”).")
    return "\n\n⚠ **The input gate is not in this export**: a gate cannot be folded into weights. " + held


MEASURED = (("harmful_refusal", "harmful refused"), ("benign_over_refusal", "benign refused"),
            ("template_over_refusal", "benign in templates refused"), ("alarming_over_refusal", "alarming words refused"),
            ("ppl_ratio", "perplexity ratio"))


def measured_text(own: dict) -> str:
    """One sentence of a measured export's figures (the checkpoint reloaded with plain transformers), as its card has them."""
    row = next((r for r in own["table"] if r["intervention"] == own["row"]), {})
    figures = ", ".join(f"{label} {row[k]:.2f}" for k, label in MEASURED if row.get(k) is not None)
    how = "the GGUF file read back by" if own.get("read_back") == "gguf" else "reloaded with plain"
    return (f"Measured {how} `transformers` on the {own['split']} split ({own['n_rows']} answers): {figures}; "
            "the model card has the full table beside the base model.")


@returns("export_status", "export_files", "export_name", "hub_token")
def do_export(studio: Studio, session: Session, name: str, overwrite: bool, repo: str, token: str, fmt: str = "transformers",
              measure: bool = False, reporter=None) -> dict:
    """Fold the session's gains into a checkpoint (or a GGUF file) under the export root; the token is used for the push
    only. `measure`: the checkpoint reloaded (a GGUF file read back by transformers) is evaluated on the test split and the model card
    carries those figures (minutes; the studio runs it as a background job, `background.export`)."""
    if session.modulation is None:
        return {"export_status": "No gains to export yet: train or apply gains in **Tune** first.", "hub_token": ""}
    safe = slugify(name or suggest_name(session))
    lm = studio.model(session)
    try:
        summary = RunFolder(session.run_dir).eval_summary() if session.run_dir and session.eval_rows is not None else None
        result = export(lm, session.exported, studio.export_root, safe, format=fmt or "transformers", preset=session.cfg.to_dict(),
                        eval_summary=summary,
                        gated=session.gate is not None,
                        overwrite=bool(overwrite), push_to_hub=(repo or "").strip() or None, token=(token or "").strip() or None,
                        measure="test" if measure else None, reporter=reporter)
    except (ExportError, ValueError) as exc:
        return {"export_status": f"✗ {exc}", "hub_token": ""}
    except OSError as exc:  # disk full, no permission ...: export() left nothing half-written
        return {"export_status": f"✗ Could not write the export ({exc}); nothing was left in {studio.export_root}. "
                                 "Free some space or choose another export folder.", "hub_token": ""}
    path = RunFolder(result["path"])
    download = Path(tempfile.mkdtemp(prefix="neurontune-download-"))  # served copies; the export root stays private
    files = [str(shutil.copy2(p, download / p.name)) for p in (path.modulation_path, path.file(RunFolder.MODEL_CARD))]
    renamed = f" (sanitised from “{name}”)" if name and safe != name else ""
    gate = _gate_note(session)
    measured = (" " + measured_text(result["measured"])) if result.get("measured") else (
        " The model card quotes the run's evaluation (tick *measure the checkpoint* to have its own figures there).")
    push = (f"\n\n⚠ {result['push_error']}" if result["push_error"] else
            f"\n\n↑ Pushed to the Hub: `{result['pushed']}`" if result["pushed"] else "")
    status = (f"✓ Exported to `{path.path}`{renamed}. The reloaded checkpoint matches the hooked model (max logit difference "
              f"{result['max_logit_diff']:.1e}).{measured}{gate}{push}\n\nLoad it with plain `transformers`:\n```python\n"
              f"from transformers import AutoModelForCausalLM, AutoTokenizer\nmodel = AutoModelForCausalLM.from_pretrained({str(path.path)!r})\n"
              f"tokenizer = AutoTokenizer.from_pretrained({str(path.path)!r})\n```")
    if (g := result["gguf"]) is not None:  # the card says what was written and how it was checked
        status = (f"✓ Exported `{path.path / g['file']}` ({g['size_mb']:.1f} MB){renamed}: same top token as the hooked model at "
                  f"{g['top1_agreement']:.0%} of positions (max logit difference {g['max_logit_diff']:.2f}).{measured}{gate}{push}\n\n"
                  f"Run it with llama.cpp: `llama-cli -m {path.path / g['file']}`" + "".join(f"\n\n{n}" for n in g["notes"]))
    return {"export_status": status, "export_files": files, "export_name": safe, "hub_token": ""}
