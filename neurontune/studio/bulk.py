"""The Compare tab's "your prompts, in bulk": a file or a pasted list of prompts, answered by the base and the
tuned model in batched calls as a background job (progress bar, Stop), shown as a sortable table with both
verdicts of the chosen judge (with a model judge, the rules' verdicts beside them, and a filter for the rows where
the two differ; and the gate's s) and offered as a CSV download. A thin layer over `eval.bulk`."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

from ..data.prompts import DataError
from ..data.user_prompts import MAX_BULK, read_prompt_list
from ..eval.bulk import bulk_frame, bulk_summary, iter_compare
from ..eval.judges import check_spec
from ..infra import files
from .background import job_text, watch
from .judging import judge_for
from .state import Session, Studio
from .uploads import upload_path
from .views import returns

BATCH = 8  # prompts per generate call (16 rows: each prompt's base and tuned answer)


@returns("bulk_status", "bulk_table", "bulk_file")
def run_bulk(studio: Studio, session: Session, upload, pasted: str, strength: float = 1.0, max_new_tokens: int = 48,
             use_gate: bool = True, judge: str = "rules", only_disagreements: bool = False) -> Iterator[dict]:
    """Answer every prompt with both models (the session's gains at `strength`, scaled by the gate's s per prompt
    when ticked and the gains have a gate, else what Export folds: `Session.tuned_side`), judged by `judge` ("rules" or "model:NAME"); the table fills while the
    job runs (only the prompts where the two judges differ, when asked)."""
    judge = (judge or "rules").strip()
    if session.modulation is None:
        yield {"bulk_status": "No gains yet: both columns would be the base model. Train or load gains in **Tune** first."}
        return
    notes: list[str] = []
    try:
        prompts = read_prompt_list(upload_path(upload), pasted or "", notes=notes)
        check_spec(judge)  # a model judge loads in the job
    except (DataError, ValueError) as exc:
        yield {"bulk_status": f"✗ {exc}"}
        return
    lm = studio.model(session)
    mod, gate, form = session.tuned_side(bool(use_gate))  # what the chat's right pane applies, in the same words
    rows: list = []

    def work(reporter):
        reporter.progress(0, len(prompts), "loading the judge" if judge != "rules" else "answering")
        judge_ = judge_for(studio, judge)  # a model judge loads here, in the job
        for batch in iter_compare(lm, prompts, mod, gate=gate, strength=float(strength), max_new_tokens=int(max_new_tokens),
                                  batch_size=BATCH, reporter=reporter, judge=judge_):
            rows.extend(batch)
        return rows
    job = studio.runner.submit("bulk", work, describe=lambda done: {"prompts": len(done)})
    session.jobs["bulk"] = job.id
    note = (" " + " ".join(notes)) if notes else ""
    only = bool(only_disagreements)
    yield from watch(studio, job, "bulk_status", lambda j: {"bulk_table": bulk_frame(list(rows), only)})
    done = list(rows)
    if not done:
        yield {"bulk_status": job_text(studio, job) + note}
        return
    out = Path(tempfile.mkdtemp(prefix="neurontune-download-")) / "your-prompts-base-vs-tuned.csv"  # a served copy
    files.write_text(out, bulk_frame(done).to_csv(index=False))
    s = bulk_summary(done)
    how = f"{form}, strength ×{float(strength):g}"
    judged = f"judge: **{judge_for(studio, judge).name}**, partial refusals counted"
    if "agree" in s:
        judged += (f"; the rules agree on {s['agree']}/{s['answers']} answers ({s['agree'] / max(1, s['answers']):.0%}), "
                   f"{s['differ']} prompt(s) differ" + (" (shown alone)" if only else " (tick “only where the judges differ” to see them)"))
    yield {"bulk_status": f"{job_text(studio, job)} **{s['n']}** prompts ({how}; {judged}): the base model refused **{s['base_refusals']}**, "
                          f"the tuned model **{s['tuned_refusals']}**; {s['changed']} verdict(s) changed. At most {MAX_BULK} prompts a run.{note}",
           "bulk_table": bulk_frame(done, only), "bulk_file": str(out)}


@returns("bulk_table")
def filter_bulk(studio: Studio, session: Session, only_disagreements: bool) -> dict:
    """The last bulk table again, all rows or only those where the two judges differ (no new answers)."""
    job = studio.runner.get(session.jobs.get("bulk"))
    rows = list(job.result) if job is not None and isinstance(job.result, list) else []
    return {"bulk_table": bulk_frame(rows, bool(only_disagreements))}
