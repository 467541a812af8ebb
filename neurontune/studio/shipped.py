"""Opening a page on the shipped run (`run.snapshot`): a visitor sees a tuned model at once (heatmap and
selection, the gains with their gate, the evaluation table, a held-out answer pair in Compare) instead of
waiting minutes for "Run the whole flow", which still redoes everything live. A thin layer: the engine reads
and checks the snapshot, `Studio.new_session` puts it into every new session (`Session.adopt_shipped`); this
only draws it. The answer pair is shown as a finished example, never as the start of the visitor's chat."""
from __future__ import annotations

from ..interventions.gating import GATED
from . import background, handlers
from .chat import display
from .state import Session, Studio
from .views import View, views

SOURCE_NOTE = ("\n\n**Opened on** {what}: the heatmap, the gains with their input gate and the evaluation come from it (no live "
               "work yet). **Run the whole flow** redoes it live on this machine (scores, selection, training, a held-out "
               "jailbreak); any tab's buttons work as well.")
EXAMPLE_NOTE = ("These two answers are an example from the shipped run's evaluation ({what}, gated gains), not part of your "
                "conversation: your first message starts a new one in both panes.")


def _eval_scope(summary: dict | None) -> str:
    """'held-out prompts of the test split, 3 training seeds (mean ± sd [Wilson 95 %])', from eval.json."""
    summary = summary or {}
    seeds = summary.get("seeds", 1)
    return (f"held-out prompts of the {summary.get('split', 'test')} split, {seeds} training seed{'s' if seeds != 1 else ''}"
            + (" (mean ± sd [Wilson 95 %])" if seeds != 1 else " [Wilson 95 %]"))


JUDGED_BEFORE = "refusal judge: the rules of that time (refuse / comply / degenerate, no partial class; `bench/rejudge.py` re-reads them)"


def example_pair(generations: list[dict], heldout: list[str]) -> tuple[str, str, str, str] | None:
    """(prompt, base answer, gated answer, what the prompt is) of the shipped evaluation: an attacked prompt that the
    base model answered and the gated model refused, from a held-out family when there is one (a validation-split
    evaluation has none), else the first attacked prompt."""
    rows = [r for r in generations if r.get("intervention") in ("neurontune" + GATED, "neurontune") and r.get("category") == "attacked"]
    if not rows:
        return None
    gated = [r for r in rows if r.get("intervention") == "neurontune" + GATED] or rows
    turned = [r for r in gated if r.get("refusal") and not r.get("base_refusal")]
    r = ([x for x in turned if x.get("family") in heldout] or turned or gated)[0]
    family = r.get("family", "unknown")
    what = (f"a held-out request inside the `{family}` attack family, which tuning never saw" if family in heldout
            else f"a request inside the `{family}` attack family, one of those tuning trained on")
    return r["prompt"], r.get("base_answer", ""), r.get("answer", ""), what


def open_shipped(studio: Studio, session: Session, view: View = View()) -> dict:
    """Draw the page of a session opened on the shipped run: the views, its gains and evaluation, and its answer
    pair as a finished example in Compare. {} when the session is not on it (or the shipped run went stale)."""
    lm = studio.model(session)
    snap = studio.shipped(lm)
    if snap is None or not session.shipped:
        return {}
    pair = example_pair(snap.generations, (snap.manifest.get("eval") or {}).get("heldout_families") or list(session.cfg.data.heldout_families))
    out = {"model_status": handlers.model_text(session, lm, SOURCE_NOTE.format(what=snap.describe())),
           **handlers.slider_limits(lm, session), **views(session, view),
           "active_gains": handlers.gains_text(session), "use_gate": handlers.gate_toggle(session),
           **background.eval_views(snap.folder.path),
           "eval_status": f"The evaluation of {snap.describe()}: {_eval_scope(snap.folder.eval_summary())}; "
                          f"{(snap.folder.eval_summary() or {}).get('judge_note') or JUDGED_BEFORE}. "
                          "**Run evaluation** measures the session's current gains live.",
           "flow_status": "✓ Showing the shipped run. **▶ Run the whole flow** to redo it live."}
    engine = studio.card_engine(session)
    if not engine.ready:  # the first neuron card then finds the pool activations computed (or read from the disk cache)
        studio.runner.submit("card prompts", lambda reporter: engine.activations() is None, key=session.scores_key, heavy=False)
    if pair is not None and not any(session.chat):  # shown, not continued: the session's chat stays empty
        prompt, base, tuned, what = pair
        example = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": base}],
                   [{"role": "user", "content": prompt}, {"role": "assistant", "content": tuned}]]
        out.update(left=display(example[0]), right=display(example[1]), chat_status=EXAMPLE_NOTE.format(what=what))
    return out
