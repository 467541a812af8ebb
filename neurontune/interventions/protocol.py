"""The intervention protocol every evaluated thing follows: None (the base model) or an object whose
`.apply(lm)` returns a context manager that changes the model inside the block only, and whose
`.apply_rows(lm, strengths)` applies it at a strength per batch row (0 = off, 1 = as is), named by `.name`
or `.meta["kind"]` (a `Modulation`, a `RefusalDirection`...). A gated intervention (`gating.Gated`) has an
`.inner` intervention and a `.strengths(lm, formatted_prompts)` read from each prompt's end."""
from __future__ import annotations

import contextlib

import torch


def applied(intervention, lm):
    """The context manager of `intervention` on `lm` (a no-op for None, the base model)."""
    return contextlib.nullcontext() if intervention is None else intervention.apply(lm)


def applied_rows(intervention, lm, strengths: torch.Tensor):
    """`intervention` at one strength per batch row: rows at 0 are the base model, rows at 1 exactly the
    intervention (bit-identical to `applied`), others in between."""
    if intervention is None or not bool(strengths.ne(0).any()):
        return contextlib.nullcontext()
    if bool(strengths.eq(1).all()):
        return intervention.apply(lm)
    return intervention.apply_rows(lm, strengths)


def is_gated(intervention) -> bool:
    return intervention is not None and hasattr(intervention, "strengths") and hasattr(intervention, "inner")


def intervention_name(intervention) -> str:
    if intervention is None:
        return "base"
    meta = getattr(intervention, "meta", None) or {}
    name = getattr(intervention, "name", None) or meta.get("name")
    return str(name or meta.get("kind") or type(intervention).__name__.lower())


# The forms a modulation is applied in, in one vocabulary for `generate`, the studio's Compare, the evaluation tables
# and the model card.
FORMS = {
    "static": "static gains: the same for every prompt (fold into the output projections)",
    "conditional": ("conditional: gains and input-side terms that read a harm direction or a folded switch's flag "
                    "(fold exactly into the model's own weights)"),
    "gated": "gated: the modulation scaled per prompt by the input gate (cannot be folded)",
}
# The same forms as titles of the evaluation tables' blocks (rows compared like with like).
FORM_TITLES = {"static": "static (the same for every prompt)",
               "conditional": "conditional, folded into the weights (what export writes, reloaded)",
               "gated": "gated (the same input gate in front of each)"}


def form_of(intervention) -> str | None:
    """"static", "conditional" or "gated" for a modulation (or a reloaded checkpoint, by what it folds); None for the base."""
    if intervention is None:
        return None
    if is_gated(intervention):
        return "gated"
    meta = getattr(intervention, "meta", None) or {}
    if getattr(intervention, "conditional", False) or meta.get("folds") == "conditional":
        return "conditional"
    return "static"

