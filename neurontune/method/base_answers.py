"""The model's own greedy answers to benign prompts: the targets of benign dependence and of the KL term that
keeps benign answers, generated once per model and prompt list and cached on disk."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..infra import distributed as dist
from ..infra import files
from ..infra.progress import Reporter
from ..interventions.generation import generate
from ..model.loading import LoadedModel


def cached_answers(lm: LoadedModel, prompts: list[str], n_tokens: int, cache_dir: Path,
                   reporter: Reporter | None = None, *, compute: bool = True) -> list[str] | None:
    """The model's own greedy answers to benign prompts (the targets of benign dependence and the KL term);
    with `compute=False`, only what the cache holds (None when it holds nothing for them)."""
    key = hashlib.sha256(json.dumps([lm.fingerprint, n_tokens, prompts]).encode()).hexdigest()[:16]
    path = cache_dir / "answers" / f"{key}.json"
    answers = files.read_json(path, "answers cache entry")  # None when missing or bad (never trusted)
    ok = isinstance(answers, list) and len(answers) == len(prompts) and all(isinstance(a, str) for a in answers)
    if dist.all_true(ok):  # under `accelerate launch` every process takes the same branch
        return answers
    if answers is not None and not ok:
        files.warn_bad(path, "wrong shape", "answers cache entry")
    if not compute:
        return None
    answers = dist.map_batches(lambda chunk, rep: generate(lm, chunk, max_new_tokens=n_tokens, batch_size=16, reporter=rep),
                               prompts, 16, reporter, "generate")  # batches shared over processes, if launched so
    answers = [a if a else "." for a in answers]
    if dist.is_main():
        files.write_json(path, answers)
    return answers
