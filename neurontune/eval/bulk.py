"""Your prompts, in bulk: the base and the tuned model answer a researcher's own list in batched calls (each
batch holds the base row and the tuned row of every prompt: per-row gains, as the side-by-side chat does),
every answer judged (by any `eval.judges` judge; with its second opinion beside it, and the rows where the two
differ selectable), with the input gate's strength per prompt when the gains have a gate (the tuned row then
applies strength × s, as the evaluation's "neurontune + gate"). The studio's bulk table uses it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import pandas as pd

from ..infra.progress import SILENT, Reporter
from ..interventions.gating import GateProbe, row_modulations
from ..interventions.generation import fit_lengths, generate
from ..interventions.modulation import Modulation
from .judge import REFUSALS
from .judges import RULES, Judge, agreement, verdict_text

COLUMNS = ("prompt", "base verdict", "tuned verdict", "gate s", "base answer", "tuned answer")
SECOND_COLUMNS = ("base: 2nd judge", "tuned: 2nd judge")  # beside the verdicts, when the judge has a second opinion


@dataclass(frozen=True)
class BulkRow:
    prompt: str
    base: str
    tuned: str
    gate: float | None = None  # the input gate's s for this prompt (None: static gains)
    base_verdict: str = ""  # the judge's verdicts (refuse | partial | comply | degenerate)
    tuned_verdict: str = ""
    base_second: str | None = None  # the second judge's, when the judge has one
    tuned_second: str | None = None

    @property
    def base_refuses(self) -> bool:
        return self.base_verdict in REFUSALS

    @property
    def tuned_refuses(self) -> bool:
        return self.tuned_verdict in REFUSALS

    @property
    def judges_differ(self) -> bool:
        """The second judge makes another refusal decision on either answer."""
        return self.base_second is not None and ((self.base_second in REFUSALS) != self.base_refuses or
                                                 (self.tuned_second in REFUSALS) != self.tuned_refuses)

    def as_dict(self) -> dict:
        out = dict(zip(COLUMNS, (self.prompt, verdict_text(self.base_verdict, self.base), verdict_text(self.tuned_verdict, self.tuned),
                                 None if self.gate is None else round(self.gate, 3), self.base, self.tuned)))
        if self.base_second is not None:
            out.update(zip(SECOND_COLUMNS, (verdict_text(self.base_second, self.base), verdict_text(self.tuned_second, self.tuned))))
        return out


def iter_compare(lm, prompts: Sequence[str], modulation: Modulation, *, gate: GateProbe | None = None, strength: float = 1.0,
                 max_new_tokens: int = 48, batch_size: int = 8, reporter: Reporter | None = None,
                 judge: Judge | None = None) -> Iterator[list[BulkRow]]:
    """Answer every prompt with the base and the tuned model, `batch_size` prompts (2 × batch_size generate
    rows) per call, greedy, each answer judged by `judge` (default the rules); yields each batch's rows as it
    finishes. Stops with `Cancelled` once `reporter` is cancelled."""
    judge = judge or RULES
    if modulation is None:
        raise ValueError("No gains to compare with: train or load gains first (both answers would be the base model's).")
    if modulation.fingerprint and modulation.fingerprint != lm.fingerprint:
        raise ValueError("These gains were made for another model; load the model they were tuned on.")
    budget, _ = fit_lengths(lm, max_new_tokens)
    prompts, reporter = list(prompts), reporter or SILENT
    for start in range(0, len(prompts), batch_size):
        reporter.check("The bulk run")
        chunk = prompts[start:start + batch_size]
        tuned, s = row_modulations(lm, modulation, gate, chunk, strength=strength, max_length=budget)
        pairs = [p for p in chunk for _ in (0, 1)]
        answers = generate(lm, pairs, [g for t in tuned for g in (None, t)], max_new_tokens=max_new_tokens, batch_size=2 * len(chunk))
        verdicts = judge.verdicts(pairs, answers)
        second = judge.second.verdicts(pairs, answers) if judge.second is not None else [None] * len(answers)
        yield [BulkRow(p, answers[2 * i], answers[2 * i + 1], None if s is None else s[i], verdicts[2 * i], verdicts[2 * i + 1],
                       second[2 * i], second[2 * i + 1]) for i, p in enumerate(chunk)]
        reporter.progress(min(start + batch_size, len(prompts)), len(prompts), "answering")


def compare_prompts(lm, prompts: Sequence[str], modulation: Modulation, **kwargs) -> list[BulkRow]:
    """Every prompt's base and tuned answer (see `iter_compare`)."""
    return [row for rows in iter_compare(lm, prompts, modulation, **kwargs) for row in rows]


def bulk_frame(rows: Sequence[BulkRow], only_disagreements: bool = False) -> pd.DataFrame:
    """The table: one row per prompt; with a second judge its verdicts beside the first's, and `only_disagreements`
    keeps the prompts where the two judges decide differently on either answer."""
    second = any(r.base_second is not None for r in rows)
    columns = list(COLUMNS[:3]) + list(SECOND_COLUMNS) + list(COLUMNS[3:]) if second else list(COLUMNS)
    shown = [r for r in rows if r.judges_differ] if only_disagreements else list(rows)
    return pd.DataFrame([r.as_dict() for r in shown], columns=columns)


def bulk_summary(rows: Sequence[BulkRow]) -> dict:
    """How many prompts each model refused (full or partial), how many verdicts the gains changed, and with a second
    judge how many of the 2 × n answers it decides the same way (`agree`) and on how many prompts they differ."""
    out = {"n": len(rows), "base_refusals": sum(r.base_refuses for r in rows), "tuned_refusals": sum(r.tuned_refuses for r in rows),
           "changed": sum(r.base_refuses != r.tuned_refuses for r in rows)}
    if any(r.base_second is not None for r in rows):
        first = [v for r in rows for v in (r.base_verdict, r.tuned_verdict)]
        second = [v for r in rows for v in (r.base_second, r.tuned_second)]
        out["agree"], out["answers"] = agreement(first, second)
        out["differ"] = sum(r.judges_differ for r in rows)
    return out
