"""The separability ceiling: AUC and recall-at-FPR against brute force, the probe on planted data, and the
per-layer table on a tiny model (the residual entering layer 0 at the prompt end is the same token for every
prompt, so nothing can be read there)."""
import pytest
import torch

from neurontune.config import DataConfig
from neurontune.data.splits import build_splits
from neurontune.eval.separability import probe_ceiling, summary
from neurontune.infra.probes import fit_probe, recall_at_fpr, roc_auc


def brute_auc(pos, neg):
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos.tolist() for n in neg.tolist()]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_count_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 6, (23,), generator=g).float()  # few distinct values: many ties
    neg = torch.randint(0, 5, (31,), generator=g).float()
    assert roc_auc(pos, neg) == pytest.approx(brute_auc(pos, neg), abs=1e-12)


@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.2, 0.5])
def test_recall_at_fpr_is_the_lowest_threshold_within_the_budget(fpr):
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(50, generator=g) + 1, torch.randn(40, generator=g)
    recall, threshold = recall_at_fpr(pos, neg, fpr)
    assert int((neg > threshold).sum()) <= int(fpr * len(neg))
    lower = [float(v) for v in neg if float(v) < threshold]  # any lower candidate breaks the budget
    assert all(int((neg > t).sum()) > int(fpr * len(neg)) for t in lower)
    assert recall == pytest.approx(float((pos > threshold).float().mean()))


def test_probe_separates_planted_direction_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=g)
    y = (torch.arange(400) % 2).float()
    planted = x.clone()
    planted[:, 3] += 3 * (2 * y - 1)  # one feature carries the label
    mean, std, w, b = fit_probe(planted[:200], y[:200])
    s = ((planted[200:] - mean) / std) @ w + b
    assert roc_auc(s[y[200:] == 1], s[y[200:] == 0]) > 0.99
    assert int(w.abs().argmax()) == 3
    mean, std, w, b = fit_probe(x[:200], y[:200])  # no signal: chance on held-out rows
    s = ((x[200:] - mean) / std) @ w + b
    assert abs(roc_auc(s[y[200:] == 1], s[y[200:] == 0]) - 0.5) < 0.15


def test_probe_ceiling_per_layer_on_tiny_model(tiny_llama):
    splits = build_splits(DataConfig())
    table = probe_ceiling(tiny_llama, splits, n_train=40, per_family_train=4, n_eval=30, per_family_eval=3)
    assert list(table["layer"]) == list(range(tiny_llama.shape[0]))
    first = table.iloc[0]  # every prompt ends with the same chat-template token: identical embeddings
    assert first["auc"] == pytest.approx(0.5) and first["harmful flagged @0.05"] == 0.0
    assert ((table["auc"] >= 0) & (table["auc"] <= 1)).all()
    assert (table["harmless flagged"] <= 0.05 + 1e-9).all()  # the threshold keeps within the allowed share
    assert "best layer" in summary(table)
    with pytest.raises(ValueError, match="another split"):
        probe_ceiling(tiny_llama, splits, split="train")
