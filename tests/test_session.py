"""A studio `Session` keeps its own rules: every method that changes it is driven here, and after each one the
invariants hold (scores_key follows the config, the selection is always select(scores, cfg.selection), gains
belong to the loaded model); a new model clears what was made for the old one; a refused change leaves the
session as it was."""
from __future__ import annotations

import pytest
import torch
from conftest import random_modulation

from neurontune.config import RunConfig
from neurontune.interventions.gating import GateProbe
from neurontune.method.neuron_scores import NeuronScores
from neurontune.method.selection import SelectionError, select
from neurontune.run.folder import RunFolder
from neurontune.run.snapshot import Snapshot
from neurontune.studio.state import Session, scores_key

CFG = RunConfig().replace(model="tiny-llama", selection={"k_safety": 30, "k_utility": 10, "protect_top": 5})
MASKS = ("safety", "utility", "overlap", "protected", "protected_dropped")


def fake_scores(shape, seed: int = 0) -> NeuronScores:
    gen = torch.Generator().manual_seed(seed)
    return NeuronScores({k: torch.randn(shape, generator=gen) for k in ("safety", "over_refusal", "benign_dependence")})


def gate_for(lm) -> GateProbe:
    return GateProbe(torch.zeros(2, dtype=torch.long), torch.arange(2), torch.zeros(2), torch.ones(2), torch.ones(2), 0.0,
                     fingerprint=lm.fingerprint)


def consistent(s: Session) -> None:
    """The invariants every method keeps."""
    assert s.scores_key == (scores_key(s.fingerprint, s.cfg) if s.fingerprint else None)
    assert (s.selection is None) == (s.scores is None)
    if s.selection is not None:
        want = select(s.scores, s.cfg.selection)
        assert s.selection.config == s.cfg.selection
        assert all(torch.equal(getattr(s.selection, m), getattr(want, m)) for m in MASKS)
    if s.scores is not None:
        assert tuple(s.scores.shape) == s.shape
    if s.modulation is not None:
        assert s.modulation.fingerprint in (None, s.fingerprint) and tuple(s.modulation.shape) == s.shape
    else:
        assert s.gate is None and s.eval_rows is None and s.operating_point is None


def loaded(lm, scores=None) -> Session:
    s = Session()
    assert s.load_model(lm, CFG, model=lm.name, preset="p", scores=scores)
    consistent(s)
    return s


def test_a_new_model_clears_what_was_made_for_the_old_one(tiny_llama, tiny_gpt2):
    s = loaded(tiny_llama, fake_scores(tiny_llama.shape))
    s.set_gains(random_modulation(tiny_llama.shape, 10, fingerprint=tiny_llama.fingerprint), "trained", gate=gate_for(tiny_llama),
                run_dir="runs/a", point=(30, 10))
    s.evaluated("runs/a", [{"intervention": "neurontune"}])
    s.chat, s.sweep_dir = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}]], "runs/sweep"
    consistent(s)
    # the same model again, same data plan: nothing is lost
    assert not s.load_model(tiny_llama, CFG, model="tiny-llama", preset="p")
    consistent(s)
    assert s.scores is not None and s.modulation is not None and s.eval_rows and s.chat[0]
    # another model: its scores, selection, gains, gate, evaluation, chat, run and sweep folders all go
    assert s.load_model(tiny_gpt2, CFG, model="tiny-gpt2", preset="p")
    consistent(s)
    assert (s.scores, s.selection, s.modulation, s.gate, s.eval_rows, s.operating_point) == (None,) * 6
    assert s.chat == [[], []] and s.run_dir is None and s.sweep_dir is None and s.gains_source == ""
    assert s.fingerprint == tiny_gpt2.fingerprint and s.shape == tuple(tiny_gpt2.shape)


def test_configure_moves_config_scores_key_and_selection_together(tiny_llama):
    scores = fake_scores(tiny_llama.shape)
    s = loaded(tiny_llama, scores)
    key = s.scores_key
    s.configure(CFG.replace(selection={"k_safety": 50}))  # thresholds only: same scores, a new selection
    consistent(s)
    assert s.scores is scores and s.scores_key == key and int(s.selection.safety.sum()) > 30
    s.configure(CFG.replace(meta={"steps": 7}))  # training settings only: nothing else moves
    consistent(s)
    assert s.scores is scores and s.cfg.meta.steps == 7
    s.configure(CFG.replace(data={"n_benign": 3}))  # another data plan: these scores are not its scores
    consistent(s)
    assert s.scores is None and s.selection is None and s.scores_key != key
    other = fake_scores(tiny_llama.shape, seed=1)
    s.configure(CFG.replace(data={"n_benign": 3}), other)  # ... unless its own are given
    consistent(s)
    assert s.scores is other


def test_adopt_scores_takes_the_runs_settings(tiny_llama):
    s = loaded(tiny_llama)
    assert s.selection is None
    run_cfg = CFG.replace(data={"n_harmful": 9}, selection={"k_safety": 12, "k_utility": 4}, meta={"steps": 99})
    scores = fake_scores(tiny_llama.shape)
    s.adopt_scores(scores, run_cfg)
    consistent(s)
    assert s.scores is scores and s.cfg.data == run_cfg.data and s.cfg.selection == run_cfg.selection
    assert s.cfg.meta == CFG.meta  # the session's training settings stay its own
    before = (s.cfg, s.scores, s.selection)
    with pytest.raises(ValueError, match="neurons"):  # scores of a model of another size
        s.adopt_scores(fake_scores((2, 8)))
    assert (s.cfg, s.scores, s.selection) == before


def test_reselect_and_training_settings(tiny_llama):
    s = loaded(tiny_llama, fake_scores(tiny_llama.shape))
    ms = s.reselect(5, 2)
    consistent(s)
    assert ms >= 0 and (s.cfg.selection.k_safety, s.cfg.selection.k_utility) == (5, 2) and int(s.selection.safety.sum()) <= 5
    before = (s.cfg, s.selection)
    for bad in ((10**9, 2), ("many", 2)):
        with pytest.raises((SelectionError, ValueError)):
            s.reselect(*bad)
        assert (s.cfg, s.selection) == before
    s.set_training(mode="joint", steps=4)
    consistent(s)
    assert (s.cfg.meta.mode, s.cfg.meta.steps) == ("joint", 4) and s.selection is before[1]
    with pytest.raises(ValueError):
        s.set_training(steps=0)
    assert s.cfg.meta.steps == 4


def test_gains_belong_to_the_model_and_new_gains_drop_the_old_evaluation(tiny_llama, tiny_gpt2):
    s = loaded(tiny_llama, fake_scores(tiny_llama.shape))
    mod = random_modulation(tiny_llama.shape, 10, fingerprint=tiny_llama.fingerprint)
    s.set_gains(mod, "trained", gate=gate_for(tiny_llama), run_dir="runs/a", point=(30, 10))
    s.keep_run("runs/a")
    s.evaluated("runs/a", [{"intervention": "neurontune"}])
    consistent(s)
    assert s.eval_rows and s.operating_point == (30, 10) and s.gate is not None
    before = (s.modulation, s.gate, s.eval_rows, s.run_dir)
    for wrong in (random_modulation(tiny_gpt2.shape, 5, fingerprint=tiny_gpt2.fingerprint),  # another model
                  random_modulation((2, 8), 3)):  # another shape, no fingerprint
        with pytest.raises(ValueError):
            s.set_gains(wrong, "wrong")
        assert (s.modulation, s.gate, s.eval_rows, s.run_dir) == before
    s.set_gains(random_modulation(tiny_llama.shape, 4, seed=1), "fixed")  # new gains: no gate, no evaluation, no point
    consistent(s)
    assert s.gate is None and s.eval_rows is None and s.operating_point is None and s.run_dir is None
    s.evaluated("runs/a", [{"intervention": "neurontune"}])  # an evaluation of the old gains that finishes late
    assert s.eval_rows is None
    s.clear_gains()
    consistent(s)
    assert s.modulation is None


def test_a_sweep_point_brings_its_gains_and_its_selection(tiny_llama):
    s = loaded(tiny_llama, fake_scores(tiny_llama.shape))
    mod = random_modulation(tiny_llama.shape, 6, fingerprint=tiny_llama.fingerprint)
    s.adopt_point(mod, 20, 5, "sweep point 1")
    consistent(s)
    assert s.modulation is mod and s.operating_point == (20, 5) and (s.cfg.selection.k_safety, s.cfg.selection.k_utility) == (20, 5)
    before = (s.cfg, s.selection, s.modulation)
    with pytest.raises(ValueError):  # thresholds the model cannot take: neither the gains nor the selection move
        s.adopt_point(random_modulation(tiny_llama.shape, 6, seed=2, fingerprint=tiny_llama.fingerprint), 10**9, 5, "bad")
    with pytest.raises(ValueError):  # gains of another shape: the selection is put back too
        s.adopt_point(random_modulation((2, 8), 3), 10, 2, "bad")
    assert (s.cfg, s.selection, s.modulation) == before
    gate = gate_for(tiny_llama)  # a point of a gate-first preset brings the gate its gains were trained behind
    s.adopt_point(mod, 30, 5, "sweep point 2", gate=gate)
    consistent(s)
    assert s.gate is gate and s.operating_point == (30, 5)
    s.adopt_point(mod, 20, 5, "sweep point 1")  # a point without one leaves no earlier gate behind
    assert s.gate is None


def test_the_shipped_run_is_adopted_whole(tiny_llama, tmp_path):
    s = loaded(tiny_llama)
    cfg = CFG.replace(name="balanced", selection={"k_safety": 25, "k_utility": 8})
    snap = Snapshot(RunFolder(tmp_path), {"fingerprint": tiny_llama.fingerprint}, cfg, fake_scores(tiny_llama.shape, 3),
                    random_modulation(tiny_llama.shape, 20, fingerprint=tiny_llama.fingerprint), gate_for(tiny_llama),
                    [{"intervention": "base"}], [])
    s.adopt_shipped(snap)
    consistent(s)
    assert s.shipped and s.scores is snap.scores and s.cfg.selection == cfg.selection and s.cfg.model == s.model
    assert s.modulation is snap.modulation and s.gate is snap.gate and s.eval_rows == snap.eval_rows
    assert s.operating_point == (25, 8) and "shipped `balanced`" in s.gains_source
    assert s.chat == [[], []]  # the shipped answer pair is shown, never put into the session's conversation


def test_the_shipped_example_pair_says_which_family_it_comes_from():
    """The Compare tab's shipped example: a held-out family's prompt the gate turned into a refusal when there is one,
    else one from a training family, and the note names the family and whether tuning saw it."""
    from neurontune.studio.shipped import EXAMPLE_NOTE, example_pair
    row = lambda fam, refused, base_refused, prompt: {"intervention": "neurontune + gate", "category": "attacked",  # noqa: E731
                                                      "family": fam, "refusal": refused, "base_refusal": base_refused,
                                                      "prompt": prompt, "base_answer": "b", "answer": "a"}
    rows = [row("roleplay", False, False, "p0"), row("roleplay", True, False, "p1"), row("few_shot", True, True, "p2"),
            row("few_shot", True, False, "p3")]
    assert example_pair(rows, ["few_shot"])[0] == "p3" and "held-out" in example_pair(rows, ["few_shot"])[3]
    prompt, _, _, what = example_pair(rows[:3], ["few_shot"])
    assert prompt == "p1" and "`roleplay`" in what and "held-out" not in what
    assert example_pair(rows[:1], [])[0] == "p0" and example_pair([], []) is None
    assert "`roleplay`" in EXAMPLE_NOTE.format(what=what)


def test_quick_picks_call_every_family_tuning_never_saw_unseen():
    """An attack family is "unseen" in the quick picks unless the session's preset trains on it (held out or merely
    not chosen alike), and unseen families come first."""
    from neurontune.data import attacks
    from neurontune.studio.chat import examples
    s = Session()
    s.cfg = RunConfig().replace(data={"train_families": ("roleplay", "academic"), "heldout_families": ("few_shot",)})
    picks = [label for label, _ in examples(None, s) if label.startswith("harmful · ")]
    tags = {label.split(" · ")[1].rsplit(" (", 1)[0].replace(" ", "_"): label.endswith("(unseen attack)") for label in picks}
    assert set(tags) == set(attacks.attack_families())
    assert {f for f, unseen in tags.items() if not unseen} == {"roleplay", "academic"}
    assert [tags[label.split(" · ")[1].rsplit(" (", 1)[0].replace(" ", "_")] for label in picks][-2:] == [False, False]


def test_the_export_note_names_what_the_checkpoint_holds_instead_of_the_gate(tiny_llama, tmp_path):
    """A gated run's export status says the gate is not folded and what is: the static gains, or the run's conditional
    (foldable) modulation when it trained one; a run without a gate gets no note."""
    from neurontune.interventions.modulation import InputTerms, Modulation
    from neurontune.studio.handlers import _gate_note
    gains = random_modulation(tiny_llama.shape, 20, fingerprint=tiny_llama.fingerprint)
    d = tiny_llama.nmap.input_rows(0).shape[1]
    foldable = Modulation(gains.shape, gains.layers, gains.fingerprint, {}, {1: InputTerms(torch.arange(4), torch.full((4,), 0.5), torch.randn(d))})
    notes = {}
    for name, gate, folded in (("static", gate_for(tiny_llama), None), ("conditional", gate_for(tiny_llama), foldable), ("ungated", None, None)):
        s = loaded(tiny_llama)
        s.adopt_shipped(Snapshot(RunFolder(tmp_path), {"fingerprint": tiny_llama.fingerprint}, CFG.replace(name="balanced"),
                                 fake_scores(tiny_llama.shape, 3), gains, gate, [{"intervention": "base"}], [], folded))
        assert (s.exported is foldable) if folded is not None else (s.exported is gains)
        notes[name] = _gate_note(s)
        # Compare's tuned side (chat and bulk alike): the gains behind the gate, else what Export folds, named by its form
        mod, side_gate, form = s.tuned_side(True)
        assert (mod is gains and side_gate is gate and form.startswith("gated:")) if gate is not None else (mod is gains and side_gate is None)
        mod, side_gate, form = s.tuned_side(False)
        assert mod is s.exported and side_gate is None and "what Export writes" in form
        assert form.startswith("conditional:" if folded is not None else "static gains:")
    assert "not in this export" in notes["static"] and "static gains only" in notes["static"]
    assert "not in this export" in notes["conditional"] and "conditional modulation" in notes["conditional"]
    assert "static gains only" not in notes["conditional"] and notes["ungated"] == ""
