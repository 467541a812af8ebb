"""One neuron, explained: the engine of the studio's neuron card and of `python -m neurontune neuron`.

A researcher clicking a neuron wants what a feature dashboard gives: its scores (every kind, every attack
family) with its rank among all neurons; which prompts of the run's pools make it fire (its activation at
the prompt's last token, where the answer starts and where the input gate reads); which tokens its output
column writes towards through the unembedding; and what a refusal does when it alone is silenced (gain 0),
left alone (1) or set to its tuned gain: the first-token refusal probability of a few held-out prompts,
one batched forward for all gains. `CardEngine` computes the costly parts once per model and run (every pool
prompt's activations, cached on disk; the base refusal) and memoises each card, so a click costs one forward.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..data.chat import chat_prompt
from ..data.splits import Splits
from ..infra import files
from ..infra.files import default_cache_dir
from ..interventions.capture import last_token
from ..interventions.modulation import Modulation, modulate
from ..method.neuron_scores import NeuronScores
from ..model.neuron_map import final_norm
from .proxy import refusal_proxy

EFFECT_SPLIT = "validation"  # the split the effect prompts come from (never the test split: that is read once per table)
POOL_PER_SET = 24  # plain harmful and benign prompts the activations are read on (+ attacked and borderline-safe)
MAX_PROMPT_TOKENS = 256


@dataclass(frozen=True)
class PoolPrompt:
    """A prompt the card reads the neuron's activation on. label: "harmful" or "harmless"."""

    text: str
    label: str
    group: str  # "harmful", "attack: roleplay", "benign", "borderline-safe"


@dataclass(frozen=True)
class ScoreRow:
    kind: str
    value: float
    rank: int  # 1 = the highest value of this kind over every neuron of the model
    of: int  # how many neurons are ranked


@dataclass(frozen=True)
class EffectRow:
    prompt: str
    label: str
    refusal: dict[str, float]  # gain label ("0", "1", "tuned ×2.31") -> first-token refusal probability


@dataclass
class NeuronCard:
    layer: int
    index: int
    role: str  # a value of `selection.ROLES`, or "" (not selected)
    gain: float | None  # the session's tuned gain of this neuron (None: no gains)
    scores: list[ScoreRow]
    activations: list[tuple[PoolPrompt, float]]  # every pool prompt, highest activation first
    promoted: list[tuple[str, float]]  # tokens the output column pushes up (logit-lens value), strongest first
    suppressed: list[tuple[str, float]]  # tokens it pushes down, strongest first
    effect: list[EffectRow]
    gains: list[str]  # the gain labels of `effect`, in order
    split: str = EFFECT_SPLIT
    seconds: dict[str, float] = field(default_factory=dict)

    def top(self, k: int = 8) -> list[tuple[PoolPrompt, float]]:
        return self.activations[:k]

    def bottom(self, k: int = 8) -> list[tuple[PoolPrompt, float]]:
        return self.activations[-k:][::-1]

    def score(self, kind: str) -> ScoreRow | None:
        return next((r for r in self.scores if r.kind == kind), None)

    def mean_refusal(self, gain: str) -> float:
        values = [r.refusal[gain] for r in self.effect if gain in r.refusal]
        return sum(values) / len(values) if values else float("nan")

    def to_text(self, k: int = 5) -> str:
        """The card as plain text (what the CLI prints)."""
        head = f"Neuron {self.layer}:{self.index}" + (f" — {self.role}" if self.role else "") + (
            f", tuned gain {self.gain:.3f}" if self.gain is not None else "")
        lines = [head, "", "Scores (rank among all neurons, 1 = highest):"]
        lines += [f"  {r.kind:<28} {r.value:+.4g}  rank {r.rank:,} of {r.of:,}" for r in self.scores]
        for title, rows in (("Highest activations (last prompt token):", self.top(k)), ("Lowest activations:", self.bottom(k))):
            lines += ["", title] + [f"  {a:+8.3f}  [{p.group}] {_short(p.text)}" for p, a in rows]
        lines += ["", "Tokens its output column promotes (logit lens through the final norm): "
                  + ", ".join(f"{t!r} {v:+.2f}" for t, v in self.promoted),
                  "Tokens it suppresses: " + ", ".join(f"{t!r} {v:+.2f}" for t, v in self.suppressed), "",
                  f"First-token refusal probability, this neuron alone at each gain ({self.split} split):",
                  "  " + " | ".join(f"{g:>12}" for g in self.gains) + " | prompt"]
        lines += ["  " + " | ".join(f"{r.refusal[g]:>12.3f}" for g in self.gains) + f" | [{r.label}] {_short(r.prompt)}"
                  for r in self.effect]
        return "\n".join(lines)


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# -- the parts ------------------------------------------------------------------------------------
def card_pools(splits: Splits, n: int = POOL_PER_SET) -> list[PoolPrompt]:
    """The prompts the card ranks by activation: the run's training pools (what attribution read): `n` plain
    harmful, 2 per training attack family, `n` benign and `n // 2` borderline-safe."""
    out = [PoolPrompt(p.text, "harmful", "harmful") for p in splits.harmful_train[:n]]
    out += [PoolPrompt(p.text, "harmful", f"attack: {p.family}") for p in splits.attacked_train(2)]
    out += [PoolPrompt(p.text, "harmless", "benign") for p in splits.benign_train[:n]]
    out += [PoolPrompt(p.text, "harmless", "borderline-safe") for p in splits.borderline_train[: max(1, n // 2)]]
    return out


def effect_prompts(splits: Splits, n_harmful: int = 2, n_benign: int = 1, split: str = EFFECT_SPLIT) -> list[PoolPrompt]:
    """Prompts the card's refusal effect is measured on: validation prompts, never seen by attribution or training
    (and never the test split, which is read once per reported table)."""
    return ([PoolPrompt(p.text, "harmful", "harmful") for p in splits.harmful[split][:n_harmful]]
            + [PoolPrompt(p.text, "harmless", "benign") for p in splits.benign[split][:n_benign]])


def score_rows(scores: NeuronScores, layer: int, index: int) -> list[ScoreRow]:
    """Every score kind of the neuron with its rank (1 = highest) among all neurons of the model."""
    rows = []
    for kind in _kind_order(scores.kinds):
        s = scores[kind].float()
        v = s[layer, index]
        rows.append(ScoreRow(kind, float(v), int((s > v).sum()) + 1, s.numel()))
    return rows


def _kind_order(kinds: Sequence[str]) -> list[str]:
    first = ["safety", "over_refusal", "benign_dependence", "safety/plain"]
    last = ["over_refusal/benign", "over_refusal/borderline", "act_harmful", "act_benign"]
    middle = sorted(k for k in kinds if k not in first + last)
    return [k for k in first if k in kinds] + middle + [k for k in last if k in kinds]


@torch.no_grad()
def logit_lens(lm, layer: int, index: int) -> torch.Tensor:
    """[vocab] what one unit of the neuron's activation writes towards, read through the unembedding:
    `lm_head(final_norm(w)) - lm_head(final_norm(0))` with w = W_down[:, index], the column the neuron adds to
    the residual stream. For RMSNorm (gain γ) that is W_U (γ ⊙ w) / rms(w); for LayerNorm W_U (γ ⊙ (w - mean w))
    / std(w): the order of W_U @ W_down[:, i] through the final norm's gain, up to a positive factor (biases
    cancel). The direct path only: later layers are ignored. A negative activation writes the opposite."""
    w = lm.nmap.weight_slice(layer)[index].detach()
    head = lm.model.get_output_embeddings()
    x = torch.stack([w, torch.zeros_like(w)])[:, None, :].to(head.weight.device, head.weight.dtype)  # [2, 1, d_model]
    y = head(final_norm(lm.model)(x))[:, 0].float()
    return (y[0] - y[1]).cpu()[: len(lm.tokenizer)]


def promoted_tokens(lm, layer: int, index: int, k: int = 10) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(promoted, suppressed): the top-k and bottom-k tokens of `logit_lens`, decoded, strongest first."""
    logits = logit_lens(lm, layer, index)
    k = min(k, logits.numel())
    up, down = torch.topk(logits, k), torch.topk(-logits, k)
    decode = lambda i: lm.tokenizer.decode([int(i)])  # noqa: E731
    return ([(decode(i), float(v)) for v, i in zip(up.values, up.indices)],
            [(decode(i), float(-v)) for v, i in zip(down.values, down.indices)])


def last_token_activations(lm, texts: Sequence[str], batch_size: int = 16, max_length: int = MAX_PROMPT_TOKENS) -> torch.Tensor:
    """[n, n_layers, n_neurons] float16: every MLP neuron's activation at each formatted prompt's last token
    (where the answer starts), unmodulated, in one pass over the prompts."""
    return last_token(lm, texts, "neurons", batch_size=batch_size, max_length=max_length, dtype=torch.float16)


def single_neuron(lm, layer: int, index: int, gain: float) -> Modulation:
    """A modulation that sets one neuron's gain and leaves every other neuron alone."""
    return Modulation(tuple(lm.shape), {int(layer): (torch.tensor([int(index)]), torch.tensor([float(gain)]))},
                      lm.fingerprint, {"kind": "single neuron", "layer": int(layer), "index": int(index), "gain": float(gain)})


@dataclass
class _RowGains:
    """Per-row gains as an intervention (`.apply(lm)`): row r of the one batch gets `rows[r]`."""

    rows: list

    def apply(self, lm):
        return modulate(lm.model, self.rows, lm.nmap)


def refusal_effect(lm, layer: int, index: int, gains: Sequence[float], prompts: Sequence[str]) -> torch.Tensor:
    """[len(gains), len(prompts)] first-token refusal probability (`proxy.refusal_proxy`) of each user prompt
    with this neuron alone at each gain; every gain and prompt in ONE batched forward (per-row gains)."""
    rows = [(g, p) for g in gains for p in prompts]
    if not rows:
        return torch.zeros(len(gains), len(prompts))
    mods = [single_neuron(lm, layer, index, g) for g, _ in rows]
    probs = refusal_proxy(lm, _RowGains(mods), [p for _, p in rows], batch_size=len(rows))
    return probs.view(len(gains), len(prompts))


def role_of(selection, layer: int, index: int) -> str:
    """What a `Selection` does with the neuron (`selection.ROLES`), or "" (not selected, or no selection)."""
    return "" if selection is None else selection.role(layer, index)


def gain_label(gain: float, tuned: bool = False) -> str:
    return f"tuned ×{gain:.2f}" if tuned else {0.0: "0 (silenced)", 1.0: "1 (base)"}.get(float(gain), f"×{gain:g}")


# -- the engine -----------------------------------------------------------------------------------
class CardEngine:
    """Neuron cards for one model, one run's scores and its prompt splits. The pool activations are
    computed once (and cached on disk under `cache_dir`, keyed by the model and the prompts); every card
    is memoised by (layer, index, gain, role). Thread-safe: studio sessions share one engine per run."""

    def __init__(self, lm, scores: NeuronScores, splits: Splits, *, cache_dir: str | Path | None = None,
                 n_pool: int = POOL_PER_SET, max_cards: int = 256):
        if tuple(scores.shape) != tuple(lm.shape):
            raise ValueError(f"These scores are for {tuple(scores.shape)} neurons, the model has {tuple(lm.shape)}: "
                             "load the model the run was made on.")
        self.lm, self.scores = lm, scores
        self.pool = card_pools(splits, n_pool)
        self.effect = effect_prompts(splits)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.max_cards = max_cards
        self._acts: torch.Tensor | None = None
        self._base: torch.Tensor | None = None  # [n_effect] refusal probability of the base model (gain 1)
        self._lock, self._acts_lock = threading.Lock(), threading.Lock()
        self._cards: OrderedDict[tuple, NeuronCard] = OrderedDict()

    @property
    def ready(self) -> bool:
        """True once the pool activations are in memory (the first card no longer pays for them)."""
        return self._acts is not None

    def _cache_path(self) -> Path:
        texts = [chat_prompt(self.lm.tokenizer, p.text) for p in self.pool]
        key = hashlib.sha256(json.dumps([self.lm.fingerprint, MAX_PROMPT_TOKENS, texts]).encode()).hexdigest()[:20]
        return self.cache_dir / "card_activations" / f"{key}.safetensors"

    def activations(self) -> torch.Tensor:
        """[n_pool, n_layers, n_neurons] float16 activations of every pool prompt (computed once, cached)."""
        with self._acts_lock:
            if self._acts is None:
                self._acts = self._load_or_compute()
            return self._acts

    def _load_or_compute(self) -> torch.Tensor:
        from safetensors.torch import load, save_file
        path = self._cache_path()
        if (blob := files.read_bytes(path, "card activations")) is not None:  # verified against its checksum
            try:
                acts = load(blob)["acts"]
                if tuple(acts.shape) == (len(self.pool), *self.lm.shape):
                    return acts
            except Exception as exc:  # noqa: BLE001 - a bad entry is recomputed, never trusted
                files.warn_bad(path, f"unreadable: {exc}", "card activations")
        acts = last_token_activations(self.lm, [chat_prompt(self.lm.tokenizer, p.text) for p in self.pool])
        files.write_file(path, lambda tmp: save_file({"acts": acts.contiguous()}, str(tmp)))
        return acts

    def base_refusal(self) -> torch.Tensor:
        """[n_effect] first-token refusal probability of the effect prompts on the base model (gain 1), computed once."""
        with self._acts_lock:
            if self._base is None:
                self._base = refusal_proxy(self.lm, None, [p.text for p in self.effect], batch_size=len(self.effect))
            return self._base

    def card(self, layer: int, index: int, *, gain: float | None = None, role: str = "", k_tokens: int = 10) -> NeuronCard:
        """The card of neuron (layer, index); `gain`: its tuned gain (adds a column to the refusal effect)."""
        n_layers, n_neurons = self.lm.shape
        if not (0 <= int(layer) < n_layers and 0 <= int(index) < n_neurons):
            raise ValueError(f"No neuron {layer}:{index}: this model has layers 0–{n_layers - 1} and neurons 0–{n_neurons - 1} per layer.")
        layer, index = int(layer), int(index)
        gain = None if gain is None else round(float(gain), 4)
        key = (layer, index, gain, role, k_tokens)
        with self._lock:
            if key in self._cards:
                self._cards.move_to_end(key)
                return self._cards[key]
        seconds = {}
        start = time.perf_counter()
        acts = self.activations()[:, layer, index].float()
        seconds["activations"] = time.perf_counter() - start
        order = torch.argsort(acts, descending=True, stable=True)
        t = time.perf_counter()
        promoted, suppressed = promoted_tokens(self.lm, layer, index, k_tokens)
        seconds["tokens"] = time.perf_counter() - t
        t = time.perf_counter()
        gains = [0.0, 1.0] + ([gain] if gain is not None and gain not in (0.0, 1.0) else [])
        labels = [gain_label(g, tuned=(i == 2)) for i, g in enumerate(gains)]
        changed = [g for g in gains if g != 1.0]  # gain 1 is the base model: measured once per engine
        probs = dict(zip(changed, refusal_effect(self.lm, layer, index, changed, [p.text for p in self.effect])))
        probs[1.0] = self.base_refusal()
        seconds["effect"] = time.perf_counter() - t
        effect = [EffectRow(p.text, p.label, {lab: float(probs[g][j]) for g, lab in zip(gains, labels)}) for j, p in enumerate(self.effect)]
        card = NeuronCard(layer, index, role, gain, score_rows(self.scores, layer, index),
                          [(self.pool[int(i)], float(acts[i])) for i in order], promoted, suppressed, effect, labels)
        seconds["total"] = time.perf_counter() - start
        card.seconds = seconds
        with self._lock:
            self._cards[key] = card
            while len(self._cards) > self.max_cards:
                self._cards.popitem(last=False)
        return card
