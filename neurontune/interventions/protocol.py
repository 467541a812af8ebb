"""The intervention protocol every evaluated thing follows: None (the base model) or an object whose
`.apply(lm)` returns a context manager that changes the model inside the block only, named by `.name` or
`.meta["kind"]` (a `Modulation`, a `GatedModulation`, a `RefusalDirection`...)."""
from __future__ import annotations

import contextlib


def applied(intervention, lm):
    """The context manager of `intervention` on `lm` (a no-op for None, the base model)."""
    return contextlib.nullcontext() if intervention is None else intervention.apply(lm)


def intervention_name(intervention) -> str:
    if intervention is None:
        return "base"
    meta = getattr(intervention, "meta", None) or {}
    name = getattr(intervention, "name", None) or meta.get("name")
    return str(name or meta.get("kind") or type(intervention).__name__.lower())
