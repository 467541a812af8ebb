"""A researcher's own list of prompts to run in bulk (the studio's "your prompts" table): a file (csv / json /
jsonl / parquet with a `prompt` column, read by `prompts.load_prompts`; or .txt, one prompt per line) or
pasted text (one prompt per line). Blank lines and duplicates are dropped and the list is capped, each with a
note the caller shows; what cannot be read raises `DataError` saying what to fix."""
from __future__ import annotations

from pathlib import Path

from .prompts import DataError, load_prompts

MAX_BULK = 200  # prompts one bulk run answers at most (each twice: base and tuned)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompt_list(path: str | Path | None = None, text: str = "", *, cap: int = MAX_BULK,
                     notes: list[str] | None = None) -> list[str]:
    """The prompts of a file and/or pasted text (file first), distinct, at most `cap`; repairs go to `notes`."""
    notes = [] if notes is None else notes
    found: list[str] = []
    if path:
        path = Path(path)
        if path.suffix.lower() == ".txt":
            try:
                found += _lines(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{path.name} is not UTF-8 text: save it as UTF-8 (one prompt per line).") from None
            except OSError as exc:
                raise DataError(f"Could not read {path.name}: {exc}.") from exc
        else:
            found += [p.text for p in load_prompts(str(path), notes=notes)]
    found += _lines(text or "")
    distinct = list(dict.fromkeys(found))
    if len(distinct) < len(found):
        notes.append(f"Dropped {len(found) - len(distinct)} duplicate prompt(s).")
    if not distinct:
        raise DataError("No prompts: upload a .txt (one per line), .csv/.jsonl/.json/.parquet (a 'prompt' column), or paste "
                        "one prompt per line.")
    if len(distinct) > cap:
        notes.append(f"{len(distinct)} prompts given; only the first {cap} are run (each is answered twice, by the base "
                     "and the tuned model). Split the list to run the rest.")
        distinct = distinct[:cap]
    return distinct
