"""What the studio keeps: one `Studio` per process (the shared models, job runner, score cache, folders) and
one `Session` per browser tab (its config, selection and gains: two sessions never share gains)."""
from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, fit_to_model, list_presets, load_preset, quick
from ..data.splits import build_splits
from ..eval.neuron_card import CardEngine
from ..infra import files
from ..infra.files import default_cache_dir
from ..interventions.gating import GateProbe
from ..interventions.modulation import Modulation
from ..method.neuron_scores import NeuronScores
from ..method.selection import Selection
from ..model.errors import ModelLoadError
from ..model.loading import LoadedModel, load_model
from ..run.folder import RunFolder
from ..run.snapshot import SHIPPED_DIR, Snapshot, SnapshotError, load_snapshot
from .jobs import JobRunner

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("embedded", "tiny-llama", "tiny-gpt2")


@dataclass
class Session:
    """One browser session's work. Lives in a `gr.State`; handlers mutate it in place."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    model: str = ""
    fingerprint: str = ""
    cfg: RunConfig = field(default_factory=RunConfig)
    preset: str = ""
    scores_key: str | None = None
    selection: Selection | None = None
    modulation: Modulation | None = None  # the gains the Compare and Export tabs use
    gate: GateProbe | None = None  # the input gate trained with those gains (Compare applies strength × s), if any
    gains_source: str = ""
    run_dir: str | None = None
    jobs: dict = field(default_factory=dict)  # kind -> job id of this session's latest job
    chat: list = field(default_factory=lambda: [[], []])  # [base conversation, modulated conversation]
    eval_rows: list | None = None
    operating_point: tuple[int, int] | None = None  # the (k_safety, k_utility) the gains were made at (marked on the trade-off)
    sweep_dir: str | None = None  # the sweep the trade-off picker reads
    shipped: bool = False  # the session opened on the shipped run (its gains, gate and evaluation)

    def clear_gains(self) -> None:
        self.modulation, self.gate, self.gains_source, self.eval_rows, self.operating_point = None, None, "", None, None


class ModelPool:
    """Models shared by every session, loaded once each; at most `capacity` kept (the default never evicted).
    A failed load raises `ModelLoadError` and leaves the pool as it was."""

    def __init__(self, default: str, capacity: int = 2, device: str | None = None, cache_dir: Path | None = None):
        self.default, self.capacity, self.device, self.cache_dir = default, capacity, device, cache_dir
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, name: str, trust_remote_code: bool = False) -> LoadedModel:
        name = (name or self.default).strip()
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            gate = self._loading.setdefault(name, threading.Lock())
        with gate:  # two sessions asking for one new model load it once
            with self._lock:
                if name in self._models:
                    return self._models[name]
            lm = load_model(name, device=self.device, trust_remote_code=trust_remote_code, cache_dir=self.cache_dir)
            with self._lock:
                self._models[name] = lm
                while len(self._models) > self.capacity:
                    victim = next((k for k in self._models if k != self.default and k != name), None)
                    if victim is None:
                        break
                    del self._models[victim]
            return lm

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)


class Studio:
    """Process-wide state: models, jobs, cached scores and the folders the studio writes to."""

    def __init__(self, model: str = "embedded", preset: str = "balanced", *, quick_default: bool = True,
                 cache_dir: str | Path | None = None, runs_dir: str | Path = "runs/studio", export_root: str | Path = "exports",
                 device: str | None = None, chat_limit: int = 4, max_models: int = 2,
                 snapshot: str | Path | None = SHIPPED_DIR):
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.runs_dir, self.export_root = Path(runs_dir), Path(export_root)
        self.default_model, self.default_preset, self.quick_default = model, preset, quick_default
        self.chat_limit = chat_limit
        self.models = ModelPool(model, max_models, device, self.cache_dir)
        self.runner = JobRunner(self.cache_dir / "studio")
        self._scores: OrderedDict[str, NeuronScores] = OrderedDict()
        self._lock = threading.Lock()
        self.snapshot_dir = Path(snapshot) if snapshot else None
        self._shipped: Snapshot | None = None
        self._shipped_checked = False
        self._cards: OrderedDict[str, CardEngine] = OrderedDict()

    # -- configuration -------------------------------------------------------------------------
    def presets(self) -> list[str]:
        return list_presets() or ["default"]

    def config(self, preset: str | None, model: str, *, quick_mode: bool, n_neurons: int | None = None) -> RunConfig:
        """The run config a session starts from: preset (name or .json path) -> quick -> fitted to the model."""
        preset = preset or self.default_preset
        cfg = RunConfig(name="default") if preset == "default" else load_preset(preset)
        cfg = cfg.replace(model=model)
        if quick_mode:
            cfg = quick(cfg)
        return fit_to_model(cfg, n_neurons) if n_neurons else cfg

    def new_session(self) -> Session:
        """The state of a new browser tab: the default model and preset (the model is already loaded), opened
        on the shipped run when there is a current one for this model and preset."""
        s = Session(model=self.default_model, preset=self.default_preset)
        try:
            lm = self.models.get(self.default_model)
            s.fingerprint = lm.fingerprint
            s.cfg = self.config(self.default_preset, self.default_model, quick_mode=self.quick_default,
                                n_neurons=lm.shape[0] * lm.shape[1])
        except (ModelLoadError, ValueError) as exc:  # shown by the Model tab; the session still opens
            log.warning("Default model/preset unavailable: %s", exc)
            return s
        if (snap := self.shipped(lm)) is not None:
            s.cfg, s.shipped = snap.cfg.replace(model=self.default_model), True
            s.scores_key = self.scores_key(lm, s.cfg)
        return s

    def shipped(self, lm: LoadedModel) -> Snapshot | None:
        """The shipped run (`run.snapshot`) when it was made on this model with the default preset as it is
        today; None otherwise (a stale one is logged with the command that regenerates it). Read once."""
        with self._lock:
            if self._shipped_checked:
                snap = self._shipped
                return snap if snap is not None and snap.manifest.get("fingerprint") == lm.fingerprint else None
        snap = None
        folder = self.snapshot_dir
        if folder is not None and folder.is_dir() and lm.name == self.default_model:
            try:
                manifest = RunFolder(folder).snapshot() or {}
                if manifest.get("preset") == self.default_preset and manifest.get("model") == lm.name:  # else not meant for this page
                    snap = load_snapshot(folder, lm)
            except (SnapshotError, OSError, ValueError) as exc:
                log.warning("Not opening on the shipped run: %s", exc)
        with self._lock:
            self._shipped, self._shipped_checked = snap, True
        return snap

    def card_engine(self, session: Session) -> CardEngine:
        """The neuron-card engine of the session's model and scores (shared by sessions on the same run)."""
        key = session.scores_key or ""
        with self._lock:
            if key in self._cards:
                self._cards.move_to_end(key)
                return self._cards[key]
        engine = CardEngine(self.model(session), self.scores(key), build_splits(session.cfg.data), cache_dir=self.cache_dir)
        with self._lock:
            engine = self._cards.setdefault(key, engine)
            while len(self._cards) > 2:
                self._cards.popitem(last=False)
        return engine

    def model(self, session: Session) -> LoadedModel:
        return self.models.get(session.model or self.default_model)

    # -- scores (shared: every session of one model and data plan reads one copy) ---------------
    @staticmethod
    def scores_key(lm: LoadedModel, cfg: RunConfig) -> str:
        return f"{lm.fingerprint}-{cfg.digest('data', 'attribution')}"

    def put_scores(self, key: str, scores: NeuronScores) -> None:
        with self._lock:
            self._scores[key] = scores
            self._scores.move_to_end(key)
            while len(self._scores) > 4:
                self._scores.popitem(last=False)

    def scores(self, key: str | None) -> NeuronScores | None:
        """Scores in memory, the shipped run's, or those a finished attribution job (this or an earlier process) saved."""
        if key is None:
            return None
        with self._lock:
            if key in self._scores:
                return self._scores[key]
            snap = self._shipped
        if snap is not None and key == f"{snap.manifest.get('fingerprint')}-{snap.cfg.digest('data', 'attribution')}":
            return snap.scores
        job = self.runner.latest("attribution", key=key)
        path = Path(job.info.get("scores", "")) if job is not None else None
        if path is not None and path.is_file():
            blob = files.read_bytes(path, "studio scores")  # checked against its sidecar checksum
            if blob is None:
                return None  # bad or half-written: recomputed (from the attribution cache), never trusted
            try:
                scores = NeuronScores.from_bytes(blob)
            except Exception as exc:  # noqa: BLE001
                files.warn_bad(path, f"unreadable: {exc}", "studio scores")
                return None
            self.put_scores(key, scores)
            return scores
        return None

    def session_dir(self, session: Session) -> Path:
        path = self.runs_dir / f"session-{session.id}"
        path.mkdir(parents=True, exist_ok=True)
        session.run_dir = str(path)
        return path
