"""Run configuration: frozen dataclasses with defaults, built from a preset file or CLI flags.

A preset (`presets/*.json`) is the JSON form of `RunConfig`; unknown keys are refused so a typo in a
preset never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import numbers
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
    refusal_eos: bool = True  # refusal targets end with end-of-turn, so the tuned model stops after refusing


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
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                value = dataclasses.replace(current, **_checked(type(current), value, key))
            updates[key] = value
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
                kwargs[key] = _value("(top level)", next(f for f in dataclasses.fields(cls) if f.name == key), value)
            else:
                raise ValueError(f"Unknown preset key '{key}'{_did_you_mean(key, [f.name for f in dataclasses.fields(cls)])}. "
                                 f"Known: {[f.name for f in dataclasses.fields(cls)]}. Fix or remove it.")
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


# Settings that make no sense below a floor (a negative neuron count, zero training steps); the upper
# bound of a neuron count depends on the model and is checked by `selection.check_counts`.
MINIMUM = {("selection", "k_safety"): 0, ("selection", "k_utility"): 0, ("selection", "protect_top"): 0,
           ("selection", "per_layer_cap"): 1, ("meta", "steps"): 1, ("meta", "inner_steps"): 1, ("meta", "eval_every"): 1,
           ("meta", "patience"): 1, ("meta", "batch_harmful"): 1, ("meta", "batch_benign"): 1, ("meta", "max_gain"): 1}


def _did_you_mean(key: str, known) -> str:
    near = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _value(section: str, f: dataclasses.Field, value):
    """`value` checked against the field's annotated type and floor; lists become tuples. Raises ValueError."""
    kind = str(f.type).replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    where = f"'{f.name}' in preset section '{section}'"
    if value is None and optional:
        return value
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{where} must be a whole number{' or null' if optional else ''}, not {value!r}.")
        value = int(value)
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, not {value!r}.")
    elif kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, not {value!r}.")
    elif kind == "str" and not isinstance(value, str):
        raise ValueError(f"{where} must be a string{' or null' if optional else ''}, not {value!r}.")
    elif kind.startswith("tuple[str"):
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where} must be a list of strings, not {value!r}.")
        value = tuple(value)
    floor = MINIMUM.get((section, f.name))
    if floor is not None and value < floor:
        what = "a number of neurons" if section == "selection" else "a setting"
        raise ValueError(f"{where} must be at least {floor:g} ({what}), not {value!r}.")
    return value


def _checked(cls, value: dict, section: str) -> dict:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in preset section '{section}'{_did_you_mean(unknown[0], names)}. "
                         f"Known: {sorted(names)}. Fix or remove them.")
    return {k: _value(section, names[k], v) for k, v in value.items()}


def _build(cls, value: dict, section: str):
    if not isinstance(value, dict):
        raise ValueError(f"Preset section '{section}' must be a JSON object of settings, not {value!r}.")
    return cls(**_checked(cls, value, section))


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"Preset {path} is not valid JSON: {exc}. Fix the file (compare with presets/balanced.json).") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"Preset {path} must hold a JSON object (like presets/balanced.json), not {type(raw).__name__}.")
    raw.setdefault("name", path.stem)
    return RunConfig.from_dict(raw)
