"""A run shipped with the repository, so that a visitor sees a tuned model at once instead of waiting minutes
for "Run the whole flow" on a CPU. `snapshot_run` copies a run folder's small files (scores, selection, gains,
gate, evaluation; never weights) into a folder with a manifest (`snapshot.json`: format version, model
fingerprint, the preset it claims and that preset's config digest); scores are stored as float16 when that
leaves the selection as it was. `check_snapshot` lists what no longer matches the code, so a test fails (and
the studio ignores the snapshot) once the method, the presets or the model change: regenerate it with
`SNAPSHOT_COMMAND`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, load_preset
from ..infra import resources
from ..interventions.gating import GateProbe
from ..interventions.modulation import Modulation
from ..method.neuron_scores import NeuronScores
from ..method.selection import Selection, select
from .folder import RunFolder

SNAPSHOT_FORMAT = 1  # bump when what a snapshot holds or how it is read changes: old snapshots then fail the check
SHIPPED_DIR = resources.shipped_run_dir()
DIGEST_SECTIONS = ("data", "attribution", "selection", "meta", "fold")  # what makes two runs the same method (and export)
SNAPSHOT_COMMAND = "python -m neurontune snapshot --preset balanced"  # the one command that (re)makes SHIPPED_DIR
COPIED = (RunFolder.CONFIG, RunFolder.SELECTION, RunFolder.MODULATION, RunFolder.GATE, RunFolder.FOLDABLE, RunFolder.TRAIN_LOG,
          RunFolder.ATTRIBUTION, RunFolder.EVAL, RunFolder.EVAL_TABLE, RunFolder.GENERATIONS)
REQUIRED = (RunFolder.CONFIG, RunFolder.SCORES, RunFolder.MODULATION, RunFolder.EVAL)


class SnapshotError(ValueError):
    """A run that cannot be snapshotted, or a snapshot that no longer matches the code; says what to do."""


def config_digest(cfg: RunConfig) -> str:
    return cfg.digest(*DIGEST_SECTIONS)


def _same_selection(a: Selection, b: Selection) -> bool:
    return all(torch.equal(getattr(a, m), getattr(b, m)) for m in ("safety", "utility", "overlap", "protected", "protected_dropped"))


def half_scores(scores: NeuronScores, cfg: RunConfig) -> tuple[NeuronScores, dict]:
    """The scores as float16 and what that rounding changes: the selection (must be identical) and the largest
    change of any score relative to its kind's largest magnitude (what moves a heatmap colour)."""
    half = NeuronScores({k: v.half() for k, v in scores.scores.items()}, dict(scores.counts), dict(scores.meta))
    back = NeuronScores({k: v.float() for k, v in half.scores.items()})
    worst = max(float((scores[k].float() - back[k]).abs().max() / scores[k].float().abs().max().clamp(min=1e-30)) for k in scores.kinds)
    same = _same_selection(select(scores, cfg.selection), select(back, cfg.selection))
    return half, {"selection_unchanged": same, "max_relative_change": worst}


def snapshot_run(run: str | Path | RunFolder, out: str | Path = SHIPPED_DIR, *, command: str = SNAPSHOT_COMMAND,
                 half: bool = True) -> dict:
    """Copy `run`'s small files into `out` (replacing what was there) with a manifest; returns the manifest.
    Refuses a run whose settings differ from the preset it names (the snapshot would claim what it is not)."""
    src = RunFolder(run)
    missing = [n for n in REQUIRED if not src.has(n)]
    if missing:
        raise SnapshotError(f"{src.path} lacks {', '.join(missing)}: snapshot a run made by `python -m neurontune tune "
                            "--preset NAME --quick-eval --out DIR` (with its evaluation).")
    cfg = src.config()
    try:
        preset = load_preset(cfg.name)
    except ValueError as exc:
        raise SnapshotError(f"{src.path} names preset '{cfg.name}', which is not in presets/: {exc}") from exc
    if config_digest(preset) != config_digest(cfg):
        changed = [s for s in DIGEST_SECTIONS if getattr(preset, s) != getattr(cfg, s)]
        raise SnapshotError(f"{src.path} was made with settings that differ from presets/{cfg.name}.json (sections: "
                            f"{', '.join(changed)}). Make the run with `tune --preset {cfg.name}` and no overrides.")
    scores = src.scores()
    info = json.loads(src.file(RunFolder.ATTRIBUTION).read_text(encoding="utf-8")) if src.has(RunFolder.ATTRIBUTION) else {}
    mod = src.modulation()
    rounding = {"selection_unchanged": True, "max_relative_change": 0.0}
    if half:
        halved, rounding = half_scores(scores, cfg)
        if rounding["selection_unchanged"]:
            scores = halved
    dest = RunFolder(out)
    if dest.path.exists() and any(dest.path.iterdir()):
        if dest.snapshot() is None:
            raise SnapshotError(f"{dest.path} exists and is not a snapshot: choose an empty or new folder for --out.")
        shutil.rmtree(dest.path)  # the previous snapshot, replaced whole
    dest.made()
    dest.write_scores(scores)
    for name in COPIED:
        if src.has(name):
            shutil.copy2(src.file(name), dest.file(name))
    manifest = {
        "format": SNAPSHOT_FORMAT, "made": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": command,
        "source": str(src.path), "model": info.get("model") or cfg.model, "fingerprint": info.get("fingerprint") or mod.fingerprint,
        "shape": list(scores.shape), "preset": cfg.name, "config_digest": config_digest(cfg),
        "scores_dtype": str(next(iter(scores.scores.values())).dtype).replace("torch.", ""), **rounding,
        "eval": {k: v for k, v in (src.eval_summary() or {}).items() if k in ("eval_config", "heldout_families", "seconds")},
        "files": {p.name: p.stat().st_size for p in sorted(dest.path.iterdir()) if p.is_file()},
    }
    manifest["bytes"] = sum(manifest["files"].values())
    dest.write_snapshot(manifest)
    return manifest


def check_snapshot(folder: str | Path | RunFolder = SHIPPED_DIR, lm=None) -> list[str]:
    """What no longer matches the code (empty when the snapshot is current): its format version, the config
    digest of the preset it claims against presets/*.json today and against its own preset.json, its files,
    and, given the loaded model, the model fingerprint."""
    folder = RunFolder(folder)
    manifest = folder.snapshot()
    if manifest is None:
        return [f"{folder.path} holds no {RunFolder.SNAPSHOT}: make it with `{SNAPSHOT_COMMAND}`."]
    problems = []
    if manifest.get("format") != SNAPSHOT_FORMAT:
        problems.append(f"format {manifest.get('format')} (this code reads format {SNAPSHOT_FORMAT})")
    missing = [n for n in REQUIRED if not folder.has(n)]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    try:
        today = config_digest(load_preset(str(manifest.get("preset"))))
        if today != manifest.get("config_digest"):
            problems.append(f"presets/{manifest.get('preset')}.json has changed since the snapshot (digest {today}, snapshot "
                            f"{manifest.get('config_digest')})")
    except ValueError as exc:
        problems.append(str(exc))
    if folder.has(RunFolder.CONFIG) and config_digest(folder.config()) != manifest.get("config_digest"):
        problems.append(f"its {RunFolder.CONFIG} does not match its manifest's config digest")
    if lm is not None:
        if lm.fingerprint != manifest.get("fingerprint"):
            problems.append(f"made on model {manifest.get('fingerprint')}, the loaded model is {lm.fingerprint}")
        if list(lm.shape) != list(manifest.get("shape") or []):
            problems.append(f"made for {manifest.get('shape')} neurons, the model has {list(lm.shape)}")
    return problems


@dataclass
class Snapshot:
    """A shipped run, read: what a studio session adopts on opening (scores upcast to float32)."""

    folder: RunFolder
    manifest: dict
    cfg: RunConfig
    scores: NeuronScores
    modulation: Modulation
    gate: GateProbe | None
    eval_rows: list[dict] | None
    generations: list[dict]
    foldable: Modulation | None = None  # what export folds, when the run trained it apart

    def describe(self) -> str:
        return (f"the shipped `{self.cfg.name}` run of {self.manifest.get('model')} (made {self.manifest.get('made', '?')[:10]} by "
                f"`{self.manifest.get('command')}`)")


def load_snapshot(folder: str | Path | RunFolder = SHIPPED_DIR, lm=None) -> Snapshot:
    """Read a snapshot checked against the code and (given) the model; `SnapshotError` lists what is stale."""
    folder = RunFolder(folder)
    problems = check_snapshot(folder, lm)
    if problems:
        raise SnapshotError(f"The snapshot in {folder.path} no longer matches the code: {'; '.join(problems)}. "
                            f"Regenerate it with `{SNAPSHOT_COMMAND}`.")
    scores = folder.scores()
    scores = dataclasses.replace(scores, scores={k: v.float() for k, v in scores.scores.items()})
    fingerprint = lm.fingerprint if lm is not None else None
    return Snapshot(folder, folder.snapshot(), folder.config(), scores, folder.modulation(fingerprint), folder.gate(lm),
                    folder.eval_table(), folder.generations(), folder.foldable(fingerprint))
