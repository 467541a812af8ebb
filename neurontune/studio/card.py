"""The Explore tab's neuron card: click a heatmap cell, a drill-down point or a table row (or type a layer and
index) and see what the neuron does. A thin layer over `eval.neuron_card` (the engine, shared per run and
memoised); this only draws the card: scores with ranks, activations on the run's prompts, promoted tokens and
the refusal effect of the neuron alone at gain 0, 1 and its tuned gain."""
from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

from ..eval.neuron_card import NeuronCard, role_of
from . import plots
from .state import Session, Studio
from .views import returns

HARMFUL_COLOR, HARMLESS_COLOR = "#d62728", "#1f77b4"
SHOWN = 6  # prompts listed at each end of the ranking


def activation_figure(card: NeuronCard, k: int = SHOWN, height: int = 300) -> go.Figure:
    """Histogram of the neuron's activation on every pool prompt, harmful vs harmless, the top and bottom
    `k` prompts as markers under it (hover: the prompt)."""
    fig = go.Figure()
    for label, color in (("harmful", HARMFUL_COLOR), ("harmless", HARMLESS_COLOR)):
        values = [a for p, a in card.activations if p.label == label]
        fig.add_trace(go.Histogram(x=values, name=f"{label} ({len(values)})", marker_color=color, opacity=0.6, nbinsx=30))
    ends = card.top(k) + card.bottom(k)
    fig.add_trace(go.Scatter(x=[a for _, a in ends], y=[-0.6] * len(ends), mode="markers", name=f"top / bottom {k}",
                             marker=dict(symbol="line-ns-open", size=14, line=dict(width=2),
                                         color=[HARMFUL_COLOR if p.label == "harmful" else HARMLESS_COLOR for p, _ in ends]),
                             text=[f"[{p.group}] {p.text[:120]}" for p, _ in ends], hovertemplate="%{x:.3f}: %{text}<extra></extra>"))
    fig.update_layout(**plots.LAYOUT, barmode="overlay", height=height, title=f"Neuron {card.layer}:{card.index}: activation at the "
                      "last prompt token", xaxis_title="activation", yaxis_title="prompts",
                      legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return fig


def prompts_table(card: NeuronCard, k: int = SHOWN):
    """The top and bottom `k` prompts, harmful rows red and harmless rows blue (a pandas Styler)."""
    rows = [("top", a, p) for p, a in card.top(k)] + [("bottom", a, p) for p, a in card.bottom(k)]
    frame = pd.DataFrame([{"end": end, "activation": round(a, 4), "set": p.label, "group": p.group, "prompt": p.text}
                          for end, a, p in rows])
    tint = {"harmful": "background-color: #fde2e2", "harmless": "background-color: #e0ecfa"}
    return frame.style.apply(lambda row: [tint.get(row["set"], "")] * len(row), axis=1)


def header(card: NeuronCard) -> str:
    role = {"amplify": "▲ amplified (safety)", "suppress": "▼ suppressed (over-refusal)"}.get(card.role, card.role or "not selected")
    gain = (" · no gains in this session" if card.gain is None else " · left at gain 1 by the session's gains" if card.gain == 1.0
            else f" · tuned gain **×{card.gain:.3f}**")
    safety = card.score("safety")
    rank = f" · safety rank **{safety.rank:,}** of {safety.of:,}" if safety else ""
    promoted, suppressed = (" ".join(f"<code>{html.escape(repr(t))}</code>" for t, _ in tokens[:8]) for tokens in (card.promoted, card.suppressed))
    took = card.seconds.get("total", 0.0)
    return (f"### Neuron {card.layer}:{card.index} — {role}{gain}{rank}\n\n"
            f"**Writes towards** {promoted}  \n**Writes away from** {suppressed}  \n"
            "<span class='how'>Its output column through the final norm and the unembedding (the direct path; a negative "
            f"activation writes the opposite). Card computed in {took:.2f} s.</span>")


def scores_frame(card: NeuronCard) -> pd.DataFrame:
    return pd.DataFrame([{"score": r.kind, "value": round(r.value, 5), "rank": r.rank, "of": r.of} for r in card.scores])


def effect_frame(card: NeuronCard) -> pd.DataFrame:
    """One row per held-out prompt (and their mean): the refusal probability at each gain, then the prompt."""
    short = lambda text: text if len(text) <= 60 else text[:59] + "…"  # noqa: E731
    rows = [{"set": r.label, **{f"gain {g}": round(r.refusal[g], 4) for g in card.gains}, "prompt": short(r.prompt)} for r in card.effect]
    rows.append({"set": "mean", **{f"gain {g}": round(card.mean_refusal(g), 4) for g in card.gains}, "prompt": ""})
    return pd.DataFrame(rows)


@returns("card_status", "card_scores", "card_acts", "card_prompts", "card_effect", "card_layer", "card_index")
def card_views(studio: Studio, session: Session, layer, index) -> dict:
    """Every card output for neuron (layer, index) of the session's model, scores and gains."""
    if session.scores is None:
        return {"card_status": "No neuron scores yet: score the neurons (or run the whole flow) first."}
    try:
        layer, index = int(layer), int(index)
    except (TypeError, ValueError):
        return {"card_status": "✗ Give a layer and a neuron index as whole numbers."}
    n_layers, n_neurons = studio.model(session).shape
    if not (0 <= layer < n_layers and 0 <= index < n_neurons):
        return {"card_status": f"✗ No neuron {layer}:{index}: layers 0–{n_layers - 1}, neurons 0–{n_neurons - 1} per layer."}
    gain = float(session.modulation.dense()[layer, index]) if session.modulation is not None else None
    try:
        card = studio.card_engine(session).card(layer, index, gain=gain, role=role_of(session.selection, layer, index))
    except ValueError as exc:
        return {"card_status": f"✗ {exc}"}
    return {"card_status": header(card), "card_scores": scores_frame(card), "card_acts": activation_figure(card),
            "card_prompts": prompts_table(card), "card_effect": effect_frame(card), "card_layer": layer, "card_index": index}


def card_from_row(studio: Studio, session: Session, row_value) -> dict:
    """A row of the top-neurons table was clicked: its first two columns are layer and neuron."""
    if not row_value or len(row_value) < 2:
        return {}
    return card_views(studio, session, row_value[0], row_value[1])
