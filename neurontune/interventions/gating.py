"""The input gate: a probe reads each prompt, unmodulated, and sets how much of an intervention that prompt gets.

`GateProbe` is a logistic readout of activations at the prompt's last token, or averaged over the user's turn (some
MLP neurons, a whole layer's neurons, or the residual stream of a layer: `capture.unit_features` reads them), giving
a strength s in (0, 1); with `either`, a second such readout of the same prompt, and the gate opens where either
reads harmful (s from the larger logit).
`Gated(inner, probe)` is the one gated intervention: every caller (the evaluation harness, the studio's chat and
bulk table, `generate` on the command line) turns prompts into per-row strengths with `Gated.strengths` and applies
`inner` at those strengths (`inner.apply_rows`; for gains that is 1 + s (g - 1) and s times any input-side term).
`row_modulations` is the one way a caller that may or may not have a gate (the studio's chat and bulk table) gets
each prompt's modulation; a caller holding a `Gated` (`generate`, the harness) calls `Gated.per_prompt`, which it wraps. `Gated.apply(lm)` does the same for free-form generation, measuring each new
prompt on its first forward.
A gate cannot be folded into weights; fitting one lives in `method/gate_fit.py`.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data.chat import chat_prompt
from ..infra.files import read_safetensors, write_file
from .capture import SITES, unit_features
from .generation import PROMPT_CAP

EITHER = "either."  # the gate file's prefix for a probe's `either` reading
GATED = " + gate"  # suffix of a gated row's name: the same intervention scaled per prompt by the gate


@dataclass
class GateProbe:
    """s = sigmoid(((a - mean) / std) . weight + bias), a = the units (layers[i], neurons[i]) of `site` at the
    prompt's last token ("neurons": MLP neurons; "residual": dimensions of the residual stream entering a layer), or
    with `pool_from` = k their mean over the prompt's tokens from the k-th on (the user's turn: `template_prefix_len`),
    or over the last `pool_last` of those. `either`: a second probe (another layer or pooling) whose logit the gate
    takes where it is the larger, so it opens where either reads harmful; its bias carries the same `bias_shift`."""

    layers: torch.Tensor  # [k] layer of each feature
    neurons: torch.Tensor  # [k] unit of each feature within its layer's site
    mean: torch.Tensor  # [k] feature standardisation
    std: torch.Tensor
    weight: torch.Tensor  # [k]
    bias: float
    train_accuracy: float = 0.0
    fingerprint: str | None = None  # the model it was fitted on (older gate files have none)
    bias_shift: float = 0.0  # added to the fitted bias (given, or chosen on validation)
    site: str = "neurons"
    pool_from: int | None = None
    pool_last: int | None = None
    either: "GateProbe | None" = None

    def logit(self, acts: torch.Tensor) -> torch.Tensor:
        """acts: [B, k] raw activations -> [B] logit of the strength."""
        return ((acts - self.mean) / self.std) @ self.weight + self.bias

    def logits(self, lm, formatted: Sequence[str] | None, *, ids: tuple[torch.Tensor, torch.Tensor] | None = None,
               max_length: int = PROMPT_CAP, reporter=None) -> torch.Tensor:
        """[n] the gate's logit of each formatted prompt, or of the left-padded `ids` = (input ids, mask) of one forward:
        this probe's, or with `either` the larger of the two."""
        z = self.logit(unit_features(lm, formatted, self.layers, self.neurons, site=self.site, ids=ids, max_length=max_length,
                                     reporter=reporter, pool_from=self.pool_from, pool_last=self.pool_last))
        if self.either is None:
            return z
        return torch.maximum(z, self.either.logits(lm, formatted, ids=ids, max_length=max_length, reporter=reporter))

    def read(self, lm, formatted: Sequence[str], max_length: int = PROMPT_CAP) -> torch.Tensor:
        """[n] strength of each formatted prompt (prompts longer than `max_length` tokens keep their end, as generation does)."""
        if not len(formatted):
            return torch.zeros(0)
        return torch.sigmoid(self.logits(lm, formatted, max_length=max_length))

    def parts(self) -> list["GateProbe"]:
        """This probe and every `either` reading after it."""
        return [self] + ([] if self.either is None else self.either.parts())

    def sharpen(self, factor: float, shift: float) -> None:
        """Multiply every part's logit by `factor`, then add `shift` to it (recorded as `bias_shift`), in place."""
        for part in self.parts():
            part.weight, part.bias = part.weight * factor, part.bias * factor + shift
            part.bias_shift = shift

    def _entries(self, prefix: str = "") -> tuple[dict, dict]:
        tensors = {prefix + k: v.contiguous() for k, v in {"layers": self.layers, "neurons": self.neurons, "mean": self.mean,
                                                           "std": self.std, "weight": self.weight}.items()}
        meta = {prefix + k: v for k, v in {"bias": repr(self.bias), "train_accuracy": repr(self.train_accuracy),
                                           "fingerprint": self.fingerprint or "", "bias_shift": repr(self.bias_shift),
                                           "site": self.site}.items()}
        if self.pool_from is not None:
            meta[prefix + "pool_from"] = str(int(self.pool_from))
        if self.pool_last is not None:
            meta[prefix + "pool_last"] = str(int(self.pool_last))
        if self.either is not None:
            t, m = self.either._entries(prefix + EITHER)
            tensors, meta = {**tensors, **t}, {**meta, **m}
        return tensors, meta

    def save(self, path):
        from safetensors.torch import save_file
        tensors, meta = self._entries()
        meta["format"] = "neurontune-gate"
        return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), checksum=False)

    @classmethod
    def load(cls, path, shape: tuple[int, int] | None = None, expected_fingerprint: str | None = None) -> "GateProbe":
        """Read a gate file; with `shape` / `expected_fingerprint`, refuse one whose neurons do not fit the
        model or that was fitted on another model (ValueError with a message for the user)."""
        try:
            meta, t = read_safetensors(path)
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise ValueError(f"{path} is not a readable gate file ({exc}).") from exc
        if meta.get("format") != "neurontune-gate":
            raise ValueError(f"{path} is not a NeuronTune gate file.")
        return cls._part(path, meta, t, "", shape, expected_fingerprint)

    @classmethod
    def _part(cls, path, meta: dict, t: dict, prefix: str, shape, expected_fingerprint) -> "GateProbe":
        """The probe stored under `prefix` in a gate file's (metadata, tensors), with its `either` readings, checked."""
        fingerprint = meta.get(prefix + "fingerprint") or None
        if expected_fingerprint and fingerprint and fingerprint != expected_fingerprint:
            raise ValueError(f"{path} is a gate fitted on model {fingerprint}, not the loaded model {expected_fingerprint}.")
        site = meta.get(prefix + "site") or "neurons"
        if site not in SITES:
            raise ValueError(f"{path} is a gate reading an unknown site {site!r}; this NeuronTune reads {SITES}.")
        try:
            probe = cls(*(t[prefix + k].long() for k in ("layers", "neurons")),
                        *(t[prefix + k].float() for k in ("mean", "std", "weight")),
                        float(meta[prefix + "bias"]), float(meta.get(prefix + "train_accuracy", 0)), fingerprint,
                        float(meta.get(prefix + "bias_shift", 0)), site,
                        int(meta[prefix + "pool_from"]) if meta.get(prefix + "pool_from") else None,
                        int(meta[prefix + "pool_last"]) if meta.get(prefix + "pool_last") else None)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path} is a corrupted gate file (missing or unreadable {exc}).") from exc
        k = len(probe.layers)
        if k == 0 or any(v.dim() != 1 or len(v) != k for v in (probe.neurons, probe.mean, probe.std, probe.weight)):
            raise ValueError(f"{path} is a corrupted gate file (its tensors do not have one entry per feature neuron).")
        if not all(bool(torch.isfinite(v).all()) for v in (probe.mean, probe.std, probe.weight)) or probe.bias != probe.bias:
            raise ValueError(f"{path} is a corrupted gate file (a value that is not a finite number).")
        if shape is not None and (int(probe.layers.min()) < 0 or int(probe.layers.max()) >= shape[0]
                                  or (site == "neurons" and (int(probe.neurons.min()) < 0 or int(probe.neurons.max()) >= shape[1]))):
            raise ValueError(f"{path} reads neurons outside this model's {tuple(shape)} (layers × neurons): it was fitted on another model.")
        if prefix + EITHER + "layers" in t:
            probe.either = cls._part(path, meta, t, prefix + EITHER, shape, expected_fingerprint)
        return probe


def row_modulations(lm, modulation, gate: "GateProbe | None", prompts: Sequence[str], *, strength: float = 1.0,
                    formatted: bool = False, max_length: int = PROMPT_CAP) -> tuple[list, list[float] | None]:
    """(the modulation each prompt gets, the gate's readings or None): how callers that answer prompts one row each
    and may have no gate (the studio's chat and bulk table) turn prompts into per-row modulations. With a gate: the
    modulation at strength x s, s read from the prompt alone (`Gated.per_prompt`); without: at `strength` for every row."""
    if gate is None:
        mod = modulation if float(strength) == 1.0 else modulation.scaled(float(strength))
        return [mod] * len(prompts), None
    return Gated(modulation, gate).per_prompt(lm, prompts, strength=strength, formatted=formatted, max_length=max_length)


@dataclass
class Gated:
    """An intervention (anything with `apply_rows`: gains, gains with input terms, a steering direction) applied to
    each prompt at the strength its gate reads from the prompt alone, unmodulated. The evaluation reads s from the
    prompt for every metric (generation, perplexity, multiple choice), so the answer text never moves the gate."""

    inner: object
    probe: GateProbe
    name: str = ""
    meta: dict = field(default_factory=lambda: {"gated": True})

    def __post_init__(self):
        if not self.name:
            inner_name = getattr(self.inner, "name", None) or (getattr(self.inner, "meta", None) or {}).get("kind") or "neurontune"
            self.name = f"{inner_name}{GATED}"

    @property
    def fingerprint(self):
        return getattr(self.inner, "fingerprint", None)

    def strengths(self, lm, prompts: Sequence[str], *, formatted: bool = True, max_length: int = PROMPT_CAP) -> torch.Tensor:
        """[n] the gate's reading of each prompt: formatted ones (chat template applied), or user messages with
        `formatted=False` (a conversation's last user message is read alone, so an earlier turn never holds the gate open)."""
        texts = list(prompts) if formatted else [chat_prompt(lm.tokenizer, p) for p in prompts]
        return self.probe.read(lm, texts, max_length)

    def per_prompt(self, lm, prompts: Sequence[str], *, strength: float = 1.0, formatted: bool = False,
                   max_length: int = PROMPT_CAP) -> tuple[list, list[float]]:
        """(the inner modulation scaled for each prompt to strength × s, the readings s): what one row of a batched
        generation applies (`generation.generate(lm, prompts, gains=...)`). For gains and input-side terms."""
        s = self.strengths(lm, prompts, formatted=formatted, max_length=max_length).tolist()
        return [self.inner.scaled(float(strength) * v) for v in s], s

    @contextlib.contextmanager
    def apply(self, lm):
        """Free-form generation: each new prompt (a forward with more than one token) is first read by the gate
        without any modulation, then runs with `inner` at that strength per row; decoding steps keep it. Yields a
        dict whose "s" holds the last prompt's readings."""
        state: dict = {"s": None}
        local = threading.local()
        stack = contextlib.ExitStack()

        def pre(module, args, kwargs):
            if getattr(local, "busy", False):
                return None
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or ids.shape[1] <= 1:
                return None
            stack.close()  # the previous prompt's modulation is off while this one is read
            mask = kwargs.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask[:, -ids.shape[1]:]
            local.busy = True
            try:
                s = torch.sigmoid(self.probe.logits(lm, None, ids=(ids, mask)))
            finally:
                local.busy = False
            state["s"] = s
            stack.enter_context(self.inner.apply_rows(lm, s))
            return None

        from .hooks import scoped_pre_hooks
        try:
            with scoped_pre_hooks([(lm.model, pre)], with_kwargs=True):
                yield state
        finally:
            stack.close()
