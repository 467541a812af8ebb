"""Plotly figures of the studio: the layers x neuron-bins heatmap with the selection overlaid, one layer's
neurons, the per-layer selection counts, the live training losses and the safety/utility trade-off."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch

SAFETY_COLOR, UTILITY_COLOR = "#d62728", "#1f77b4"
# A small white template: plotly's built-in "plotly_white" costs ~15 ms of deep copies per figure.
TEMPLATE = go.layout.Template(layout=dict(
    plot_bgcolor="white", paper_bgcolor="white", colorway=["#4c5fd5", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"],
    xaxis=dict(gridcolor="#ebebeb", zeroline=False, linecolor="#bbbbbb"), yaxis=dict(gridcolor="#ebebeb", zeroline=False, linecolor="#bbbbbb")))
LAYOUT = dict(template=TEMPLATE, margin=dict(l=60, r=20, t=50, b=50), font=dict(size=12))
ROLE_SCALE = [[0, "#bbbbbb"], [0.5, UTILITY_COLOR], [1, SAFETY_COLOR]]  # role code 0 none, 1 suppress, 2 amplify


def empty(message: str, height: int = 320) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font=dict(size=14, color="#666"), x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(**LAYOUT, height=height, xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def bin_size(n_neurons: int, target_bins: int = 64) -> int:
    return max(1, math.ceil(n_neurons / target_bins))


def _np(x) -> np.ndarray | None:
    """Plot arithmetic runs in numpy: small torch ops pay thread-pool wake-ups on a busy CPU."""
    return None if x is None else (x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))


def _bins(x: np.ndarray, b: int) -> np.ndarray:
    """[L, N] -> [L, n_bins, b], zero-padded at the end."""
    L, N = x.shape
    n_bins = math.ceil(N / b)
    padded = np.zeros((L, n_bins * b), dtype=x.dtype)
    padded[:, :N] = x
    return padded.reshape(L, n_bins, b)


def heatmap(values, title: str, *, safety=None, utility=None, per_bin: int | None = None, height: int = 460) -> go.Figure:
    """values: [n_layers, n_neurons]. Each cell is a bin of neurons coloured by its most extreme value;
    hover gives that neuron, the bin mean and how many neurons of the bin are selected; `customdata[0]` of a
    cell (and `customdata[1]` of an overlay marker) is that neuron, which a click opens as a neuron card.
    safety / utility: bool masks [n_layers, n_neurons] drawn as markers on the bins that hold them."""
    v = _np(values).astype(np.float32)
    L, N = v.shape
    b = per_bin or bin_size(N)
    cells = _bins(v, b)
    n_bins = cells.shape[1]
    arg = np.abs(cells).argmax(-1)  # [L, n_bins] the most extreme neuron of each bin
    z = np.take_along_axis(cells, arg[..., None], -1)[..., 0]
    starts = np.arange(n_bins) * b
    width = np.minimum(b, N - starts)
    counts = [np.zeros((L, n_bins), dtype=np.int64) if m is None else _bins(_np(m).astype(np.int64), b).sum(-1) for m in (safety, utility)]
    custom = np.stack([starts[None, :] + arg, cells.sum(-1) / width, counts[0], counts[1],
                       np.broadcast_to(starts, (L, n_bins)), np.broadcast_to(starts + width - 1, (L, n_bins))], -1).astype(np.float32)
    signed = bool((v < 0).any())
    zmax = float(np.abs(z).max()) or 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=starts + b / 2, y=np.arange(L), customdata=custom,
        colorscale="RdBu_r" if signed else "Viridis", zmid=0 if signed else None,
        zmin=-zmax if signed else None, zmax=zmax if signed else None, colorbar=dict(title="score", thickness=12),
        hovertemplate=("layer %{y} · neurons %{customdata[4]:.0f}–%{customdata[5]:.0f}<br>most extreme: neuron "
                       "%{customdata[0]:.0f} = %{z:.4g}<br>bin mean %{customdata[1]:.3g}<br>selected: "
                       "%{customdata[2]:.0f} amplify · %{customdata[3]:.0f} suppress<extra></extra>")))
    for name, count, color, symbol in (("amplified (safety)", counts[0], SAFETY_COLOR, "triangle-up"),
                                       ("suppressed (over-refusal)", counts[1], UTILITY_COLOR, "triangle-down")):
        layer, col = np.nonzero(count)
        if len(layer) == 0:
            continue
        n = count[layer, col].astype(np.float32)
        fig.add_trace(go.Scatter(  # customdata: (count, the cell's most extreme neuron: what a click opens)
            x=starts[col] + b / 2, y=layer, mode="markers", name=name,
            marker=dict(symbol=symbol, color=color, size=6 + 10 * np.sqrt(n / n.max()), line=dict(width=1, color="white")),
            customdata=np.stack([n, custom[layer, col, 0]], -1),
            hovertemplate=f"layer %{{y}}, bin at neuron %{{x:.0f}}: %{{customdata[0]:.0f}} {name}<extra></extra>"))
    fig.update_layout(**LAYOUT, title=title, height=height, xaxis_title=f"neuron index (bins of {b})", yaxis_title="layer",
                      legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    fig.update_yaxes(range=[-0.5, L - 0.5], dtick=max(1, L // 15))
    return fig


def layer_neurons(values, layer: int, title: str, *, safety=None, utility=None, gains=None, height: int = 300) -> go.Figure:
    """Drill-down: every neuron of one layer (values: [n_layers, n_neurons]); selected ones coloured."""
    v = _np(values)[layer].astype(np.float32)
    amp = _np(safety)[layer].astype(bool) if safety is not None else np.zeros(len(v), bool)
    sup = _np(utility)[layer].astype(bool) if utility is not None else np.zeros(len(v), bool)
    g = _np(gains)[layer] if gains is not None else np.ones(len(v), np.float32)
    role = np.where(amp, "amplify", np.where(sup, "suppress", ""))
    code = np.where(amp, 2, np.where(sup, 1, 0))
    fig = go.Figure(go.Scattergl(x=np.arange(len(v)), y=v, mode="markers",
                                 marker=dict(color=code, colorscale=ROLE_SCALE, cmin=0, cmax=2, size=5),
                                 text=role, customdata=np.stack([g, np.full(len(v), layer)], -1),  # (gain, layer): a click opens the card
                                 hovertemplate="neuron %{x}: %{y:.4g}<br>%{text} gain %{customdata[0]:.3f}<extra></extra>"))
    fig.update_layout(**LAYOUT, title=title, height=height, xaxis_title="neuron", yaxis_title="score", showlegend=False)
    return fig


def layer_counts(per_layer, height: int = 300) -> go.Figure:
    """Selected neurons per layer (a DataFrame with layer, safety, utility columns)."""
    fig = go.Figure([
        go.Bar(x=per_layer["layer"], y=per_layer["safety"], name="amplify (safety)", marker_color=SAFETY_COLOR,
               hovertemplate="layer %{x}: %{y} amplified<extra></extra>"),
        go.Bar(x=per_layer["layer"], y=per_layer["utility"], name="suppress (over-refusal)", marker_color=UTILITY_COLOR,
               hovertemplate="layer %{x}: %{y} suppressed<extra></extra>"),
    ])
    fig.update_layout(**LAYOUT, title="Selected neurons per layer", barmode="group", height=height,
                      xaxis_title="layer", yaxis_title="neurons", legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return fig


def losses(entries: list[dict], height: int = 320) -> go.Figure:
    """Training log: total loss and its terms per step, validation loss as markers."""
    if not entries:
        return empty("Losses appear here while the gains train.", height)
    fig = go.Figure()
    steps = [e["step"] for e in entries]
    for key, name, dash in (("loss", "loss", None), ("refusal_nll", "refusal NLL (harmful)", "dot"),
                            ("over_refusal", "over-refusal penalty", "dot"), ("kl", "KL to base (benign)", "dot")):
        ys = [e.get(key) for e in entries]
        if any(y is not None for y in ys):
            fig.add_trace(go.Scatter(x=steps, y=ys, mode="lines", name=name, line=dict(dash=dash)))
    val = [(e["step"], e["val"]) for e in entries if "val" in e]
    if val:
        fig.add_trace(go.Scatter(x=[s for s, _ in val], y=[v for _, v in val], mode="markers+lines", name="validation loss",
                                 marker=dict(size=8, symbol="diamond")))
    fig.update_layout(**LAYOUT, title="Meta-learning losses", height=height, xaxis_title="step", yaxis_title="loss",
                      legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return fig
