"""Heavy work of the studio as background jobs (attribution, training, evaluation, sweep): submit to the
shared `JobRunner`, then stream the job's progress to the page until it ends. Closing the page does not
stop a job; its result stays in the runner's status files for the next visit or another session."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pandas as pd

from ..eval.judges import check_spec
from ..run.evaluate_run import evaluate_run
from ..run.folder import RunFolder
from ..run.steps import attribute_step, select_step, train_step, truncation_note
from ..run.sweep import parse_grid, sweep_run
from . import handlers, plots
from .jobs import Job
from .judging import judge_for
from .picker import sweep_views
from .state import Session, Studio
from .views import VIEW, View, returns, views

POLL_S = 0.4
LABELS = {"attribution": "Scoring neurons", "train": "Training gains", "evaluate": "Evaluating", "sweep": "Sweeping thresholds",
          "bulk": "Answering your prompts", "export": "Exporting and measuring the checkpoint"}
STATUS_KEY = {"attribution": "attr_status", "train": "train_status", "evaluate": "eval_status", "sweep": "eval_status", "bulk": "bulk_status",
              "export": "export_status"}


def _bar(done: int, total: int, width: int = 24) -> str:
    frac = 0.0 if not total else min(1.0, done / total)
    return "█" * round(frac * width) + "░" * (width - round(frac * width)) + f" {frac:.0%}"


def job_text(studio: Studio, job: Job) -> str:
    """One or two lines: queue position, stage and step, or how the job ended."""
    s = studio.runner.status(job)
    label = LABELS.get(job.kind, job.kind)
    if s["status"] == "queued":
        ahead = f" ({s['running_now']} running now)" if s["running_now"] else ""
        return f"◷ {label}: waiting in the queue — position **{s['position']}**{ahead}. Chat keeps working on the base model meanwhile."
    if s["status"] == "running":
        last = job.log[-1] if job.log else {}
        loss = f" · loss {last['loss']:.4f}" if "loss" in last else ""
        return f"● {label} — {job.stage or 'starting'} · step {job.step}/{job.total or '?'}{loss}\n\n`{_bar(job.step, job.total)}`"
    icon = {"done": "✓", "cancelled": "■", "failed": "✗", "interrupted": "⚠"}[s["status"]]
    took = f" in {job.finished - job.started:.1f} s" if job.finished and job.started else ""
    return f"{icon} {label}: {s['status']}{took}." + (f" {job.error}" if job.error else "")


def watch(studio: Studio, job: Job, key: str, extra=None) -> Iterator[dict]:
    """Yield `{key: status text, **extra(job)}` while the job runs and once when it has ended."""
    while not job.wait(POLL_S):
        yield {key: job_text(studio, job), **(extra(job) if extra else {})}
    yield {key: job_text(studio, job), **(extra(job) if extra else {})}


def stopper(kind: str):
    """The Stop button of one kind of job: asks the session's running job of that kind to stop."""
    key = STATUS_KEY[kind]

    @returns(key)
    def stop(studio: Studio, session: Session) -> dict:
        job_id = session.jobs.get(kind)
        if job_id and studio.runner.cancel(job_id):
            return {key: f"■ Stopping {LABELS[kind].lower()}… (it stops at its next step and keeps what it has)"}
        return {key: "Nothing of yours is running."}
    stop.__name__ = f"stop_{kind}"
    return stop


# -- attribution ---------------------------------------------------------------------------------
@returns("attr_status", *VIEW)
def attribute(studio: Studio, session: Session, view: View = View()) -> Iterator[dict]:
    """Score every neuron (shared job: two sessions asking for the same model and data share one run)."""
    lm = studio.model(session)
    if session.scores is None and (known := studio.known_scores(lm, session.cfg)) is not None:
        session.adopt_scores(known)
    if session.scores is not None:
        yield {"attr_status": "✓ Neuron scores loaded from the cache (same model, prompts and method).", **views(session, view)}
        return
    cfg, key = session.cfg, session.scores_key
    out = studio.runs_dir / "attribution" / key

    def work(reporter):
        return attribute_step(lm, cfg, out, reporter=reporter, cache_dir=studio.cache_dir)
    job = studio.runner.submit("attribution", work, key=key,
                               describe=lambda s: {"scores": str(RunFolder(out).scores_path), "model": lm.name, "shape": list(s.shape)})
    session.jobs["attribution"] = job.id
    yield from watch(studio, job, "attr_status")
    if job.status == "done" and job.result is not None and session.scores_key == key:  # the session kept its model and data
        session.adopt_scores(job.result)
        note = truncation_note(job.result, cfg)
        yield {"attr_status": job_text(studio, job) + (f"\n\n⚠ {note}" if note else ""), **views(session, view)}


# -- training ------------------------------------------------------------------------------------
def _new_run_dir(studio: Studio, session: Session) -> Path:
    run = studio.runs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{session.id}"
    folder = RunFolder(run).made()
    if session.scores is not None:  # evaluation baselines read the run's scores (the cache may live elsewhere)
        folder.write_scores(session.scores)
    folder.write_config(session.cfg)
    return run


def train_key(lm, session: Session) -> str:
    """Trainings with the same model, data, attribution, selection and meta settings give the same gains."""
    return f"{lm.fingerprint}-{session.cfg.digest('data', 'attribution', 'selection', 'meta')}"


@returns("train_status", "loss_plot", *handlers.GAINS, "recent_runs")
def train(studio: Studio, session: Session, view: View = View()) -> Iterator[dict]:
    if session.selection is None:
        yield {"train_status": "Score and select neurons first (Explore, then the sliders above)."}
        return
    if not session.selection.counts()["safety"] and not session.selection.counts()["utility"]:
        yield {"train_status": "The selection is empty: raise k_safety or k_utility."}
        return
    lm, selection, cfg = studio.model(session), session.selection, session.cfg
    run = _new_run_dir(studio, session)
    select_step(session.scores, cfg, run)

    def work(reporter):
        return train_step(lm, selection, cfg, run, reporter=reporter, cache_dir=studio.cache_dir)

    def describe(result):
        return {"run_dir": str(run), "modulation": str(RunFolder(run).modulation_path), "fingerprint": lm.fingerprint,
                "model": lm.name, "stopped": result.stopped, "steps_run": len(result.log), "best_step": result.best_step,
                "k_safety": cfg.selection.k_safety, "k_utility": cfg.selection.k_utility, **result.modulation.summary()}
    job = studio.runner.submit("train", work, key=train_key(lm, session), describe=describe)
    session.jobs["train"] = job.id
    yield from watch(studio, job, "train_status", lambda j: {"loss_plot": plots.losses(list(j.log))})
    result = job.result
    if result is not None and job.status in ("done", "cancelled"):
        stopped = {"done": "all steps", "early_stop": "early stop", "cancelled": "stopped by you", "non_finite": "stopped: non-finite loss"}
        gate, note = None, ""
        if RunFolder(run).has(RunFolder.GATE):  # train_step fits one when the preset asks (meta.gate) and it was not stopped
            try:
                gate = RunFolder(run).gate(lm)
            except ValueError as exc:
                note = f"\n\n⚠ The run's gate could not be read ({exc}): the right pane shows what Export writes, without a gate."
        try:
            session.set_gains(result.modulation, f"trained gains ({len(result.log)} steps, {stopped.get(result.stopped, result.stopped)}, "
                              f"best step {result.best_step})", gate=gate, run_dir=str(run),
                              point=(cfg.selection.k_safety, cfg.selection.k_utility), foldable=RunFolder(run).foldable(lm.fingerprint))
        except ValueError as exc:  # another model was loaded meanwhile: the gains stay in their run folder
            note += f"\n\n⚠ Not made the session's gains: {exc} They are kept in `{run}`."
        yield {**handlers.gains_views(session, view), "train_status": job_text(studio, job) + note,
               "loss_plot": plots.losses(list(job.log)), **handlers.recent_runs(studio, session)}


# -- evaluation and sweep ------------------------------------------------------------------------
def _run_with_gains(studio: Studio, session: Session) -> Path:
    """The session's run folder with its current gains saved in it (made for fixed or uploaded gains)."""
    run = Path(session.run_dir) if session.run_dir else _new_run_dir(studio, session)
    folder = RunFolder(run)
    if not folder.has(RunFolder.MODULATION) or session.run_dir is None:
        folder.write_modulation(session.modulation)
        if session.gate is not None:  # evaluated as "neurontune + gate" too
            folder.write_gate(session.gate)
    session.keep_run(str(run))
    return run


def eval_views(run: Path) -> dict:
    folder = RunFolder(run)
    table = folder.eval_table() or []
    samples = folder.generations()
    frame = pd.DataFrame()
    if samples:  # a few prompts of each (category, family), every intervention's answer side by side
        frame = pd.DataFrame(samples)
        frame["n"] = frame.groupby("intervention").cumcount()
        first = frame[frame["intervention"] == frame["intervention"].iloc[0]]
        keep = first.groupby(["category", "family"], sort=False).head(3)["n"]
        order = {name: i for i, name in enumerate(dict.fromkeys(frame["intervention"]))}
        frame = frame[frame["n"].isin(keep)].assign(o=lambda f: f["intervention"].map(order)).sort_values(["n", "o"])
        if "second_verdict" in frame.columns and frame["second_verdict"].isna().all():
            frame = frame.drop(columns=["second_verdict"])  # no second judge ran
        frame = frame[[c for c in ("category", "family", "intervention", "verdict", "second_verdict", "answer", "prompt") if c in frame.columns]]
    return {"eval_table": eval_frame(table), "eval_samples": frame}


def eval_frame(table: list[dict]) -> pd.DataFrame:
    """The evaluation table as read: each headline metric as 'mean ± sd [Wilson 95 %]', one row per intervention."""
    from ..eval.report import HEADLINE, LABELS, cell
    if not table:
        return pd.DataFrame()
    frame = pd.DataFrame(table).set_index("intervention")
    if "seeds" not in frame.columns:  # a table written before intervals: the plain numbers
        return frame.reset_index().round(4)
    cols = [m for m in HEADLINE if m in frame.columns]
    return pd.DataFrame([{"intervention": name, **{LABELS.get(m, m): cell(frame, name, m) for m in cols}} for name in frame.index])


@returns("eval_status", "eval_table", "eval_samples")
def evaluate(studio: Studio, session: Session, quick: bool, baselines: list[str], split: str = "validation",
             judge: str = "rules") -> Iterator[dict]:
    """Evaluate the session's gains in the background: on the validation split while choosing settings, on the
    test split for the table one reports (read it once, when the choices are made); `judge` ("rules" or
    "model:NAME") reads the answers."""
    if session.modulation is None:
        yield {"eval_status": "No gains to evaluate yet: train or apply gains in **Tune** first."}
        return
    try:
        check_spec(judge)
    except ValueError as exc:
        yield {"eval_status": f"✗ {exc}"}
        return
    lm, cfg, run = studio.model(session), session.cfg, _run_with_gains(studio, session)

    def work(reporter):
        evaluate_run(lm, run, cfg, baselines=tuple(baselines or ()), quick=bool(quick), split=split or "validation",
                     cache_dir=studio.cache_dir, reporter=reporter, judge=judge_for(studio, judge))
        return {"run_dir": str(run)}
    job = studio.runner.submit("evaluate", work)
    session.jobs["evaluate"] = job.id
    yield from watch(studio, job, "eval_status")
    if job.status == "done":
        session.evaluated(str(run), RunFolder(run).eval_table())
        summary = RunFolder(run).eval_summary() or {}
        audit = (summary.get("style_audit") or {}).get("accuracy")
        said = (f" {summary.get('split', split)} split, {summary.get('seeds', 1)} seed(s); mean [Wilson 95 %]"
                + (f"; style audit of the pools {audit:.2f} (0.5 = chance)." if audit is not None else ".")
                + (f" {summary['judge_note'][0].upper()}{summary['judge_note'][1:]}." if summary.get("judge_note") else ""))
        yield {"eval_status": job_text(studio, job) + said + f" Written to `{run}` ({RunFolder.EVAL}, {RunFolder.GENERATIONS}).",
               **eval_views(run)}


@returns("eval_status", "tradeoff", "points")
def sweep(studio: Studio, session: Session, grid_text: str, judged: bool = False) -> Iterator[dict]:
    """Each grid point trained as the session's preset trains (behind its gate, for a gate-first preset) and measured
    by the first-token proxy, or with `judged` by judging short answers on every validation group (minutes a point)."""
    try:
        grid = parse_grid(grid_text)
    except ValueError as exc:
        yield {"eval_status": f"✗ {exc}"}
        return
    if session.scores is None:
        yield {"eval_status": "Score the neurons first (Explore): the sweep re-selects from those scores."}
        return
    lm, cfg, scores = studio.model(session), session.cfg, session.scores
    out = studio.runs_dir / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{session.id}"

    def work(reporter):
        sweep_run(lm, cfg, grid, out, scores=scores, judged=bool(judged), cache_dir=studio.cache_dir, reporter=reporter)
        return {"out": str(out)}
    job = studio.runner.submit("sweep", work)
    session.jobs["sweep"] = job.id
    yield from watch(studio, job, "eval_status")
    if job.status == "done" and RunFolder(out).sweep() is not None:
        session.sweep_dir = str(out)
        yield {"eval_status": job_text(studio, job) + f" Written to `{out}`. Click a point (or a row) to make its gains yours.",
               **sweep_views(session)}


# -- the one-button flow -------------------------------------------------------------------------
FLOW = (*handlers.LOAD, *train.outputs, "left", "right", "msg", "chat_status", "attr_status", "flow_status", "tabs")


@returns(*FLOW)
def flow(studio: Studio, session: Session, model, trust_remote_code, preset, quick_mode, harmful_file=None, benign_file=None,
         borderline_file=None, view: View = View()) -> Iterator[dict]:
    """Load → score neurons → select (preset counts) → train gains → ask a held-out attacked prompt; the
    page follows along tab by tab."""
    import gradio as gr

    from . import chat as chat_ui

    yield {"flow_status": "**1/4** Loading the model…"}
    out = handlers.load(studio, session, model, trust_remote_code, preset, quick_mode, harmful_file, benign_file, borderline_file, view)
    if out["model_status"].startswith("✗"):
        yield {**out, "flow_status": "Stopped: the model or data could not be loaded (see below)."}
        return
    yield {**out, "flow_status": "**2/4** Scoring every neuron (attribution)…", "tabs": gr.Tabs(selected="explore")}
    for update in attribute(studio, session, view):
        yield {**update, "flow_status": "**2/4** Scoring neurons — " + update.get("attr_status", "done")}
    if session.selection is None:
        yield {"flow_status": "Stopped: attribution did not finish (see the Explore tab)."}
        return
    yield {"flow_status": f"**3/4** Training gains for the selected neurons ({session.cfg.meta.steps} steps)…", "tabs": gr.Tabs(selected="tune"),
           **handlers.slider_limits(studio.model(session), session)}
    earlier = studio.runner.latest("train", key=train_key(studio.model(session), session))
    if earlier is not None and Path(earlier.info.get("modulation", "")).is_file():  # same settings trained before
        update = handlers.use_run(studio, session, earlier.id, view)
        yield {**update, "train_status": f"✓ Reused the gains trained earlier with the same settings (run `{Path(earlier.info['run_dir']).name}`); "
               "press **Train gains** to train again.", "loss_plot": plots.losses(list(earlier.log)), "flow_status": "**3/4** Reused earlier gains."}
    else:
        for update in train(studio, session, view):
            yield {**update, "flow_status": "**3/4** " + update.get("train_status", "Training done.")}
    if session.modulation is None:
        yield {"flow_status": "Stopped: training did not finish (see the Tune tab)."}
        return
    label, prompt = next((p for p in chat_ui.examples(studio, session) if "unseen" in p[0]), chat_ui.examples(studio, session)[0])
    yield {"flow_status": f"**4/4** Asking both models a held-out request wrapped in an attack family tuning never saw ({label})…", "tabs": gr.Tabs(selected="compare")}
    session.chat = [[], []]
    yield from chat_ui.chat(studio, session, prompt, 1.0, 64)
    yield {"flow_status": "✓ Done. Compare answers below, try the examples, move the strength slider, then Evaluate and Export."}


@returns("export_status", "export_files", "export_name", "hub_token")
def export(studio: Studio, session: Session, name: str, overwrite: bool, repo: str, token: str, fmt: str = "transformers",
           measure: bool = True) -> Iterator[dict]:
    """Export the session's modulation (`handlers.do_export`); with `measure` as a background job
    that also evaluates the reloaded checkpoint on the test split, so the model card carries its own figures."""
    if not measure or session.modulation is None:
        yield handlers.do_export(studio, session, name, overwrite, repo, token, fmt)
        return
    job = studio.runner.submit("export", lambda reporter: handlers.do_export(studio, session, name, overwrite, repo, token, fmt,
                                                                             measure=True, reporter=reporter))
    session.jobs["export"] = job.id
    yield {"hub_token": ""}  # the token stays in the job only
    yield from watch(studio, job, "export_status")
    if job.status == "done" and isinstance(job.result, dict):
        yield job.result
