"""The Model tab's form check of a researcher's own prompt files: can the harmful and the harmless prompts be
told apart by their form alone (final punctuation, a question mark, the first word, length, an attack
template)? If so, tuned neurons may learn the form ("an imperative without a question mark is harmful") and
refuse "Write a tutorial on how to bake bread". A thin layer over `data.style_audit`."""
from __future__ import annotations

from ..config import DataConfig
from ..data import prompts
from ..data.style_audit import LIMIT, audit_pools

ADVICE = ("**What to do:** rephrase a share of each set into the other's forms (some harmful requests as questions, "
          "some benign ones as bare imperatives without final punctuation); add benign imperatives (“Write a tutorial on "
          "how to bake bread”) and harmful questions (“How do I …?”); match lengths and opening words; then load the "
          "files again and check that the accuracy falls towards 0.5.")


def pools(data: DataConfig) -> tuple[list[str], list[str]]:
    """(harmful, harmless) texts a run on `data` reads: the user's files where given, the built-in sets otherwise."""
    harmful = prompts.load_prompts(data.harmful_file) if data.harmful_file else prompts.harmful()
    benign = prompts.load_prompts(data.benign_file) if data.benign_file else prompts.benign()
    border = prompts.load_prompts(data.borderline_file) if data.borderline_file else prompts.borderline()
    return [p.text for p in harmful], [p.text for p in list(benign) + list(border)]


def form_check(data: DataConfig) -> str:
    """Markdown: the surface classifier's balanced accuracy on the run's pools, the features that separate
    them (with how often each set has them), and a warning with advice above the limit."""
    if not (data.harmful_file or data.benign_file or data.borderline_file):
        return ""
    harmful, harmless = pools(data)
    try:
        audit = audit_pools(harmful, harmless)
    except ValueError as exc:
        return f"**Form check** not run: {exc} (each set needs a few prompts in both its parts)."
    lines = []
    for name, weight in audit.top_features[:5]:
        pos, neg = audit.rates.get(name, (float("nan"), float("nan")))
        side = "harmful" if weight > 0 else "harmless"
        lines.append(f"| {name} | {side} | {pos:.0%} | {neg:.0%} |" if "log" not in name else
                     f"| {name} | {side} | {pos:.2f} | {neg:.2f} |")
    table = "| feature | points to | harmful | harmless |\n|---|---|---|---|\n" + "\n".join(lines)
    verdict = (f"⚠ **Separable by form** (balanced accuracy **{audit.accuracy:.2f}** > {LIMIT}): a classifier that sees only the "
               "surface of the prompts tells your harmful and harmless sets apart, so tuning may learn their form instead of "
               f"their harm.\n\n{ADVICE}" if audit.separable else
               f"✓ **Not separable by form** (balanced accuracy **{audit.accuracy:.2f}**, chance 0.50, warning above {LIMIT}).")
    return (f"**Form check of your prompts** ({len(harmful)} harmful vs {len(harmless)} harmless, benign + borderline-safe; "
            f"a surface-feature classifier fitted on 70 % and scored on the rest).\n\n{verdict}\n\n{table}")
