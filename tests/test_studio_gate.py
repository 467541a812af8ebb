"""The studio's input gate on the tiny model: the Compare tab's right pane is "neurontune + gate" when the
session's gains have a gate. A gate forced shut gives exactly the base answer and one forced open exactly
the static gains' answer; the s used in chat is the s `Gated` measures; a training in the studio
(meta.gate on) leaves the session with a gate; gate files for another model are refused."""
from __future__ import annotations

import os
import re

import torch
from conftest import STUDIO_PRESET, VIEW, StudioClient, hooks_left, pane_text, random_modulation, served_app

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

GATED_PRESET = {**STUDIO_PRESET, "name": "tiny-gated", "meta": {**STUDIO_PRESET["meta"], "gate": True, "gate_bias_shift": 0.0}}
app = served_app("studio-gate", GATED_PRESET)


def forced_gate(lm, bias: float, fingerprint: str | None = None, neuron: int = 0):
    """A probe whose strength is sigmoid(bias) for every prompt: exactly 0 at -1e4, exactly 1 at +1e4."""
    from neurontune.interventions.gating import GateProbe
    k = 4
    return GateProbe(torch.arange(k) % lm.shape[0], torch.arange(k) + neuron, torch.zeros(k), torch.ones(k), torch.zeros(k),
                     bias, 1.0, fingerprint or lm.fingerprint)


def test_forced_gate_gives_base_or_static_answers(app, tmp_path):
    from gradio_client import handle_file

    studio, url, preset = app
    lm = studio.models.get("tiny-llama")
    mod_path = random_modulation(lm.shape, 80, seed=3, low=0.0, high=4.0, fingerprint=lm.fingerprint).save(tmp_path / "run" / "modulation.safetensors")
    shut, open_ = tmp_path / "shut" / "gate.safetensors", tmp_path / "open" / "gate.safetensors"
    for path, bias in ((shut, -1e4), (open_, 1e4)):
        path.parent.mkdir()
        forced_gate(lm, bias).save(path)
    s = StudioClient(url, preset)
    s.load()
    out = s.call("gains_file", [handle_file(str(mod_path)), handle_file(str(shut))], *VIEW)
    assert "with its gate" in out["gains_status"] and "input gate" in out["active_gains"], out["gains_status"]
    base, right, status = s.chat(use_gate=True)
    assert right == base, "a gate at s = 0 must leave the right pane the base model"
    assert "gate 0.00: looks benign" in status and "identical answers" in status
    base_off, static, status = s.chat(use_gate=False)  # the static gains, as export folds them
    assert base_off == base and static != base, "these gains must change the answer for the test to mean anything"
    assert "input gate off" in status
    out = s.call("gains_file", [handle_file(str(mod_path)), handle_file(str(open_))], *VIEW)
    assert "with its gate" in out["gains_status"]
    base1, right1, status = s.chat(use_gate=True)
    assert base1 == base and right1 == static, "a gate at s = 1 must give the static gains' answer"
    assert "gate 1.00: looks harmful" in status
    assert "gate 1.00" in pane_text(s.call("chat", "And then?", 1.0, 8, False, 0.7, True)["right"][-1])  # per answer
    # fixed gains have no gate: the toggle is off and disabled, the answers static
    s.call("attribute", *VIEW)
    out = s.call("fixed_gains", 2.0, 0.5, *VIEW)
    assert "no input gate" in out["active_gains"]
    assert "gate" not in s.chat(use_gate=True)[2].split("Strength")[1]
    assert hooks_left(lm) == 0 and not lm.model._forward_pre_hooks


def test_gate_files_for_another_model_are_refused(app, tmp_path):
    from neurontune.studio import handlers

    studio, _, _ = app
    lm = studio.models.get("tiny-llama")
    session = studio.new_session()
    run = tmp_path / "run"
    random_modulation(lm.shape, 40, seed=4, low=1.5, high=3.0, fingerprint=lm.fingerprint).save(run / "modulation.safetensors")
    forced_gate(lm, 0.0).save(run / "gate.safetensors")
    out = handlers.gains_file(studio, session, str(run))  # a run folder: its gate comes along
    assert out["gains_status"].startswith("✓") and session.gate is not None and "with its gate" in session.gains_source
    kept = session.modulation
    for name, probe, why in (("other", forced_gate(lm, 0.0, fingerprint="0123456789abcdef"), "fitted on model 0123456789abcdef"),
                             ("wide", forced_gate(lm, 0.0, neuron=lm.shape[1] - 2), "outside this model's")):
        folder = tmp_path / name
        random_modulation(lm.shape, 40, seed=5, fingerprint=lm.fingerprint).save(folder / "modulation.safetensors")
        probe.save(folder / "gate.safetensors")
        out = handlers.gains_file(studio, session, str(folder / "modulation.safetensors"))  # the gate beside the file
        assert out["gains_status"].startswith("✗") and why in out["gains_status"], out["gains_status"]
        assert session.modulation is kept and session.gate is not None  # the session keeps what it had
    session.set_gains(kept, "fixed gains")  # gains without a gate clear the old one
    assert session.gate is None


def test_chat_gate_strength_equals_gated_modulation(app):
    """The s the right pane used, for a first turn and a follow-up, equals Gated's s on the last user
    message alone (the evaluation's single prompt): the gate reads the message, not the whole conversation."""
    from neurontune.data import chat as chatfmt
    from neurontune.data import prompts as sets
    from neurontune.interventions.gating import Gated
    from neurontune.interventions.generation import generate
    from neurontune.studio import chat

    studio, lm, mod, probe, session = _gated_session(app, seed=1)
    strengths = []
    for message in (sets.harmful()[20].text, sets.benign()[20].text):
        session.chat = [[], []]
        for follow_up in (message, "Say more."):
            list(chat.chat(studio, session, follow_up, max_new_tokens=4))
            used = session.chat[1][-1]["gate"]
            with Gated(mod, probe).apply(lm) as state:  # the brute-force reference: the evaluation's path
                generate(lm, [chatfmt.chat_prompt(lm.tokenizer, follow_up)], formatted=True, max_new_tokens=1)
            assert used == float(state["s"][0]), (follow_up, used, float(state["s"][0]))
            strengths.append(used)
    assert len(set(strengths)) > 1  # the gate reads each message
    assert hooks_left(lm) == 0 and not lm.model._forward_pre_hooks


def test_a_previous_harmful_turn_does_not_open_the_gate_for_the_next(app):
    """Multi-turn: a benign follow-up after a harmful turn gets the s it gets as a first message."""
    from neurontune.data import prompts as sets
    from neurontune.studio import chat

    studio, _, _, _, session = _gated_session(app, seed=2)
    benign, harmful = sets.benign()[30].text, sets.harmful()[30].text
    list(chat.chat(studio, session, benign, max_new_tokens=4))
    alone = session.chat[1][-1]["gate"]
    session.chat = [[], []]
    list(chat.chat(studio, session, harmful, max_new_tokens=4))
    after_harmful = session.chat[1][-1]["gate"]
    list(chat.chat(studio, session, benign, max_new_tokens=4))
    assert session.chat[1][-1]["gate"] == alone != after_harmful


def test_training_in_the_studio_leaves_a_gate(app):
    studio, url, preset = app
    s = StudioClient(url, preset)
    s.load()
    s.call("attribute", *VIEW)
    out = s.call("train", *VIEW)
    assert "Training gains: done" in out["train_status"], out["train_status"]
    assert "trained gains" in out["active_gains"] and "input gate" in out["active_gains"], out["active_gains"]
    assert "input gate" in out["gains_status"]
    run = next(p for p in studio.runs_dir.iterdir() if (p / "gate.safetensors").exists() and (p / "train_log.jsonl").exists())
    left, right, status = s.chat(use_gate=True)
    assert re.search(r"gate [01]\.\d\d: ", status), status
    exported = s.call("export", "gated-tiny", False, "", "", "transformers", False)["export_status"]
    assert "not in this export" in exported and "static gains only" in exported, exported  # fold.form "none": the gains
    # another session picks the same run (with its gate) from the finished trainings
    other = StudioClient(url, preset)
    other.load()
    runs = other.call("refresh_runs")["recent_runs"]
    choices = runs["choices"] if isinstance(runs, dict) else runs
    job_id = next(value for label, value in choices if "gated" in label)
    out = other.call("use_run", job_id, *VIEW)
    assert run.name in out["gains_status"] and "input gate" in out["active_gains"]
    left2, right2, status2 = other.chat(use_gate=True)
    assert (left2, right2) == (left, right) and re.search(r"gate [01]\.\d\d: ", status2).group(0) in status


def _gated_session(app, seed: int):
    """A studio session on the tiny model with random gains (80 neurons, 1.5-3x) and a gate fitted for them."""
    from neurontune.data import prompts as sets
    from neurontune.method.gate_fit import fit_gate

    studio, _, _ = app
    lm = studio.models.get("tiny-llama")
    mod = random_modulation(lm.shape, 80, seed=seed, low=1.5, high=3.0, fingerprint=lm.fingerprint)
    probe = fit_gate(lm, mod, [p.text for p in sets.harmful()[:16]], [p.text for p in sets.benign()[:16]])
    session = studio.new_session()
    session.set_gains(mod, "test gains", gate=probe)
    return studio, lm, mod, probe, session
