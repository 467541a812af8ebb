"""Where each architecture keeps its MLP neurons: the input units of every layer's MLP output projection.

One table keyed by `config.model_type`; everything else in the engine (hooks, folding, attribution)
goes through `NeuronMap` and never touches architecture-specific attribute names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

# model_type -> (candidate paths of the decoder layer list, path of the MLP output projection in a layer)
_DOWN_PROJ = (("model.layers", "model.language_model.layers", "language_model.model.layers"), "mlp.down_proj")
ARCHITECTURES: dict[str, tuple[tuple[str, ...], str]] = {
    **{t: _DOWN_PROJ for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3",
        "olmo", "olmo2", "granite", "smollm3", "cohere", "stablelm", "starcoder2_llama", "helium",
    )},
    "gpt2": (("transformer.h",), "mlp.c_proj"),            # Conv1D: weight stored [in, out]
    "gpt_neox": (("gpt_neox.layers",), "mlp.dense_4h_to_h"),
    "opt": (("model.decoder.layers",), "fc2"),
    "phi": (("model.layers",), "mlp.fc2"),
    "gptj": (("transformer.h",), "mlp.fc_out"),
    "falcon": (("transformer.h",), "mlp.dense_4h_to_h"),
    "bloom": (("transformer.h",), "mlp.dense_4h_to_h"),
}

# model_type -> path of the MLP's input projection whose output unit i is linear in the layer's MLP input and feeds
# neuron i (the "up" half of a gated MLP, or the pre-activation of a plain one), and the row offset of neuron 0 in it
# (phi3 fuses gate and up: the up half comes second). Where a neuron's input-side term is written (`InputTerms`).
INPUT_PROJECTIONS: dict[str, tuple[str, bool]] = {
    **{t: ("mlp.up_proj", False) for t in ARCHITECTURES if ARCHITECTURES[t] is _DOWN_PROJ},
    "phi3": ("mlp.gate_up_proj", True),
    "gpt2": ("mlp.c_fc", False),
    "gpt_neox": ("mlp.dense_h_to_4h", False),
    "opt": ("fc1", False),
    "phi": ("mlp.fc1", False),
    "gptj": ("mlp.fc_in", False),
    "falcon": ("mlp.dense_h_to_4h", False),
    "bloom": ("mlp.dense_h_to_4h", False),
}

# Mixture-of-experts models have one MLP per expert and a router; a "neuron" is not one unit there.
MOE_TYPES = {
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx", "jamba", "granitemoe", "granitemoeshared",
    "phimoe", "deepseek_v2", "deepseek_v3", "jetmoe", "switch_transformers", "nllb_moe", "gpt_oss",
    "llama4", "llama4_text", "minimax", "hunyuan_v1_moe", "ernie4_5_moe", "glm4_moe", "dots1",
}


def supported_types() -> list[str]:
    return sorted(ARCHITECTURES)


def _get(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class NeuronMap:
    """The MLP output projection of every layer, in layer order, and the neuron count per layer."""

    model_type: str
    projections: tuple[nn.Module, ...]
    n_neurons: int
    transposed: bool  # True for GPT-2's Conv1D, whose weight is [in, out]: neuron i is row i
    input_projections: tuple[nn.Module, ...] = ()  # per layer, the input projection feeding the neurons (INPUT_PROJECTIONS)
    input_offset: int = 0  # row of neuron 0 in the input projection's output (phi3's fused gate_up: n_neurons)
    gated: bool = False  # the MLP is down(act(gate(x)) * up(x)) and the input projection is `up`: linear in a neuron

    @property
    def n_layers(self) -> int:
        return len(self.projections)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_neurons)

    def weight_slice(self, layer: int) -> torch.Tensor:
        """The projection weight with neurons along dim 0: [n_neurons, d_model] (a view, writable)."""
        w = self.projections[layer].weight
        return w if self.transposed else w.t()

    def input_rows(self, layer: int) -> torch.Tensor:
        """The input projection's weight rows that feed the neurons: [n_neurons, d_model] (a view, writable)."""
        w = self.input_projections[layer].weight
        rows = w.t() if self.transposed else w  # Conv1D stores [in, out]
        return rows[self.input_offset:self.input_offset + self.n_neurons]

    def input_bias(self, layer: int) -> torch.Tensor | None:
        """The input projection's bias entries of the neurons ([n_neurons], a view), or None without a bias."""
        b = getattr(self.input_projections[layer], "bias", None)
        return None if b is None else b[self.input_offset:self.input_offset + self.n_neurons]


def check_supported(model_type: str | None, n_experts: int | None = None) -> None:
    """Refuse mixture-of-experts and unmapped architectures; works on a config alone, before any weight loads."""
    if model_type in MOE_TYPES or n_experts:
        raise UnsupportedModelError(
            f"'{model_type}' is a mixture-of-experts model; NeuronTune supports dense MLPs only for now. "
            f"Choose a dense model of a supported family: {', '.join(supported_types())}.")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"Model type '{model_type}' is not in the neuron map. Supported families: "
            f"{', '.join(supported_types())}. Add an entry to neurontune/model/neuron_map.py:ARCHITECTURES "
            "naming where its decoder layers and MLP output projection are.")


def neuron_map(model: nn.Module) -> NeuronMap:
    """Build the neuron map of a loaded causal LM, or say clearly why it is not supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    check_supported(model_type, getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None))
    layer_paths, proj_path = ARCHITECTURES[model_type]
    layers = None
    for path in layer_paths:
        try:
            layers = _get(model, path)
            break
        except AttributeError:
            continue
    if layers is None:
        raise UnsupportedModelError(f"Could not find the decoder layers of this '{model_type}' model at {layer_paths}.")
    projections = tuple(_get(layer, proj_path) for layer in layers)
    transposed = type(projections[0]).__name__ == "Conv1D"
    weight = projections[0].weight
    n_neurons = weight.shape[0] if transposed else weight.shape[1]
    input_path, fused = INPUT_PROJECTIONS.get(model_type, (None, False))
    try:
        inputs = tuple(_get(layer, input_path) for layer in layers) if input_path else ()
    except AttributeError:  # a variant of the family without that module: no input-side terms for it
        inputs = ()
    gated = bool(inputs) and input_path in ("mlp.up_proj", "mlp.gate_up_proj")
    return NeuronMap(model_type, projections, int(n_neurons), transposed, inputs, int(n_neurons) if fused else 0, gated)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a supported model (the residual stream enters each layer as its first argument)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"Model type '{model_type}' is not in the neuron map. Supported families: {', '.join(supported_types())}.")
    for path in ARCHITECTURES[model_type][0]:
        try:
            return _get(model, path)
        except AttributeError:
            continue
    raise UnsupportedModelError(f"Could not find the decoder layers of this '{model_type}' model at {ARCHITECTURES[model_type][0]}.")


# The norm applied to the residual stream right before the unembedding (what a logit lens must go through).
FINAL_NORMS = ("model.norm", "model.language_model.norm", "language_model.model.norm", "transformer.ln_f",
               "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm", "model.final_layernorm")


def final_norm(model: nn.Module) -> nn.Module:
    """The final norm before the LM head (identity for a model without one, e.g. OPT-350m's post-norm)."""
    for path in FINAL_NORMS:
        try:
            norm = _get(model, path)
        except AttributeError:
            continue
        return nn.Identity() if norm is None else norm
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise UnsupportedModelError(f"Could not find the final norm of this '{model_type}' model at {FINAL_NORMS}; add its path "
                                "to neurontune/model/neuron_map.py:FINAL_NORMS.")
