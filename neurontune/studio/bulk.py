"""The Compare tab's "your prompts, in bulk": a file or a pasted list of prompts, answered by the base and the
tuned model in batched calls as a background job (progress bar, Stop), shown as a sortable table with both
verdicts (and the gate's s) and offered as a CSV download. A thin layer over `eval.bulk`."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

from ..data.prompts import DataError
from ..data.user_prompts import MAX_BULK, read_prompt_list
from ..eval.bulk import bulk_frame, bulk_summary, iter_compare
from ..infra import files
from .background import job_text, watch
from .state import Session, Studio
from .uploads import upload_path
from .views import returns

BATCH = 8  # prompts per generate call (16 rows: each prompt's base and tuned answer)


@returns("bulk_status", "bulk_table", "bulk_file")
def run_bulk(studio: Studio, session: Session, upload, pasted: str, strength: float = 1.0, max_new_tokens: int = 48,
             use_gate: bool = True) -> Iterator[dict]:
    """Answer every prompt with both models (the session's gains at `strength`, scaled by the gate's s per prompt
    when ticked and the gains have a gate); the table fills while the job runs."""
    if session.modulation is None:
        yield {"bulk_status": "No gains yet: both columns would be the base model. Train or load gains in **Tune** first."}
        return
    notes: list[str] = []
    try:
        prompts = read_prompt_list(upload_path(upload), pasted or "", notes=notes)
    except DataError as exc:
        yield {"bulk_status": f"✗ {exc}"}
        return
    lm, mod = studio.model(session), session.modulation
    gate = session.gate if use_gate else None
    rows: list = []

    def work(reporter):
        reporter.progress(0, len(prompts), "answering")
        for batch in iter_compare(lm, prompts, mod, gate=gate, strength=float(strength), max_new_tokens=int(max_new_tokens),
                                  batch_size=BATCH, reporter=reporter):
            rows.extend(batch)
        return len(rows)
    job = studio.runner.submit("bulk", work)
    session.jobs["bulk"] = job.id
    note = (" " + " ".join(notes)) if notes else ""
    yield from watch(studio, job, "bulk_status", lambda j: {"bulk_table": bulk_frame(list(rows))})
    done = list(rows)
    if not done:
        yield {"bulk_status": job_text(studio, job) + note}
        return
    out = Path(tempfile.mkdtemp(prefix="neurontune-download-")) / "your-prompts-base-vs-tuned.csv"  # a served copy
    files.write_text(out, bulk_frame(done).to_csv(index=False))
    s = bulk_summary(done)
    how = f"gate on (s per prompt), strength ×{float(strength):g}" if gate is not None else f"static gains, strength ×{float(strength):g}"
    yield {"bulk_status": f"{job_text(studio, job)} **{s['n']}** prompts ({how}): the base model refused **{s['base_refusals']}**, the "
                          f"tuned model **{s['tuned_refusals']}**; {s['changed']} verdict(s) changed. At most {MAX_BULK} prompts a run.{note}",
           "bulk_table": bulk_frame(done), "bulk_file": str(out)}
