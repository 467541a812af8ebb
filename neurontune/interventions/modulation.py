"""Per-neuron modulation: scoped application, per batch row, thread-isolated, foldable, serialisable.

A neuron's modulation has two parts, both written into the model's own weights by `fold_into_weights`:
- a gain g: `activation[..., i] *= g` at the input of layer l's MLP output projection (a static scale);
- an input-side term (`InputTerms`, optional): `c * (h . x - m)` added to the neuron's unit of the MLP input
  projection (the "up" half of a gated MLP, the pre-activation of a plain one), where x is the MLP's input and h a
  direction of that layer (a harm direction, centred so it reads about zero on the average prompt). The neuron then
  fires more where x points along h and less where it points away: a modulation that depends on the input and
  still folds exactly into the input projection's rows (and bias, for m), with no new module;
- a switch (`switch.Switch`, optional, gated MLPs): two neurons of one layer rewritten to read a probe of the prompt and
  raise a flag in the residual stream, which later layers' input-side terms then read instead of a raw harm direction.
`modulate(model, modulation)` applies both for the duration of a `with` block only, through
`hooks.scoped_pre_hooks`: a hook registered by one thread is a no-op for every other thread using the
same model, so two users of one shared model never see each other's gains, and nothing stays on the
model after the block, also when it raises.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn

from ..infra.files import read_safetensors, write_file
from ..model.neuron_map import NeuronMap, neuron_map
from .hooks import scoped_pre_hooks
from .switch import EARLIER, EARLIER_NAMES, Switch
from .switch import folded as folded_switch
from .switch import hooks as switch_hooks
from .turn_mean import NAMES as turn_mean_names

FORMAT_VERSION = 5  # the "version" field of the file header; bump it (and add a migration) when the layout changes
REGENERATE = ("Regenerate it with this NeuronTune: `python -m neurontune tune --out DIR` (or Train gains in the studio) "
              "on the model it was made for.")
# version -> function(header, tensors) returning them in the next version's layout. Version 1 is the first
# versioned layout; a file without a version (0) predates it and is refused with REGENERATE. Version 2 added the
# optional input-side terms (`layer.L.input_*` tensors): a version-1 file is a modulation without them. Version 3 added
# the optional switch (`switch.*` tensors, header "switch_layer"): a version-2 file is a modulation without one. Version 4
# added the switch's optional turn mean (`switch.mean.*`): a version-3 switch reads the prompt's end only.
# Version 5 added the switch's optional earlier switch (`switch.earlier.*`): a version-4 switch reads one layer.
MIGRATIONS: dict[int, Callable[[dict, dict], tuple[dict, dict]]] = {1: lambda header, tensors: (header, tensors),
                                                                     2: lambda header, tensors: (header, tensors),
                                                                     3: lambda header, tensors: (header, tensors),
                                                                     4: lambda header, tensors: (header, tensors)}


@dataclass
class InputTerms:
    """Input-side terms of one layer: neuron `indices[j]` gets `coef[j] * (direction . x - offset)` added to its unit
    of the MLP input projection, x being that projection's input. `offset` is 0 for an input projection without a
    bias (the direction is then centred by construction), and folds into the bias otherwise."""

    indices: torch.Tensor  # [k] long
    coef: torch.Tensor  # [k] float
    direction: torch.Tensor  # [d_model] float
    offset: float = 0.0

    def scaled(self, strength: float) -> "InputTerms":
        return InputTerms(self.indices, self.coef.clone() if strength == 1 else self.coef * strength, self.direction, self.offset)


def at_strength(gains: torch.Tensor, strength) -> torch.Tensor:
    """1 + s (g - 1): gains moved towards the identity by strength s (a number or a tensor that broadcasts): the one
    formula a gate's reading, the studio's strength slider and training behind a gate all apply."""
    return 1.0 + strength * (gains - 1.0)


class ModulationFileError(ValueError):
    """A modulation file is unreadable, of an unknown version, or made for another model."""


@dataclass
class Modulation:
    """Sparse per-neuron gains. `layers[l] = (indices: [k] long, gains: [k] float)`."""

    shape: tuple[int, int]  # (n_layers, n_neurons)
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fingerprint: str | None = None
    meta: dict = field(default_factory=dict)
    inputs: dict[int, InputTerms] = field(default_factory=dict)  # layer -> input-side terms (a conditional modulation)
    switch: Switch | None = None  # the folded switch whose flag the input-side terms read (`switch.Switch`)

    def __post_init__(self):
        for sw in [] if self.switch is None else self.switch.chain():  # a switch owns its neurons: no gain or input term may touch them
            idx = sw.neurons
            gains = self.layers.get(sw.layer)
            terms = self.inputs.get(sw.layer)
            if (gains is not None and bool(torch.isin(gains[0], idx).any())) or (terms is not None and bool(torch.isin(terms.indices, idx).any())):
                raise ValueError(f"Neurons {idx.tolist()} of layer {sw.layer} are the switch's: a gain or input term "
                                 "on them would be overwritten. Leave them out of the selection.")

    @classmethod
    def from_dense(cls, dense: torch.Tensor, fingerprint: str | None = None, meta: dict | None = None,
                   inputs: dict[int, InputTerms] | None = None, switch: Switch | None = None) -> "Modulation":
        """Keep every entry of a dense [n_layers, n_neurons] gain table that differs from 1 (and the input terms
        whose coefficients are not all 0, and the switch)."""
        dense = dense.detach().float().cpu()
        layers = {}
        for layer in range(dense.shape[0]):
            idx = torch.nonzero(dense[layer] != 1.0).flatten()
            if len(idx):
                layers[layer] = (idx, dense[layer, idx].clone())
        kept = {int(l): InputTerms(t.indices.long().cpu(), t.coef.detach().float().cpu().clone(), t.direction.detach().float().cpu(),
                                   float(t.offset)) for l, t in (inputs or {}).items() if bool((t.coef != 0).any())}
        return cls(tuple(dense.shape), layers, fingerprint, dict(meta or {}), kept, switch)

    @classmethod
    def average(cls, mods: Sequence["Modulation"], meta: dict | None = None) -> "Modulation":
        """The mean of modulations that differ only in their trained values (one switch, the same input directions):
        gains and input coefficients averaged (a missing term counts as 0). Both fold linearly into the weights (a gain
        scales a column, a coefficient adds a rank-one row), so the average is the average of the folded checkpoints:
        one checkpoint for several training seeds."""
        if not mods:
            raise ValueError("Modulation.average needs at least one modulation.")
        first = mods[0]
        for m in mods[1:]:
            if m.shape != first.shape or m.fingerprint != first.fingerprint:
                raise ValueError(f"Cannot average modulations of different models ({m.shape}, {m.fingerprint} vs "
                                 f"{first.shape}, {first.fingerprint}).")
            if (m.switch is None) != (first.switch is None) or (m.switch is not None and not m.switch.same(first.switch)):
                raise ValueError("Cannot average modulations with different switches: train them with one fitted switch.")
        terms: dict[int, InputTerms] = {}
        for m in mods:
            for layer, t in m.inputs.items():
                have = terms.get(layer)
                if have is None:
                    terms[layer] = InputTerms(t.indices, t.coef / len(mods), t.direction, t.offset)
                elif torch.equal(have.indices, t.indices) and torch.equal(have.direction, t.direction) and have.offset == t.offset:
                    have.coef = have.coef + t.coef / len(mods)
                else:
                    raise ValueError(f"Cannot average the input-side terms of layer {layer}: the modulations read different "
                                     "neurons or directions there.")
        dense = torch.stack([m.dense() for m in mods]).mean(0)
        return cls.from_dense(dense, first.fingerprint, {**first.meta, **(meta or {})}, inputs=terms, switch=first.switch)

    @property
    def conditional(self) -> bool:
        """True when the modulation has input-side terms or a switch (its effect depends on the input)."""
        return bool(self.inputs) or self.switch is not None

    def dense(self) -> torch.Tensor:
        """[n_layers, n_neurons] float32 gains, 1 where the modulation leaves a neuron alone."""
        out = torch.ones(self.shape)
        for layer, (idx, gains) in self.layers.items():
            out[layer, idx] = gains.float()
        return out

    def scaled(self, strength: float) -> "Modulation":
        """Interpolate towards the identity: gain -> 1 + strength * (gain - 1), input coefficients -> strength * coef
        (a switch stays, its flag read less); exactly the modulation at 1, none at 0."""
        strength = float(strength)
        layers = {l: (i, g.clone() if strength == 1 else at_strength(g, strength)) for l, (i, g) in self.layers.items()}
        inputs = {l: t.scaled(strength) for l, t in self.inputs.items()}
        switch = None if strength == 0 else self.switch
        if strength == 0:
            layers, inputs = {}, {}
        return Modulation(self.shape, layers, self.fingerprint, {**self.meta, "strength": strength}, inputs, switch)

    def static(self) -> "Modulation":
        """The gains alone, without the input-side terms and switch."""
        return Modulation(self.shape, dict(self.layers), self.fingerprint, dict(self.meta))

    @property
    def n_modulated(self) -> int:
        return sum(len(i) for i, _ in self.layers.values())

    def summary(self) -> dict:
        gains = torch.cat([g for _, g in self.layers.values()]) if self.layers else torch.ones(0)
        coefs = torch.cat([t.coef for t in self.inputs.values()]) if self.inputs else torch.zeros(0)
        return {
            "n_modulated": self.n_modulated,
            "n_amplified": int((gains > 1).sum()),
            "n_suppressed": int((gains < 1).sum()),
            "max_gain": float(gains.max()) if len(gains) else 1.0,
            "min_gain": float(gains.min()) if len(gains) else 1.0,
            "layers": sorted(self.layers),
            "n_conditional": int((coefs != 0).sum()),
            "max_abs_coef": float(coefs.abs().max()) if len(coefs) else 0.0,
            "input_layers": sorted(self.inputs),
            "switch_layer": None if self.switch is None else self.switch.layer,
            "switch_mean": None if self.switch is None or self.switch.mean is None else [self.switch.mean.layer, self.switch.mean.group],
            "switch_earlier": None if self.switch is None or self.switch.earlier is None else self.switch.earlier.layer,
        }

    def apply(self, lm):
        """Context manager applying this modulation to a `LoadedModel` (the intervention protocol)."""
        return modulate(lm.model, self, lm.nmap)

    def row_gains(self, strengths: torch.Tensor) -> torch.Tensor:
        """[B, n_layers, n_neurons] gains 1 + s (g - 1) for per-row strengths s; exactly g at s = 1 and 1 at s = 0."""
        dense = self.dense()[None]
        s = strengths.detach().float().cpu()[:, None, None]
        return torch.where(s == 1, dense, torch.where(s == 0, torch.ones_like(dense), at_strength(dense, s)))

    def row_inputs(self, strengths: torch.Tensor) -> dict[int, "RowTerms"]:
        """The input-side terms at one strength per batch row: coefficients s * coef ([B, k])."""
        s = strengths.detach().float().cpu()[:, None]
        return {l: RowTerms(t.indices, s * t.coef[None], t.direction, torch.full((len(s),), float(t.offset)))
                for l, t in self.inputs.items()}

    def apply_rows(self, lm, strengths: torch.Tensor):
        """This modulation at one strength per batch row (the protocol's per-row form: gates, mixed batches); a switch
        applies to the rows at a strength above 0 only, so a row at 0 is the base model exactly."""
        switch = None if self.switch is None else (self.switch, strengths.detach().cpu() > 0)
        return modulate(lm.model, self.row_gains(strengths), lm.nmap, inputs=self.row_inputs(strengths), switch=switch)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a small safetensors file (indices + gains per layer) with shape and fingerprint in its header."""
        tensors = {}
        for layer, (idx, gains) in self.layers.items():
            tensors[f"layer.{layer}.indices"] = idx.to(torch.int64).contiguous()
            tensors[f"layer.{layer}.gains"] = gains.float().contiguous()
        for layer, t in self.inputs.items():
            tensors[f"layer.{layer}.input_indices"] = t.indices.to(torch.int64).contiguous()
            tensors[f"layer.{layer}.input_coef"] = t.coef.float().contiguous()
            tensors[f"layer.{layer}.input_direction"] = t.direction.float().contiguous()
            tensors[f"layer.{layer}.input_offset"] = torch.tensor([float(t.offset)])
        if self.switch is not None:
            tensors.update(self.switch.tensors())
        header = {
            "format": "neurontune-modulation",
            "version": str(FORMAT_VERSION),
            "shape": json.dumps(list(self.shape)),
            "fingerprint": self.fingerprint or "",
            "meta": json.dumps(self.meta, default=str),
            "checksum": _checksum(tensors),
        }
        if self.switch is not None:
            header["switch_layer"] = str(self.switch.layer)
        return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header), checksum=False)  # the header holds one

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> "Modulation":
        """Read a modulation file; refuse one made for another model when a fingerprint is given, and one
        that is truncated, corrupted (checksum, shapes, indices, non-finite gains) or of an unknown version."""
        path = Path(path)
        if path.is_dir():
            raise ModulationFileError(f"{path} is a folder: pass the modulation file in it, or read a run or export folder "
                                      "with neurontune.run.RunFolder(path).modulation().")
        if not path.exists():
            raise ModulationFileError(f"No modulation file at {path}. Pass a modulation.safetensors that `tune --out` or an export wrote.")
        try:
            header, tensors = read_safetensors(path)
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise ModulationFileError(f"{path} is not a readable modulation file ({exc}). Re-export it.") from exc
        if header.get("format") != "neurontune-modulation":
            raise ModulationFileError(f"{path} is a safetensors file but not a NeuronTune modulation.")
        version = _version(path, header)
        while version < FORMAT_VERSION:  # only reached when every step has a migration
            header, tensors = MIGRATIONS[version](header, tensors)
            version += 1
        fingerprint = header.get("fingerprint") or None
        if expected_fingerprint and fingerprint and fingerprint != expected_fingerprint:
            raise ModulationFileError(
                f"{path} was made for model {fingerprint}, not the loaded model {expected_fingerprint}. "
                "Load the model it was tuned on, or tune this one.")
        if header.get("checksum") and header["checksum"] != _checksum(tensors):
            raise ModulationFileError(f"{path} is corrupted (its gains do not match their checksum). {REGENERATE}")
        try:
            shape = tuple(json.loads(header["shape"]))
            meta = json.loads(header.get("meta") or "{}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ModulationFileError(f"{path} is corrupted (unreadable header: {exc}). {REGENERATE}") from exc
        inputs = _check_inputs(path, shape, tensors)
        switch = _check_switch(path, shape, header, tensors)
        layers = _check_layers(path, shape, {k: v for k, v in tensors.items() if ".input_" not in k and not k.startswith("switch.")})
        return cls(shape, layers, fingerprint, meta if isinstance(meta, dict) else {}, inputs, switch)


GainsLike = Union[Modulation, torch.Tensor, Sequence[Union[Modulation, None]], None]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order): detects a flipped byte."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _version(path: Path, header: dict) -> int:
    """The file's format version; a newer one, and an older one that no migration converts, are refused."""
    raw = header.get("version")
    try:
        version = int(raw) if raw is not None else 0
    except ValueError:
        raise ModulationFileError(f"{path} has an unreadable format version {raw!r}. {REGENERATE}") from None
    if version > FORMAT_VERSION:
        raise ModulationFileError(f"{path} has format version {version}, written by a newer NeuronTune; this one reads "
                                  f"versions up to {FORMAT_VERSION}. Upgrade NeuronTune (pip install -U) to load it.")
    if version < FORMAT_VERSION and version not in MIGRATIONS:
        raise ModulationFileError(f"{path} has format version {version} (an older NeuronTune); this one reads version "
                                  f"{FORMAT_VERSION} and cannot convert it. {REGENERATE}")
    return version


def _check_layers(path: Path, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (indices, gains) after checking they fit `shape` and hold finite numbers."""
    bad = lambda why: ModulationFileError(f"{path} is corrupted ({why}). {REGENERATE}")  # noqa: E731
    if len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise bad(f"shape {shape}")
    layers = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "layer" or not parts[1].isdigit() or parts[2] not in ("indices", "gains"):
            raise bad(f"unexpected tensor {key!r}")
        if parts[2] == "gains":
            continue
        layer = int(parts[1])
        gains = tensors.get(f"layer.{layer}.gains")
        if gains is None:
            raise bad(f"layer {layer} has indices but no gains")
        if layer >= shape[0] or tensor.dim() != 1 or gains.shape != tensor.shape or tensor.dtype != torch.int64:
            raise bad(f"layer {layer}: indices {tuple(tensor.shape)} / gains {tuple(gains.shape)} do not fit shape {shape}")
        if len(tensor) and (int(tensor.min()) < 0 or int(tensor.max()) >= shape[1]):
            raise bad(f"layer {layer}: a neuron index outside 0..{shape[1] - 1}")
        if not bool(torch.isfinite(gains.float()).all()):
            raise bad(f"layer {layer}: a gain that is not a finite number")
        layers[layer] = (tensor, gains)
    orphans = {k for k in tensors if k.endswith(".gains") and k.replace(".gains", ".indices") not in tensors}
    if orphans:
        raise bad(f"gains without indices: {sorted(orphans)[:3]}")
    return layers


def _check_switch(path: Path, shape: tuple[int, int], header: dict, tensors: dict[str, torch.Tensor]) -> Switch | None:
    names = {k for k in tensors if k.startswith("switch.")}
    if not names and "switch_layer" not in header:
        return None
    try:
        mean = {k for k in tensors if k.startswith("switch.mean.")}
        if mean and mean != set(turn_mean_names):
            raise ValueError(f"its turn mean needs the tensors {list(turn_mean_names)}, not {sorted(mean)}")
        earlier, wanted = {k for k in tensors if k.startswith(EARLIER)}, {EARLIER + n for n in EARLIER_NAMES}
        if earlier and earlier != wanted:
            raise ValueError(f"its earlier switch needs the tensors {sorted(wanted)}, not {sorted(earlier)}")
        switch = Switch.from_tensors(int(header["switch_layer"]), tensors)
        for sw in switch.chain():
            if not 0 <= sw.layer < shape[0] or (len(sw.neurons) and not 0 <= int(sw.neurons.min()) <= int(sw.neurons.max()) < shape[1]):
                raise ValueError("its layer or neurons are outside the model's shape")
    except (KeyError, ValueError) as exc:
        raise ModulationFileError(f"{path} is corrupted (bad switch: {exc}). {REGENERATE}") from exc
    return switch


def _check_inputs(path: Path, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> dict[int, InputTerms]:
    """Per-layer input-side terms after checking they fit `shape` and hold finite numbers."""
    bad = lambda why: ModulationFileError(f"{path} is corrupted ({why}). {REGENERATE}")  # noqa: E731
    inputs = {}
    for key in tensors:
        if not key.endswith(".input_indices"):
            continue
        layer = int(key.split(".")[1]) if key.split(".")[1].isdigit() else -1
        parts = [tensors.get(f"layer.{layer}.input_{name}") for name in ("indices", "coef", "direction", "offset")]
        if layer < 0 or layer >= shape[0] or any(p is None for p in parts):
            raise bad(f"incomplete input terms {key!r}")
        idx, coef, direction, offset = parts
        if idx.dim() != 1 or coef.shape != idx.shape or idx.dtype != torch.int64 or direction.dim() != 1 or offset.numel() != 1:
            raise bad(f"layer {layer}: input terms of shapes {tuple(idx.shape)} / {tuple(coef.shape)} / {tuple(direction.shape)}")
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= shape[1]):
            raise bad(f"layer {layer}: an input-term neuron index outside 0..{shape[1] - 1}")
        if not all(bool(torch.isfinite(t.float()).all()) for t in (coef, direction, offset)):
            raise bad(f"layer {layer}: an input term that is not a finite number")
        inputs[layer] = InputTerms(idx, coef.float(), direction.float(), float(offset.flatten()[0]))
    return inputs


@dataclass
class RowTerms:
    """Input-side terms of one layer for a batch: shared neurons `indices` [k]; coefficients [k] (every row) or
    [B, k] (per row); direction [d] or [B, d]; offset a number or [B]. Rows without terms hold zero coefficients."""

    indices: torch.Tensor
    coef: torch.Tensor
    direction: torch.Tensor
    offset: torch.Tensor | float = 0.0

    @property
    def per_row(self) -> bool:
        return self.coef.dim() == 2


def _row_terms(rows: Sequence[Modulation | None], n_layers: int) -> dict[int, RowTerms]:
    """Per-row input terms of a list of modulations (None: no terms on that row), over the union of their neurons."""
    out = {}
    for layer in range(n_layers):
        present = [(b, m.inputs[layer]) for b, m in enumerate(rows) if m is not None and layer in m.inputs]
        if not present:
            continue
        indices = torch.unique(torch.cat([t.indices for _, t in present]))
        d = present[0][1].direction.shape[0]
        coef, direction, offset = torch.zeros(len(rows), len(indices)), torch.zeros(len(rows), d), torch.zeros(len(rows))
        for b, t in present:
            coef[b, torch.searchsorted(indices, t.indices)] = t.coef.float()
            direction[b], offset[b] = t.direction.float(), float(t.offset)
        out[layer] = RowTerms(indices, coef, direction, offset)
    return out


def _terms(gains: GainsLike, inputs: dict | None, n_layers: int) -> dict[int, RowTerms]:
    """The input-side terms to apply: given explicitly (training, per-row strengths), or carried by the modulation(s)."""
    if inputs is not None:
        return {l: t if isinstance(t, RowTerms) else RowTerms(t.indices, t.coef, t.direction, t.offset) for l, t in inputs.items()}
    if isinstance(gains, Modulation):
        return {l: RowTerms(t.indices, t.coef, t.direction, t.offset) for l, t in gains.inputs.items()}
    if gains is None or isinstance(gains, torch.Tensor):
        return {}
    return _row_terms(list(gains), n_layers)


def _input_hook(t: RowTerms, offset_rows: int):
    """Forward hook on an input projection adding coef * (direction . x - offset) to the neurons' units. Terms are
    moved to each (device, dtype) once unless trainable; x is the projection's input."""
    ready: dict = {}
    trainable = t.coef.requires_grad

    def hook(module, args, out):
        x = args[0]
        key = (x.device, x.dtype)
        if trainable or key not in ready:
            ready[key] = (t.indices.to(x.device) + offset_rows, t.coef.to(x.device, x.dtype), t.direction.to(x.device, x.dtype),
                          t.offset.to(x.device, x.dtype) if isinstance(t.offset, torch.Tensor) else float(t.offset))
        idx, coef, direction, offset = ready[key]
        if t.per_row:
            rows = coef.shape[0]
            xr = x.reshape(rows, -1, x.shape[-1])  # OPT flattens [B, T, d] to [B*T, d]
            proj = torch.einsum("btd,bd->bt", xr, direction) if direction.dim() == 2 else xr @ direction
            proj = proj - (offset[:, None] if isinstance(offset, torch.Tensor) and offset.dim() == 1 else offset)
            add = (proj[..., None] * coef[:, None, :]).reshape(*out.shape[:-1], -1)
        else:
            add = ((x @ direction) - offset)[..., None] * coef
        return out.index_add(-1, idx, add.to(out.dtype))
    return hook


def _dense_gains(gains: GainsLike, shape: tuple[int, int]) -> torch.Tensor | None:
    """Normalise to [n_layers, n_neurons] (same for all rows) or [batch, n_layers, n_neurons] (per row)."""
    if gains is None:
        return None
    if isinstance(gains, Modulation):
        dense = gains.dense()
    elif isinstance(gains, torch.Tensor):
        dense = gains
    else:  # one entry per batch row; None = unmodulated row
        dense = torch.stack([torch.ones(shape) if g is None else g.dense() for g in gains])
    if tuple(dense.shape[-2:]) != tuple(shape):
        raise ValueError(f"Gains of shape {tuple(dense.shape)} do not fit this model's neurons {shape}.")
    return dense


@contextmanager
def modulate(model: nn.Module, gains: GainsLike, nmap: NeuronMap | None = None,
             inputs: dict[int, "InputTerms | RowTerms"] | None = None,
             switch: "tuple[Switch, torch.Tensor | None] | Switch | None" = None) -> Iterator[None]:
    """Apply gains (and input-side terms) to `model` inside the block only, and only for calls made from this
    thread/context.

    gains: a `Modulation` (with its input terms, if any); a tensor [n_layers, n_neurons] (may require grad, for
    training) or [batch, n_layers, n_neurons] for per-row gains; or a list with one `Modulation | None` per batch row.
    inputs: input-side terms per layer given explicitly (training, per-row strengths); by default those of the
    modulation(s). Layers whose gains are all exactly 1 and terms all 0 (and not trainable) get no hook at all.
    switch: a `Switch` (or (switch, [B] bool rows it applies to)) given explicitly; by default the modulation's own, or,
    for a list of per-row modulations, the one switch they carry, on their rows.
    """
    nmap = nmap or neuron_map(model)
    dense = _dense_gains(gains, nmap.shape)
    hooks = []
    if dense is not None:
        per_row = dense.dim() == 3
        for layer, proj in enumerate(nmap.projections):
            g = dense[:, layer] if per_row else dense[layer]
            if not g.requires_grad and bool((g == 1).all()):
                continue
            hooks.append((proj, _gain_hook(g, per_row)))
    terms = {l: t for l, t in _terms(gains, inputs, nmap.n_layers).items() if t.coef.requires_grad or bool((t.coef != 0).any())}
    if terms and not nmap.input_projections:
        raise ValueError(f"This modulation has input-side terms, but '{nmap.model_type}' models have no known MLP input "
                         "projection (model/neuron_map.py INPUT_PROJECTIONS). Use its static gains (Modulation.static()).")
    post = [(nmap.input_projections[l], _input_hook(t, nmap.input_offset)) for l, t in terms.items()]
    found = _switch(gains) if switch is None else (switch if isinstance(switch, tuple) else (switch, None))
    if found is not None:
        post = switch_hooks(model, found[0], nmap, found[1]) + post
    with scoped_pre_hooks(hooks, post=post):
        yield


def _switch(gains: GainsLike) -> tuple[Switch, torch.Tensor | None] | None:
    """The switch a modulation (all rows) or a list of per-row modulations (the rows that carry it) applies."""
    if isinstance(gains, Modulation):
        return None if gains.switch is None else (gains.switch, None)
    if gains is None or isinstance(gains, torch.Tensor):
        return None
    carried = [m.switch if m is not None else None for m in gains]
    distinct = {id(s) for s in carried if s is not None}
    if not distinct:
        return None
    if len(distinct) > 1:
        raise ValueError("Rows of one batch carry different switches; generate them in separate batches.")
    switch = next(s for s in carried if s is not None)
    return switch, torch.tensor([s is not None for s in carried])


def _broadcast(g: torch.Tensor, x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Gains shaped to multiply x: [N] for shared gains; [B, 1, ..., N] per row ([B, N] for a flattened x)."""
    if not per_row or x.dim() == 2:
        return g
    return g.view(g.shape[0], *([1] * (x.dim() - 2)), g.shape[-1])


def _rows(gx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row gains for a batch whose row count differs from theirs: OPT flattens [B, T, N] to [B*T, N]."""
    if x.dim() == 2 and x.shape[0] % gx.shape[0] == 0:
        return gx.repeat_interleave(x.shape[0] // gx.shape[0], dim=0)
    raise ValueError(f"Per-row gains for {gx.shape[0]} rows but the batch has {x.shape[0]}.")


def _gain_hook(g: torch.Tensor, per_row: bool):
    """Pre-hook multiplying a projection's input by its gains.

    Fixed gains are moved to each (device, dtype) the layer runs on and shaped to broadcast once, on the
    first call there (e.g. each shard under device_map="auto"); every later call, i.e. every decoding step,
    is one lookup and one multiply. Trainable gains are moved on every call so gradients reach them."""
    if g.requires_grad:
        def trainable(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            gx = _broadcast(g.to(device=x.device, dtype=x.dtype), x, per_row)
            if per_row and gx.shape[0] != x.shape[0]:
                gx = _rows(gx, x)
            return (x * gx, *args[1:])
        return trainable
    ready: dict = {}  # (device, dtype, rank) -> gains on that device, in that dtype, shaped to broadcast

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        gx = ready.get((x.device, x.dtype, x.dim()))
        if gx is None:
            gx = ready[x.device, x.dtype, x.dim()] = _broadcast(g.to(device=x.device, dtype=x.dtype), x, per_row)
        if per_row and gx.shape[0] != x.shape[0]:
            gx = _rows(gx, x)
        return (x * gx, *args[1:])

    return hook


@torch.no_grad()
def fold_into_weights(model: nn.Module, modulation: Modulation | torch.Tensor, nmap: NeuronMap | None = None) -> nn.Module:
    """Scale the output projection's input columns (rows for Conv1D) in place so the plain model
    computes what the hooked model does. Returns the model. Use on a copy when the original is shared.
    The product is taken in float32 and rounded once to the weight's dtype (see `folded_weight`)."""
    nmap = nmap or neuron_map(model)
    dense = _dense_gains(modulation, nmap.shape)
    if dense.dim() != 2:
        raise ValueError("Per-row gains cannot be folded into one set of weights.")
    for layer in range(nmap.n_layers):
        g = dense[layer]
        if bool((g == 1).all()):
            continue
        w = nmap.weight_slice(layer)  # [n_neurons, d_model] view
        w.copy_(folded_weight(w, g))
    if isinstance(modulation, Modulation):
        for layer, terms in modulation.inputs.items():
            rows, bias = folded_inputs(nmap, layer, terms)
            nmap.input_rows(layer).copy_(rows)
            if bias is not None:
                nmap.input_bias(layer).copy_(bias)
        if modulation.switch is not None:
            params = dict(model.named_parameters())
            for name, w in folded_switch(model, modulation.switch, nmap).items():
                params[name].copy_(w)
    return model


def folded_inputs(nmap: NeuronMap, layer: int, terms: InputTerms) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input rows [n_neurons, d_model], input bias [n_neurons] or None) of `layer` with the terms written in:
    row i += coef_i * direction, bias_i -= coef_i * offset; in float32, rounded once to the weights' dtype."""
    w = nmap.input_rows(layer).detach()
    rows = w.float().clone()
    rows[terms.indices.to(w.device)] += terms.coef.to(w.device, torch.float32)[:, None] * terms.direction.to(w.device, torch.float32)[None]
    b = nmap.input_bias(layer)
    if b is None:
        if terms.offset != 0:
            raise ValueError(f"Layer {layer}'s input projection has no bias, so input terms must have offset 0 "
                             f"(this one has {terms.offset:g}); centre the direction instead.")
        return rows.to(w.dtype), None
    bias = b.detach().float().clone()
    bias[terms.indices.to(b.device)] -= terms.coef.to(b.device, torch.float32) * float(terms.offset)
    return rows.to(w.dtype), bias.to(b.dtype)


@torch.no_grad()
def folded_state_dict(model: nn.Module, modulation: Modulation, nmap: NeuronMap | None = None,
                      gains_into: str = "down") -> dict[str, torch.Tensor]:
    """The model's state dict with the modulation folded into copies of the weights it changes; the shared model itself
    is never modified. What `export` saves, in any format.

    Input-side terms go into the input projection's rows (and bias). Gains go into the output projection's columns
    (`gains_into="down"`), or, for a gated MLP (`NeuronMap.gated`: down(act(gate(x)) * up(x))), into the rows of `up`
    (`gains_into="up"`), which is exact there and keeps a block-quantised row's codes (GGUF blocks run along rows)."""
    nmap = nmap or neuron_map(model)
    if gains_into not in ("down", "up"):
        raise ValueError(f"gains_into must be 'down' or 'up', not {gains_into!r}.")
    if gains_into == "up" and not nmap.gated:
        raise ValueError(f"Gains fold into the up projection only in a gated MLP; '{nmap.model_type}' is not one: use gains_into='down'.")
    state = dict(model.state_dict())
    names = {id(mod): name for name, mod in model.named_modules()}
    dense = modulation.dense()
    for layer in range(nmap.n_layers):
        g, terms = dense[layer], modulation.inputs.get(layer)
        gains_down = gains_into == "down" and not bool((g == 1).all())
        if gains_down:
            proj = nmap.projections[layer]
            w = folded_weight(nmap.weight_slice(layer).detach(), g)  # [n_neurons, d_model]
            state[f"{names[id(proj)]}.weight"] = w if nmap.transposed else w.t().contiguous()
        gains_up = gains_into == "up" and not bool((g == 1).all())
        if terms is None and not gains_up:
            continue
        module = nmap.input_projections[layer]
        rows, bias = (folded_inputs(nmap, layer, terms) if terms is not None else
                      (nmap.input_rows(layer).detach().clone(), None if nmap.input_bias(layer) is None else nmap.input_bias(layer).detach().clone()))
        if gains_up:  # a_i = act(gate_i x) * (row_i x + b_i): scaling the row and bias scales the neuron
            rows = folded_weight(rows, g)
            bias = None if bias is None else folded_weight(bias[:, None], g)[:, 0]
        full = module.weight.detach().clone()
        if nmap.transposed:  # Conv1D [in, out]
            full[:, nmap.input_offset:nmap.input_offset + nmap.n_neurons] = rows.t()
        else:
            full[nmap.input_offset:nmap.input_offset + nmap.n_neurons] = rows
        state[f"{names[id(module)]}.weight"] = full
        if bias is not None:
            full_b = module.bias.detach().clone()
            full_b[nmap.input_offset:nmap.input_offset + nmap.n_neurons] = bias
            state[f"{names[id(module)]}.bias"] = full_b
    if modulation.switch is not None:  # its own rows and columns: the gains and terms leave its neurons alone
        state.update(folded_switch(model, modulation.switch, nmap, state))
    return state


def folded_weight(w: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """w [n_neurons, d_model] (neurons along dim 0) times gains [n_neurons], computed in float32 from the
    original weights and rounded once to w's dtype: in bfloat16, rounding the gains to bf16 first and the
    product again would add a second rounding error on every modulated neuron."""
    return (w.float() * gains.to(w.device, torch.float32)[:, None]).to(w.dtype)
