"""Input-conditional ("dynamic") modulation: a small probe decides, per prompt, how much of the gains to apply.

The probe is a logistic regression on the safety neurons' activations at the prompt's last token
(unmodulated), trained on the same training prompts: harmful (plain and attacked) = 1, benign and
borderline-safe = 0. Under `GatedModulation.apply(lm)`, the first forward of each call (the prompt)
first runs the model once without gains to read those activations, sets each row's strength
s = sigmoid(w . a + b), and then runs with gains 1 + s (g - 1); later decoding steps reuse s.
A gate cannot be folded into weights; export takes its static gains only on request.
`gate_strength(lm, probe, texts)` is the same s for formatted prompts, without generating (the studio's chat).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data.chat import chat_prompt
from ..infra.devices import cat_to_host
from ..infra.files import read_safetensors, write_file
from ..infra.probes import fit_probe, roc_auc
from ..infra.progress import SILENT, Reporter
from .generation import PROMPT_CAP, encode_left
from .hooks import scoped_pre_hooks
from .modulation import Modulation


GATED = " + gate"  # suffix of a gated row's name: the same intervention scaled per prompt by the gate


@dataclass
class GateProbe:
    layers: torch.Tensor  # [k] layer of each feature neuron
    neurons: torch.Tensor  # [k] index of each feature neuron
    mean: torch.Tensor  # [k] feature standardisation
    std: torch.Tensor
    weight: torch.Tensor  # [k]
    bias: float
    train_accuracy: float = 0.0
    fingerprint: str | None = None  # the model it was fitted on (older gate files have none)
    bias_shift: float = 0.0  # added to the fitted bias (given, or chosen on validation)

    def strength(self, acts: torch.Tensor) -> torch.Tensor:
        """acts: [B, k] raw activations -> [B] strength in (0, 1)."""
        return torch.sigmoid(((acts - self.mean) / self.std) @ self.weight + self.bias)

    def save(self, path):
        from safetensors.torch import save_file
        tensors = {k: v.contiguous() for k, v in {"layers": self.layers, "neurons": self.neurons, "mean": self.mean,
                                                  "std": self.std, "weight": self.weight}.items()}
        meta = {"format": "neurontune-gate", "bias": repr(self.bias), "train_accuracy": repr(self.train_accuracy),
                "fingerprint": self.fingerprint or "", "bias_shift": repr(self.bias_shift)}
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
        fingerprint = meta.get("fingerprint") or None
        if expected_fingerprint and fingerprint and fingerprint != expected_fingerprint:
            raise ValueError(f"{path} is a gate fitted on model {fingerprint}, not the loaded model {expected_fingerprint}.")
        try:
            probe = cls(t["layers"].long(), t["neurons"].long(), t["mean"].float(), t["std"].float(), t["weight"].float(),
                        float(meta["bias"]), float(meta.get("train_accuracy", 0)), fingerprint, float(meta.get("bias_shift", 0)))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path} is a corrupted gate file (missing or unreadable {exc}).") from exc
        k = len(probe.layers)
        if k == 0 or any(v.dim() != 1 or len(v) != k for v in (probe.neurons, probe.mean, probe.std, probe.weight)):
            raise ValueError(f"{path} is a corrupted gate file (its tensors do not have one entry per feature neuron).")
        if not all(bool(torch.isfinite(v).all()) for v in (probe.mean, probe.std, probe.weight)) or probe.bias != probe.bias:
            raise ValueError(f"{path} is a corrupted gate file (a value that is not a finite number).")
        if shape is not None and (int(probe.layers.min()) < 0 or int(probe.layers.max()) >= shape[0]
                                  or int(probe.neurons.min()) < 0 or int(probe.neurons.max()) >= shape[1]):
            raise ValueError(f"{path} reads neurons outside this model's {tuple(shape)} (layers × neurons): it was fitted on another model.")
        return probe


def gate_strength(lm, probe: GateProbe, texts: Sequence[str], max_length: int = PROMPT_CAP) -> torch.Tensor:
    """[n] strength s of each formatted prompt: its unmodulated activations at the last token through the
    probe, as `GatedModulation` sets s on a prompt's first forward (prompts longer than `max_length`
    tokens keep their end, as generation does)."""
    return probe.strength(_last_token_acts(lm, texts, probe.layers, probe.neurons, max_length=max_length))


def _last_token_acts(lm, texts: Sequence[str], layers: torch.Tensor, neurons: torch.Tensor, batch_size: int = 16,
                     max_length: int = PROMPT_CAP, reporter: Reporter | None = None) -> torch.Tensor:
    """[n, k] activations of the given neurons at each formatted prompt's last token, unmodulated."""
    out = []
    needed = sorted(set(layers.tolist()))
    reporter = reporter or SILENT
    for start in range(0, len(texts), batch_size):
        reporter.check("Gate fitting")
        ids, mask = encode_left(lm.tokenizer, texts[start:start + batch_size], max_length)
        out.append(_acts_for_ids(lm, ids, mask, needed, layers, neurons))
        reporter.progress(min(start + batch_size, len(texts)), len(texts), "gate: reading activations")
    return torch.cat(out)


@torch.no_grad()
def _acts_for_ids(lm, ids, mask, needed, layers, neurons) -> torch.Tensor:
    """[B, k] float32 activations of the feature neurons (layers[i], neurons[i]) at each row's last position.
    Each hook keeps only its layer's feature neurons at the last position, on the layer's device; the
    [B, k_layer] pieces are copied to the host together, once per device."""
    store: dict[int, torch.Tensor] = {}
    picks = {l: (layers == l).nonzero().flatten() for l in needed}  # layer -> positions in the feature vector
    index: dict = {}  # (layer, device) -> that layer's neuron indices on the device

    def make(l):
        def hook(module, args):
            x = args[0]
            if (l, x.device) not in index:
                index[l, x.device] = neurons[picks[l]].to(x.device)
            last = x.reshape(ids.shape[0], -1, x.shape[-1])[:, -1]  # left-padded: last = prompt end
            store[l] = last.index_select(-1, index[l, x.device]).float()
        return hook
    device = lm.model.get_input_embeddings().weight.device
    with scoped_pre_hooks([(lm.nmap.projections[l], make(l)) for l in needed]):
        lm.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                 position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False, logits_to_keep=1)
    out = torch.empty(ids.shape[0], len(layers))
    out[:, torch.cat([picks[l] for l in needed])] = cat_to_host([store[l] for l in needed], 1)
    return out


GATE_FEATURES = ("amplified", "layer")


def fit_gate_for_run(lm, modulation: Modulation, splits, *, bias_shift: float | None = 0.0,
                     features: str = "amplified", reporter: Reporter | None = None) -> GateProbe:
    """The probe of a run, from its training split only: harmful requests (plain and in the training attack
    families) vs benign and borderline-safe requests, plain AND in the same families, so that a template alone
    does not open the gate. `bias_shift` > 0 makes the gate open more readily (more harmful refusal); None
    chooses it on the validation split (`choose_bias_shift`). `features`: "amplified" reads the most amplified
    neurons; "layer" reads every neuron of the one layer whose probe separates the validation pools best
    (`fit_layer_gate`: more training prompts, about four times the cost)."""
    if features not in GATE_FEATURES:
        raise ValueError(f"The gate's features must be one of {GATE_FEATURES}, not {features!r}.")
    if features == "layer":
        probe = fit_layer_gate(lm, *splits.harm_pools("train", 400, 40), *splits.harm_pools("validation", 48, 6), reporter=reporter)
    else:
        probe = fit_gate(lm, modulation, *splits.harm_pools("train", 100, 16), reporter=reporter)
    probe.bias += choose_bias_shift(lm, probe, splits, reporter=reporter) if bias_shift is None else bias_shift
    probe.bias_shift = probe.bias_shift if bias_shift is None else bias_shift
    return probe


def fit_layer_gate(lm, positive: Sequence[str], negative: Sequence[str], val_positive: Sequence[str],
                   val_negative: Sequence[str], *, layers: Sequence[int] | None = None,
                   reporter: Reporter | None = None) -> GateProbe:
    """A probe on all the neurons of one layer: for each candidate layer (default: every layer), fit on
    (positive, negative) and keep the layer with the highest ROC AUC on the validation prompts (ties: the lower). Why a whole layer: a linear probe
    of the prompt end separates harmful from harmless far better at later layers than the amplified neurons
    do (docs/method.md, "separability ceiling")."""
    n_layers, n_neurons = lm.shape
    candidates = list(layers) if layers is not None else list(range(n_layers))
    every_l = torch.tensor(candidates).repeat_interleave(n_neurons)
    every_n = torch.arange(n_neurons).repeat(len(candidates))
    fmt = lambda texts: [chat_prompt(lm.tokenizer, t) for t in texts]  # noqa: E731
    x = _last_token_acts(lm, fmt(list(positive) + list(negative)), every_l, every_n, reporter=reporter)
    xv = _last_token_acts(lm, fmt(list(val_positive) + list(val_negative)), every_l, every_n, reporter=reporter)
    y = torch.tensor([1.0] * len(positive) + [0.0] * len(negative))
    best = None
    for i, layer in enumerate(candidates):
        cols = slice(i * n_neurons, (i + 1) * n_neurons)
        mean, std, w, b = fit_probe(x[:, cols], y)
        z = ((xv[:, cols] - mean) / std) @ w + b
        auc = roc_auc(z[: len(val_positive)], z[len(val_positive):])
        if best is None or auc > best[0]:
            train_acc = float(((((x[:, cols] - mean) / std) @ w + b > 0).float() == y).float().mean())
            best = (auc, GateProbe(torch.full((n_neurons,), layer), torch.arange(n_neurons), mean, std, w, float(b),
                                   train_acc, getattr(lm, "fingerprint", None)))
    return best[1]


SHIFTS = tuple(x / 2 for x in range(-8, 9))  # -4 .. 4 in steps of 0.5


def choose_bias_shift(lm, probe: GateProbe, splits, shifts: tuple[float, ...] = SHIFTS, *,
                      reporter: Reporter | None = None) -> float:
    """The bias shift whose gate best separates harmful from harmless VALIDATION prompts (plain and in the training
    families): the largest true-positive minus false-positive rate of s > 0.5 (ties: the smaller shift)."""
    positive, negative = splits.harm_pools("validation", 48, 6)
    feats = lambda texts: _last_token_acts(lm, [chat_prompt(lm.tokenizer, t) for t in texts], probe.layers, probe.neurons,  # noqa: E731
                                           reporter=reporter)
    z_pos = ((feats(positive) - probe.mean) / probe.std) @ probe.weight + probe.bias
    z_neg = ((feats(negative) - probe.mean) / probe.std) @ probe.weight + probe.bias
    score = {s: float((z_pos + s > 0).float().mean() - (z_neg + s > 0).float().mean()) for s in shifts}
    best = max(shifts, key=lambda s: (round(score[s], 6), -abs(s)))
    probe.bias_shift = best
    return best


def fit_gate(lm, modulation: Modulation, positive: Sequence[str], negative: Sequence[str], *, max_features: int = 256,
             steps: int = 100, l2: float = 1e-2, reporter: Reporter | None = None) -> GateProbe:
    """Train the probe on user prompts (positive = should be modulated: harmful/attacked), reading the
    `max_features` most amplified neurons."""
    dense = modulation.dense()
    amplified = (dense > 1).nonzero()
    if len(amplified) == 0:
        raise ValueError("The modulation amplifies no neuron: nothing to gate on.")
    order = torch.argsort((dense[amplified[:, 0], amplified[:, 1]]), descending=True)[:max_features]
    layers, neurons = amplified[order, 0], amplified[order, 1]
    x = _last_token_acts(lm, [chat_prompt(lm.tokenizer, p) for p in list(positive) + list(negative)], layers, neurons,
                         reporter=reporter)
    y = torch.tensor([1.0] * len(positive) + [0.0] * len(negative))
    mean, std, w, b = fit_probe(x, y, l2=l2, steps=steps, precise=False)
    acc = float(((((x - mean) / std) @ w + b > 0).float() == y).float().mean())
    return GateProbe(layers, neurons, mean, std, w, float(b), acc, getattr(lm, "fingerprint", None))


@dataclass
class Gated:
    """Any intervention (with `apply_rows`) scaled per prompt by a gate: each prompt gets the intervention at
    strength s = the probe's reading of its last token, unmodulated. The evaluation computes s from the prompt
    alone for every metric (generation, perplexity, multiple choice), so the answer text never moves the gate;
    the same probe gates NeuronTune and each baseline alike."""

    inner: object
    probe: GateProbe
    name: str = "gated"
    meta: dict = field(default_factory=lambda: {"gated": True})

    @property
    def fingerprint(self):
        return getattr(self.inner, "fingerprint", None)

    def strengths(self, lm, formatted: Sequence[str], max_length: int = PROMPT_CAP) -> torch.Tensor:
        """[n] gate strengths of formatted prompts (chat template applied, ending with the assistant header)."""
        return gate_strength(lm, self.probe, formatted, max_length)

    def apply(self, lm):
        raise NotImplementedError(f"{self.name}: a gate needs each prompt's strength first: use strengths(lm, prompts) "
                                  "and inner.apply_rows(lm, strengths) (as the evaluation does).")


@dataclass
class GatedModulation:
    """A modulation whose strength is set per prompt by a `GateProbe`. `.apply(lm)` measures each new prompt
    on its first forward (for free-form generation); `.strengths` + `.inner.apply_rows` is the explicit form."""

    modulation: Modulation
    probe: GateProbe
    meta: dict = field(default_factory=lambda: {"gated": True})
    name: str = "neurontune" + GATED

    @property
    def fingerprint(self):
        return self.modulation.fingerprint

    @property
    def inner(self) -> Modulation:
        return self.modulation

    def strengths(self, lm, formatted: Sequence[str], max_length: int = PROMPT_CAP) -> torch.Tensor:
        return gate_strength(lm, self.probe, formatted, max_length)

    @contextlib.contextmanager
    def apply(self, lm):
        dense = self.modulation.dense()
        needed = sorted(set(self.probe.layers.tolist()))
        state = threading.local()
        state.busy = False
        gains_holder: dict = {}

        def pre(module, args, kwargs):
            if state.busy:
                return None
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and ids.shape[1] > 1:  # a new prompt: measure it unmodulated
                mask = kwargs.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask[:, -ids.shape[1]:]
                state.busy = True
                try:
                    acts = _acts_for_ids(lm, ids, mask, needed, self.probe.layers, self.probe.neurons)
                finally:
                    state.busy = False
                s = self.probe.strength(acts)  # [B]
                gains_holder["g"] = 1 + s[:, None, None] * (dense[None] - 1)  # [B, L, N] on the host
                gains_holder["on"] = {}  # this prompt's gains per (layer, device, dtype, rank), made once
                gains_holder["s"] = s
            return None

        # per-row gains are read lazily from gains_holder by a thin hook per modulated layer
        hooks = [(proj, _lazy_gain_hook(layer, gains_holder, state)) for layer, proj in enumerate(lm.nmap.projections)
                 if not bool((dense[layer] == 1).all())]
        with scoped_pre_hooks([(lm.model, pre)], with_kwargs=True), scoped_pre_hooks(hooks):
            yield gains_holder


def _lazy_gain_hook(layer: int, holder: dict, state):
    """Multiplies by the current prompt's per-row gains of `layer`: moved to the activation's device and
    dtype and shaped to broadcast ([B, 1, N]) once per prompt, then one multiply per decoding step."""
    def hook(module, args):
        if getattr(state, "busy", False) or "g" not in holder:
            return None
        x = args[0]
        on, key = holder["on"], (layer, x.device, x.dtype, x.dim())
        g = on.get(key)
        if g is None:
            g = holder["g"][:, layer].to(x.device, x.dtype)
            g = on[key] = g if x.dim() == 2 else g.view(g.shape[0], *([1] * (x.dim() - 2)), g.shape[-1])
        if x.dim() == 2 and x.shape[0] != g.shape[0]:  # OPT flattens [B, T, N] to [B*T, N] (prompt pass)
            g = g.repeat_interleave(x.shape[0] // g.shape[0], 0)
        return (x * g, *args[1:])
    return hook
