"""A run folder: the one place that names the files of a run (`tune --out`, a studio training, a sweep, an
export) and reads and writes them. Every write is atomic; a part that is missing reads as None.

    preset.json          the RunConfig                    modulation.safetensors  the trained gains
    scores.safetensors   every neuron's scores            gate.safetensors        the input gate (when fitted)
    top_neurons.csv      top 100 neurons per score kind   train_log.jsonl         one line per training step
    layer_summary.csv    score mass per layer             eval.json               the evaluation table and its settings
    attribution.json     model, counts, processes         eval_table.csv          the same table as CSV
    foldable.safetensors the modulation trained without a gate, for export (when `fold.form` asks)
    selection.json       counts, rules, per layer         generations.jsonl       every generated answer
    sweep.csv, sweep_baselines.csv, tradeoff.html         a threshold sweep
    points/ks<k_safety>-ku<k_utility>/                    each sweep point: itself a run folder (preset, selection, gains)
    snapshot.json        what a shipped snapshot of a run claims (format, model, preset digest; `run.snapshot`)
    README.md, export_check.json                          an export: its model card and the reload check's figures
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from ..config import RunConfig
from ..infra import files
from ..interventions.gating import GateProbe
from ..interventions.modulation import Modulation
from ..method.neuron_scores import NeuronScores
from ..method.selection import Selection

POINTS = "points"  # the sub-folder of a sweep holding one run folder per (k_safety, k_utility) point


class RunFolder:
    CONFIG = "preset.json"
    SCORES = "scores.safetensors"
    TOP_NEURONS = "top_neurons.csv"
    LAYERS = "layer_summary.csv"
    ATTRIBUTION = "attribution.json"
    SELECTION = "selection.json"
    MODULATION = "modulation.safetensors"
    GATE = "gate.safetensors"
    FOLDABLE = "foldable.safetensors"
    TRAIN_LOG = "train_log.jsonl"
    EVAL = "eval.json"
    EVAL_TABLE = "eval_table.csv"
    GENERATIONS = "generations.jsonl"
    SWEEP = "sweep.csv"
    SWEEP_BASELINES = "sweep_baselines.csv"
    TRADEOFF = "tradeoff.html"
    SNAPSHOT = "snapshot.json"
    MODEL_CARD = "README.md"
    EXPORT_CHECK = "export_check.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        """The path of one of the files above (refuses a name that is not a run file)."""
        if name not in self.names():
            raise KeyError(f"{name!r} is not a file of a run folder; run files: {', '.join(sorted(self.names()))}.")
        return self.path / name

    @classmethod
    def names(cls) -> set[str]:
        return {v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str)}

    def has(self, name: str) -> bool:
        return self.file(name).is_file()

    def made(self) -> "RunFolder":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def modulation_path(self) -> Path:
        return self.file(self.MODULATION)

    @property
    def gate_path(self) -> Path:
        return self.file(self.GATE)

    @property
    def scores_path(self) -> Path:
        return self.file(self.SCORES)

    # -- configuration ------------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig | dict) -> Path:
        raw = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
        return files.write_json(self.made().file(self.CONFIG), raw, checksum=False, indent=2)

    def config(self) -> RunConfig:
        if not self.has(self.CONFIG):
            raise FileNotFoundError(f"{self.path} is not a NeuronTune run folder (no {self.CONFIG}). "
                                    f"Run `python -m neurontune tune --out {self.path}` first.")
        return RunConfig.from_dict(json.loads(self.file(self.CONFIG).read_text(encoding="utf-8")))

    # -- attribution and selection ------------------------------------------------------------------
    def write_scores(self, scores: NeuronScores) -> Path:
        return scores.save(self.made().file(self.SCORES))  # verified on read (checksum sidecar)

    def scores(self) -> NeuronScores | None:
        return NeuronScores.load(self.file(self.SCORES)) if self.has(self.SCORES) else None

    def write_attribution(self, scores: NeuronScores, info: dict) -> None:
        """The scores, plus the tables a reader wants first: top neurons per kind and score mass per layer."""
        self.write_scores(scores)
        tables = [scores.table(kind, 100).assign(kind=kind) for kind in ("safety", "over_refusal", "benign_dependence")
                  if kind in scores.scores]
        files.write_text(self.file(self.TOP_NEURONS), pd.concat(tables).to_csv(index=False))
        layers = scores.layer_summary("safety").rename(columns=lambda c: c if c == "layer" else f"safety_{c}")
        layers = layers.merge(scores.layer_summary("over_refusal").rename(columns=lambda c: c if c == "layer" else f"over_refusal_{c}"))
        files.write_text(self.file(self.LAYERS), layers.to_csv(index=False))
        files.write_json(self.file(self.ATTRIBUTION), info, checksum=False, indent=2)

    def write_selection(self, selection: Selection) -> Path:
        return files.write_json(self.made().file(self.SELECTION), {
            "counts": selection.counts(), "rules": selection.rules, "per_layer": selection.per_layer().to_dict(orient="list")},
            checksum=False, indent=2)

    # -- gains and gate -----------------------------------------------------------------------------
    def write_modulation(self, modulation: Modulation) -> Path:
        return modulation.save(self.made().file(self.MODULATION))

    def modulation(self, expected_fingerprint: str | None = None) -> Modulation | None:
        """The run's gains (refused with a message when made for another model or corrupted); None if absent."""
        return Modulation.load(self.modulation_path, expected_fingerprint) if self.has(self.MODULATION) else None

    def write_foldable(self, modulation: Modulation) -> Path:
        return modulation.save(self.made().file(self.FOLDABLE))

    def foldable(self, expected_fingerprint: str | None = None) -> Modulation | None:
        """The modulation trained apart, without any gate, for export (`fold.form`); None if the run has none."""
        return Modulation.load(self.file(self.FOLDABLE), expected_fingerprint) if self.has(self.FOLDABLE) else None

    def exported(self, expected_fingerprint: str | None = None) -> Modulation | None:
        """What export folds: the foldable modulation when the run trained one, else the run's own gains."""
        return self.foldable(expected_fingerprint) or self.modulation(expected_fingerprint)

    def write_train_log(self, entries: Iterable[dict]) -> Path:
        return files.write_jsonl(self.made().file(self.TRAIN_LOG), entries)

    def train_log(self) -> list[dict]:
        return self._jsonl(self.TRAIN_LOG)

    def write_gate(self, probe: GateProbe) -> Path:
        return probe.save(self.made().file(self.GATE))

    def gate(self, lm=None) -> GateProbe | None:
        """The run's input gate, or None. Given the loaded model, one fitted on another model is refused."""
        if not self.has(self.GATE):
            return None
        if lm is None:
            return GateProbe.load(self.gate_path)
        return GateProbe.load(self.gate_path, shape=tuple(lm.shape), expected_fingerprint=lm.fingerprint)

    # -- evaluation ---------------------------------------------------------------------------------
    def write_eval(self, summary: dict, table: pd.DataFrame) -> None:
        """eval.json (`summary` holds "table": one dict per intervention, and the settings) and eval_table.csv."""
        files.write_json(self.made().file(self.EVAL), summary, checksum=False, indent=2)
        files.write_text(self.file(self.EVAL_TABLE), table.to_csv())

    def eval_summary(self) -> dict | None:
        return self._json_dict(self.EVAL)

    def eval_table(self) -> list[dict] | None:
        """The evaluation table's rows (one dict per intervention), or None when not evaluated."""
        summary = self.eval_summary()
        table = (summary or {}).get("table")
        return table if isinstance(table, list) else None

    def write_generations(self, results: Sequence) -> Path:
        """Every generated answer of every evaluated intervention (`EvalResult`s), one JSON object per line."""
        return files.write_jsonl(self.made().file(self.GENERATIONS), ({"intervention": r.name, "seed": r.meta.get("seed"), **row}
                                                                     for r in results for row in r.rows))

    def generations(self) -> list[dict]:
        return self._jsonl(self.GENERATIONS)

    # -- sweep --------------------------------------------------------------------------------------
    def write_sweep(self, frame: pd.DataFrame, baselines: pd.DataFrame, figure) -> None:
        files.write_text(self.made().file(self.SWEEP), frame.to_csv(index=False))
        files.write_text(self.file(self.SWEEP_BASELINES), baselines.to_csv(index=False))
        files.write_text(self.file(self.TRADEOFF), figure.to_html(include_plotlyjs=True))  # self-contained: opens offline

    def sweep(self) -> tuple[pd.DataFrame, pd.DataFrame | None] | None:
        if not self.has(self.SWEEP):
            return None
        base = pd.read_csv(self.file(self.SWEEP_BASELINES)) if self.has(self.SWEEP_BASELINES) else None
        return pd.read_csv(self.file(self.SWEEP)), base

    def point(self, k_safety: int, k_utility: int) -> "RunFolder":
        """The run folder of one sweep point (its preset, selection and gains), inside this sweep's folder."""
        return RunFolder(self.path / POINTS / f"ks{int(k_safety)}-ku{int(k_utility)}")

    # -- export (a checkpoint folder that also reads as a run folder) -------------------------------------
    def write_model_card(self, text: str) -> Path:
        return files.write_text(self.made().file(self.MODEL_CARD), text)

    def write_export_check(self, check: dict) -> Path:
        return files.write_json(self.made().file(self.EXPORT_CHECK), check, checksum=False)

    def export_check(self) -> dict | None:
        """The reload check an export passed (max logit difference, tolerance, dtype), or None."""
        return self._json_dict(self.EXPORT_CHECK)

    # -- snapshot (a run shipped in the repository) --------------------------------------------------
    def write_snapshot(self, manifest: dict) -> Path:
        return files.write_json(self.made().file(self.SNAPSHOT), manifest, checksum=False, indent=2)

    def snapshot(self) -> dict | None:
        """The snapshot manifest, or None when this folder is not a snapshot (or it is unreadable)."""
        return self._json_dict(self.SNAPSHOT)

    def _json_dict(self, name: str) -> dict | None:
        """A JSON object file of the run, or None when it is missing, unreadable or not an object."""
        if not self.has(name):
            return None
        try:
            value = json.loads(self.file(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _jsonl(self, name: str) -> list[dict]:
        if not self.has(name):
            return []
        with open(self.file(name), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
