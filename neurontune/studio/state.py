"""What the studio keeps: one `Studio` per process (the shared models, job runner, shipped run, folders) and
one `Session` per browser tab (its model, config, scores, selection and gains: two sessions never share gains)."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, fit_to_model, list_presets, load_preset, quick
from ..data.splits import build_splits
from ..eval.neuron_card import CardEngine
from ..infra.files import default_cache_dir
from ..interventions.gating import GateProbe
from ..interventions.modulation import Modulation
from ..interventions.protocol import FORMS, form_of
from ..method.neuron_scores import NeuronScores, cached_scores
from ..method.selection import Selection, select
from ..model.errors import ModelLoadError
from ..model.loading import LoadedModel, load_model
from ..run.folder import RunFolder
from ..run.snapshot import SHIPPED_DIR, Snapshot, SnapshotError, load_snapshot
from ..run.steps import fit_context
from .jobs import JobRunner

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("embedded", "tiny-llama", "tiny-gpt2")


def scores_key(fingerprint: str, cfg: RunConfig) -> str:
    """The name of one model's scores for one data plan and attribution method: sessions (and attribution jobs)
    with the same key share them."""
    return f"{fingerprint}-{cfg.digest('data', 'attribution')}"


@dataclass
class Session:
    """One browser session's work. Lives in a `gr.State`; its methods make every change and keep its rules:

    - the scores, selection, gains, chat and run folder belong to the loaded model: a new model clears them;
    - `scores` are the model's for `cfg`'s data and attribution (`scores_key` follows `cfg`): a config that
      changes either drops them, and with them the selection;
    - `selection` is always `select(scores, cfg.selection)`: None without scores;
    - gains are refused when made for another model; new gains drop the evaluation of the old ones."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    model: str = ""
    fingerprint: str = ""
    shape: tuple[int, int] | None = None  # the model's [n_layers, n_neurons]
    cfg: RunConfig = field(default_factory=RunConfig)
    preset: str = ""
    scores: NeuronScores | None = None
    selection: Selection | None = None
    modulation: Modulation | None = None  # the gains the Compare and Export tabs use
    gate: GateProbe | None = None  # the input gate trained with those gains (Compare applies strength × s), if any
    foldable: Modulation | None = None  # what export folds when the run trained it apart from gated gains (`fold.form`)
    gains_source: str = ""
    run_dir: str | None = None
    eval_rows: list | None = None  # the evaluation of the current gains
    operating_point: tuple[int, int] | None = None  # the (k_safety, k_utility) the gains were made at (marked on the trade-off)
    sweep_dir: str | None = None  # the sweep the trade-off picker reads
    shipped: bool = False  # the session opened on the shipped run (its gains, gate and evaluation)
    jobs: dict = field(default_factory=dict)  # kind -> job id of this session's latest job
    chat: list = field(default_factory=lambda: [[], []])  # [base conversation, modulated conversation]

    @property
    def scores_key(self) -> str | None:
        return scores_key(self.fingerprint, self.cfg) if self.fingerprint else None

    # -- model and configuration ---------------------------------------------------------------
    def load_model(self, lm: LoadedModel, cfg: RunConfig, *, model: str, preset: str,
                   scores: NeuronScores | None = None) -> bool:
        """Use `lm` with `cfg` (and the `scores` known for them, if any). A model other than the current one clears
        everything made for the old one. Returns whether the model changed."""
        changed = lm.fingerprint != self.fingerprint
        if changed:
            self.clear_gains()
            self.scores = self.selection = self.run_dir = self.sweep_dir = None
            self.chat, self.shipped = [[], []], False
        self.model, self.fingerprint, self.shape, self.preset = model, lm.fingerprint, tuple(lm.shape), preset
        self.configure(cfg, scores)
        return changed

    def configure(self, cfg: RunConfig, scores: NeuronScores | None = None) -> None:
        """A new config for the loaded model. Scores made for another data plan or method are dropped unless
        `scores` (made for `cfg`) are given; the selection follows `cfg.selection`."""
        same = self.fingerprint and scores_key(self.fingerprint, cfg) == self.scores_key
        self.cfg = cfg
        if scores is not None:
            self._check_scores(scores)
            self.scores = scores
        elif not same:
            self.scores = None
        self._select()

    def set_training(self, **meta) -> None:
        """Training settings (meta-learning mode, steps, loss weights); ValueError / TypeError leave them as they were."""
        self.cfg = self.cfg.replace(meta=meta)

    # -- scores and selection --------------------------------------------------------------------
    def adopt_scores(self, scores: NeuronScores, cfg: RunConfig | None = None) -> None:
        """Scores made for `cfg` (a run's: its data, attribution and selection settings are taken) or, without it,
        for the session's own config; the selection is made from them."""
        self._check_scores(scores)
        if cfg is not None:
            self.cfg = self.cfg.replace(data=cfg.data, attribution=cfg.attribution, selection=cfg.selection)
        self.scores = scores
        self._select()

    def reselect(self, k_safety=None, k_utility=None, protect_top=None) -> float:
        """New thresholds (None keeps one): the selection is made again from the scores. Returns milliseconds taken;
        `SelectionError`, ValueError or TypeError leave the session as it was."""
        s = self.cfg.selection
        new = dataclasses.replace(s, k_safety=int(k_safety if k_safety is not None else s.k_safety),
                                  k_utility=int(k_utility if k_utility is not None else s.k_utility),
                                  protect_top=int(protect_top if protect_top is not None else s.protect_top))
        start = time.perf_counter()
        selection = select(self.scores, new) if self.scores is not None else None
        self.cfg, self.selection = self.cfg.replace(selection=new), selection
        return (time.perf_counter() - start) * 1000

    def _select(self) -> None:
        self.selection = select(self.scores, self.cfg.selection) if self.scores is not None else None

    def _check_scores(self, scores: NeuronScores) -> None:
        if self.shape is not None and tuple(scores.shape) != self.shape:
            raise ValueError(f"These neuron scores are for {tuple(scores.shape)} neurons; the model has {self.shape}.")

    # -- gains -----------------------------------------------------------------------------------
    def set_gains(self, mod: Modulation, source: str, *, gate: GateProbe | None = None, run_dir: str | None = None,
                  point: tuple[int, int] | None = None, foldable: Modulation | None = None) -> None:
        """The session's gains (and their gate: None for fixed gains or gains without one; and the modulation the run
        trained apart for export, if any); `point`: the (k_safety, k_utility) they were made at, marked on the
        trade-off plot (None: unknown, e.g. a file). Gains made for another model are refused (ValueError); the
        evaluation of the previous gains is dropped."""
        for m in (mod, foldable):
            if m is None:
                continue
            if m.fingerprint and self.fingerprint and m.fingerprint != self.fingerprint:
                raise ValueError(f"These gains were made for model {m.fingerprint}, not the loaded model {self.fingerprint}.")
            if self.shape is not None and tuple(m.shape) != self.shape:
                raise ValueError(f"These gains are for {tuple(m.shape)} neurons; the model has {self.shape}.")
        self.modulation, self.gate, self.gains_source, self.run_dir, self.eval_rows = mod, gate, source, run_dir, None
        self.foldable = foldable
        self.operating_point = None if point is None else (int(point[0]), int(point[1]))

    def keep_run(self, run_dir: str) -> None:
        """The run folder that now holds the session's gains (saved there to be evaluated)."""
        self.run_dir = run_dir

    def evaluated(self, run_dir: str, rows: list | None) -> None:
        """The evaluation of the gains saved in `run_dir`: kept only while those are still the session's gains."""
        if run_dir == self.run_dir:
            self.eval_rows = rows

    def clear_gains(self) -> None:
        self.modulation, self.gate, self.gains_source, self.eval_rows, self.operating_point = None, None, "", None, None
        self.foldable = None

    @property
    def exported(self) -> Modulation | None:
        """What Export folds (and Compare shows with the gate off): the foldable modulation, else the gains."""
        return self.foldable or self.modulation

    def tuned_side(self, use_gate: bool) -> tuple[Modulation | None, GateProbe | None, str]:
        """What the tuned side of Compare (chat and bulk) applies: (modulation, gate or None, the form's name in the
        vocabulary of `generate` and the evaluation tables). With the gate: the gains behind it; without: what Export
        folds."""
        if self.gate is not None and use_gate:
            return self.modulation, self.gate, FORMS["gated"]
        return self.exported, None, FORMS[form_of(self.exported) or "static"] + " — what Export writes"

    def adopt_point(self, mod: Modulation, k_safety: int, k_utility: int, source: str, gate: GateProbe | None = None) -> None:
        """A sweep point: its gains (with the gate it was trained behind, if any) and the selection at its
        thresholds, together (a ValueError from either leaves the session as it was)."""
        before = self.cfg, self.selection
        self.reselect(k_safety, k_utility)
        try:
            self.set_gains(mod, source, gate=gate, point=(k_safety, k_utility))
        except ValueError:
            self.cfg, self.selection = before
            raise

    def adopt_shipped(self, snap: Snapshot) -> None:
        """The shipped run: its config, scores and selection, its gains with their gate, and its evaluation."""
        self.configure(snap.cfg.replace(model=self.model), snap.scores)
        s = self.cfg.selection
        self.set_gains(snap.modulation, f"the shipped `{snap.cfg.name}` run's trained gains", gate=snap.gate,
                       point=(s.k_safety, s.k_utility), foldable=snap.foldable)
        self.eval_rows, self.shipped = snap.eval_rows, True


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
    """Process-wide state: models, jobs, the shipped run, neuron-card engines and the folders the studio writes to.
    Scores are the engine's (`method.neuron_scores`' cache) or a run's; sessions hold the ones they use."""

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
        """The state of every new session, a page's or an API client's alike: the default model and preset (the
        model is already loaded), on the shipped run (its scores, gains, gate and evaluation) when there is a
        current one for this model and preset."""
        s = Session(model=self.default_model, preset=self.default_preset)
        try:
            lm = self.models.get(self.default_model)
            cfg = self.config(self.default_preset, self.default_model, quick_mode=self.quick_default,
                              n_neurons=lm.shape[0] * lm.shape[1])
        except (ModelLoadError, ValueError) as exc:  # shown by the Model tab; the session still opens
            log.warning("Default model/preset unavailable: %s", exc)
            return s
        s.load_model(lm, cfg, model=self.default_model, preset=self.default_preset)
        if (snap := self.shipped(lm)) is not None:
            s.adopt_shipped(snap)
        return s

    def known_scores(self, lm: LoadedModel, cfg: RunConfig) -> NeuronScores | None:
        """Scores already made for this model and config: the shipped run's, or the engine's cached attribution
        (what an attribution job leaves); None when they would have to be computed, or the prompts cannot be planned
        yet (a data problem is reported by the attribution that needs them)."""
        with self._lock:
            snap = self._shipped
        if snap is not None and scores_key(snap.manifest.get("fingerprint", ""), snap.cfg) == scores_key(lm.fingerprint, cfg):
            return snap.scores
        try:
            return cached_scores(lm, fit_context(lm, cfg), cache_dir=self.cache_dir)
        except (ValueError, OSError):
            return None

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
        engine = CardEngine(self.model(session), session.scores, build_splits(session.cfg.data), cache_dir=self.cache_dir)
        with self._lock:
            engine = self._cards.setdefault(key, engine)
            while len(self._cards) > 2:
                self._cards.popitem(last=False)
        return engine

    def model(self, session: Session) -> LoadedModel:
        return self.models.get(session.model or self.default_model)
