"""Safety and utility scores of every neuron for one model and prompt plan, cached on disk.

Score kinds, each [n_layers, n_neurons], mean over examples:
- `safety`: attribution to the log-prob of a refusal on harmful prompts, plain and attacked ("attack-aware");
  `safety/plain` and `safety/<family>` per attack family, `safety/contrast` for the unsafe twins of the
  alarming-word pairs;
- `over_refusal`: attribution to a refusal on benign and borderline-safe prompts (`over_refusal/benign`,
  `over_refusal/borderline`, both wrapped in the training attack templates: `over_refusal/attacked`, and the
  safe halves of the alarming-word pairs: `over_refusal/alarming`):
  neurons that push the model to refuse what it should answer;
- `benign_dependence`: mean |attribution| to the model's own answers to benign prompts;
- `act_harmful`, `act_benign`: mean activation over prompt tokens.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from ..config import AttributionConfig, RunConfig
from ..data import prompts
from ..data.chat import chat_prompt
from ..data.splits import build_splits
from ..infra import distributed as dist
from ..infra import files
from ..infra.files import default_cache_dir
from ..infra.progress import Reporter
from ..model.loading import LoadedModel
from .attribution import GroupScores, attribute
from .base_answers import cached_answers


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
        return sorted(k.split("/", 1)[1] for k in self.scores if k.startswith("safety/") and k not in ("safety/plain", "safety/contrast"))

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
        """Written atomically, with a `.sha256` sidecar that `infra.files` verifies on read."""
        return files.write_file(path, lambda tmp: save_file(
            {k: v.contiguous() for k, v in self.scores.items()}, str(tmp),
            metadata={"counts": json.dumps(self.counts), "meta": json.dumps(self.meta, default=str)}))

    @classmethod
    def load(cls, path: str | Path) -> "NeuronScores":
        header, tensors = files.read_safetensors(path)
        return cls(tensors, json.loads(header.get("counts", "{}")), json.loads(header.get("meta", "{}")))

    @classmethod
    def from_bytes(cls, blob: bytes) -> "NeuronScores":
        """From the bytes of a .safetensors file (a verified cache entry, read once)."""
        from safetensors.torch import load
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n]).get("__metadata__") or {}
        return cls(load(blob), json.loads(header.get("counts", "{}")), json.loads(header.get("meta", "{}")))


def attribution_plan(lm: LoadedModel, cfg: RunConfig, cache_dir: Path, reporter: Reporter | None = None, *,
                     compute: bool = True) -> dict[str, tuple[list[str], list[str]]] | None:
    """Group name -> (formatted prompts, targets). Refusal targets rotate over the built-in list. With
    `compute=False`, None when the model's answers it needs are not cached (nothing is generated)."""
    d = cfg.data
    splits = build_splits(d)
    refusals = prompts.targets()["refusal"]
    tok = lm.tokenizer

    def refusal_group(prompts):
        return [chat_prompt(tok, p.text) for p in prompts], [refusals[i % len(refusals)] for i in range(len(prompts))]

    groups = {"safety/plain": refusal_group(splits.harmful_train[: d.n_harmful])}
    attacked = splits.attacked_train(d.n_attack_per_family)
    for family in splits.train_families:
        groups[f"safety/{family}"] = refusal_group([p for p in attacked if p.family == family])
    groups["over_refusal/benign"] = refusal_group(splits.benign_train[: d.n_benign])
    groups["over_refusal/borderline"] = refusal_group(splits.borderline_train[: d.n_borderline])
    if d.n_benign_attack_per_family:  # harmless requests inside the same templates: a template alone is no reason to refuse
        half = max(1, d.n_benign_attack_per_family // 2)
        groups["over_refusal/attacked"] = refusal_group(splits.attacked("benign", "train", d.n_benign_attack_per_family - half)
                                                        + splits.attacked("borderline", "train", half))
    if d.n_alarming and splits.alarming["train"]:  # the same alarming words: refuse the unsafe twin, answer the safe one
        groups["safety/contrast"] = refusal_group(splits.contrast["train"][: d.n_alarming])
        groups["over_refusal/alarming"] = refusal_group(splits.alarming["train"][: d.n_alarming])
    answer_prompts = [p.text for p in splits.benign_train[: d.n_answer]]
    answers = cached_answers(lm, answer_prompts, d.answer_tokens, cache_dir, reporter, compute=compute)
    if answers is None:
        return None
    groups["benign_dependence"] = ([chat_prompt(tok, p) for p in answer_prompts], answers)
    return {k: v for k, v in groups.items() if v[0]}


def run_attribution(lm: LoadedModel, cfg: RunConfig = RunConfig(), *, cache_dir: str | Path | None = None,
                    reporter: Reporter | None = None, use_cache: bool = True) -> NeuronScores:
    """Score every neuron for safety and utility; reuse the cached result for the same model, data and method."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    groups = attribution_plan(lm, cfg, cache_dir, reporter)
    acfg: AttributionConfig = cfg.attribution
    key, path = _entry(lm, acfg, groups, cache_dir)
    cached = _read_entry(path, lm) if use_cache else None
    if dist.all_true(cached is not None):  # under `accelerate launch`: all processes hit, or all recompute
        return cached
    # One job per batch, shared round robin over the processes of `accelerate launch` (all jobs with one
    # process): each batch is the one a single process runs, and per-group sums and counts add up exactly.
    bs = acfg.batch_size
    jobs = dist.shard([(name, s) for name, (prompts, _) in groups.items() for s in range(0, len(prompts), bs)])
    total = sum(len(groups[name][0][s:s + bs]) for name, s in jobs)
    done = 0
    sums = {name: GroupScores.zeros(lm.shape) for name in groups}
    for name, s in jobs:
        prompts, targets = groups[name]
        part = attribute(lm, prompts[s:s + bs], targets[s:s + bs], acfg, reporter=reporter,
                         stage=name, offset=done, total=total)
        sums[name].add(part)
        done += part.n
    sums = dist.sum_groups(sums)  # sums of sums and of counts over processes (no-op for one)
    result = combine(sums)
    result.meta.update(model=lm.name, fingerprint=lm.fingerprint, method=acfg.method, key=key,
                       truncated=sum(g.truncated for g in sums.values()))
    if dist.is_main():  # the key does not depend on the number of processes; only the main process writes
        result.save(path)
    result.meta["cache"] = str(path)
    return result


def cached_scores(lm: LoadedModel, cfg: RunConfig = RunConfig(), *, cache_dir: str | Path | None = None) -> NeuronScores | None:
    """What `run_attribution` would return from its cache for this model and config, or None: computes nothing
    (not even the model's answers that the plan needs), so a page can ask at once."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    groups = attribution_plan(lm, cfg, cache_dir, compute=False)
    return None if groups is None else _read_entry(_entry(lm, cfg.attribution, groups, cache_dir)[1], lm)


def _entry(lm: LoadedModel, acfg: AttributionConfig, groups: dict, cache_dir: Path) -> tuple[str, Path]:
    """(key, path) of the cache entry of one model, attribution method and prompt plan."""
    key = hashlib.sha256(json.dumps([lm.fingerprint, acfg.method, acfg.ig_steps, acfg.max_length, groups],
                                    sort_keys=True).encode()).hexdigest()[:20]
    return key, cache_dir / "attribution" / f"{key}.safetensors"


def _read_entry(path: Path, lm: LoadedModel) -> NeuronScores | None:
    """The cache entry, verified against its checksum and the model's shape; a bad one is None (recomputed, never trusted)."""
    if (blob := files.read_bytes(path, "attribution cache entry")) is None:
        return None
    try:
        cached = NeuronScores.from_bytes(blob)
    except Exception as exc:  # noqa: BLE001
        files.warn_bad(path, f"unreadable: {exc}", "attribution cache entry")
        return None
    if cached.shape != lm.shape:
        files.warn_bad(path, f"shape {cached.shape}, model has {lm.shape}", "attribution cache entry")
        return None
    cached.meta["cache"] = str(path)
    return cached


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
