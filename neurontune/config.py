"""Every configuration of a run: frozen dataclasses with defaults, built from a preset file or CLI flags, and
the few policies that derive one configuration from another (a quick first look, a prompt count, a smaller model).

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

from .infra import files, resources

PRESETS = resources.presets_dir()


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
    n_benign_attack_per_family: int = 6  # benign prompts wrapped in each training family (negatives: over-refusal)
    val_fraction: float = 0.15  # validation: every choice (early stopping, presets, thresholds, gate bias, sweep)
    test_fraction: float = 0.3  # test: read once per reported table
    seed: int = 0
    n_alarming: int = 32  # safe requests with alarming words (attribution: over-refusal) and as many unsafe twins (safety)
    alarming_pairs: bool = True  # use assets/alarming_pairs.jsonl (safe/unsafe requests in the same words) in every pool
    harmful_file: str | None = None  # optional user files (csv/json/jsonl/parquet with a 'prompt' column)
    benign_file: str | None = None
    borderline_file: str | None = None


@dataclass(frozen=True)
class AttributionConfig:
    method: str = "grad_x_act"  # or "integrated_gradients"
    ig_steps: int = 8
    batch_size: int = 8
    max_length: int = 256

    def __post_init__(self):
        if self.method not in ("grad_x_act", "integrated_gradients"):
            raise ValueError(f"Unknown attribution method '{self.method}'; use grad_x_act or integrated_gradients.")
        if self.ig_steps < 1 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError("ig_steps and batch_size must be at least 1 and max_length at least 8.")


@dataclass(frozen=True)
class SelectionConfig:
    k_safety: int = 1500
    k_utility: int = 500
    per_layer_cap: int | None = None
    protect_top: int = 500  # the neurons benign answers depend on most are never amplified
    safety_rank: str = "safety"  # "safety" or "contrast" (safety - over_refusal: harmful-specific neurons)
    utility_rank: str = "over_refusal"  # "over_refusal" or "contrast" (over_refusal - safety: refusal of harmless prompts only)


KL_ANSWERS = ("benign", "harmless")  # meta.kl_answers


# What an input gate can read (`meta.gate_features`; fitted by `method/gate_fit.py`).
GATE_FEATURES = ("amplified", "layer", "residual", "residual_mean", "residual_tail", "residual_either")


def _check_targets(section: str, n) -> None:
    """A count of refusal targets is a whole number of 1 or more, or null (all of them)."""
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"{section}.refusal_targets must be a count of refusal targets (1 or more) or null for all of them, "
                         f"not {n!r}.")


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
    gate: bool = False  # also fit an input-conditional gate (interventions/gating.py)
    gate_bias_shift: float | None = 0.0  # None: chosen on the validation split (gate_fit.choose_bias_shift)
    gate_max_fpr: float | None = None  # with a chosen shift: the best recall that opens on at most this share of harmless prompts
    gate_sharpness: float = 1.0  # multiplies the gate's logit: > 1 gives unsure prompts less of the modulation
    # What the gate reads: "amplified" (the 256 most amplified neurons, or before training the top selected safety
    # neurons), "layer" (every neuron of the layer whose probe separates validation prompts best), "residual" (the
    # residual stream entering the layer that separates them best, at the prompt's last token), "residual_mean"
    # (the same, averaged over the user's turn), "residual_tail" (averaged over the turn's last 32 tokens) or
    # "residual_either" (both, each at its own layer: the gate opens where either reads harmful)
    gate_features: str = "amplified"
    # Train the gains BEHIND the gate: the gate is fitted first (it reads the unmodulated prompt) and every training
    # prompt gets the gains at the strength the gate reads from it; off: gains first, then a gate fitted on them.
    gate_first: bool = False
    # Also fit the gate on the safety pairs (assets/safety_pairs.jsonl, training only): questions about staying safe
    # from a harm as harmless, requests to cause it in the same words as harmful.
    gate_safety_pairs: bool = False
    # Also train one input-side term per selected neuron along its layer's harm direction (method/conditional.py):
    # a modulation that depends on the input and still folds into the model's own weights.
    conditional: bool = False
    input_lr: float = 0.05  # Adam learning rate of the input-side coefficients
    max_coef: float = 4.0  # input coefficients stay in [-max_coef, max_coef]
    direction_prompts: int = 200  # harmful (and as many harmless) training prompts per direction, plus a tenth per family
    input_from_layer: int = 0  # input-side terms only on layers from this one on (early layers tell harm from form less well)
    refusal_eos: bool = True  # refusal targets end with end-of-turn, so the tuned model stops after refusing
    # The over-refusal penalty reads the whole refusal "target" sentence, or p(the answer "opening" is a refusal);
    # opening_weight > 0 also pushes harmful prompts towards a refusal opening. Both opening terms are opt-in: the
    # default is the whole-sentence penalty (why: docs/log.md).
    over_refusal_span: str = "target"
    opening_weight: float = 0.0
    # Whose answers the KL term keeps: the base model's answers to plain "benign" training prompts, or to every
    # "harmless" kind (benign, borderline-safe, alarming-word, and benign inside the training attack templates), so
    # that a modulation that half-fires on a safe prompt is held to its answer there too.
    kl_answers: str = "benign"
    # Answer tokens at the start of each kept answer that the KL term leaves out: the opening is then left to the
    # refusal and over-refusal terms, and the KL term holds only what follows it.
    kl_skip: int = 0
    # How many of the refusal targets (assets/refusal_targets.json, in file order) the refusal and over-refusal terms
    # use; None: all of them. Gains taught several learn blends of them (why one: docs/method.md).
    refusal_targets: int | None = None

    def __post_init__(self):
        _check_targets("meta", self.refusal_targets)
        if self.gate_features not in GATE_FEATURES:
            raise ValueError(f"meta.gate_features must be one of {', '.join(map(repr, GATE_FEATURES))}, not {self.gate_features!r}.")
        if self.gate_first and not self.gate:
            raise ValueError("meta.gate_first trains the gains behind the input gate: set meta.gate to true as well.")
        if self.kl_answers not in KL_ANSWERS:
            raise ValueError(f"meta.kl_answers must be 'benign' or 'harmless', not {self.kl_answers!r}.")
        if not (isinstance(self.kl_skip, int) and self.kl_skip >= 0):
            raise ValueError(f"meta.kl_skip must be a count of answer tokens (0 or more), not {self.kl_skip!r}.")


FOLD_FORMS = ("none", "static", "conditional", "switch")


@dataclass(frozen=True)
class FoldConfig:
    """The modulation a run exports. A gate cannot be folded into weights, and gains trained behind a gate are not meant
    to work without it; so a gated run can also train a second, foldable modulation without any gate, with its own
    over-refusal and utility terms (the rest as in `meta`). `form`: "none" (export folds the run's own gains),
    "static" (gains only), "conditional" (gains and input-side terms along each layer's harm direction) or "switch"
    (a folded switch in layer `switch_layer`, default the middle one, whose flag the input-side terms of later layers
    read: `method/switch_fit.py`; gated MLPs only; `switch_readers`: the selected neurons of those layers, or all;
    `switch_threshold`: the probe's logit it starts firing at; `switch_mean`: the switch also reads the whole prompt
    through a key-value group of its layer's attention rewritten into a running mean, `interventions/turn_mean.py`;
    `switch_earlier`: a layer before the switch's whose own probe must read harmful too, an AND of two layers)."""

    form: str = "none"
    mu_over_refusal: float = 2.0
    lam_kl: float = 1.0
    steps: int | None = None  # None: meta.steps
    outer_lr: float | None = None  # None: meta.outer_lr
    max_gain: float | None = None  # None: meta.max_gain
    input_lr: float = 0.3
    input_from_layer: int = 0
    switch_layer: int | None = None
    switch_readers: str = "selected"  # which neurons of later layers read the switch's flag: "selected" or "all"
    switch_threshold: float = 0.0  # the probe's logit the switch starts firing at (higher: fires on fewer prompts)
    switch_mean: bool = False  # the switch reads a turn mean of the whole prompt beside the prompt's end
    switch_earlier: int | None = None  # a layer before the switch's: the switch also reads that layer's switch (an AND)
    kl_answers: str | None = None  # None: meta.kl_answers
    kl_skip: int | None = None  # None: meta.kl_skip
    # Train the foldable modulation from this many seeds (meta.seed * seeds + i) and export their average: gains and
    # input coefficients fold linearly, so the average is one checkpoint, less of one training seed's luck.
    seeds: int = 1
    # The refusal targets of the foldable modulation's training, as meta.refusal_targets; None: all of them (not
    # meta's setting: the export was chosen with all eight, and one target is validated for the gated gains only).
    refusal_targets: int | None = None

    def __post_init__(self):
        _check_targets("fold", self.refusal_targets)
        if self.form not in FOLD_FORMS:
            raise ValueError(f"fold.form must be one of {', '.join(repr(f) for f in FOLD_FORMS)}, not {self.form!r}.")
        if self.switch_readers not in ("selected", "all"):
            raise ValueError(f"fold.switch_readers must be 'selected' or 'all', not {self.switch_readers!r}.")
        if not self.switch_threshold >= 0:
            raise ValueError(f"fold.switch_threshold must be a logit of 0 or more, not {self.switch_threshold}.")
        if self.kl_answers is not None and self.kl_answers not in KL_ANSWERS:
            raise ValueError(f"fold.kl_answers must be 'benign', 'harmless' or null, not {self.kl_answers!r}.")
        if not (isinstance(self.seeds, int) and self.seeds >= 1):
            raise ValueError(f"fold.seeds must be a count of training seeds (1 or more), not {self.seeds!r}.")
        if self.kl_skip is not None and not (isinstance(self.kl_skip, int) and self.kl_skip >= 0):
            raise ValueError(f"fold.kl_skip must be a count of answer tokens (0 or more) or null, not {self.kl_skip!r}.")
        if self.switch_layer is not None and self.switch_layer < 0:
            raise ValueError(f"fold.switch_layer must be a layer index (0 or more) or null, not {self.switch_layer}.")
        if self.switch_earlier is not None and not (isinstance(self.switch_earlier, int) and self.switch_earlier >= 0
                                                    and (self.switch_layer is None or self.switch_earlier < self.switch_layer)):
            raise ValueError("fold.switch_earlier must be a layer index before the switch's (fold.switch_layer) or null, not "
                             f"{self.switch_earlier!r}.")
        if self.switch_earlier is not None and self.switch_mean:
            raise ValueError("fold.switch_earlier and fold.switch_mean cannot both be set: a switch reads an earlier switch or a "
                             "turn mean, not both.")

    def meta(self, meta: "MetaConfig") -> "MetaConfig":
        """The training settings of the foldable modulation: `meta` without any gate, with this section's terms."""
        return dataclasses.replace(meta, gate=False, gate_first=False, conditional=self.form in ("conditional", "switch"),
                                   mu_over_refusal=self.mu_over_refusal, lam_kl=self.lam_kl, input_lr=self.input_lr,
                                   input_from_layer=self.input_from_layer,
                                   steps=self.steps if self.steps is not None else meta.steps,
                                   outer_lr=self.outer_lr if self.outer_lr is not None else meta.outer_lr,
                                   max_gain=self.max_gain if self.max_gain is not None else meta.max_gain,
                                   kl_answers=self.kl_answers if self.kl_answers is not None else meta.kl_answers,
                                   kl_skip=self.kl_skip if self.kl_skip is not None else meta.kl_skip,
                                   refusal_targets=self.refusal_targets)


@dataclass(frozen=True)
class EvalConfig:
    """How many held-out prompts of each kind to evaluate, and how long the answers are."""

    n_harmful: int = 40  # plain harmful prompts per phrasing group (imperative, question, context)
    n_per_family: int = 16  # harmful prompts wrapped in each attack family the split may use
    families: tuple[str, ...] | None = None  # None: every family the split may use (held-out ones on test only)
    n_benign: int = 30  # plain benign prompts per phrasing group
    n_borderline: int = 30  # plain borderline-safe prompts per phrasing group
    n_benign_per_family: int = 8  # benign + borderline-safe prompts wrapped in each attack family (over-refusal under templates)
    n_alarming: int = 16  # alarming-word pairs per phrasing group: the safe request (over-refusal) and its unsafe twin (refusal)
    n_ppl: int = 30  # held-out benign prompts scored on the base model's own greedy answers
    n_mc: int | None = None  # None: all of the built-in multiple-choice questions
    mc_style: str = "cloze"  # "cloze": mean log p(choice text | question); "letter": log p(letter | listed choices)
    max_new_tokens: int = 48
    batch_size: int = 16
    repetition_threshold: float = 0.5  # an answer whose distinct-4-gram ratio is below this is degenerate

    def __post_init__(self):
        if self.mc_style not in ("cloze", "letter"):
            raise ValueError(f"Unknown mc_style '{self.mc_style}'; use 'cloze' or 'letter'.")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be at least 1.")


QUICK_EVAL = EvalConfig(n_harmful=12, n_per_family=6, n_benign=12, n_borderline=8, n_benign_per_family=4, n_alarming=6,
                        n_ppl=16, max_new_tokens=40)
# What `evaluate` uses without --quick: sized so that three training seeds, static and gated, fit in about an
# hour on a 2-core CPU (templated prompts are long: a few minutes per intervention). EvalConfig() is larger.
FULL_EVAL = EvalConfig(n_harmful=16, n_per_family=6, n_benign=12, n_borderline=8, n_benign_per_family=3, n_alarming=10,
                       n_ppl=16, max_new_tokens=40)
# The research loop on the validation split: FULL_EVAL's prompts, a 24-token opening pass judged for refusal (on
# tuned models its verdicts equal those of 40 tokens on 98-100 % of rows: docs/results.md) and larger batches.
VALIDATION_EVAL = dataclasses.replace(FULL_EVAL, max_new_tokens=24, batch_size=32)


@dataclass(frozen=True)
class RunConfig:
    name: str = "custom"
    description: str = ""
    model: str = "embedded"
    data: DataConfig = field(default_factory=DataConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    fold: FoldConfig = field(default_factory=FoldConfig)

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
        sections = {"data": DataConfig, "attribution": AttributionConfig, "selection": SelectionConfig, "meta": MetaConfig,
                    "fold": FoldConfig}
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
        """Write the preset JSON (atomically): what `load_preset` reads back."""
        return files.write_json(path, self.to_dict(), checksum=False, indent=2)

    def digest(self, *sections: str) -> str:
        """A short hash of some sections (e.g. what attribution depends on), for cache keys and run names."""
        d = self.to_dict()
        return hashlib.sha256(json.dumps({s: d[s] for s in sections}, sort_keys=True).encode()).hexdigest()[:12]


# Settings that make no sense below a floor (a negative neuron count, zero training steps); the upper
# bound of a neuron count depends on the model and is checked by `selection.check_counts`.
MINIMUM = {("selection", "k_safety"): 0, ("selection", "k_utility"): 0, ("selection", "protect_top"): 0,
           ("selection", "per_layer_cap"): 1, ("meta", "steps"): 1, ("meta", "inner_steps"): 1, ("meta", "eval_every"): 1,
           ("meta", "patience"): 1, ("meta", "batch_harmful"): 1, ("meta", "batch_benign"): 1, ("meta", "max_gain"): 1,
           ("fold", "steps"): 1, ("fold", "max_gain"): 1, ("fold", "input_from_layer"): 0, ("meta", "input_from_layer"): 0}


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


# -- configurations derived from others ---------------------------------------------------------------

def with_prompts(cfg: RunConfig, n: int, *, at_most: bool = False) -> RunConfig:
    """About `n` prompts per attribution group: n harmful, n/4 per attack family, n benign, n/2 borderline,
    n/2 alarming-word pairs and n/2 answers. `at_most`: never more than the preset asks for. The CLI's --n-prompts and the studio's quick
    first look both use this one plan."""
    d = cfg.data
    plan = {"n_harmful": n, "n_attack_per_family": max(1, n // 4), "n_benign": n, "n_borderline": max(1, n // 2),
            "n_answer": max(1, n // 2), "n_alarming": max(1, n // 2)}
    if at_most:
        plan = {k: min(v, getattr(d, k)) for k, v in plan.items()}
    return cfg.replace(data=plan)


QUICK_PROMPTS, QUICK_STEPS = 16, 20


def quick(cfg: RunConfig) -> RunConfig:
    """A first look: the quick prompt plan (at most the preset's) and at most 20 training steps."""
    m = cfg.meta
    return with_prompts(cfg, QUICK_PROMPTS, at_most=True).replace(
        meta={"steps": min(m.steps, QUICK_STEPS), "eval_every": min(m.eval_every, 5)})


PRESET_NEURONS = 46_080  # the built-in presets' counts are written for the embedded model (30 layers x 1536 neurons)


def fit_to_model(cfg: RunConfig, n_neurons: int) -> RunConfig:
    """Scale neuron counts written for the embedded model down to a much smaller model (1500 of 46k neurons is
    12 of 384), when they would select more than a quarter of its neurons; otherwise unchanged."""
    s = cfg.selection
    if s.k_safety + s.k_utility + s.protect_top <= n_neurons // 4:
        return cfg
    scale = lambda k: max(1, round(k * n_neurons / PRESET_NEURONS)) if k else 0  # noqa: E731
    return cfg.replace(selection={"k_safety": scale(s.k_safety), "k_utility": scale(s.k_utility), "protect_top": scale(s.protect_top)})
