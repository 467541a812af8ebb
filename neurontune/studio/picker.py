"""The Evaluate tab's trade-off picker. Every sweep point keeps its gains (`RunFolder.point`); picking one, by a
click on the plot or a row of the table, sets the k sliders to it, makes its gains the session's and offers
Compare and Export for it. The plot rings the operating point in use and names the split its figures read.
A thin layer over `run.sweep` and the run folder."""
from __future__ import annotations

import pandas as pd

from ..interventions.modulation import ModulationFileError
from ..interventions.protocol import form_of
from ..run.export import slugify
from ..run.folder import RunFolder
from ..run.sweep import X_COLUMNS, Y_COLUMNS, split_of, tradeoff_figure
from . import handlers, plots
from .state import Session, Studio
from .views import View, returns

COLUMNS = ("point", "k_safety", "k_utility", "n_safety", "n_utility", "gated", "harmful_refusal", "benign_over_refusal",
           "template_over_refusal", "borderline_over_refusal", "alarming_over_refusal", "ppl_ratio", "harmful_refusal_proxy",
           "benign_over_refusal_proxy", "borderline_over_refusal_proxy", "split")


def _sweep(session: Session) -> tuple[pd.DataFrame, pd.DataFrame | None] | None:
    return RunFolder(session.sweep_dir).sweep() if session.sweep_dir else None


def points_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per sweep point, numbered as on the plot (its `customdata`)."""
    table = frame.assign(point=range(len(frame)))
    return table[[c for c in COLUMNS if c in table.columns]].round(4)


def sweep_views(session: Session) -> dict:
    """The trade-off plot (the session's operating point ringed) and the points table of the session's sweep."""
    swept = _sweep(session)
    if swept is None:
        return {"tradeoff": plots.empty("Run a sweep to see the safety / over-refusal trade-off and pick a point.", 360),
                "points": pd.DataFrame()}
    frame, base = swept
    try:
        fig = tradeoff_figure(frame, base, current=session.operating_point)
    except KeyError as exc:
        return {"tradeoff": plots.empty(f"The trade-off plot needs other columns: {exc}", 360), "points": points_table(frame)}
    fig.update_layout(height=440, clickmode="event", legend=dict(orientation="h", y=-0.28, x=0, yanchor="top"),
                      margin=dict(l=60, r=20, t=50, b=90))
    return {"tradeoff": fig, "points": points_table(frame)}


@returns(*handlers.GAINS, "k_safety", "k_utility", "tradeoff", "points", "pick_status", "export_name", "chat_status")
def pick_point(studio: Studio, session: Session, index, view: View = View()) -> dict:
    """Make sweep point `index` the session's: its gains (with the gate they were trained behind, when the preset fits
    one), the k sliders and the selection at its (k_safety, k_utility), the plot's ring; the status offers Compare
    and Export."""
    swept = _sweep(session)
    if swept is None:
        return {"pick_status": "No sweep yet: run one above, then click a point."}
    frame, _ = swept
    try:
        i = int(index)
        row = frame.iloc[i]
    except (TypeError, ValueError, IndexError):
        return {"pick_status": f"✗ Choose a point between 0 and {len(frame) - 1} (the `point` column)."}
    ks, ku = int(row["k_safety"]), int(row["k_utility"])
    folder = RunFolder(session.sweep_dir).point(ks, ku)
    lm = studio.model(session)
    try:
        mod = folder.modulation(lm.fingerprint)
        gate = folder.gate(lm)
    except (ModulationFileError, ValueError) as exc:
        return {"pick_status": f"✗ {exc}"}
    if mod is None:
        return {"pick_status": "✗ This sweep was written before sweep points kept their gains: run the sweep again."}
    form = f"{'gated' if gate is not None else form_of(mod) or 'static'} gains"  # the forms' vocabulary (protocol.FORMS)
    try:
        session.adopt_point(mod, ks, ku, f"sweep point {i} (k_safety={ks}, k_utility={ku}; {form})", gate=gate)
    except ValueError as exc:  # gains for another model's shape, or thresholds the model cannot take
        return {"pick_status": f"✗ {exc}"}
    split = split_of(frame) or "an unnamed"
    y, x = (next((c for c in cols if c in frame.columns), cols[0]) for cols in (Y_COLUMNS, X_COLUMNS))  # judged, else proxy
    status = (f"✓ Point {i} (k_safety={ks}, k_utility={ku}; {split} split: {y.replace('_', ' ')} {row.get(y, float('nan')):.3f}, "
              f"{x.replace('_', ' ')} {row.get(x, float('nan')):.3f}) is now this session's {form}. "
              "**→ Compare** chats with it; **→ Export** folds " + ("its gains (without the gate)" if gate is not None else "it")
              + " into a checkpoint.")
    return {**handlers.gains_views(session, view), **sweep_views(session),
            "k_safety": ks, "k_utility": ku, "pick_status": status, "chat_status": handlers.gains_text(session),
            "export_name": slugify(f"{session.model}-neurontune-ks{ks}-ku{ku}")}


def pick_row(studio: Studio, session: Session, row_value, view: View = View()) -> dict:
    """A row of the points table was clicked: its `point` column is the index."""
    if not row_value:
        return {}
    return pick_point(studio, session, row_value[0], view)
