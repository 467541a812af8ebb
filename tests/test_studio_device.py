"""The studio's engine path on whatever device the machine has (cuda when available, else the CPU, as
`app.py` picks): load the tiny model there, score neurons, train a step, chat, evaluate. Every forward of
the model and of each MLP output projection must see its inputs on the model's device."""
from __future__ import annotations

import json

import pytest
import torch

from neurontune.studio import background, chat, handlers
from neurontune.studio.state import Studio

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESET = {"name": "tiny-device",
          "data": {"n_harmful": 4, "n_attack_per_family": 1, "n_benign": 4, "n_borderline": 2, "n_answer": 2, "answer_tokens": 4},
          "attribution": {"max_length": 64, "batch_size": 8},
          "selection": {"k_safety": 20, "k_utility": 10, "protect_top": 5},
          "meta": {"steps": 1, "eval_every": 1, "batch_harmful": 2, "batch_benign": 2}}


class Devices:
    """Plain hooks (on every thread: the studio runs jobs and streaming in its own threads) recording the
    device of each tensor that enters the model and its MLP output projections, per stage."""

    def __init__(self, lm):
        self.stage, self.seen = "", {}
        record = lambda tensors: self.seen.setdefault(self.stage, set()).update(  # noqa: E731
            t.device.type for t in tensors if isinstance(t, torch.Tensor))
        self.handles = [lm.model.register_forward_pre_hook(lambda m, a, k: record([*a, *k.values()]), with_kwargs=True)]
        self.handles += [p.register_forward_pre_hook(lambda m, a: record(a)) for p in lm.nmap.projections]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _last(updates) -> dict:
    out: dict = {}
    for update in updates:
        out.update(update)
    return out


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("studio-device")
    (tmp / "tiny.json").write_text(json.dumps(PRESET))
    studio = Studio("tiny-llama", str(tmp / "tiny.json"), quick_default=False, cache_dir=tmp / "cache",
                    runs_dir=tmp / "runs", export_root=tmp / "exports", device=DEVICE)
    yield studio
    studio.runner.shutdown()


def test_attribution_training_chat_and_evaluation_on_the_models_device(studio):
    session = studio.new_session()
    out = handlers.load(studio, session, "tiny-llama", False, studio.default_preset, False)
    assert "✗" not in out["model_status"], out["model_status"]
    lm = studio.model(session)
    assert lm.device.type == DEVICE
    devices = Devices(lm)
    try:
        devices.stage = "attribution"
        status = _last(background.attribute(studio, session))["attr_status"]
        assert "done" in status, status
        scores = session.scores
        assert scores["safety"].device.type == "cpu" and torch.isfinite(scores["safety"]).all()  # results come home
        assert session.selection is not None and session.selection.counts()["safety"] > 0

        devices.stage = "training"
        status = _last(background.train(studio, session))["train_status"]
        assert "Training gains: done" in status, status
        assert session.modulation is not None and session.modulation.n_modulated > 0

        devices.stage = "chat"
        out = _last(chat.chat(studio, session, "Tell me how to pick a lock", 1.0, 6))
        assert out["left"][-1]["role"] == out["right"][-1]["role"] == "assistant", out.get("chat_status")

        devices.stage = "evaluation"
        status = _last(background.evaluate(studio, session, True, []))["eval_status"]
        assert "done" in status, status
    finally:
        devices.remove()
    assert set(devices.seen) == {"attribution", "training", "chat", "evaluation"}  # each stage ran the model
    assert all(found == {DEVICE} for found in devices.seen.values()), devices.seen
