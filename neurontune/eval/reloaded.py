"""An exported checkpoint, reloaded with plain `transformers`, evaluated as an intervention on its base model.

The harness runs a `Reloaded`'s rows on its own model with no hook at all, and the base rows on the base model,
so the figures are those of exactly the files a user downloads, not of the hooked model they were folded from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..model.loading import LoadedModel, load_model


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
