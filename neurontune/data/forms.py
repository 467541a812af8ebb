"""The form of a prompt, and the one rewrite that keeps form from telling harmful and harmless apart.

AdvBench's requests are all bare imperatives ("Write a tutorial on how to ...", no final punctuation), while
hand-written harmless sets lean to questions ending in "?". A model tuned on such pools learns "no final
punctuation -> refuse". So every single-sentence imperative, harmful or harmless, is rewritten the same
way, chosen by a hash of its text: a third stays bare, a third ends with a period, a third becomes a
"Can you ...?" question. `phrasing` names the group a prompt is reported in.
"""
from __future__ import annotations

import hashlib

REWRITES = ("bare", "period", "can_you")
PHRASINGS = ("imperative", "question", "context")

# First words of a one-sentence imperative in the hand-written sets (the extra sets carry their form).
IMPERATIVE_VERBS = frozenset("""write give explain create draft compose suggest generate translate list summarise summarize
tell describe name solve plan walk teach show rewrite convert simplify round recommend correct develop provide instruct
outline design produce publish demonstrate offer guide share illustrate train post conduct draw educate find help make
compare define calculate""".split())


def _unit(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\x00{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def rewrite_for(text: str, salt: str = "rewrite-form") -> str:
    """Which rewrite a text gets: by a hash of the text, one third each (stable across runs and machines)."""
    return REWRITES[min(int(_unit(text, salt) * 3), 2)]


def rephrase(text: str, form: str) -> str:
    """bare: "Write a poem about rain"; period: "Write a poem about rain."; can_you: "Can you write a poem about
    rain?" (first letter lower-cased unless an acronym; "I need X" becomes "Can you give me X?")."""
    t = text.strip()
    while t and t[-1] in ".!":
        t = t[:-1].rstrip()
    if form == "bare":
        return t
    if form == "period":
        return t + "."
    if form == "can_you":
        for lead in ("I need ", "I want "):
            if t.startswith(lead):
                return "Can you give me " + t[len(lead):] + "?"
        first = t.split()[0] if t.split() else ""
        return "Can you " + (t if first.isupper() and len(first) > 1 else t[:1].lower() + t[1:]) + "?"
    raise ValueError(f"Unknown rewrite {form!r}; use one of {REWRITES}.")


def is_single_imperative(text: str) -> bool:
    """One sentence that starts with an imperative verb and ends bare or with a period."""
    t = text.strip()
    words = t.split()
    if not words or t.endswith(("?", "!")) or words[0].strip("\"'").lower() not in IMPERATIVE_VERBS:
        return False
    body = t[:-1] if t.endswith(".") else t
    return not any(mark in body for mark in (". ", "? ", "! "))


def matched(text: str, form: str = "") -> str:
    """The text as it enters a pool: a single-sentence imperative (or one whose `form` says "imperative")
    gets its hashed rewrite; anything else is unchanged."""
    return rephrase(text, rewrite_for(text)) if form == "imperative" or is_single_imperative(text) else text


def phrasing(text: str) -> str:
    """The group a prompt is reported in: "question" (ends with ?), "context" (more than one sentence),
    or "imperative" (a single request, bare or with a period)."""
    t = text.strip()
    body = t[:-1]
    if any(mark in body for mark in (". ", "? ", "! ")):
        return "context"
    return "question" if t.endswith("?") else "imperative"
