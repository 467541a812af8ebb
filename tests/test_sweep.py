"""Threshold sweep: one row per grid point with a stub trainer, and a trade-off figure with one point per
setting plus one marker per baseline."""
from __future__ import annotations

import threading

import pandas as pd
import pytest
import torch

from conftest import Recorder
from neurontune.config import DataConfig, SelectionConfig
from neurontune.data.splits import build_splits
from neurontune.eval.proxy import proxy_metrics
from neurontune.infra.progress import Cancelled, Reporter
from neurontune.run.sweep import parse_grid, sweep, tradeoff_figure

GRID = [(10, 0), (20, 5), (40, 10)]


@pytest.fixture(scope="module")
def scores(tiny_llama):
    gen = torch.Generator().manual_seed(0)
    shape = tiny_llama.shape
    return {"safety": torch.randn(shape, generator=gen), "over_refusal": torch.randn(shape, generator=gen),
            "benign_dependence": torch.rand(shape, generator=gen)}


@pytest.fixture(scope="module")
def frame(tiny_llama, scores):
    splits = build_splits(DataConfig())
    rec = Recorder()
    out = sweep(tiny_llama, scores, GRID, train_fn=lambda sel: sel.modulation(2.0, 0.5, tiny_llama.fingerprint),
                eval_fn=lambda mod: proxy_metrics(tiny_llama, mod, splits, n=3), reporter=rec,
                selection=SelectionConfig(protect_top=5))
    out.attrs["progress"] = [(d, t) for d, t, _ in rec.calls]
    return out


def test_one_row_per_grid_point(frame):
    assert len(frame) == len(GRID)
    assert list(zip(frame["k_safety"], frame["k_utility"])) == GRID
    assert frame.attrs["progress"] == [(1, 3), (2, 3), (3, 3)]
    assert (frame["n_safety"] <= frame["k_safety"]).all() and (frame["n_utility"] <= frame["k_utility"]).all()
    assert (frame["n_modulated"] == frame["n_safety"] + frame["n_utility"]).all()
    assert {"harmful_refusal_proxy", "benign_over_refusal_proxy"} <= set(frame.columns)


def test_figure_points_and_baselines(frame):
    baselines = pd.DataFrame({"harmful_refusal_proxy": [0.1, 0.2], "benign_over_refusal_proxy": [0.05, 0.3]},
                             index=["base", "direction"])
    fig = tradeoff_figure(frame, baselines)
    assert len(fig.data) == 3 and len(fig.data[0].x) == len(GRID)
    assert list(fig.data[0].text) == ["ks=10, ku=0", "ks=20, ku=5", "ks=40, ku=10"]
    assert [t.name for t in fig.data[1:]] == ["base", "direction"]
    assert fig.data[1].marker.symbol != fig.data[2].marker.symbol
    assert len(tradeoff_figure(frame).data) == 1
    with pytest.raises(KeyError):
        tradeoff_figure(frame, x="nope")


def test_cancel(tiny_llama, scores):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        sweep(tiny_llama, scores, GRID, train_fn=lambda s: None, eval_fn=lambda m: {}, reporter=Reporter(cancel))


def test_sweep_reads_validation_and_refuses_the_test_split(tiny_llama, tmp_path):
    from neurontune.config import RunConfig
    from neurontune.run.sweep import sweep_run
    cfg = RunConfig()
    with pytest.raises(ValueError, match="validation split only"):
        sweep_run(tiny_llama, cfg, [(5, 2)], tmp_path / "s", split="test")
    assert not (tmp_path / "s").exists()


def test_figure_names_the_split_and_rings_the_operating_point(frame):
    with_split = frame.assign(split="validation")
    fig = tradeoff_figure(with_split)
    assert "validation split" in fig.layout.title.text and "validation split" in fig.layout.xaxis.title.text
    assert "validation split" in fig.layout.yaxis.title.text
    assert list(fig.data[0].customdata) == [0, 1, 2]  # the row a click picks
    ringed = tradeoff_figure(with_split, current=(20, 5))
    assert [t.name for t in ringed.data] == ["NeuronTune sweep (click a point)", "current operating point"]
    assert (ringed.data[1].x[0], ringed.data[1].y[0]) == (with_split["benign_over_refusal_proxy"][1], with_split["harmful_refusal_proxy"][1])
    assert len(tradeoff_figure(with_split, current=(999, 0)).data) == 1  # not a sweep point: nothing to ring
    assert "split" not in tradeoff_figure(frame).layout.title.text  # an old sweep that did not say


def test_one_grid_parser_for_the_cli_and_the_studio():
    assert parse_grid("250:0, 750:250,1500:500") == [(250, 0), (750, 250), (1500, 500)]
    for bad in ("", "250", "250:x", "1:2:3", "-5:0", "2.5:1", ","):
        with pytest.raises(ValueError, match="k_safety:k_utility pairs"):
            parse_grid(bad)
