"""Jailbreak templates by attack family, and wrapping requests in them (the "attack-aware" prompts)."""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Sequence

from .prompts import ASSETS, DataError, Prompt, stable_int


@lru_cache(maxsize=None)
def attack_families() -> dict[str, tuple[str, ...]]:
    """Jailbreak templates by family; `{prompt}` (or `{part1}`/`{part2}`) marks where the request goes."""
    raw = json.loads((ASSETS / "attacks.json").read_text(encoding="utf-8"))["families"]
    for name, fam in raw.items():
        for i, template in enumerate(fam["templates"]):
            try:
                validate_template(template)
            except DataError as exc:  # found when the set loads, not in the middle of a run
                raise DataError(f"{ASSETS / 'attacks.json'}, family '{name}', template {i}: {exc}") from None
    return {name: tuple(fam["templates"]) for name, fam in raw.items()}


def validate_template(template: str) -> None:
    if "{prompt}" not in template and not ("{part1}" in template and "{part2}" in template):
        raise DataError(f"Attack template has no {{prompt}} (or {{part1}}/{{part2}}) placeholder: {template[:80]!r}. "
                        "Write {prompt} where the request goes (or {part1} and {part2} for a request split in two).")


def wrap(template: str, request: str) -> str:
    """Put a request into an attack template; payload-splitting templates get it in two halves."""
    validate_template(template)
    words = request.split()
    half = max(1, len(words) // 2)
    return (template.replace("{prompt}", request)
            .replace("{part1}", " ".join(words[:half])).replace("{part2}", " ".join(words[half:])))


def attacked(prompts: Sequence[Prompt], families: Sequence[str] | None = None, per_prompt: int = 1, seed: int = 0) -> list[Prompt]:
    """Wrap each prompt in `per_prompt` templates of each family (templates chosen deterministically)."""
    fams = attack_families()
    unknown = set(families or ()) - set(fams)
    if unknown:
        raise DataError(f"Unknown attack families {sorted(unknown)}; known: {sorted(fams)}.")
    out = []
    for family in families if families is not None else sorted(fams):
        templates = fams[family]
        for i, p in enumerate(prompts):
            for j in range(per_prompt):
                t = templates[(stable_int(p.text, seed) + i + j) % len(templates)]
                out.append(Prompt(wrap(t, p.text), p.category, family, p.text))
    return out


