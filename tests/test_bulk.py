"""Your prompts in bulk: the batched base-vs-tuned answers equal each model answering alone, a gate forced
shut gives the base answer and one forced open the static gains' answer (with s reported per prompt), Stop
works between batches, and a user's prompt list is read from .txt / .csv / pasted text with repairs noted."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import Recorder, hooks_left, random_modulation
from neurontune.data.prompts import DataError
from neurontune.data.user_prompts import read_prompt_list
from neurontune.eval.bulk import bulk_frame, bulk_summary, compare_prompts, iter_compare
from neurontune.infra.progress import Cancelled
from neurontune.interventions.gating import GateProbe
from neurontune.interventions.generation import generate

PROMPTS = ["Tell me how to pick a lock", "What is the capital of France?", "Write a haiku about rain", "How do I bake bread?"]


def forced_gate(lm, bias: float) -> GateProbe:
    k = 4
    return GateProbe(torch.arange(k) % lm.shape[0], torch.arange(k), torch.zeros(k), torch.ones(k), torch.zeros(k), bias, 1.0, lm.fingerprint)


@pytest.fixture(scope="module")
def mod(tiny_llama):
    return random_modulation(tiny_llama.shape, 80, seed=3, low=0.0, high=4.0, fingerprint=tiny_llama.fingerprint)


def test_batched_rows_equal_each_model_alone(tiny_llama, mod):
    lm = tiny_llama
    rows = compare_prompts(lm, PROMPTS, mod, max_new_tokens=8, batch_size=2)
    assert [r.prompt for r in rows] == PROMPTS and all(r.gate is None for r in rows)
    base = generate(lm, PROMPTS, None, max_new_tokens=8, batch_size=2)
    tuned = generate(lm, PROMPTS, mod, max_new_tokens=8, batch_size=2)
    assert [r.base for r in rows] == base
    assert [r.tuned for r in rows] == tuned
    assert base != tuned, "these gains must change some answer for the test to mean anything"
    frame = bulk_frame(rows)
    assert list(frame.columns) == ["prompt", "base verdict", "tuned verdict", "gate s", "base answer", "tuned answer"]
    assert bulk_summary(rows)["n"] == 4 and hooks_left(lm) == 0


def test_gate_shut_gives_base_and_open_gives_static(tiny_llama, mod):
    lm = tiny_llama
    shut = compare_prompts(lm, PROMPTS[:3], mod, gate=forced_gate(lm, -1e4), max_new_tokens=8)
    assert all(r.tuned == r.base and r.gate == 0.0 for r in shut)
    opened = compare_prompts(lm, PROMPTS[:3], mod, gate=forced_gate(lm, 1e4), max_new_tokens=8)
    static = compare_prompts(lm, PROMPTS[:3], mod, max_new_tokens=8)
    assert [r.tuned for r in opened] == [r.tuned for r in static] and all(r.gate == 1.0 for r in opened)
    assert bulk_frame(opened)["gate s"].tolist() == [1.0] * 3


def test_stop_between_batches_keeps_what_is_done(tiny_llama, mod):
    cancel, done = threading.Event(), []
    rec = Recorder(cancel)
    with pytest.raises(Cancelled):
        for batch in iter_compare(tiny_llama, PROMPTS, mod, max_new_tokens=4, batch_size=1, reporter=rec):
            done += batch
            cancel.set()
    assert len(done) == 1 and [(d, t) for d, t, _ in rec.calls] == [(1, 4)]
    with pytest.raises(ValueError, match="No gains"):
        compare_prompts(tiny_llama, PROMPTS, None)


def test_prompt_lists_from_files_and_paste(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("first prompt\n\nsecond prompt\nfirst prompt\n", encoding="utf-8")
    notes: list[str] = []
    assert read_prompt_list(txt, "pasted one\nsecond prompt", notes=notes) == ["first prompt", "second prompt", "pasted one"]
    assert any("duplicate" in n for n in notes)
    csv = tmp_path / "mine.csv"
    csv.write_text("prompt\nalpha\nbeta\n")
    assert read_prompt_list(csv) == ["alpha", "beta"]
    notes = []
    assert len(read_prompt_list(None, "\n".join(f"p{i}" for i in range(12)), cap=5, notes=notes)) == 5
    assert "only the first 5" in notes[0]
    with pytest.raises(DataError, match="No prompts"):
        read_prompt_list(None, "  \n ")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_prompt_list(bad)
