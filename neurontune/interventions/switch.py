"""A switch folded into the model's own weights: two neurons of one layer rewritten to decide "is this harmful?" and
raise a flag in the residual stream that later layers' input-side terms read (`modulation.InputTerms`).

In a gated MLP a neuron computes act(gate . x) * (up . x) and writes that times its column of the output projection.
The switch rewrites two neurons j1, j2 of layer `layer`:
- gate rows a*w and a*w - T*k, where w is a bias-free probe of the MLP input (it reads > 0 at the end of a harmful
  prompt) and k a direction that reads about 1 on every token (a gated MLP has no bias, so k stands in for one);
- up rows k, so each neuron is about act(a * w.x) and act(a * w.x - T): their difference is a ramp clamped to [0, T];
- output columns +f and -f: the clamped ramp times f is added to the residual stream, nothing where the probe reads
  below zero.
Later layers read the flag through input-side terms whose direction picks f out of their MLP input. Optionally the
switch also reads the whole prompt: `mean`, a key-value group of an attention layer at or before its own rewritten to
write the running mean of a second probe over every token so far (`turn_mean.TurnMean`), which w then reads beside the
prompt's end. Or it also reads the flag of an `earlier` switch (a probe of an earlier layer): its gate rows then carry
M*(r - k), r reading that flag (about 1 when it is up, 0 when down), so without the earlier flag the probe must read
above M to fire: an AND of two layers' probes. Everything is rows and columns of existing weight matrices: the folded
checkpoint has the architecture and config of the base model.
The hooked form (`hooks`) computes exactly what the folded weights do, for the duration of a `with` block only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..model.neuron_map import NeuronMap, decoder_layers
from .hooks import delta_hook
from . import turn_mean
from .turn_mean import TurnMean

EARLIER = "switch.earlier."  # the stored names of an earlier switch's tensors (and its layer)
EARLIER_NAMES = ("layer", "neurons", "gate_rows", "up_rows", "down_cols")


@dataclass
class Switch:
    """Neurons `neurons` [k] of layer `layer` with new gate rows, up rows [k, d_model] and output columns [k, d_model]
    (neuron-major: row i is what neuron i writes into the residual stream)."""

    layer: int
    neurons: torch.Tensor
    gate_rows: torch.Tensor
    up_rows: torch.Tensor
    down_cols: torch.Tensor
    mean: TurnMean | None = None  # the whole-prompt reading w reads beside the prompt's end (`turn_mean`)
    earlier: "Switch | None" = None  # a switch of an earlier layer whose flag the gate rows also read (an AND)

    def __post_init__(self):
        k = len(self.neurons)
        shapes = {t.shape for t in (self.gate_rows, self.up_rows, self.down_cols)}
        if len(shapes) != 1 or next(iter(shapes))[0] != k or len(next(iter(shapes))) != 2:
            raise ValueError(f"A switch needs gate rows, up rows and output columns of shape [{k}, d_model]; got "
                             f"{[tuple(t.shape) for t in (self.gate_rows, self.up_rows, self.down_cols)]}.")
        if not all(bool(torch.isfinite(t).all()) for t in (self.gate_rows, self.up_rows, self.down_cols)):
            raise ValueError("A switch's rows and columns must be finite.")
        if self.mean is not None and self.mean.layer > self.layer:
            raise ValueError(f"The switch of layer {self.layer} reads a turn mean of layer {self.mean.layer}: it must be at or "
                             "before the switch's own layer.")
        if self.earlier is not None and (self.earlier.layer >= self.layer or self.earlier.earlier is not None
                                         or self.earlier.mean is not None):
            raise ValueError(f"The switch of layer {self.layer} reads an earlier switch of layer {self.earlier.layer}: it must be "
                             "of an earlier layer and read the prompt's end only (no turn mean, no switch before it).")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The switch's tensors under the names a modulation file stores them."""
        out = {"switch.neurons": self.neurons.to(torch.int64).contiguous(), "switch.gate_rows": self.gate_rows.float().contiguous(),
               "switch.up_rows": self.up_rows.float().contiguous(), "switch.down_cols": self.down_cols.float().contiguous()}
        if self.earlier is not None:
            out[EARLIER + "layer"] = torch.tensor([self.earlier.layer], dtype=torch.int64)
            out.update({EARLIER + k.removeprefix("switch."): v for k, v in self.earlier.tensors().items()})
        return out if self.mean is None else {**out, **self.mean.tensors()}

    def same(self, other: "Switch") -> bool:
        """The same rewrite: same layer, same stored tensors bit for bit (what a file of either would hold)."""
        a, b = self.tensors(), other.tensors()
        return self.layer == other.layer and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    @classmethod
    def from_tensors(cls, layer: int, tensors: dict[str, torch.Tensor]) -> "Switch":
        earlier = None
        if EARLIER + "layer" in tensors:
            inner = {"switch." + k.removeprefix(EARLIER): v for k, v in tensors.items() if k.startswith(EARLIER)}
            earlier = cls.from_tensors(int(tensors[EARLIER + "layer"][0]), inner)
        return cls(int(layer), tensors["switch.neurons"].long(), tensors["switch.gate_rows"].float(),
                   tensors["switch.up_rows"].float(), tensors["switch.down_cols"].float(), TurnMean.from_tensors(tensors), earlier)

    def chain(self) -> list["Switch"]:
        """The switches this one is made of, earliest first (itself alone, or its earlier switch and itself)."""
        return ([] if self.earlier is None else self.earlier.chain()) + [self]

    def check(self, nmap: NeuronMap, d_model: int | None = None) -> None:
        """Refuse a switch that does not fit the model: not a gated MLP, layer or neurons out of range, wrong width."""
        require_gated(nmap)
        if not 0 <= self.layer < nmap.n_layers:
            raise ValueError(f"The switch's layer {self.layer} is outside the model's layers 0..{nmap.n_layers - 1}.")
        if len(self.neurons) and (int(self.neurons.min()) < 0 or int(self.neurons.max()) >= nmap.n_neurons):
            raise ValueError(f"The switch's neurons must be in 0..{nmap.n_neurons - 1}.")
        if d_model is not None and self.gate_rows.shape[1] != d_model:
            raise ValueError(f"The switch was made for hidden size {self.gate_rows.shape[1]}, not {d_model}.")
        if self.earlier is not None:
            self.earlier.check(nmap, d_model)


def require_gated(nmap: NeuronMap) -> None:
    """A switch rewrites rows of a gated MLP's separate gate and up projections (the LLaMA family)."""
    if not nmap.gated or nmap.input_offset:
        raise ValueError(f"A switch rewrites a gated MLP's gate and up rows; '{nmap.model_type}' models do not have "
                         "separate ones. Export static gains or input-side terms (fold.form 'static' or 'conditional').")


def _mlp(model, layer: int):
    return decoder_layers(model)[layer].mlp


def hooks(model, switch: Switch, nmap: NeuronMap, rows: torch.Tensor | None = None) -> list:
    """Forward hooks that make the model compute what the folded switch computes (`hooks.scoped_pre_hooks(post=...)`).
    `rows`: a [B] bool mask of the batch rows it applies to (per-row strengths: rows at strength 0 stay the base model)."""
    switch.check(nmap)
    if switch.earlier is not None:
        return hooks(model, switch.earlier, nmap, rows) + hooks(model, dataclasses.replace(switch, earlier=None), nmap, rows)
    mlp = _mlp(model, switch.layer)
    idx = switch.neurons

    def delta(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return new.to(old.device, torch.float32) - old[idx.to(old.device)].detach().float()
    reads = [] if switch.mean is None else turn_mean.hooks(model, switch.mean, rows)
    return reads + [(mlp.gate_proj, delta_hook(idx, delta(switch.gate_rows, mlp.gate_proj.weight), rows, units_out=True)),
            (mlp.up_proj, delta_hook(idx, delta(switch.up_rows, mlp.up_proj.weight), rows, units_out=True)),
            (nmap.projections[switch.layer], delta_hook(idx, delta(switch.down_cols, nmap.weight_slice(switch.layer)), rows,
                                                         units_out=False))]


@torch.no_grad()
def folded(model, switch: Switch, nmap: NeuronMap, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: new weight} for the three matrices the switch changes, starting from `state`'s tensors where it
    has them (a state dict with other terms already folded in), else the model's: copies, the model is not touched."""
    switch.check(nmap)
    if switch.earlier is not None:
        out = folded(model, switch.earlier, nmap, state)
        return {**out, **folded(model, dataclasses.replace(switch, earlier=None), nmap, {**(state or {}), **out})}
    mlp = _mlp(model, switch.layer)
    names = {id(p): n for n, p in model.named_parameters()}
    start = lambda module: (state or {}).get(names[id(module.weight)], module.weight).detach().clone()  # noqa: E731
    out = {}
    idx = switch.neurons
    for module, rows in ((mlp.gate_proj, switch.gate_rows), (mlp.up_proj, switch.up_rows)):
        w = start(module)
        w[idx.to(w.device)] = rows.to(w.device, w.dtype)
        out[names[id(module.weight)]] = w
    down = nmap.projections[switch.layer]
    w = start(down)  # [d_model, n_neurons] for a linear output projection
    w[:, idx.to(w.device)] = switch.down_cols.to(w.device, w.dtype).t()
    out[names[id(down.weight)]] = w
    if switch.mean is not None:
        out.update(turn_mean.folded(model, switch.mean, state))
    return out
