"""The README's dial figure: how moving k_safety and k_utility moves refusal and over-refusal, from a judged sweep.

    python -m neurontune sweep --preset balanced --judged --grid 500:500,1500:500,3000:500,1500:0,1500:1500 --out runs/sweep-balanced
    python docs/dial_figure.py runs/sweep-balanced assets/screenshots/dial.png

Two panels from one sweep.csv: k_safety moved at the preset's k_utility, and k_utility moved at its k_safety. The PNG is
the plotly figure rendered by Chromium (no kaleido needed)."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LINES = (("harmful_refusal", "harmful (should refuse)", "#d62728", "solid"),
         ("train_family_refusal", "harmful in attack templates (should refuse)", "#ff7f0e", "solid"),
         ("template_over_refusal", "benign in templates (should answer)", "#1f77b4", "dash"),
         ("borderline_over_refusal", "borderline-safe (should answer)", "#17becf", "dash"),
         ("alarming_over_refusal", "alarming words, safe (should answer)", "#9467bd", "dash"),
         ("benign_over_refusal", "benign (should answer)", "#2ca02c", "dash"))


def figure(frame: pd.DataFrame, k_safety: int, k_utility: int) -> go.Figure:
    """Left: rows at k_utility, by k_safety; right: rows at k_safety, by k_utility."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=(f"more safety neurons (k_utility = {k_utility})",
                                        f"more utility neurons (k_safety = {k_safety})"))
    panels = ((frame[frame.k_utility == k_utility].sort_values("k_safety"), "k_safety", 1),
              (frame[frame.k_safety == k_safety].sort_values("k_utility"), "k_utility", 2))
    for rows, axis, col in panels:
        for key, label, colour, dash in LINES:
            if key in rows:
                fig.add_trace(go.Scatter(x=rows[axis].astype(str), y=rows[key], name=label, legendgroup=key, showlegend=col == 1,
                                         mode="lines+markers", line=dict(color=colour, dash=dash, width=2.5), marker=dict(size=9)),
                              row=1, col=col)
        fig.update_xaxes(title_text=axis, type="category", row=1, col=col)
    split = str(frame["split"].iloc[0]) if "split" in frame else "validation"
    fig.update_yaxes(title_text="refusal rate (judged)", range=[-0.03, 1.03], row=1, col=1)
    fig.update_layout(template="plotly_white", width=1100, height=480, margin=dict(l=60, r=20, t=80, b=60),
                      title=f"The dial, behind the gate ({split} split, one seed; solid: should refuse, dashed: should answer)",
                      legend=dict(orientation="h", y=-0.2, x=0, yanchor="top"))
    return fig


def render(fig: go.Figure, png: Path) -> None:
    """Write the PNG: a Chromium screenshot of the figure's self-contained HTML (in a temporary folder)."""
    import tempfile

    from playwright.sync_api import sync_playwright
    html = Path(tempfile.mkdtemp(prefix="dial-")) / "dial.html"
    fig.write_html(html, include_plotlyjs=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1120, "height": 500})
        page.goto(html.resolve().as_uri())
        page.wait_for_selector(".main-svg")
        page.locator(".plotly").first.screenshot(path=str(png))
        browser.close()


if __name__ == "__main__":
    sweep_dir, png = Path(sys.argv[1]), Path(sys.argv[2])
    frame = pd.read_csv(sweep_dir / "sweep.csv")
    from neurontune.config import load_preset
    sel = load_preset("balanced").selection
    render(figure(frame, sel.k_safety, sel.k_utility), png)
    print(f"wrote {png}")
