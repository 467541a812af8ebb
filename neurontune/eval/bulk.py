"""Your prompts, in bulk: the base and the tuned model answer a researcher's own list in batched calls (each
batch holds the base row and the tuned row of every prompt: per-row gains, as the side-by-side chat does),
every answer judged, with the input gate's strength per prompt when the gains have a gate (the tuned row
then applies strength × s, as the evaluation's "neurontune + gate"). The studio's bulk table uses it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import pandas as pd

from ..infra.progress import SILENT, Reporter
from ..interventions.gating import Gated, GateProbe
from ..interventions.generation import fit_lengths, generate
from ..interventions.modulation import Modulation
from .judge import is_refusal, refusal_phrase

COLUMNS = ("prompt", "base verdict", "tuned verdict", "gate s", "base answer", "tuned answer")


@dataclass(frozen=True)
class BulkRow:
    prompt: str
    base: str
    tuned: str
    gate: float | None = None  # the input gate's s for this prompt (None: static gains)

    @property
    def base_refuses(self) -> bool:
        return is_refusal(self.base, self.prompt)

    @property
    def tuned_refuses(self) -> bool:
        return is_refusal(self.tuned, self.prompt)

    def as_dict(self) -> dict:
        def verdict(text: str) -> str:
            phrase = refusal_phrase(text)
            return f"refuses (“{phrase}”)" if phrase else ("empty" if not text.strip() else "answers")
        return dict(zip(COLUMNS, (self.prompt, verdict(self.base), verdict(self.tuned), None if self.gate is None else round(self.gate, 3),
                                  self.base, self.tuned)))


def tuned_gains(lm, prompts: Sequence[str], modulation: Modulation, gate: GateProbe | None, strength: float,
                max_prompt_tokens: int) -> tuple[list[Modulation], list[float] | None]:
    """The tuned row's gains for each prompt: strength × the gate's s (read on the prompt alone, unmodulated)
    when there is a gate, else the static gains at `strength`."""
    if gate is None:
        mod = modulation if float(strength) == 1.0 else modulation.scaled(float(strength))
        return [mod] * len(prompts), None
    return Gated(modulation, gate).per_prompt(lm, prompts, strength=strength, max_length=max_prompt_tokens)


def iter_compare(lm, prompts: Sequence[str], modulation: Modulation, *, gate: GateProbe | None = None, strength: float = 1.0,
                 max_new_tokens: int = 48, batch_size: int = 8, reporter: Reporter | None = None) -> Iterator[list[BulkRow]]:
    """Answer every prompt with the base and the tuned model, `batch_size` prompts (2 × batch_size generate
    rows) per call, greedy; yields each batch's rows as it finishes. Stops with `Cancelled` once `reporter` is cancelled."""
    if modulation is None:
        raise ValueError("No gains to compare with: train or load gains first (both answers would be the base model's).")
    if modulation.fingerprint and modulation.fingerprint != lm.fingerprint:
        raise ValueError("These gains were made for another model; load the model they were tuned on.")
    budget, _ = fit_lengths(lm, max_new_tokens)
    prompts, reporter = list(prompts), reporter or SILENT
    for start in range(0, len(prompts), batch_size):
        reporter.check("The bulk run")
        chunk = prompts[start:start + batch_size]
        tuned, s = tuned_gains(lm, chunk, modulation, gate, strength, budget)
        answers = generate(lm, [p for p in chunk for _ in (0, 1)], [g for t in tuned for g in (None, t)],
                           max_new_tokens=max_new_tokens, batch_size=2 * len(chunk))
        yield [BulkRow(p, answers[2 * i], answers[2 * i + 1], None if s is None else s[i]) for i, p in enumerate(chunk)]
        reporter.progress(min(start + batch_size, len(prompts)), len(prompts), "answering")


def compare_prompts(lm, prompts: Sequence[str], modulation: Modulation, **kwargs) -> list[BulkRow]:
    """Every prompt's base and tuned answer (see `iter_compare`)."""
    return [row for rows in iter_compare(lm, prompts, modulation, **kwargs) for row in rows]


def bulk_frame(rows: Sequence[BulkRow]) -> pd.DataFrame:
    return pd.DataFrame([r.as_dict() for r in rows], columns=list(COLUMNS))


def bulk_summary(rows: Sequence[BulkRow]) -> dict:
    """How many prompts each model refused, and how many verdicts the gains changed."""
    return {"n": len(rows), "base_refusals": sum(r.base_refuses for r in rows), "tuned_refusals": sum(r.tuned_refuses for r in rows),
            "changed": sum(r.base_refuses != r.tuned_refuses for r in rows)}
