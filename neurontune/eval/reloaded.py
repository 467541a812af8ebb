"""An exported checkpoint, reloaded with plain `transformers`, evaluated as an intervention on its base model.

The harness runs a `Reloaded`'s rows on its own model with no hook at all, and the base rows on the base model,
so the figures are those of exactly the files a user downloads, not of the hooked model they were folded from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..model.loading import LoadedModel, fingerprint, load_model
from ..model.neuron_map import neuron_map


@dataclass
class Reloaded:
    lm: LoadedModel  # the reloaded checkpoint
    fingerprint: str  # the base model's: the checkpoint is measured against the model it was folded from
    name: str = "neurontune (folded, reloaded)"
    meta: dict = field(default_factory=lambda: {"kind": "reloaded checkpoint", "form": "folded"})

    @classmethod
    def load(cls, path: str | Path, base: LoadedModel, name: str | None = None) -> "Reloaded":
        """The checkpoint in `path` (a folder `export` wrote), loaded like any local model, in the base model's dtype."""
        dtype = str(base.model.dtype).removeprefix("torch.")
        reloaded = load_model(str(path), dtype=dtype)
        return cls(reloaded, base.fingerprint, name or cls.name, {"kind": "reloaded checkpoint", "form": "folded", "path": str(path)})

    @classmethod
    def of_model(cls, model, base: LoadedModel, path: str | Path, name: str | None = None) -> "Reloaded":
        """A checkpoint transformers has already read back (a GGUF file, dequantised), with the base model's tokenizer
        (the export wrote the same one), in the base model's dtype."""
        model = model.to(base.model.dtype).eval().requires_grad_(False)
        nmap = neuron_map(model)
        lm = LoadedModel(model, base.tokenizer, str(path), fingerprint(model, nmap), nmap, source=f"gguf:{path}")
        return cls(lm, base.fingerprint, name or cls.name, {"kind": "reloaded checkpoint", "form": "folded", "path": str(path)})
