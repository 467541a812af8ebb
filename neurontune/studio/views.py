"""What the Explore and Tune tabs draw from a session: the heatmap, drill-down, top-neurons table, per-layer
counts and selection summary, for one `View` (score kind, drill-down layer, table rows). Also the one place
callbacks declare the outputs they return (`returns`), which the page and its API read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gradio as gr
import numpy as np
import pandas as pd

from ..method.selection import ROLES
from . import plots
from .state import Session

VIEW = ("heatmap", "kind", "drill", "table", "drill_layer", "dist_explore", "dist_tune", "counts")  # what `views` returns
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
NO_SCORES = "No neuron scores yet: press “Score neurons” (Explore) or “Run the whole flow” (Model & data)."


def returns(*names: str) -> Callable:
    """Declare the named outputs a callback returns (or yields): the page binds them to its components, in this
    order, and `app.OUTPUTS` (what a `gradio_client` call returns) is read from these declarations."""
    def mark(fn):
        fn.outputs = tuple(dict.fromkeys(names))
        return fn
    return mark


@dataclass(frozen=True)
class View:
    """What the Explore tab shows: the score kind, the drill-down layer and the number of table rows."""

    kind: str = "safety"
    layer: int = 0
    top: int = 50

    @classmethod
    def of(cls, kind=None, layer=None, top=None) -> "View":
        """From the page's three inputs (or an API call's): missing or unreadable values take the defaults."""
        def whole(value, default: int) -> int:
            try:
                return int(value)
            except (TypeError, ValueError):
                return default
        return cls(str(kind or "safety"), whole(layer, 0), whole(top, 50) or 50)


def kind_choices(session: Session) -> list[tuple[str, str]]:
    scores = session.scores
    if scores is None:
        return [(KIND_LABELS["safety"], "safety")]
    kinds = [k for k in ("safety", "over_refusal", "benign_dependence", "diff:safety-over_refusal") if k.startswith("diff:") or k in scores.scores]
    kinds += [f"safety/{f}" for f in scores.families] + [k for k in ("safety/plain", "over_refusal/benign", "over_refusal/borderline") if k in scores.scores]
    kinds += ["diff:act_harmful-act_benign"] + (["gains"] if session.modulation is not None else [])
    return [(KIND_LABELS.get(k, f"Safety under the '{k.split('/', 1)[-1]}' attack family"), k) for k in kinds]


def kind_values(session: Session, kind: str) -> np.ndarray:
    """[n_layers, n_neurons] values of a score kind, a difference of two, or the current gains − 1.
    The view code works in numpy: on a busy CPU each small multi-threaded torch op waits for a core."""
    scores = session.scores
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


def top_table(session: Session, kind: str, top: int, values: np.ndarray | None = None,
              m: dict | None = None, gains: np.ndarray | None = None) -> pd.DataFrame:
    """The `top` neurons by the chosen score, with every score, activations, role and current gain."""
    scores = session.scores
    values = kind_values(session, kind) if values is None else values
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
        roles = ("safety", "utility", "overlap", "protected")
        frame["role"] = np.select([m[r][layers, neurons] for r in roles], [ROLES[r] for r in roles], "")
    if session.modulation is not None:
        gains = session.modulation.dense().numpy() if gains is None else gains
        frame["gain"] = gains[layers, neurons]
    out = pd.DataFrame(frame)
    floats = out.select_dtypes("number").columns.difference(["layer", "neuron"])
    return out.astype({c: "float64" for c in floats}).round(4)


@returns(*VIEW)
def views(session: Session, view: View = View()) -> dict:
    """Heatmap, drill-down, table, per-layer counts and the selection summary for the session's state."""
    if session.scores is None:
        return {"heatmap": plots.empty(NO_SCORES, 460), "drill": plots.empty("", 300), "table": pd.DataFrame(),
                "dist_explore": plots.empty("", 300), "dist_tune": plots.empty(NO_SCORES, 300), "counts": NO_SCORES}
    choices = kind_choices(session)
    kind = view.kind if view.kind in {v for _, v in choices} else "safety"
    values = kind_values(session, kind)
    m = masks(session)
    overlay = {"safety": m.get("safety"), "utility": m.get("utility")}
    layer = int(min(max(view.layer, 0), values.shape[0] - 1))
    label = dict((v, l) for l, v in choices)[kind]
    gains = session.modulation.dense().numpy() if session.modulation is not None else None
    out = {"heatmap": plots.heatmap(values, label, **overlay), "kind": gr.update(choices=choices, value=kind),
           "drill": plots.layer_neurons(values, layer, f"Layer {layer}: every neuron ({label.split(':')[0]})", gains=gains, **overlay),
           "table": top_table(session, kind, view.top, values, m, gains), "drill_layer": gr.update(maximum=values.shape[0] - 1, value=layer)}
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
            f"{c['overlap']:,} {ROLES['overlap']} · {c['protected_dropped']:,} protected (benign answers need them){timing}")
