"""Faults: every on-disk cache survives truncation, corruption and a crash in the middle of a write (a bad
entry is recomputed with a warning, never trusted, never a crash); every job kind of the studio can be
cancelled and run again with the result of an uninterrupted run; a process killed in the middle of a job
leaves that job "interrupted" and no bad cache entry behind."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from neurontune.config import DataConfig, EvalConfig, RunConfig
from neurontune.data.splits import build_splits
from neurontune.eval import harness as evaluate_mod
from neurontune.eval.harness import evaluate
from neurontune.infra import files as cache_io
from neurontune.method import base_answers, neuron_scores
from neurontune.method.neuron_scores import (
    NeuronScores,
    cached_answers,
    run_attribution,
)
from neurontune.model import loading as models
from neurontune.run import evaluate_run as evaluation_run
from neurontune.run import sweep as sweep_mod
from neurontune.studio.jobs import Job, JobReporter, JobRunner, write_status

ROOT = Path(__file__).resolve().parent.parent
TINY = {"name": "tiny-faults",
        "data": {"n_harmful": 4, "n_attack_per_family": 1, "n_benign": 4, "n_borderline": 2, "n_answer": 4, "answer_tokens": 6},
        "attribution": {"max_length": 64, "batch_size": 16},
        "selection": {"k_safety": 20, "k_utility": 10, "protect_top": 5},
        "meta": {"steps": 3, "eval_every": 1, "batch_harmful": 2, "batch_benign": 2}}
CFG = RunConfig.from_dict({**TINY, "model": "tiny-llama"})
EVAL = EvalConfig(n_harmful=2, n_per_family=1, families=("roleplay", "few_shot"), n_benign=2, n_borderline=1, n_ppl=2,
                  n_mc=2, max_new_tokens=6, batch_size=8)
GRID = "6:2, 12:4"


# -- damage ---------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    """One byte changed near the end, same size: a safetensors file still loads, with a wrong value."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def drop_checksum(path: Path) -> None:
    """Data without its checksum: what a crash between publishing the data and its sidecar leaves."""
    cache_io.sidecar(path).unlink()


DAMAGE = {"truncate": truncate, "flip": flip, "empty": empty, "no_checksum": drop_checksum}


def json_flip(path: Path) -> None:
    """Still valid JSON, same size, one character of content changed: only the checksum can tell."""
    text = path.read_text(encoding="utf-8")
    for i in [*range(len(text) // 2, len(text)), *range(len(text) // 2)]:
        if text[i].isascii() and text[i].isalnum():
            edited = text[:i] + ("7" if text[i] != "7" else "8") + text[i + 1:]
            try:
                if json.loads(edited) != json.loads(text):
                    path.write_text(edited, encoding="utf-8")
                    return
            except ValueError:
                continue
    raise AssertionError(f"found no same-size edit of {path}")


JSON_DAMAGE = {**DAMAGE, "flip": json_flip}


class Crash(RuntimeError):
    """A simulated crash inside a cache writer."""


def crash_halfway(monkeypatch) -> None:
    """The next `cache_io` file write writes half its bytes to the temp file, then dies."""
    real = cache_io.write_file

    def writer(path, fill, **kw):
        def half(tmp: Path):
            fill(tmp)
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) // 2])
            raise Crash("killed while writing")
        return real(path, half, **kw)
    monkeypatch.setattr(cache_io, "write_file", writer)


def crash_before_checksum(monkeypatch) -> None:
    """The data is renamed into place, then the process dies before the checksum sidecar is."""
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(cache_io.SIDECAR):
            raise Crash("killed between the data and its checksum")
        return real(src, dst)
    monkeypatch.setattr(cache_io.os, "replace", replace)


CRASH = {"halfway": crash_halfway, "before_checksum": crash_before_checksum}


def no_temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp-" in p.name] if folder.exists() else []


def bad_entries(cache: Path) -> list[Path]:
    """Entries a reader would reject: files without a matching checksum (temp files are not entries)."""
    bad = []
    for p in cache.rglob("*"):
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(cache_io.SIDECAR) and p.parent.name != "jobs":
            if not cache_io.verify_file(p):
                bad.append(p)
    return bad


def same_scores(a: NeuronScores, b: NeuronScores, exact: bool = True) -> bool:
    if sorted(a.scores) != sorted(b.scores) or a.counts != b.counts:
        return False
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-7))
    return all(check(a.scores[k], b.scores[k]) for k in a.scores)


@pytest.fixture
def spy(monkeypatch):
    """spy(module, name) counts calls to a function (and records their first arguments)."""
    def install(module, name):
        real, calls = getattr(module, name), []

        def wrapper(*args, **kwargs):
            calls.append(args)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)
        return calls
    return install


@pytest.fixture(scope="module")
def clean(tiny_llama, tmp_path_factory):
    """A cache filled by an uninterrupted run: attribution scores and the benign answers they need."""
    cache = tmp_path_factory.mktemp("clean_cache")
    scores = run_attribution(tiny_llama, CFG, cache_dir=cache)
    return cache, scores


def _copy(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    return out


# -- file caches: attribution, answers, eval_base ------------------------------------------------
@pytest.mark.parametrize("damage", DAMAGE)
def test_bad_attribution_entry_is_recomputed(tiny_llama, clean, tmp_path, spy, caplog, damage):
    cache = _copy(clean[0], tmp_path)
    entry = next((cache / "attribution").glob("*.safetensors"))
    DAMAGE[damage](entry)
    calls = spy(neuron_scores, "attribute")
    with caplog.at_level(logging.WARNING, "neurontune.infra.files"):
        again = run_attribution(tiny_llama, CFG, cache_dir=cache)
    assert calls, "a bad entry must be recomputed, not read"
    assert "Ignoring bad attribution cache entry" in caplog.text
    assert same_scores(again, clean[1])
    assert cache_io.verify_file(entry) and bad_entries(cache) == []  # rewritten whole
    calls.clear()
    assert same_scores(run_attribution(tiny_llama, CFG, cache_dir=cache), clean[1]) and not calls  # and served again


@pytest.mark.parametrize("damage", JSON_DAMAGE)
def test_bad_answers_entry_is_recomputed(tiny_llama, clean, tmp_path, spy, caplog, damage):
    cache = _copy(clean[0], tmp_path)
    prompts = [p.text for p in build_splits(CFG.data).benign_train[: CFG.data.n_answer]]
    want = cached_answers(tiny_llama, prompts, CFG.data.answer_tokens, cache)
    entry = next((cache / "answers").glob("*.json"))
    JSON_DAMAGE[damage](entry)
    calls = spy(base_answers, "generate")
    with caplog.at_level(logging.WARNING, "neurontune.infra.files"):
        got = cached_answers(tiny_llama, prompts, CFG.data.answer_tokens, cache)
    assert calls and got == want and "Ignoring bad answers cache entry" in caplog.text
    assert bad_entries(cache) == []


@pytest.fixture(scope="module")
def clean_eval(tiny_llama, tmp_path_factory):
    cache = tmp_path_factory.mktemp("eval_cache")
    splits = build_splits(DataConfig())
    return cache, splits, evaluate(tiny_llama, None, splits, EVAL, cache_dir=cache)


def _base_generated(calls) -> int:
    return sum(1 for args in calls for _, strength in args[1] if strength == 0)


@pytest.mark.parametrize("damage", JSON_DAMAGE)
def test_bad_eval_base_entry_is_recomputed(tiny_llama, clean_eval, tmp_path, spy, caplog, damage):
    cache, splits, want = clean_eval
    cache = _copy(cache, tmp_path)
    calls = spy(evaluate_mod, "_generate_rows")
    evaluate(tiny_llama, None, splits, EVAL, cache_dir=cache)
    assert _base_generated(calls) == 0  # a good entry is used
    entry = cache / "eval_base" / f"{tiny_llama.fingerprint}.json"
    JSON_DAMAGE[damage](entry)
    calls.clear()
    with caplog.at_level(logging.WARNING, "neurontune.infra.files"):
        got = evaluate(tiny_llama, None, splits, EVAL, cache_dir=cache)
    assert _base_generated(calls) > 0 and "Ignoring bad eval_base cache entry" in caplog.text
    assert got.rows == want.rows and got.metrics == pytest.approx(want.metrics, nan_ok=True)
    assert bad_entries(cache) == []


@pytest.mark.parametrize("crash", CRASH)
def test_crash_while_writing_attribution_leaves_no_valid_entry(tiny_llama, clean, tmp_path, crash):
    cache = tmp_path / "cache"
    shutil.copytree(clean[0] / "answers", cache / "answers")  # only the attribution entry is written below
    with pytest.MonkeyPatch.context() as m:
        CRASH[crash](m)
        with pytest.raises(Crash):
            run_attribution(tiny_llama, CFG, cache_dir=cache)
    entry = clean[1].meta["cache"]
    entry = cache / "attribution" / Path(entry).name
    assert cache_io.read_bytes(entry) is None  # nothing there reads as valid
    assert no_temps(cache / "attribution") == []  # the writer removed its temp file
    assert same_scores(run_attribution(tiny_llama, CFG, cache_dir=cache), clean[1])
    assert cache_io.verify_file(entry)


@pytest.mark.parametrize("crash", CRASH)
def test_crash_while_writing_answers_and_eval_base(tiny_llama, clean_eval, tmp_path, crash):
    prompts = [p.text for p in build_splits(CFG.data).benign_train[:3]]
    want = cached_answers(tiny_llama, prompts, 5, tmp_path / "ref")
    _, splits, want_eval = clean_eval
    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as m:
        CRASH[crash](m)
        with pytest.raises(Crash):
            cached_answers(tiny_llama, prompts, 5, cache)
    with pytest.MonkeyPatch.context() as m:
        CRASH[crash](m)
        with pytest.raises(Crash):
            evaluate(tiny_llama, None, splits, EVAL, cache_dir=cache)
    for folder in ("answers", "eval_base"):
        entries = [p for p in (cache / folder).iterdir() if not p.name.endswith(cache_io.SIDECAR)]
        assert all(cache_io.read_bytes(p) is None for p in entries) and no_temps(cache / folder) == []
    assert cached_answers(tiny_llama, prompts, 5, cache) == want
    assert evaluate(tiny_llama, None, splits, EVAL, cache_dir=cache).rows == want_eval.rows
    assert bad_entries(cache) == []


def dead_pid() -> int:
    """The pid of a process that has ended."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def test_stale_temp_of_a_dead_process_is_removed(tmp_path):
    entry = tmp_path / "answers" / "k.json"
    entry.parent.mkdir()
    dead = dead_pid()
    stale, ours = entry.with_name(f".k.json.tmp-{dead}-1-abc"), entry.with_name(f".k.json.tmp-{os.getpid()}-1-abc")
    stale.write_text("[\"half")
    ours.write_text("[\"half")  # a live writer's (here: this process's) temp file is left alone
    assert cache_io.read_json(entry) is None  # a temp file is never an entry
    cache_io.write_json(entry, ["a"])
    assert not stale.exists() and ours.exists() and cache_io.read_json(entry) == ["a"]
    jobs = tmp_path / "studio" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / f".train-x.json.tmp-{dead}-1-abc").write_text("{\"id\": ")  # a status write cut short by a kill
    JobRunner(tmp_path / "studio")
    assert list(jobs.iterdir()) == []


# -- the dequantised model cache (a folder) -------------------------------------------------------
@pytest.fixture
def fake_gguf(monkeypatch):
    """transformers' GGUF loading stood in for by the tiny model (no SmolLM2 in these tests): records each
    dequantisation; loads from the cache folder go through the real `from_pretrained`."""
    from neurontune.model.tiny import tiny_model
    real_model, real_tok, calls = models.AutoModelForCausalLM, models.AutoTokenizer, []

    class Model:
        @staticmethod
        def from_pretrained(path, **kw):
            if "gguf_file" in kw:
                calls.append(path)
                return tiny_model("llama")[0]
            return real_model.from_pretrained(path, **kw)

    class Tok:
        @staticmethod
        def from_pretrained(path, **kw):
            return tiny_model("llama")[1] if "gguf_file" in kw else real_tok.from_pretrained(path, **kw)
    monkeypatch.setattr(models, "AutoModelForCausalLM", Model)
    monkeypatch.setattr(models, "AutoTokenizer", Tok)
    return calls


def _load(tmp_path: Path, cache: Path):
    model, tok, source = models._from_gguf(tmp_path, "model.gguf", torch.float32, cache)
    return {k: v.clone() for k, v in model.state_dict().items()}, source


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


MODEL_DAMAGE = {"truncate": lambda c: truncate(c / "model.safetensors"), "flip": lambda c: flip(c / "model.safetensors"),
                "missing_file": lambda c: (c / "tokenizer_config.json").unlink(),
                "no_manifest": lambda c: (c / cache_io.MANIFEST).unlink(),
                "bad_manifest": lambda c: truncate(c / cache_io.MANIFEST),
                "empty_manifest": lambda c: (c / cache_io.MANIFEST).write_text('{"files": {}}'),
                "manifest_not_a_map": lambda c: (c / cache_io.MANIFEST).write_text('{"files": ["model.safetensors"]}')}


@pytest.mark.parametrize("damage", MODEL_DAMAGE)
def test_bad_model_cache_is_rebuilt(tmp_path, fake_gguf, caplog, damage):
    cache = tmp_path / "models" / "tiny"
    want, source = _load(tmp_path, cache)
    assert source.startswith("gguf:") and cache_io.verify_folder(cache)
    got, source = _load(tmp_path, cache)
    assert source.startswith("cache:") and _same_weights(got, want) and len(fake_gguf) == 1
    MODEL_DAMAGE[damage](cache)
    with caplog.at_level(logging.WARNING, "neurontune.infra.files"):
        got, source = _load(tmp_path, cache)
    assert source.startswith("gguf:") and len(fake_gguf) == 2, "a bad model cache must be rebuilt, not loaded"
    assert "Ignoring bad model cache" in caplog.text and _same_weights(got, want)
    assert cache_io.verify_folder(cache) and _load(tmp_path, cache)[1].startswith("cache:")
    assert no_temps(cache.parent) == []  # the bad folder was moved aside and deleted


def _crash_model_write(m: pytest.MonkeyPatch, crash: str) -> None:
    if crash == "halfway":  # every file saved, then the weights cut to half and the process dies
        real = cache_io.write_folder

        def writer(path, fill, **kw):
            def half(tmp: Path):
                fill(tmp)
                truncate(tmp / "model.safetensors")
                raise Crash("killed while writing")
            return real(path, half, **kw)
        m.setattr(cache_io, "write_folder", writer)
    else:  # the folder and its manifest are complete; the process dies before the rename that publishes it
        rename = os.rename

        def dies(src, dst):
            if Path(src).name.startswith(".tiny.tmp-"):
                raise Crash("killed before the rename")
            return rename(src, dst)
        m.setattr(cache_io.os, "rename", dies)


@pytest.mark.parametrize("crash", ["halfway", "before_rename"])
def test_crash_while_writing_model_cache_leaves_no_valid_folder(tmp_path, fake_gguf, crash):
    cache = tmp_path / "models" / "tiny"
    with pytest.MonkeyPatch.context() as m:
        _crash_model_write(m, crash)
        with pytest.raises(Crash):
            _load(tmp_path, cache)
    assert not cache.exists() and not cache_io.verify_folder(cache) and no_temps(cache.parent) == []
    _, source = _load(tmp_path, cache)
    assert source.startswith("gguf:") and cache_io.verify_folder(cache) and len(fake_gguf) == 2


# -- job status files and the studio's score copies -----------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_bad_job_status_file_is_ignored(tmp_path, caplog, damage):
    runner = JobRunner(tmp_path)
    job = runner.submit("train", lambda r: {"run_dir": "runs/a"})
    assert job.wait(5)
    path = tmp_path / "jobs" / f"{job.id}.json"
    if damage == "truncate":
        truncate(path)
    else:  # valid JSON, plausible, but not what was written
        path.write_text(path.read_text().replace('"status": "done"', '"status": "running"'))
    with caplog.at_level(logging.WARNING, "neurontune.infra.files"):
        other = JobRunner(tmp_path)
    assert other.get(job.id) is None and other.jobs() == [] and other.recovered == []
    assert "Ignoring bad job status file" in caplog.text
    # a crash while a status file is rewritten leaves the previous one readable
    good = runner.submit("train", lambda r: {"n": 1})
    assert good.wait(5)
    gpath = tmp_path / "jobs" / f"{good.id}.json"
    def half_then_die(self, data, *a, **k):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise Crash("killed while writing")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Path, "write_bytes", half_then_die)
        with pytest.raises(Crash):
            write_status(gpath, {**good.to_dict(), "status": "running"})
    assert JobRunner(tmp_path).get(good.id).status == "done"
    assert [p.name for p in (tmp_path / "jobs").iterdir() if ".tmp" in p.name] == []


# -- cancel and restart every job kind through the studio's background layer ------------------------
def make_studio(tiny_llama, tmp_path: Path):
    """The studio's state as `app.py` builds it, on the tiny preset, with its cache in `tmp_path/cache`."""
    from neurontune.studio import Studio
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps(TINY))
    s = Studio("tiny-llama", str(preset), quick_default=False, cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs",
               export_root=tmp_path / "exports")
    s.models._models["tiny-llama"] = tiny_llama  # the conftest model, not a second copy
    return s


@pytest.fixture
def studio(tiny_llama, tmp_path, monkeypatch):
    s = make_studio(tiny_llama, tmp_path)
    monkeypatch.setattr(evaluation_run, "QUICK_EVAL", EVAL)  # "quick" evaluation, tiny
    yield s
    s.runner.shutdown(wait=5)


def cancel_first_job(monkeypatch, runner: JobRunner) -> list[str]:
    """Cancel the next job at its first progress report (a step or a log entry); later jobs run through."""
    fired, update, log = [], JobReporter.update, JobReporter.log

    def hit(self):
        if not fired:
            fired.append(self.job.id)
            runner.cancel(self.job.id)

    monkeypatch.setattr(JobReporter, "update", lambda self, *a, **k: (update(self, *a, **k), hit(self))[0])
    monkeypatch.setattr(JobReporter, "log", lambda self, entry: (log(self, entry), hit(self))[0])
    return fired


def _ended(studio, session, kind) -> Job:
    job = studio.runner.get(session.jobs[kind])
    assert job is not None and not job.active
    return job


def _attributed(studio):
    from neurontune.studio import background
    session = studio.new_session()
    list(background.attribute(studio, session))
    assert _ended(studio, session, "attribution").status == "done"
    return session


def test_cancel_and_restart_attribution(studio, tiny_llama, tmp_path, monkeypatch):
    from neurontune.studio import background
    session = studio.new_session()
    fired = cancel_first_job(monkeypatch, studio.runner)
    out = list(background.attribute(studio, session))
    job = _ended(studio, session, "attribution")
    assert fired == [job.id] and job.status == "cancelled" and "cancelled" in out[-1]["attr_status"]
    assert session.scores is None and session.selection is None
    assert list((studio.cache_dir / "attribution").glob("*.safetensors")) == []  # nothing partial cached
    list(background.attribute(studio, session))
    again = _ended(studio, session, "attribution")
    assert again.id != job.id and again.status == "done" and session.selection is not None
    want = run_attribution(tiny_llama, session.cfg, cache_dir=tmp_path / "ref")
    assert same_scores(session.scores, want)
    assert bad_entries(studio.cache_dir) == []
    # the one score cache is checked too: a damaged entry is dropped (never read), and attribution refills it
    entry = Path(session.scores.meta["cache"])
    flip(entry)
    fresh = studio.new_session()
    assert studio.known_scores(tiny_llama, fresh.cfg) is None
    list(background.attribute(studio, fresh))
    assert same_scores(fresh.scores, want) and cache_io.verify_file(entry)


def test_cancel_and_restart_training(studio, tiny_llama, tmp_path, monkeypatch):
    from neurontune.method.metalearn import train_gains
    from neurontune.studio import background
    session = _attributed(studio)
    selection, cfg = session.selection, session.cfg
    fired = cancel_first_job(monkeypatch, studio.runner)
    list(background.train(studio, session))
    job = _ended(studio, session, "train")
    assert fired == [job.id] and job.status == "cancelled" and job.result.stopped == "cancelled"
    assert len(job.result.log) < cfg.meta.steps
    list(background.train(studio, session))
    again = _ended(studio, session, "train")
    assert again.status == "done" and again.result.stopped != "cancelled"
    want = train_gains(tiny_llama, selection, cfg, splits=build_splits(cfg.data), cache_dir=tmp_path / "ref")
    assert torch.equal(session.modulation.dense(), want.modulation.dense())
    assert [e["loss"] for e in again.result.log] == [e["loss"] for e in want.log]


def _strip(table: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "second" not in k and not k.endswith("_s")} for row in table]


def test_cancel_and_restart_evaluation(studio, tiny_llama, tmp_path, monkeypatch):
    from neurontune.studio import background
    session = _attributed(studio)
    list(background.train(studio, session))
    run = Path(session.run_dir)
    ref = tmp_path / "ref_run"
    shutil.copytree(run, ref)
    fired = cancel_first_job(monkeypatch, studio.runner)
    list(background.evaluate(studio, session, True, []))
    job = _ended(studio, session, "evaluate")
    assert fired == [job.id] and job.status == "cancelled" and not (run / "eval.json").exists()
    assert bad_entries(studio.cache_dir) == []
    out = list(background.evaluate(studio, session, True, []))
    assert _ended(studio, session, "evaluate").status == "done" and "done" in out[-1]["eval_status"]
    evaluation_run.evaluate_run(tiny_llama, ref, session.cfg, baselines=(), quick=True, split="validation",
                                cache_dir=tmp_path / "ref_cache")
    got, want = (json.loads((d / "eval.json").read_text())["table"] for d in (run, ref))
    assert _strip(got) == _strip(want)
    assert (run / "generations.jsonl").read_text() == (ref / "generations.jsonl").read_text()


def test_cancel_and_restart_sweep(studio, tiny_llama, tmp_path, monkeypatch):
    from neurontune.studio import background
    session = _attributed(studio)
    fired = cancel_first_job(monkeypatch, studio.runner)
    list(background.sweep(studio, session, GRID))
    job = _ended(studio, session, "sweep")
    assert fired == [job.id] and job.status == "cancelled"
    out = list(background.sweep(studio, session, GRID))
    again = _ended(studio, session, "sweep")
    assert again.status == "done" and "done" in out[-1]["eval_status"]
    grid = [tuple(int(x) for x in p.split(":")) for p in GRID.replace(" ", "").split(",")]
    want = sweep_mod.sweep_run(tiny_llama, session.cfg, grid, tmp_path / "ref_sweep", scores=session.scores,
                                    cache_dir=tmp_path / "ref_cache")
    got = pd.read_csv(Path(again.info["out"]) / "sweep.csv")
    pd.testing.assert_frame_equal(got.drop(columns="seconds"), want.drop(columns="seconds"), check_dtype=False)


# -- a real kill ----------------------------------------------------------------------------------
KILLED = """
import sys, time
sys.path.insert(0, {root!r})
from neurontune.infra import files as cache_io
from neurontune.config import RunConfig
from neurontune.studio.jobs import JobRunner
from neurontune.model.loading import load_model
from neurontune.method.neuron_scores import run_attribution

mode, cache = {mode!r}, {cache!r}
cfg = RunConfig.from_dict({cfg!r})
lm = load_model("tiny-llama")
runner = JobRunner({status!r}, write_every=0)
if mode == "writing":  # stall in the middle of writing the attribution entry: half the bytes are on disk
    real = cache_io.write_file
    def stalled(path, fill, **kw):
        if path.parent.name != "attribution":
            return real(path, fill, **kw)
        def half(tmp):
            fill(tmp)
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) // 2])
            print("writing", flush=True)
            time.sleep(120)
        return real(path, half)
    cache_io.write_file = stalled

def work(reporter):
    progress = reporter.progress
    def report(done, total, stage=""):
        progress(done, total, stage)
        if mode == "computing" and stage.startswith("safety"):
            print("computing", flush=True)
            time.sleep(120)
    reporter.progress = report
    return run_attribution(lm, cfg, cache_dir=cache, reporter=reporter)

runner.submit("attribution", work)
time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["computing", "writing"])
def test_killed_process_leaves_interrupted_job_and_clean_cache(tiny_llama, clean, tmp_path, spy, mode):
    """A process runs an attribution job with the studio's cache layout and is SIGKILLed mid-job; then the
    studio starts again on the same cache."""
    from neurontune.studio import background, handlers
    cache = tmp_path / "cache"
    script = KILLED.format(root=str(ROOT), mode=mode, cache=str(cache), status=str(cache / "studio"), cfg=CFG.to_dict())
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "NEURONTUNE_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == mode
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    studio = make_studio(tiny_llama, tmp_path)  # the app starting again
    try:
        assert len(studio.runner.recovered) == 1
        job = studio.runner.get(studio.runner.recovered[0])
        assert job.kind == "attribution" and job.status == "interrupted" and "Run it again" in job.error
        assert list(handlers.jobs_table(studio)["jobs_table"]["status"]) == ["interrupted"]  # what the page lists
        assert bad_entries(cache) == []  # the answers entry is whole; the attribution entry is absent, not half
        entry = cache / "attribution" / Path(clean[1].meta["cache"]).name
        assert cache_io.read_bytes(entry) is None and not entry.exists()
        if mode == "writing":
            assert len(no_temps(cache / "attribution")) == 1  # the dead writer's temp file: never read as an entry
        session = studio.new_session()
        session.configure(CFG)
        calls = spy(neuron_scores, "attribute")
        list(background.attribute(studio, session))
        assert calls and same_scores(session.scores, clean[1], exact=False)
        assert cache_io.verify_file(entry) and no_temps(cache / "attribution") == []  # the stale temp is gone too
        assert studio.runner.get(job.id).status == "interrupted"  # and it stays so
    finally:
        studio.runner.shutdown(wait=5)
