"""Thin callbacks of the Model, Explore, Tune and Export tabs over the engine. Each returns a dict of
named updates (the layout maps names to components); per-session work lives in the `Session`."""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from ..data import prompts
from ..interventions.gating import GateProbe
from ..interventions.modulation import Modulation, ModulationFileError
from ..method.selection import SelectionError, select
from ..model.errors import ModelLoadError
from ..run.export import ExportError, export, slugify
from ..run.folder import RunFolder
from . import plots
from .form_check import form_check
from .state import Session, Studio

KIND_LABELS = {
    "safety": "Safety: pushes harmful prompts towards refusal",
    "over_refusal": "Utility: pushes benign/borderline prompts towards refusal (over-refusal)",
    "benign_dependence": "Benign dependence: what benign answers rely on",
    "diff:safety-over_refusal": "Difference: safety − over-refusal",
    "safety/plain": "Safety on plain harmful prompts",
    "over_refusal/benign": "Over-refusal on benign prompts",
    "over_refusal/borderline": "Over-refusal on borderline-safe prompts",
    "diff:act_harmful-act_benign": "Mean activation: harmful − benign",
    "gains": "Learned gain − 1 (the current gains)",
}


# -- shared views ---------------------------------------------------------------------------------
def kind_choices(studio: Studio, session: Session) -> list[tuple[str, str]]:
    scores = studio.scores(session.scores_key)
    if scores is None:
        return [(KIND_LABELS["safety"], "safety")]
    kinds = [k for k in ("safety", "over_refusal", "benign_dependence", "diff:safety-over_refusal") if k.startswith("diff:") or k in scores.scores]
    kinds += [f"safety/{f}" for f in scores.families] + [k for k in ("safety/plain", "over_refusal/benign", "over_refusal/borderline") if k in scores.scores]
    kinds += ["diff:act_harmful-act_benign"] + (["gains"] if session.modulation is not None else [])
    return [(KIND_LABELS.get(k, f"Safety under the '{k.split('/', 1)[-1]}' attack family"), k) for k in kinds]


def kind_values(studio: Studio, session: Session, kind: str) -> np.ndarray:
    """[n_layers, n_neurons] values of a score kind, a difference of two, or the current gains − 1.
    The view code works in numpy: on a busy CPU each small multi-threaded torch op waits for a core."""
    scores = studio.scores(session.scores_key)
    if kind == "gains" and session.modulation is not None:
        return session.modulation.dense().numpy() - 1.0
    if kind.startswith("diff:"):
        a, b = kind[5:].split("-")
        return scores[a].numpy() - scores[b].numpy()
    return scores[kind if kind in scores.scores else "safety"].numpy()


def masks(session: Session) -> dict[str, np.ndarray]:
    sel = session.selection
    if sel is None:
        return {}
    return {k: getattr(sel, k).numpy() for k in ("safety", "utility", "overlap", "protected", "protected_dropped")}


def top_table(studio: Studio, session: Session, kind: str, top: int, values: np.ndarray | None = None,
              m: dict | None = None, gains: np.ndarray | None = None) -> pd.DataFrame:
    """The `top` neurons by the chosen score, with every score, activations, role and current gain."""
    scores = studio.scores(session.scores_key)
    values = kind_values(studio, session, kind) if values is None else values
    m = masks(session) if m is None else m
    order = (np.abs(values) if kind == "gains" else values).ravel()
    k = min(max(int(top or 50), 1), order.size)
    flat = np.argpartition(-order, k - 1)[:k]
    flat = flat[np.argsort(-order[flat], kind="stable")]
    layers, neurons = np.divmod(flat, values.shape[1])
    frame = {"layer": layers, "neuron": neurons, "gain − 1" if kind == "gains" else kind: values[layers, neurons]}
    for col in ("safety", "over_refusal", "benign_dependence", "act_harmful", "act_benign"):
        if col in scores.scores and col != kind:
            frame[col] = scores[col].numpy()[layers, neurons]
    if m:
        frame["role"] = np.select([m["safety"][layers, neurons], m["utility"][layers, neurons], m["overlap"][layers, neurons],
                                   m["protected"][layers, neurons]], ["amplify", "suppress", "left alone (both)", "protected"], "")
    if session.modulation is not None:
        gains = session.modulation.dense().numpy() if gains is None else gains
        frame["gain"] = gains[layers, neurons]
    out = pd.DataFrame(frame)
    floats = out.select_dtypes("number").columns.difference(["layer", "neuron"])
    return out.astype({c: "float64" for c in floats}).round(4)


def views(studio: Studio, session: Session, kind: str = "safety", layer: int = 0, top: int = 50) -> dict:
    """Heatmap, drill-down, table, per-layer counts and the selection summary for the session's state."""
    scores = studio.scores(session.scores_key)
    if scores is None:
        msg = "No neuron scores yet: press “Score neurons” (Explore) or “Run the whole flow” (Model & data)."
        return {"heatmap": plots.empty(msg, 460), "drill": plots.empty("", 300), "table": pd.DataFrame(),
                "dist_explore": plots.empty("", 300), "dist_tune": plots.empty(msg, 300), "counts": msg}
    choices = kind_choices(studio, session)
    kind = kind if kind in {v for _, v in choices} else "safety"
    values = kind_values(studio, session, kind)
    m = masks(session)
    overlay = {"safety": m.get("safety"), "utility": m.get("utility")}
    layer = int(min(max(int(layer or 0), 0), values.shape[0] - 1))
    label = dict((v, l) for l, v in choices)[kind]
    gains = session.modulation.dense().numpy() if session.modulation is not None else None
    out = {"heatmap": plots.heatmap(values, label, **overlay), "kind": gr.update(choices=choices, value=kind),
           "drill": plots.layer_neurons(values, layer, f"Layer {layer}: every neuron ({label.split(':')[0]})", gains=gains, **overlay),
           "table": top_table(studio, session, kind, top, values, m, gains), "drill_layer": gr.update(maximum=values.shape[0] - 1, value=layer)}
    if m:
        per_layer = pd.DataFrame({"layer": np.arange(values.shape[0]), "safety": m["safety"].sum(1), "utility": m["utility"].sum(1)})
        fig = plots.layer_counts(per_layer)
        out.update(dist_explore=fig, dist_tune=fig, counts=counts_text(session, m=m))
    return out


def counts_text(session: Session, ms: float | None = None, m: dict | None = None) -> str:
    m = masks(session) if m is None else m
    c = {k: int(v.sum()) for k, v in m.items()}
    timing = f" — selection updated in {ms:.1f} ms from cached scores" if ms is not None else ""
    return (f"**{c['safety']:,}** neurons amplified (safety) · **{c['utility']:,}** suppressed (over-refusal) · "
            f"{c['overlap']:,} left alone (in both sets) · {c['protected_dropped']:,} protected (benign answers need them){timing}")


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
def _file_path(f) -> str | None:
    return None if not f else str(getattr(f, "name", f))


def load(studio: Studio, session: Session, model: str, trust_remote_code: bool, preset: str, quick_mode: bool,
         harmful_file=None, benign_file=None, borderline_file=None, kind: str = "safety", layer: int = 0, top: int = 50) -> dict:
    """Load (or reuse) the model and build the session's config; on any error the session is unchanged."""
    model = (model or studio.default_model).strip()
    try:
        lm = studio.models.get(model, bool(trust_remote_code))
        cfg = studio.config(preset, model, quick_mode=bool(quick_mode), n_neurons=lm.shape[0] * lm.shape[1])
        files, notes = {}, []
        for key, f in (("harmful_file", harmful_file), ("benign_file", benign_file), ("borderline_file", borderline_file)):
            if (path := _file_path(f)) is not None:
                prompts.load_prompts(path, notes=notes)  # a bad file is reported now, not in the middle of a job
                files[key] = path
        cfg = cfg.replace(data=files) if files else cfg
    except (ModelLoadError, ValueError, OSError) as exc:
        kept = f" The previous model (**{session.model}**) is still loaded and usable." if session.fingerprint else ""
        return {"model_status": f"✗ {exc}{kept}"}
    for note in notes:  # repairs made to the files (duplicates dropped, rows capped): shown, not fatal
        gr.Warning(note)
    changed = lm.fingerprint != session.fingerprint
    session.model, session.fingerprint, session.cfg, session.preset = model, lm.fingerprint, cfg, preset
    if changed:
        session.clear_gains()
        session.selection, session.chat, session.run_dir = None, [[], []], None
    session.scores_key = studio.scores_key(lm, cfg)
    note = ""
    if studio.scores(session.scores_key) is not None:
        reselect(studio, session)
        note = "Neuron scores for this model and data were computed before: loaded from the cache."
    if trust_remote_code:
        note += ("\n\n⚠ **trust_remote_code is on**: a model repository's own Python code may run on this machine. "
                 "Leave it off unless you trust the repository.")
    out = {"model_status": model_text(session, lm, note), **slider_limits(lm, session), **views(studio, session, kind, layer, top),
           "form_check": form_check(cfg.data)}
    if changed:
        out.update(left=[], right=[], active_gains=gains_text(session), use_gate=gate_toggle(session))
    return out


# -- Tune: selection and gains -------------------------------------------------------------------
def reselect(studio: Studio, session: Session, k_safety=None, k_utility=None, protect_top=None) -> float:
    """Apply the selection rules to the cached scores; returns milliseconds taken."""
    s = session.cfg.selection
    cfg = dataclasses.replace(s, k_safety=int(k_safety if k_safety is not None else s.k_safety),
                              k_utility=int(k_utility if k_utility is not None else s.k_utility),
                              protect_top=int(protect_top if protect_top is not None else s.protect_top))  # keeps safety_rank, per-layer cap
    start = time.perf_counter()
    session.selection = select(studio.scores(session.scores_key), cfg)
    session.cfg = session.cfg.replace(selection=cfg)
    return (time.perf_counter() - start) * 1000


def on_select(studio: Studio, session: Session, k_safety, k_utility, protect_top, kind="safety", layer=0, top=50) -> dict:
    if studio.scores(session.scores_key) is None:
        return {"counts": "No neuron scores yet: score the neurons first (Explore tab or “Run the whole flow”)."}
    try:
        ms = reselect(studio, session, k_safety, k_utility, protect_top)
    except (SelectionError, ValueError, TypeError) as exc:  # also a non-numeric value sent through the API
        return {"counts": f"✗ {exc}" if isinstance(exc, SelectionError) else f"✗ The thresholds must be whole numbers of neurons ({exc})."}
    out = views(studio, session, kind, layer, top)
    return {**out, "counts": out["counts"] + f" — selection updated in {ms:.1f} ms from cached scores"}


def on_meta(studio: Studio, session: Session, mode, steps, lam_kl, mu_over_refusal, max_gain) -> None:
    try:
        session.cfg = session.cfg.replace(meta={"mode": mode, "steps": int(steps), "lam_kl": float(lam_kl),
                                                "mu_over_refusal": float(mu_over_refusal), "max_gain": float(max_gain)})
    except (ValueError, TypeError) as exc:  # the previous settings stay
        gr.Warning(f"Training settings not changed: {exc}")


def gains_text(session: Session) -> str:
    if session.modulation is None:
        return ("No gains yet: both panes answer with the base model. Train gains or apply fixed gains in **Tune**, "
                "or run the whole flow from **Model & data**.")
    s = session.modulation.summary()
    text = (f"Right pane uses **{session.gains_source}**: {s['n_amplified']:,} amplified, {s['n_suppressed']:,} suppressed, "
            f"gains {s['min_gain']:.2f}–{s['max_gain']:.2f}, scaled by the strength slider")
    gate = session.gate
    if gate is None:
        return text + " (static: no input gate)."
    accuracy = f", training accuracy {gate.train_accuracy:.0%}" if gate.train_accuracy else ""
    return (text + f" and by an **input gate** (a probe on {len(gate.layers):,} neurons{accuracy}): the right pane applies "
            "strength × s, s from 0 (prompt looks benign) to 1 (looks harmful), as “neurontune + gate” in the evaluation.")


def gate_props(session: Session) -> dict:
    """The Compare tab's gate checkbox: on and usable when the session's gains have a gate, else off and disabled."""
    if session.gate is None:
        return dict(value=False, interactive=False, label="input gate (none for these gains)")
    return dict(value=True, interactive=True, label="input gate: strength × s per prompt")


def gate_toggle(session: Session):
    return gr.update(**gate_props(session))


def set_gains(session: Session, mod: Modulation, source: str, run_dir: str | None = None, gate: GateProbe | None = None,
              point: tuple[int, int] | None = None) -> None:
    """The session's gains (and their gate: None for fixed gains or gains without one); `point`: the
    (k_safety, k_utility) they were made at, marked on the trade-off plot (None: unknown, e.g. a file)."""
    session.modulation, session.gate, session.gains_source, session.run_dir, session.eval_rows = mod, gate, source, run_dir, None
    session.operating_point = None if point is None else (int(point[0]), int(point[1]))


def load_gate(path: str | Path, lm) -> GateProbe:
    """A gate file checked against the loaded model (its neurons and fingerprint); ValueError otherwise."""
    return GateProbe.load(path, shape=tuple(lm.shape), expected_fingerprint=lm.fingerprint)


def _file_format(path: str) -> str:
    """The `format` field of a safetensors file's header ("" when unreadable)."""
    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("format", "")
    except Exception:  # noqa: BLE001 - reported when the file is loaded as a modulation
        return ""


def _gains_paths(upload) -> tuple[str | None, str | None]:
    """(modulation, gate) from an upload: one file or folder, or several files (the gate told apart by its header).
    A gate.safetensors beside a modulation file, or inside a run folder, comes along."""
    paths = [p for p in (upload if isinstance(upload, (list, tuple)) else [upload]) if _file_path(p)]
    paths = [_file_path(p) for p in paths]
    gates = [p for p in paths if Path(p).is_file() and _file_format(p) == "neurontune-gate"]
    mods = [p for p in paths if p not in gates]
    mod = mods[0] if mods else None
    gate = gates[0] if gates else None
    if mod is not None and Path(mod).is_dir():  # a run or export folder: its gains file, and its gate if it has one
        folder = RunFolder(mod)
        mod, gate = str(folder.modulation_path), gate or (str(folder.gate_path) if folder.has(RunFolder.GATE) else None)
    elif mod is not None and gate is None:  # a gains file that sits in a run folder brings that folder's gate
        beside = RunFolder(Path(mod).parent)
        gate = str(beside.gate_path) if Path(mod).name == RunFolder.MODULATION and beside.has(RunFolder.GATE) else None
    return mod, gate


def fixed_gains(studio: Studio, session: Session, safety_gain: float, utility_gain: float, kind="safety", layer=0, top=50) -> dict:
    if session.selection is None:
        return {"gains_status": "Select neurons first (score them, then move the sliders)."}
    lm = studio.model(session)
    sel = session.selection.config
    set_gains(session, session.selection.modulation(float(safety_gain), float(utility_gain), lm.fingerprint),
              f"fixed gains ×{float(safety_gain):g} / ×{float(utility_gain):g}", point=(sel.k_safety, sel.k_utility))
    return gains_views(studio, session, kind, layer, top)


def gains_views(studio: Studio, session: Session, kind="safety", layer=0, top=50) -> dict:
    """What changes on the page when the session's gains change."""
    return {**views(studio, session, kind, layer, top), "gains_status": "✓ " + gains_text(session), "active_gains": gains_text(session),
            "use_gate": gate_toggle(session)}


def gains_file(studio: Studio, session: Session, upload, kind="safety", layer=0, top=50) -> dict:
    """Gains from a modulation file or run folder, with the gate.safetensors beside it or uploaded with it;
    a file made for another model (gains or gate) is refused and the session keeps its gains."""
    path, gate_path = _gains_paths(upload)
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
    set_gains(session, mod, f"gains from file {name}" + (" with its gate" if gate else ""), gate=gate)
    return gains_views(studio, session, kind, layer, top)


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


def use_run(studio: Studio, session: Session, job_id: str, kind="safety", layer=0, top=50) -> dict:
    job = studio.runner.get(job_id)
    if job is None or not job.info.get("modulation"):
        return {"gains_status": "Pick a finished training run first."}
    lm = studio.model(session)
    try:
        mod = Modulation.load(job.info["modulation"], expected_fingerprint=lm.fingerprint)
        gate = RunFolder(job.info["run_dir"]).gate(lm) if job.info.get("run_dir") else None
    except (ModulationFileError, ValueError) as exc:
        return {"gains_status": f"✗ {exc}"}
    set_gains(session, mod, f"trained gains from run {Path(job.info['run_dir']).name}", job.info["run_dir"], gate=gate,
              point=(job.info.get("k_safety"), job.info.get("k_utility")) if job.info.get("k_safety") is not None else None)
    note = adopt_run_scores(studio, session, lm, job.info.get("run_dir"))
    out = gains_views(studio, session, kind, layer, top)
    return {**out, "gains_status": out["gains_status"] + note}


def adopt_run_scores(studio: Studio, session: Session, lm, run_dir: str | None) -> str:
    """When the session has no scores for its settings, take the chosen run's (its folder keeps them) with the
    run's data, attribution and selection settings, so Explore and Tune show what these gains were made from.
    Returns a note for the status ("" when nothing changed)."""
    if studio.scores(session.scores_key) is not None or not run_dir:
        return ""
    folder = RunFolder(run_dir)
    try:
        scores, cfg = folder.scores(), folder.config()
    except (OSError, ValueError):
        return ""
    if scores is None or tuple(scores.shape) != tuple(lm.shape):
        return ""
    session.cfg = session.cfg.replace(data=cfg.data, attribution=cfg.attribution, selection=cfg.selection)
    session.scores_key = studio.scores_key(lm, session.cfg)
    studio.put_scores(session.scores_key, scores)
    reselect(studio, session)
    return " Its neuron scores and selection settings came with it (this session had none for its own settings)."


# -- Export --------------------------------------------------------------------------------------
def suggest_name(session: Session) -> str:
    return slugify(f"{session.model}-neurontune-{session.cfg.name}")


def do_export(studio: Studio, session: Session, name: str, overwrite: bool, repo: str, token: str, fmt: str = "transformers") -> dict:
    """Fold the session's gains into a checkpoint (or a GGUF file) under the export root; the token is used for the push only."""
    if session.modulation is None:
        return {"export_status": "No gains to export yet: train or apply gains in **Tune** first.", "hub_token": ""}
    safe = slugify(name or suggest_name(session))
    lm = studio.model(session)
    try:
        summary = RunFolder(session.run_dir).eval_summary() if session.run_dir and session.eval_rows is not None else None
        result = export(lm, session.modulation, studio.export_root, safe, format=fmt or "transformers", preset=session.cfg.to_dict(), eval_summary=summary,
                        gated=session.gate is not None,
                        overwrite=bool(overwrite), push_to_hub=(repo or "").strip() or None, token=(token or "").strip() or None)
    except (ExportError, ValueError) as exc:
        return {"export_status": f"✗ {exc}", "hub_token": ""}
    except OSError as exc:  # disk full, no permission ...: export() left nothing half-written
        return {"export_status": f"✗ Could not write the export ({exc}); nothing was left in {studio.export_root}. "
                                 "Free some space or choose another export folder.", "hub_token": ""}
    path = Path(result["path"])
    download = Path(tempfile.mkdtemp(prefix="neurontune-download-"))  # served copies; the export root stays private
    files = [str(shutil.copy2(p, download / p.name)) for p in (RunFolder(path).modulation_path, path / "README.md")]
    renamed = f" (sanitised from “{name}”)" if name and safe != name else ""
    gate = ("\n\n⚠ **The input gate is not in this export**: a gate cannot be folded into weights, so the checkpoint holds "
            "the static gains only: what the Compare tab shows with *input gate* unticked (on the embedded model these "
            "refuse far more benign prompts than the gated right pane; README “Results”).") if session.gate is not None else ""
    push = (f"\n\n⚠ {result['push_error']}" if result["push_error"] else
            f"\n\n↑ Pushed to the Hub: `{result['pushed']}`" if result["pushed"] else "")
    status = (f"✓ Exported to `{path}`{renamed}. The reloaded checkpoint matches the hooked model (max logit difference "
              f"{result['max_logit_diff']:.1e}).{gate}{push}\n\nLoad it with plain `transformers`:\n```python\n"
              f"from transformers import AutoModelForCausalLM, AutoTokenizer\nmodel = AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
              f"tokenizer = AutoTokenizer.from_pretrained({str(path)!r})\n```")
    if (g := result["gguf"]) is not None:  # the card says what was written and how it was checked
        status = (f"✓ Exported `{path / g['file']}` ({g['size_mb']:.1f} MB){renamed}: same top token as the hooked model at "
                  f"{g['top1_agreement']:.0%} of positions (max logit difference {g['max_logit_diff']:.2f}).{gate}{push}\n\n"
                  f"Run it with llama.cpp: `llama-cli -m {path / g['file']}`" + "".join(f"\n\n{n}" for n in g["notes"]))
    return {"export_status": status, "export_files": files, "export_name": safe, "hub_token": ""}


def eval_rows_of(run_dir: str | None) -> list | None:
    return RunFolder(run_dir).eval_table() if run_dir else None
