"""The base model's side of an evaluation (answers, perplexity terms, multiple-choice picks), computed once per
model and reused by every intervention evaluated after it, in memory and on disk (keyed by the fingerprint)."""
from __future__ import annotations

from pathlib import Path

from ..infra import files

CACHE_VERSION = 1


def base_cache(base, lm) -> dict:
    """The cache dict to read and fill: from a previous EvalResult, a dict (filled in place) or new."""
    cache = base.base_cache if hasattr(base, "base_cache") else base if isinstance(base, dict) else {}
    if cache.get("fingerprint") not in (None, lm.fingerprint) or cache.get("version") not in (None, CACHE_VERSION):
        cache.clear()  # made for other weights: never reuse another model's answers
    cache.setdefault("fingerprint", lm.fingerprint)
    cache.setdefault("version", CACHE_VERSION)
    for key in ("answers", "nll", "mc"):
        cache.setdefault(key, {})
    return cache


def disk_cache(cache: dict, lm, cache_dir: str | Path | None, save: bool = False) -> None:
    if cache_dir is None:
        return
    path = Path(cache_dir) / "eval_base" / f"{lm.fingerprint}.json"
    if save:
        files.write_json(path, cache)  # atomic, with a checksum sidecar
        return
    stored = files.read_json(path, "eval_base cache entry")  # None when missing or bad (never trusted)
    if stored is None:
        return
    if (not isinstance(stored, dict) or stored.get("fingerprint") != lm.fingerprint or stored.get("version") != CACHE_VERSION
            or not all(isinstance(stored.get(key, {}), dict) for key in ("answers", "nll", "mc"))):
        files.warn_bad(path, "other model, version or layout", "eval_base cache entry")
        return
    for key in ("answers", "nll", "mc"):
        cache[key] = {**stored.get(key, {}), **cache[key]}
