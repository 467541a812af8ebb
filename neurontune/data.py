"""Prompt sets: built-in (AdvBench, attack templates, benign, borderline-safe, multiple choice), user files
through `datasets`, deterministic splits, and chat formatting with the tokenizer's own template."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

ASSETS = Path(__file__).resolve().parent.parent / "assets"


class DataError(ValueError):
    """A prompt set is missing, empty or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class Prompt:
    """One user message. `family` names the attack template family ("plain" for none)."""

    text: str
    category: str = ""
    family: str = "plain"
    source: str = ""  # the original request, before an attack template wrapped it


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=None)
def harmful() -> tuple[Prompt, ...]:
    """AdvBench's 520 harmful behaviours (MIT licence; see assets/ADVBENCH_SOURCE.md)."""
    import csv
    with open(ASSETS / "advbench_harmful_behaviors.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return tuple(Prompt(r["goal"].strip(), (r.get("harm_categories") or "").split(";")[0].strip(), "plain", r["goal"].strip()) for r in rows)


@lru_cache(maxsize=None)
def benign() -> tuple[Prompt, ...]:
    return tuple(Prompt(r["prompt"], r.get("category", ""), "plain", r["prompt"]) for r in _read_jsonl(ASSETS / "benign.jsonl"))


@lru_cache(maxsize=None)
def borderline() -> tuple[Prompt, ...]:
    return tuple(Prompt(r["prompt"], r.get("category", ""), "plain", r["prompt"]) for r in _read_jsonl(ASSETS / "borderline.jsonl"))


@lru_cache(maxsize=None)
def attack_families() -> dict[str, tuple[str, ...]]:
    """Jailbreak templates by family; `{prompt}` (or `{part1}`/`{part2}`) marks where the request goes."""
    raw = json.loads((ASSETS / "attacks.json").read_text(encoding="utf-8"))["families"]
    return {name: tuple(fam["templates"]) for name, fam in raw.items()}


@lru_cache(maxsize=None)
def multiple_choice() -> tuple[dict, ...]:
    return tuple(_read_jsonl(ASSETS / "mc.jsonl"))


@lru_cache(maxsize=None)
def targets() -> dict[str, tuple[str, ...]]:
    """Refusal and compliance openings used as teacher-forced targets."""
    raw = json.loads((ASSETS / "refusal_targets.json").read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in raw.items()}


def validate_template(template: str) -> None:
    if "{prompt}" not in template and not ("{part1}" in template and "{part2}" in template):
        raise DataError(f"Attack template has no {{prompt}} (or {{part1}}/{{part2}}) placeholder: {template[:80]!r}")


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
                t = templates[(_stable_int(p.text, seed) + i + j) % len(templates)]
                out.append(Prompt(wrap(t, p.text), p.category, family, p.text))
    return out


def _stable_int(text: str, seed: int = 0) -> int:
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16)


def split(prompts: Sequence[Prompt], test_fraction: float = 0.3, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic train/test split by a hash of the text: stable when prompts are added or reordered."""
    train, test = [], []
    for p in prompts:
        (test if (_stable_int(p.source or p.text, seed) % 1000) / 1000 < test_fraction else train).append(p)
    return train, test


def load_prompts(source: str, column: str = "prompt", category_column: str | None = None, max_rows: int | None = None) -> list[Prompt]:
    """Load user prompts from a local csv/json/jsonl/parquet file, or a hub dataset id when online."""
    import datasets

    path = Path(source)
    try:
        if path.exists():
            kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
            if kind is None:
                raise DataError(f"{path}: unsupported file type '{path.suffix}'. Use .csv, .json, .jsonl or .parquet.")
            if path.is_file() and path.stat().st_size <= 4096 and not path.read_bytes().strip():  # datasets: no message
                raise DataError(f"{path} is empty. Add at least one prompt in a '{column}' column.")
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            if source.endswith((".csv", ".json", ".jsonl", ".parquet")) or "/" not in source:
                raise DataError(f"No file at {path}. Give a local .csv/.json/.jsonl/.parquet file, or a hub dataset id when online.")
            ds = datasets.load_dataset(source, split="train")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"Could not read prompts from {source}: {exc}") from exc
    if len(ds) == 0:
        raise DataError(f"{source} holds no rows. Add at least one prompt in a '{column}' column.")
    if column not in ds.column_names:
        raise DataError(f"{source} has no '{column}' column (it has {ds.column_names}). Rename the column or pass --column.")
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    texts = [str(t).strip() for t in ds[column] if t is not None and str(t).strip()]
    if not texts:
        raise DataError(f"{source}: every '{column}' value is empty.")
    cats = ds[category_column] if category_column and category_column in ds.column_names else [""] * len(texts)
    return [Prompt(t, str(c), "plain", t) for t, c in zip(texts, cats)]


def chat_prompt(tokenizer, user_text: str, history: Sequence[dict] = (), system: str | None = None) -> str:
    """Format a conversation ending in a user turn with the tokenizer's own chat template.

    Models without a template (base models, tiny GPT-2) get a plain 'User:/Assistant:' transcript."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(history) + [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return turns + "Assistant:"
