"""The studio's refusal judge: the choice shown where verdicts are ("rules", or "model:NAME" for a chat model from
the studio's own model pool), built once per studio and choice so a model judge keeps its cache between calls."""
from __future__ import annotations

import threading
import weakref

from ..eval.judges import RULES, Judge, check_spec, judge_from_spec

CHOICES = ["rules", "model:embedded"]  # the dropdown's entries; any "model:PATH_OR_ID" may be typed in
_built: weakref.WeakKeyDictionary[object, dict[str, Judge]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def judge_for(studio, spec: str | None) -> Judge:
    """The judge of `spec` for this studio (a bad spec raises ValueError with what to give)."""
    spec = (spec or "rules").strip()
    check_spec(spec)
    if spec == "rules":
        return RULES
    with _lock:
        judges = _built.setdefault(studio, {})
        if spec not in judges:
            judges[spec] = judge_from_spec(spec, cache_dir=studio.cache_dir,
                                           load=lambda name, **_: studio.models.get(name))
        return judges[spec]
