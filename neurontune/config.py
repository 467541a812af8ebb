"""Run configuration: frozen dataclasses with defaults, built from a preset file or CLI flags.

A preset (`presets/*.json`) is the JSON form of `RunConfig`; unknown keys are refused so a typo in a
preset never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .attribution import AttributionConfig

PRESETS = Path(__file__).resolve().parent.parent / "presets"


@dataclass(frozen=True)
class DataConfig:
    """Which prompts attribution and tuning see. Evaluation uses the held-out split and families."""

    n_harmful: int = 48  # plain harmful (AdvBench train split) prompts
    n_attack_per_family: int = 12  # harmful prompts wrapped in each training attack family
    train_families: tuple[str, ...] = ("roleplay", "refusal_suppression", "prefix_injection", "developer_mode", "academic")
    heldout_families: tuple[str, ...] = ("hypothetical", "few_shot", "payload_splitting")
    n_benign: int = 48  # benign prompts with a refusal target (over-refusal attribution / penalty)
    n_borderline: int = 32
    n_answer: int = 32  # benign prompts with the model's own answer (benign dependence / KL)
    answer_tokens: int = 24
    test_fraction: float = 0.3
    seed: int = 0
    harmful_file: str | None = None  # optional user files (csv/json/jsonl/parquet with a 'prompt' column)
    benign_file: str | None = None
    borderline_file: str | None = None


@dataclass(frozen=True)
class SelectionConfig:
    k_safety: int = 1500
    k_utility: int = 500
    per_layer_cap: int | None = None
    protect_top: int = 500  # the neurons benign answers depend on most are never amplified
    safety_rank: str = "safety"  # "safety" or "contrast" (safety - over_refusal: harmful-specific neurons)


@dataclass(frozen=True)
class MetaConfig:
    mode: str = "fomaml"  # "fomaml" | "reptile" | "joint"
    steps: int = 60
    inner_steps: int = 1
    inner_lr: float = 0.05
    outer_lr: float = 0.05
    batch_harmful: int = 8
    batch_benign: int = 8
    lam_kl: float = 1.0  # utility preservation: KL(base || modulated) on benign answers
    mu_over_refusal: float = 1.0  # penalty on refusal likelihood of benign/borderline prompts
    constrained: bool = True  # safety gains >= 1, utility gains in [0, 1]
    max_gain: float = 4.0
    patience: int = 8  # early stopping: validation checks without improvement
    eval_every: int = 5
    seed: int = 0
    gate: bool = False  # also fit an input-conditional gate (neurontune/gating.py)
    gate_bias_shift: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    name: str = "custom"
    description: str = ""
    model: str = "embedded"
    data: DataConfig = field(default_factory=DataConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "RunConfig":
        """Copy with some fields of some sections changed: `cfg.replace(selection={"k_safety": 10})`."""
        updates = {}
        for key, value in sections.items():
            current = getattr(self, key)
            updates[key] = dataclasses.replace(current, **value) if dataclasses.is_dataclass(current) and isinstance(value, dict) else value
        return dataclasses.replace(self, **updates)

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        raw = dict(raw)
        sections = {"data": DataConfig, "attribution": AttributionConfig, "selection": SelectionConfig, "meta": MetaConfig}
        kwargs = {}
        for key, value in raw.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value, key)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"Unknown preset key '{key}'. Known: {[f.name for f in dataclasses.fields(cls)]}.")
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def digest(self, *sections: str) -> str:
        """A short hash of some sections (e.g. what attribution depends on), for cache keys and run names."""
        d = self.to_dict()
        return hashlib.sha256(json.dumps({s: d[s] for s in sections}, sort_keys=True).encode()).hexdigest()[:12]


def _build(cls, value: dict, section: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(value) - set(names)
    if unknown:
        raise ValueError(f"Unknown key(s) {sorted(unknown)} in preset section '{section}'. Known: {sorted(names)}.")
    value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return cls(**value)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def load_preset(name_or_path: str) -> RunConfig:
    """A preset by name (`balanced`) or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / f"{name_or_path}.json"
    if not path.exists():
        raise ValueError(f"No preset '{name_or_path}'. Built-in presets: {', '.join(list_presets())}; or give a .json path.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"Preset {path} is not valid JSON: {exc}") from exc
    raw.setdefault("name", path.stem)
    return RunConfig.from_dict(raw)
