"""Answer a list of prompts with a run's modulation in a chosen form: what `neurontune generate` does, as an engine
call. A run folder offers its modulation as static gains, as a conditional modulation (when it has input-side terms)
and, when it has a gate, gated (`interventions.protocol.FORMS`); the default is the richest form the run has. Every
answer is then read by a judge (`eval.judges`), with its second opinion where it has one."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..eval.judges import RULES, Judge
from ..infra.progress import Reporter
from ..interventions.gating import Gated
from ..interventions.generation import generate
from ..interventions.modulation import Modulation
from ..interventions.protocol import FORMS
from .folder import RunFolder


class FormError(ValueError):
    """The run cannot be applied in the asked form."""


def run_forms(folder: RunFolder, lm) -> dict[str, object]:
    """Every form the run can be applied in, richest last: what export folds (static gains, or conditional with input-side
    terms: the foldable modulation when the run trained one apart, else its own), then gated (its own behind its gate)."""
    mod = folder.modulation(lm.fingerprint)
    if mod is None:
        raise FormError(f"{folder.path} holds no trained gains ({RunFolder.MODULATION}); run `tune --out` first.")
    folded = folder.exported(lm.fingerprint)
    forms: dict[str, object] = {"static": folded.static()}
    if folded.conditional:
        forms["conditional"] = folded
    gate = folder.gate(lm)
    if gate is not None:
        forms["gated"] = Gated(mod, gate)
    return forms


def intervention_for(lm, source: str | Path, form: str | None = None) -> tuple[object, str]:
    """(the intervention, its form) for a run folder or a modulation file, in `form` (default: the richest)."""
    if form is not None and form not in FORMS:
        raise FormError(f"Unknown form {form!r}; use one of {', '.join(FORMS)}.")
    path = Path(source)
    if path.is_dir():
        forms = run_forms(RunFolder(path), lm)
    else:
        mod = Modulation.load(path, lm.fingerprint)
        forms = {"static": mod.static(), **({"conditional": mod} if mod.conditional else {})}
    chosen = form or list(forms)[-1]
    if chosen not in forms:
        raise FormError(f"{source} cannot be applied {chosen}: it offers {', '.join(forms)} "
                        f"({'no input gate' if chosen == 'gated' else 'no input-side terms'}).")
    return forms[chosen], chosen


def answer(lm, prompts: Sequence[str], intervention=None, *, max_new_tokens: int = 48, batch_size: int = 16,
           reporter: Reporter | None = None) -> tuple[list[str], list[float] | None]:
    """(answers, the gate's reading of each prompt or None): a gated intervention scales its modulation per prompt by
    the gate's reading of that prompt alone; any other applies as it is (None: the base model)."""
    strengths = None
    gains = intervention
    if isinstance(intervention, Gated):
        gains, strengths = intervention.per_prompt(lm, prompts)
    answers = generate(lm, prompts, gains, max_new_tokens=max_new_tokens, batch_size=batch_size, reporter=reporter)
    return answers, strengths


def judge_answers(prompts: Sequence[str], answers: Sequence[str], judge: Judge | None = None) -> tuple[list[str], list[str] | None]:
    """(the judge's verdict on each answer, its second opinion's verdicts or None when it has none); default the rules."""
    judge = judge or RULES
    verdicts = judge.verdicts(prompts, answers)
    return verdicts, (judge.second.verdicts(prompts, answers) if judge.second is not None else None)
