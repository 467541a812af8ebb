"""Prompt sets: built-in (AdvBench, attack templates, benign, borderline-safe, multiple choice), user files
through `datasets`, deterministic splits, and chat formatting with the tokenizer's own template."""
from __future__ import annotations

import codecs
import difflib
import hashlib
import itertools
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MAX_ROWS = 10_000  # far more than a run uses (a few hundred per set): a longer file is cut here, with a warning
STREAM_BYTES = 32 * 2**20  # a larger file is read lazily, only as far as MAX_ROWS rows

log = logging.getLogger(__name__)


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
    for name, fam in raw.items():
        for i, template in enumerate(fam["templates"]):
            try:
                validate_template(template)
            except DataError as exc:  # found when the set loads, not in the middle of a run
                raise DataError(f"{ASSETS / 'attacks.json'}, family '{name}', template {i}: {exc}") from None
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


def _note(notes: list[str] | None, message: str) -> None:
    """A repair the user should hear about: logged (the CLI prints it) and collected for the studio."""
    log.warning(message)
    if notes is not None:
        notes.append(message)


def _check_utf8(path: Path, limit: int) -> None:
    """Refuse a text file that is not UTF-8 (its first `limit` bytes), naming the line of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with open(path, "rb") as f:
        while True:
            at_limit = offset >= limit
            chunk = b"" if at_limit else f.read(min(1 << 20, limit - offset))
            pending = decoder.getstate()[0]  # the start of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=not chunk and not at_limit)
            except UnicodeDecodeError as exc:
                data = pending + chunk
                line = lines + data[:exc.start].count(b"\n") + 1
                raise DataError(
                    f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} "
                    f"cannot be read. Save the file as UTF-8 (spreadsheets: \"CSV UTF-8\"; or `iconv -f latin1 -t utf-8 "
                    f"{path.name} > {path.stem}-utf8{path.suffix}`).") from None
            if not chunk:
                return
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def load_prompts(source: str, column: str = "prompt", category_column: str | None = None, max_rows: int | None = None,
                 *, notes: list[str] | None = None) -> list[Prompt]:
    """Load user prompts from a local csv/json/jsonl/parquet file, or a hub dataset id when online.

    What cannot work raises `DataError` saying what to fix (missing, empty, not UTF-8, no such column). What
    can be repaired is, and is reported through the log and `notes`: blank values and duplicates are
    dropped, and a file of more than MAX_ROWS rows is cut to its first MAX_ROWS (`max_rows` cuts silently)."""
    import datasets

    path = Path(source)
    cap = max_rows if max_rows is not None else MAX_ROWS
    cut = 0  # rows in a file the default cap cut (-1: more than cap, read lazily)
    kind = "dataset"
    try:
        if path.exists():
            kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
            if kind is None:
                raise DataError(f"{path}: unsupported file type '{path.suffix}'. Use .csv, .json, .jsonl or .parquet.")
            size = path.stat().st_size if path.is_file() else 0
            if path.is_file() and size <= 4096 and not path.read_bytes().strip():  # datasets: no message
                raise DataError(f"{path} is empty. Add at least one prompt in a '{column}' column.")
            if kind != "parquet" and path.is_file():
                _check_utf8(path, STREAM_BYTES)
            if size > STREAM_BYTES:  # far more than needed: read only the rows that will be used
                rows = list(itertools.islice(datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True), cap + 1))
                if len(rows) > cap:
                    rows, cut = rows[:cap], -1 if max_rows is None else 0
                ds = datasets.Dataset.from_list(rows)
            else:
                ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            if source.endswith((".csv", ".json", ".jsonl", ".parquet")) or "/" not in source:
                raise DataError(f"No file at {path}. Give a local .csv/.json/.jsonl/.parquet file, or a hub dataset id when online.")
            ds = datasets.load_dataset(source, split="train")
    except DataError:
        raise
    except Exception as exc:
        if "corresponds to no data" in str(exc):  # datasets' words for a file with a header and no rows
            raise DataError(f"{source} holds no rows. Add at least one prompt in a '{column}' column.") from exc
        cause = exc.__cause__ or exc  # datasets wraps the parser's own words in a generic error
        raise DataError(f"Could not read prompts from {source}: {cause}. Check that it is a valid {kind} file "
                        f"with a '{column}' column.") from exc
    if len(ds) == 0:
        raise DataError(f"{source} holds no rows. Add at least one prompt in a '{column}' column.")
    if column not in ds.column_names:
        near = difflib.get_close_matches(column, ds.column_names, n=1, cutoff=0.5)
        raise DataError(f"{source} has no '{column}' column (it has {ds.column_names}). Rename the column that holds the "
                        f"prompts to '{column}'" + (f" (is it '{near[0]}'? names are case-sensitive)." if near else "."))
    if len(ds) > cap:
        cut = len(ds) if max_rows is None else 0
        ds = ds.select(range(cap))
    cats = ds[category_column] if category_column and category_column in ds.column_names else [""] * len(ds)
    prompts, seen, blank, dups = [], set(), 0, 0
    for value, cat in zip(ds[column], cats):
        text = "" if value is None else str(value).strip()
        if not text or text in seen:
            blank, dups = blank + (not text), dups + bool(text)
            continue
        seen.add(text)
        prompts.append(Prompt(text, "" if cat is None else str(cat), "plain", text))
    if not prompts:
        raise DataError(f"{source}: every '{column}' value is empty. Put one prompt per row in the '{column}' column.")
    if cut:
        _note(notes, f"{source} holds {'more than ' if cut < 0 else ''}{max(cut, cap):,} rows; only the first {cap:,} are used "
                     "(a run needs a few hundred at most). Cut the file to silence this warning.")
    if dups:
        _note(notes, f"{source}: dropped {dups:,} duplicate prompt(s) (the first of each is kept); {len(prompts):,} distinct remain.")
    if blank:
        _note(notes, f"{source}: skipped {blank:,} row(s) whose '{column}' value is empty.")
    return prompts


WORD_JOINER = "\u2060"  # invisible; inside a special-token string it makes the tokenizer read plain text
_MARKUP = re.compile(r"^[<\[].+[>\]]$", re.S)  # added tokens that look like markup: <think>, [INST] ...
_ROLE_LINE = re.compile(r"(?im)^(\s*)(user|assistant|system)(\s*:)")  # turns of the plain transcript


def special_strings(tokenizer) -> list[str]:
    """Strings the tokenizer maps to special or markup token ids wherever they occur in text, longest first."""
    found = {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])}
    try:
        added = tokenizer.added_tokens_decoder.values()
    except (AttributeError, NotImplementedError):
        added = ()
    for tok in added:
        content = str(getattr(tok, "content", tok))
        if getattr(tok, "special", False) or _MARKUP.match(content):
            found.add(content)
    return sorted((s for s in found if len(s) > 1), key=len, reverse=True)


def plain_text(tokenizer, text: str) -> str:
    """Message content made unable to produce special token ids: every special-token string in it (a fake
    `<|im_start|>system`, an early `<|im_end|>`, ...) gets an invisible word joiner after its first character,
    so the tokenizer encodes it as ordinary text. The one place content is neutralised: `chat_prompt` and
    `scoring.encode_pairs` use it, so user text can never open, close or fake a turn."""
    if not isinstance(text, str) or not text:
        return text
    specials = special_strings(tokenizer)
    if specials:
        pattern = re.compile("|".join(re.escape(s) for s in specials))
        text = pattern.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)
    return text


def chat_prompt(tokenizer, user_text: str, history: Sequence[dict] = (), system: str | None = None) -> str:
    """Format a conversation ending in a user turn with the tokenizer's own chat template.

    Every message's content goes through `plain_text` first: only the template makes special tokens.
    Models without a template (base models) get a plain 'User:/Assistant:' transcript, in which a content
    line starting with a role name is broken the same way, so it cannot fake a turn either."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(history) + [{"role": "user", "content": user_text}]
    messages = [{**m, "content": plain_text(tokenizer, m["content"])} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"{m['role'].capitalize()}: {_ROLE_LINE.sub(_break_role, m['content'])}\n" for m in messages)
    return turns + "Assistant:"


def _break_role(m: re.Match) -> str:
    return m.group(1) + m.group(2)[0] + WORD_JOINER + m.group(2)[1:] + m.group(3)
