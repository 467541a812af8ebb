"""Selection rules on hand-made score tables, compared with a brute-force reading of the rules."""

import pytest
import torch

from neurontune.config import SelectionConfig
from neurontune.method.selection import ROLES, SelectionError, select


def scores(seed=0, shape=(30, 1536)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g)
    return {"safety": s, "over_refusal": 0.8 * s + 0.6 * torch.randn(shape, generator=g),
            "benign_dependence": torch.rand(shape, generator=g)}


def brute(sc, k_s, k_u, protect):
    def top(t, k):
        flat = [(float(v), i) for i, v in enumerate(t.flatten()) if v > 0]
        return {i for _, i in sorted(flat, reverse=True)[:k]}
    s, u = top(sc["safety"], k_s), top(sc["over_refusal"], k_u)
    prot = {i for _, i in sorted(((float(v), i) for i, v in enumerate(sc["benign_dependence"].flatten())), reverse=True)[:protect]}
    return (s - u) - prot, u - s, s & u


@pytest.mark.parametrize("k_s,k_u,protect", [(50, 20, 10), (200, 150, 0), (0, 40, 5)])
def test_rules_match_brute_force(k_s, k_u, protect):
    sc = scores(shape=(6, 64))
    sel = select(sc, SelectionConfig(k_safety=k_s, k_utility=k_u, protect_top=protect))
    safety, utility, overlap = brute(sc, k_s, k_u, protect)
    assert set(sel.safety.flatten().nonzero().flatten().tolist()) == safety
    assert set(sel.utility.flatten().nonzero().flatten().tolist()) == utility
    assert set(sel.overlap.flatten().nonzero().flatten().tolist()) == overlap
    assert not (sel.safety & sel.utility).any()
    assert not (sel.safety & sel.protected).any()  # protected neurons are never amplified


def test_per_layer_cap_and_counts():
    sc = scores(shape=(6, 64))
    sel = select(sc, SelectionConfig(k_safety=100, k_utility=0, protect_top=0, per_layer_cap=5))
    assert int(sel.safety.sum(1).max()) <= 5
    assert sel.counts()["safety"] == int(sel.safety.sum())
    assert sel.per_layer()["safety"].sum() == sel.counts()["safety"]


def test_fixed_gain_modulation():
    sc = scores(shape=(6, 64))
    sel = select(sc, SelectionConfig(k_safety=30, k_utility=10, protect_top=0))
    dense = sel.modulation(2.0, 0.5).dense()
    assert torch.equal(dense[sel.safety], torch.full((int(sel.safety.sum()),), 2.0))
    assert torch.equal(dense[sel.utility], torch.full((int(sel.utility.sum()),), 0.5))
    assert int((dense != 1).sum()) == int(sel.safety.sum() + sel.utility.sum())


@pytest.mark.parametrize("bad", [-1, 10**9, "many", 2.5, None])
def test_out_of_range_thresholds_are_refused_with_the_range(bad):
    with pytest.raises(SelectionError, match="between 0 and"):
        select(scores(shape=(4, 8)), SelectionConfig(k_safety=bad))


def test_contrast_ranks_against_brute_force():
    """contrast: safety neurons by safety - over_refusal (both > 0), utility neurons by over_refusal - safety."""
    gen = torch.Generator().manual_seed(5)
    sc = {"safety": torch.randn(4, 50, generator=gen), "over_refusal": torch.randn(4, 50, generator=gen)}
    cfg = SelectionConfig(k_safety=12, k_utility=9, protect_top=0, safety_rank="contrast", utility_rank="contrast")
    sel = select(sc, cfg)
    s, o = sc["safety"].flatten().tolist(), sc["over_refusal"].flatten().tolist()
    safety = sorted((i for i in range(200) if s[i] > 0 and s[i] - o[i] > 0), key=lambda i: -(s[i] - o[i]))[:12]
    utility = sorted((i for i in range(200) if o[i] > 0 and o[i] - s[i] > 0), key=lambda i: -(o[i] - s[i]))[:9]
    assert set(sel.safety.flatten().nonzero().flatten().tolist()) == set(safety)
    assert set(sel.utility.flatten().nonzero().flatten().tolist()) == set(utility)
    assert not sel.overlap.any()  # a neuron cannot lean both ways
    with pytest.raises(SelectionError, match="utility_rank"):
        select(sc, SelectionConfig(k_safety=1, k_utility=1, protect_top=0, utility_rank="vibes"))


def test_each_neuron_has_one_role_with_one_label():
    """`Selection.role` reads the masks in `ROLES` order (the card, the CLI and the studio's table and counts all show
    these labels): amplified, suppressed, in both sets (left alone), protected, or "" for the rest."""
    from neurontune.eval.neuron_card import role_of
    sel = select(scores(shape=(6, 64)), SelectionConfig(k_safety=60, k_utility=60, protect_top=10))
    for mask in ("safety", "utility", "overlap", "protected"):
        layer, index = getattr(sel, mask).nonzero()[0].tolist()
        want = next(ROLES[m] for m in ROLES if bool(getattr(sel, m)[layer, index]))  # the first mask that holds it
        assert sel.role(layer, index) == role_of(sel, layer, index) == want
    layer, index = (~(sel.safety | sel.utility | sel.overlap | sel.protected)).nonzero()[0].tolist()
    assert sel.role(layer, index) == "" and role_of(None, layer, index) == ""
    assert ROLES["overlap"] == "left alone (in both sets)"
