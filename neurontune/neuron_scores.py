"""Safety and utility scores of every neuron for one model and prompt plan, cached on disk.

Score kinds, each [n_layers, n_neurons], mean over examples:
- `safety`: attribution to the log-prob of a refusal on harmful prompts, plain and attacked ("attack-aware");
  `safety/plain` and `safety/<family>` per attack family;
- `over_refusal`: attribution to a refusal on benign and borderline-safe prompts (`over_refusal/benign`,
  `over_refusal/borderline`): neurons that push the model to refuse what it should answer;
- `benign_dependence`: mean |attribution| to the model's own answers to benign prompts;
- `act_harmful`, `act_benign`: mean activation over prompt tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import data
from .attribution import AttributionConfig, GroupScores, Progress, attribute
from .config import RunConfig
from .data import chat_prompt
from .generation import generate
from .models import LoadedModel, default_cache_dir
from .splits import build_splits


@dataclass
class NeuronScores:
    scores: dict[str, torch.Tensor]  # kind -> [n_layers, n_neurons]
    counts: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(next(iter(self.scores.values())).shape)

    @property
    def kinds(self) -> list[str]:
        return sorted(self.scores)

    @property
    def families(self) -> list[str]:
        return sorted(k.split("/", 1)[1] for k in self.scores if k.startswith("safety/") and k != "safety/plain")

    def __getitem__(self, kind: str) -> torch.Tensor:
        if kind not in self.scores:
            raise KeyError(f"No score '{kind}'; available: {self.kinds}")
        return self.scores[kind]

    def table(self, kind: str = "safety", top: int = 50, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
        """The `top` neurons by `kind`, with their other scores and activation statistics."""
        s = self[kind]
        k = min(top, s.numel())
        vals, flat = torch.topk(s.flatten(), k)
        layers, neurons = flat // s.shape[1], flat % s.shape[1]
        cols = columns or tuple(c for c in ("safety", "over_refusal", "benign_dependence", "act_harmful", "act_benign") if c in self.scores)
        frame = {"layer": layers.numpy(), "neuron": neurons.numpy(), kind: vals.numpy()}
        for c in cols:
            if c != kind:
                frame[c] = self.scores[c][layers, neurons].numpy()
        return pd.DataFrame(frame)

    def layer_summary(self, kind: str = "safety") -> pd.DataFrame:
        """Per layer: positive score mass, max, and the best neuron."""
        s = self[kind]
        return pd.DataFrame({
            "layer": range(s.shape[0]),
            "positive_mass": s.clamp(min=0).sum(1).numpy(),
            "max": s.max(1).values.numpy(),
            "top_neuron": s.argmax(1).numpy(),
        })

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        save_file({k: v.contiguous() for k, v in self.scores.items()}, str(tmp),
                  metadata={"counts": json.dumps(self.counts), "meta": json.dumps(self.meta, default=str)})
        tmp.replace(path)  # atomic
        return path

    @classmethod
    def load(cls, path: str | Path) -> "NeuronScores":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        return cls(load_file(str(path)), json.loads(header.get("counts", "{}")), json.loads(header.get("meta", "{}")))


def cached_answers(lm: LoadedModel, prompts: list[str], n_tokens: int, cache_dir: Path, progress=None) -> list[str]:
    """The model's own greedy answers to benign prompts (the targets of benign dependence and the KL term)."""
    key = hashlib.sha256(json.dumps([lm.fingerprint, n_tokens, prompts]).encode()).hexdigest()[:16]
    path = cache_dir / "answers" / f"{key}.json"
    if path.exists():
        try:
            answers = json.loads(path.read_text(encoding="utf-8"))
            if len(answers) == len(prompts):
                return answers
        except (json.JSONDecodeError, OSError):
            pass  # a bad cache entry is recomputed, never trusted
    answers = generate(lm, prompts, max_new_tokens=n_tokens, batch_size=16, progress=progress)
    answers = [a if a else "." for a in answers]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(answers), encoding="utf-8")
    tmp.replace(path)
    return answers


def attribution_plan(lm: LoadedModel, cfg: RunConfig, cache_dir: Path, progress: Progress | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """Group name -> (formatted prompts, targets). Refusal targets rotate over the built-in list."""
    d = cfg.data
    splits = build_splits(d)
    refusals = data.targets()["refusal"]
    tok = lm.tokenizer

    def refusal_group(prompts):
        return [chat_prompt(tok, p.text) for p in prompts], [refusals[i % len(refusals)] for i in range(len(prompts))]

    groups = {"safety/plain": refusal_group(splits.harmful_train[: d.n_harmful])}
    attacked = splits.attacked_train(d.n_attack_per_family)
    for family in splits.train_families:
        groups[f"safety/{family}"] = refusal_group([p for p in attacked if p.family == family])
    groups["over_refusal/benign"] = refusal_group(splits.benign_train[: d.n_benign])
    groups["over_refusal/borderline"] = refusal_group(splits.borderline_train[: d.n_borderline])
    answer_prompts = [p.text for p in splits.benign_train[: d.n_answer]]
    answers = cached_answers(lm, answer_prompts, d.answer_tokens, cache_dir, progress)
    groups["benign_dependence"] = ([chat_prompt(tok, p) for p in answer_prompts], answers)
    return {k: v for k, v in groups.items() if v[0]}


def run_attribution(lm: LoadedModel, cfg: RunConfig = RunConfig(), *, cache_dir: str | Path | None = None,
                    progress: Progress | None = None, cancel: threading.Event | None = None,
                    use_cache: bool = True) -> NeuronScores:
    """Score every neuron for safety and utility; reuse the cached result for the same model, data and method."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    groups = attribution_plan(lm, cfg, cache_dir, progress)
    acfg: AttributionConfig = cfg.attribution
    key = hashlib.sha256(json.dumps([lm.fingerprint, acfg.method, acfg.ig_steps, acfg.max_length, groups],
                                    sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / "attribution" / f"{key}.safetensors"
    if use_cache and path.exists():
        try:
            cached = NeuronScores.load(path)
            if cached.shape == lm.shape:
                cached.meta["cache"] = str(path)
                return cached
        except Exception:
            pass  # unreadable: recompute
    total = sum(len(p) for p, _ in groups.values())
    done = 0
    sums: dict[str, GroupScores] = {}
    for name, (prompts, targets) in groups.items():
        sums[name] = attribute(lm, prompts, targets, acfg, progress=progress, cancel=cancel, stage=name, offset=done, total=total)
        done += len(prompts)
    result = combine(sums)
    result.meta.update(model=lm.name, fingerprint=lm.fingerprint, method=acfg.method, key=key,
                       truncated=sum(g.truncated for g in sums.values()))
    result.save(path)
    result.meta["cache"] = str(path)
    return result


def combine(sums: dict[str, GroupScores]) -> NeuronScores:
    """Turn per-group sums into mean scores, overall safety and over-refusal, and activation means."""
    def mean(names, attr="score"):
        names = [n for n in names if n in sums]
        n = sum(sums[x].n for x in names)
        return sum(getattr(sums[x], attr) for x in names) / max(n, 1)

    safety = [n for n in sums if n.startswith("safety/")]
    over = [n for n in sums if n.startswith("over_refusal/")]
    scores = {n: sums[n].score / sums[n].n for n in safety + over}
    scores["safety"] = mean(safety)
    scores["over_refusal"] = mean(over)
    if "benign_dependence" in sums:
        scores["benign_dependence"] = sums["benign_dependence"].abs_score / sums["benign_dependence"].n
    benign = [n for n in over + ["benign_dependence"] if n in sums]
    scores["act_harmful"] = sum(sums[n].act for n in safety) / max(sum(sums[n].tokens for n in safety), 1)
    scores["act_benign"] = sum(sums[n].act for n in benign) / max(sum(sums[n].tokens for n in benign), 1)
    return NeuronScores({k: v.float() for k, v in scores.items()}, {n: g.n for n, g in sums.items()})
