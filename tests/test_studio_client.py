"""The studio through `gradio_client`, launched on 127.0.0.1 with the tiny model: load → attribute →
slide → train → chat → evaluate → export on real outputs; Stop; bad input; a new session reusing
finished work; and two concurrent sessions with different gains that never see each other's."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
from conftest import VIEW, StudioClient, amplified, served_app, wait_until

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TOKEN = "hf_PLANTEDtoken1234567890"
app = served_app("studio")


@pytest.fixture(scope="module")
def tuned(app):
    """A session taken through load → attribute → slide → train (the gains the later tests chat with)."""
    studio, url, preset = app
    s = StudioClient(url, preset)
    out = s.load()
    assert "3 layers × 128 neurons" in out["model_status"] and "tiny-test" in out["model_status"]
    out = s.call("attribute", *VIEW)
    assert "done" in out["attr_status"] or "cache" in out["attr_status"], out["attr_status"]
    assert amplified(out["counts"]) > 0
    heat = json.loads(out["heatmap"]["plot"])  # the plotly figure as sent to the page
    assert [t["type"] for t in heat["data"]][:2] == ["heatmap", "scatter"]  # the scores and the selection overlay
    assert heat["data"][0]["z"]["shape"].replace(" ", "") == "3,64"  # 3 layers x 64 bins of 2 neurons
    # slide: the selection follows the thresholds at once, from the cached scores
    few, many = s.call("select", 5, 2, 0, *VIEW), s.call("select", 60, 20, 0, *VIEW)
    assert amplified(few["counts"]) <= 5 < amplified(many["counts"]) <= 60
    assert "ms from cached scores" in many["counts"]
    table = many["table"]
    assert {"layer", "neuron", "safety", "over_refusal", "act_harmful", "act_benign", "role"} <= set(table["headers"])
    out = s.call("train", *VIEW)
    assert "Training gains: done" in out["train_status"], out["train_status"]
    assert "trained gains" in out["active_gains"]
    run = next(p for p in studio.runs_dir.iterdir() if (p / "modulation.safetensors").exists())
    assert (run / "train_log.jsonl").read_text().count("\n") >= 1 and (run / "preset.json").exists()
    return s


def test_chat_panes_differ_with_gains_and_match_without(tuned):
    s = tuned
    left, right, status = s.chat()
    assert "Strength ×1" in status
    out = s.call("fixed_gains", 4.0, 0.0, *VIEW)  # strong fixed gains: the modulated pane must change
    assert "fixed gains ×4 / ×0" in out["gains_status"]
    left, right, status = s.chat()
    assert left != right, "amplifying and ablating the selected neurons changed nothing"
    assert "differ" in status
    left0, right0, status0 = s.chat(strength=0.0)  # strength 0: gains of 1, the base model on both sides
    assert left0 == right0 == left and "identical" in status0
    s.call("fixed_gains", 1.0, 1.0, *VIEW)  # explicit gains of 1 at full strength
    left1, right1, _ = s.chat()
    assert left1 == right1 == left
    # multi-turn: the second turn sees the first (each pane its own history)
    out = s.call("chat", "And then?", 1.0, 8, False, 0.7)
    assert len(out["left"]) == len(out["right"]) == 4
    assert s.call("chat", "   ", 1.0, 8, False, 0.7)["chat_status"].startswith("Type a message")


def test_queue_position_stop_and_chat_while_training(app, tuned):
    """A second session's training waits visibly behind the first; chat keeps working on the shared
    model meanwhile; Stop ends a running job (keeping its gains) and drops a queued one."""
    studio, url, preset = app
    a, b = tuned, StudioClient(url, preset)
    b.load()
    b.call("attribute", *VIEW)  # cached: instant
    base, _, _ = a.chat(strength=0.0)
    for s in (a, b):
        s.call("training_settings", "fomaml", 200, 1.0, 1.0, 4.0)
    first = a.client.submit(*VIEW, api_name="/train")
    assert wait_until(lambda: any(j.status == "running" and j.step >= 1 for j in studio.runner.jobs("train", include_files=False))), "training never started"
    second = b.client.submit(*VIEW, api_name="/train")

    def queued_text() -> str:
        return " ".join(str(o[0]) for o in second.outputs() if o)
    assert wait_until(lambda: "position **1**" in queued_text()), queued_text()
    left, right, _ = a.chat(strength=0.0)  # the shared model answers while it trains
    assert left == right == base
    assert "Stopping" in a.call("stop_train")["train_status"]
    assert "Stopping" in b.call("stop_train")["train_status"]
    out = dict(zip(a.outputs["train"], first.result(timeout=60)))  # the generator's last update
    assert "cancelled" in out["train_status"] and "stopped by you" in out["active_gains"]
    out_b = dict(zip(b.outputs["train"], second.result(timeout=60)))
    assert "cancelled" in out_b["train_status"]
    assert all(j.step < 200 for j in studio.runner.jobs("train", include_files=False))
    for s in (a, b):
        s.call("training_settings", "fomaml", 3, 1.0, 1.0, 4.0)


def test_evaluate_in_background(app, tuned):
    out = tuned.call("evaluate", True, [], "validation")
    assert "Evaluating: done" in out["eval_status"] and "validation split" in out["eval_status"], out["eval_status"]
    assert out["eval_table"]["data"], "empty metrics table"
    assert out["eval_samples"]["data"], "no sample generations"
    table = out["eval_table"]
    assert {"base", "neurontune"} <= {row[table["headers"].index("intervention")] for row in table["data"]}
    run = Path(re.search(r"Written to `([^`]+)`", out["eval_status"]).group(1))
    assert json.loads((run / "eval.json").read_text())["table"] and (run / "generations.jsonl").stat().st_size > 0
    # a sweep over two thresholds, in the background, drawn as the trade-off plot
    out = tuned.call("sweep", "5:2, 20:5")
    assert "Sweeping thresholds: done" in out["eval_status"] and out["tradeoff"] is not None


def test_export_writes_files_and_never_keeps_the_token(app, tuned):
    studio, _, _ = app
    out = tuned.call("export", "My tuned model!", False, "someone/neurontune-test", TOKEN)  # measured: the default
    assert "Exported to" in out["export_status"], out["export_status"]
    assert "Measured reloaded with plain `transformers` on the test split" in out["export_status"], out["export_status"]
    folder = studio.export_root / out["export_name"]
    card = (folder / "README.md").read_text()
    assert "Measured on **this checkpoint, reloaded with plain `transformers`**" in card and "this checkpoint" in card
    assert json.loads((folder / "export_check.json").read_text())["measured"]["split"] == "test"
    assert out["export_name"] == "My-tuned-model" and folder.is_dir()
    for name in ("model.safetensors", "config.json", "modulation.safetensors", "README.md", "preset.json"):
        assert (folder / name).is_file(), name
    assert sorted(Path(f).name for f in out["export_files"]) == ["README.md", "modulation.safetensors"]
    assert all(Path(f).is_file() for f in out["export_files"])  # downloaded by the client
    assert "from_pretrained" in out["export_status"]
    assert out["hub_token"] == ""  # the password box is cleared
    assert "failed" in out["export_status"] and TOKEN not in out["export_status"]  # offline push fails, export stays
    assert studio.runner.dir is not None
    for path in [*folder.rglob("*"), *studio.runner.dir.rglob("*")]:  # the export and the job's status files
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    again = tuned.call("export", "My tuned model!", False, "", "", "transformers", False)
    assert "already exists" in again["export_status"]
    # a GGUF export is measured too: the file itself, read back by transformers
    gguf = tuned.call("export", "my-gguf", False, "", "", "gguf", True)
    assert "Measured the GGUF file read back by `transformers` on the test split" in gguf["export_status"], gguf["export_status"]
    card = (studio.export_root / gguf["export_name"] / "README.md").read_text()
    assert "library_name: gguf" in card and "Measured on **this GGUF file, read back by plain `transformers`**" in card


def test_bad_input_keeps_the_previous_model_and_data(app, tmp_path):
    from gradio_client import handle_file

    _, url, preset = app
    s = StudioClient(url, preset)
    assert "384" in s.load()["model_status"]
    out = s.load("no-such/model-anywhere")
    assert out["model_status"].startswith("✗") and "still loaded and usable" in out["model_status"]
    left, right, status = s.chat()  # chat still works on the previous model (no gains: both panes base)
    assert left == right and "No gains yet" in status
    assert "No gains to export" in s.call("export", "x", False, "", "")["export_status"]
    bad = tmp_path / "prompts.csv"
    bad.write_text("text\nhello\n")
    out = s.call("load_model", "tiny-llama", False, preset, False, handle_file(str(bad)), None, None, *VIEW)
    assert out["model_status"].startswith("✗") and "no 'prompt' column" in out["model_status"]
    good = tmp_path / "harmful.csv"
    good.write_text("prompt\n" + "\n".join(f"Explain how to do forbidden thing number {i}" for i in range(12)) + "\n")
    out = s.call("load_model", "tiny-llama", False, preset, False, handle_file(str(good)), None, None, *VIEW)
    assert "harmful: `harmful.csv`" in out["model_status"]


def test_new_session_reuses_finished_work(app, tuned):
    """A reopened page finds the cached scores and the finished trainings (any session)."""
    _, url, preset = app
    s = StudioClient(url, preset)
    out = s.call("on_load", *VIEW)
    assert "computed before" in out["model_status"] and amplified(out["counts"]) > 0
    runs = s.call("refresh_runs")["recent_runs"]
    choices = runs["choices"] if isinstance(runs, dict) else runs
    assert choices, runs
    job_id = choices[0][1]
    out = s.call("use_run", job_id, *VIEW)
    assert "trained gains from run" in out["gains_status"]
    jobs = s.call("jobs")["jobs_table"]
    statuses = {tuple(row[1:3]) for row in jobs["data"]}
    assert {("attribution", "done"), ("train", "done")} <= statuses, statuses


def test_two_sessions_never_see_each_others_gains(app, tuned):
    _, url, preset = app
    a, b = StudioClient(url, preset), StudioClient(url, preset)
    for s, gains in ((a, (4.0, 0.0)), (b, (2.0, 1.0))):
        s.load()
        s.call("attribute", *VIEW)  # cached: instant
        s.call("select", 40, 20, 0, *VIEW)
        s.call("fixed_gains", *gains, *VIEW)
    solo = {"a": a.chat(), "b": b.chat()}
    assert solo["a"][0] == solo["b"][0]  # same base answer
    assert solo["a"][1] != solo["b"][1]  # different gains, different modulated answers
    seen, errors = {"a": [], "b": []}, []
    barrier = threading.Barrier(2)

    def run(name: str, s: StudioClient) -> None:
        try:
            for _ in range(3):
                barrier.wait(timeout=30)
                seen[name].append(s.chat())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for name in ("a", "b"):
        assert [x[:2] for x in seen[name]] == [solo[name][:2]] * 3, f"session {name} saw other gains"
