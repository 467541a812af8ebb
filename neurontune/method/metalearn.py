"""Meta-learned neuron gains: amplify safety neurons, suppress over-refusal neurons, weights frozen.

Loss on a batch = refusal NLL on harmful (attacked) prompts + opening_weight * -log p(refuse) on them
                + lam_kl * KL(base || modulated) over the base model's own answers to benign prompts (with
                  kl_answers "harmless" also to borderline-safe, alarming-word and template-wrapped benign ones;
                  kl_skip > 0 leaves each answer's first tokens, its opening, to the other terms)
                + mu * -log(1 - p(refuse)) on benign and borderline-safe prompts in the same forms,
where p(refuse) is, with over_refusal_span="target" (default), the per-token probability of a refusal sentence,
and with "opening" the probability that the answer opens with a refusal ("I'm sorry", "I can't", ...:
assets/refusal_targets.json "openings"). The opening terms are opt-in; the default is the whole-sentence penalty
(why: docs/log.md).
Tasks are attack families (plus "plain"); FOMAML takes inner steps on a support batch of one family and
updates the shared gains with the query-batch gradient at the adapted gains, Reptile moves the shared
gains towards the adapted ones, and "joint" trains on mixed batches (the control for meta-learning).
Early stopping keeps the gains with the best validation loss.
"""
from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..data import attacks, prompts
from ..data.chat import chat_prompt
from ..data.prompts import Prompt
from ..data.splits import Splits, build_splits
from ..infra.files import default_cache_dir
from ..infra.progress import SILENT, Reporter
from ..interventions.gating import GateProbe
from ..interventions.modulation import InputTerms, Modulation, RowTerms, at_strength, modulate
from ..model.logprobs import PairBatch, encode_pairs, forward, target_logprob
from .base_answers import cached_answers
from .conditional import harm_directions
from .selection import Selection, SelectionError
from .switch_fit import FittedSwitch


@dataclass
class TrainResult:
    modulation: Modulation
    log: list[dict] = field(default_factory=list)  # one dict per step: step, task, loss, refusal_nll, kl, over_refusal, val
    stopped: str = "done"  # done | early_stop | cancelled | non_finite
    best_step: int = 0


class GainParams:
    """The trainable parts of a modulation: gains of the selected neurons (their dense [n_layers, n_neurons] view) and,
    for a conditional modulation, one input-side coefficient per selected neuron (or per `readers` neuron) of every
    layer that has a direction (`method/conditional.py`, or a switch's flag), reading that layer's fixed direction."""

    def __init__(self, selection: Selection, constrained: bool, max_gain: float,
                 directions: dict[int, tuple[torch.Tensor, float]] | None = None, max_coef: float = 4.0,
                 readers: torch.Tensor | None = None):
        self.shape = selection.shape
        self.safety_idx = selection.safety.flatten().nonzero().flatten()
        self.utility_idx = selection.utility.flatten().nonzero().flatten()
        self.safety = torch.ones(len(self.safety_idx), requires_grad=True)
        self.utility = torch.ones(len(self.utility_idx), requires_grad=True)
        self.constrained, self.max_gain, self.max_coef = constrained, max_gain, max_coef
        chosen = selection.safety | selection.utility if readers is None else readers
        self.directions = {l: d for l, d in (directions or {}).items() if bool(chosen[l].any())}
        self.coef_index = {l: chosen[l].nonzero().flatten() for l in sorted(self.directions)}  # layer -> neurons with a term
        n_coef = sum(len(i) for i in self.coef_index.values())
        self.coef = torch.zeros(n_coef, requires_grad=True) if self.directions else None

    def params(self) -> list[torch.Tensor]:
        return [self.safety, self.utility] + ([self.coef] if self.coef is not None else [])

    def dense(self, safety: torch.Tensor | None = None, utility: torch.Tensor | None = None) -> torch.Tensor:
        flat = torch.ones(self.shape[0] * self.shape[1])
        flat = flat.index_put((self.safety_idx,), self.safety if safety is None else safety)
        flat = flat.index_put((self.utility_idx,), self.utility if utility is None else utility)
        return flat.view(self.shape)

    def inputs(self, coef: torch.Tensor | None = None) -> dict[int, InputTerms]:
        """Layer -> the input-side terms at the current (or given) coefficients; empty for a static modulation."""
        coef = self.coef if coef is None else coef
        out, start = {}, 0
        for layer, idx in self.coef_index.items():
            direction, offset = self.directions[layer]
            out[layer] = InputTerms(idx, coef[start:start + len(idx)], direction, offset)
            start += len(idx)
        return out

    def view(self, values: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[int, InputTerms]]:
        """(dense gains, input terms) at the current parameters or at `values` (a list shaped like `params()`)."""
        values = values or self.params()
        return self.dense(values[0], values[1]), self.inputs(values[2] if len(values) > 2 else None)

    @torch.no_grad()
    def project(self) -> None:
        """Safety gains in [1, max_gain] (amplify), utility gains in [0, 1] (suppress), unless unconstrained;
        input coefficients in [-max_coef, max_coef]."""
        if self.constrained:
            self.safety.clamp_(1.0, self.max_gain)
            self.utility.clamp_(0.0, 1.0)
        else:
            self.safety.clamp_(0.0, self.max_gain)
            self.utility.clamp_(0.0, self.max_gain)
        if self.coef is not None:
            self.coef.clamp_(-self.max_coef, self.max_coef)

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in self.params())

    def load(self, snap: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params(), snap):
                p.copy_(v)

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params())

    def modulation(self, fingerprint: str | None, meta: dict | None = None) -> Modulation:
        dense, inputs = self.view()
        return Modulation.from_dense(dense.detach(), fingerprint, meta, inputs=inputs)


@dataclass
class TaskData:
    """Prompt pools of training (train split) and early stopping (validation split), formatted once.

    A task is a form of request: "plain" or an attack family. Its harmful prompts are the training harmful
    requests in that form, and its benign prompts the training benign and borderline-safe requests in the
    SAME form: a template alone must not earn a refusal, only harm inside it."""

    harmful: dict[str, list[str]]  # family ("plain" or an attack family) -> formatted harmful prompts
    benign: dict[str, list[str]]  # family -> formatted benign + borderline-safe prompts (over-refusal penalty)
    answers: list[tuple[str, str]]  # (formatted benign prompt, base model's answer) for the KL term
    val_harmful: list[str]
    val_benign: list[str]
    val_answers: list[tuple[str, str]]


def build_tasks(lm, cfg: RunConfig, splits: Splits, cache_dir) -> TaskData:
    """Training pools from the train split; the early-stopping batch from the validation split."""
    tok, d = lm.tokenizer, cfg.data
    fams = attacks.attack_families()
    rng = random.Random(d.seed)
    families = ("plain", *splits.train_families)

    def in_form(prompts: list[Prompt], family: str) -> list[str]:
        if family == "plain":
            return [chat_prompt(tok, p.text) for p in prompts]
        return [chat_prompt(tok, attacks.wrap(rng.choice(fams[family]), p.text)) for p in prompts]

    harmless_train = _interleave(_interleave(splits.benign["train"], splits.borderline["train"]), splits.alarming["train"])
    harmless_val = _interleave(_interleave(splits.benign["validation"], splits.borderline["validation"]), splits.alarming["validation"])
    harmful = {f: in_form(splits.harmful["train"], f) for f in families}
    harmful["plain"] = in_form(_interleave(splits.harmful["train"], splits.contrast["train"]), "plain")
    benign = {f: in_form(harmless_train, f) for f in families}
    val_harmful = in_form(_interleave(splits.harmful["validation"], splits.contrast["validation"])[:16], "plain")
    val_benign = in_form(harmless_val[:16], "plain")
    for i, f in enumerate(splits.train_families):  # and a few in each training form
        val_harmful += in_form(splits.harmful["validation"][16 + 2 * i:18 + 2 * i], f)
        val_benign += in_form(harmless_val[16 + i:17 + i], f)
    n = max(d.n_answer, 8)
    answer_prompts = [p.text for p in splits.benign["train"][: n * 2]]
    val_answer_prompts = [p.text for p in splits.benign["validation"][-8:]]
    if cfg.meta.kl_answers == "harmless":
        answer_prompts += _kl_harmless(splits, "train", n // 2, d.seed)
        val_answer_prompts += _kl_harmless(splits, "validation", 2, d.seed)
    answers = cached_answers(lm, answer_prompts, d.answer_tokens, cache_dir)
    val_answers = cached_answers(lm, val_answer_prompts, d.answer_tokens, cache_dir)
    return TaskData(
        harmful=harmful, benign=benign,
        answers=[(chat_prompt(tok, p), a) for p, a in zip(answer_prompts, answers)],
        val_harmful=val_harmful, val_benign=val_benign,
        val_answers=[(chat_prompt(tok, p), a) for p, a in zip(val_answer_prompts, val_answers)],
    )


def _kl_harmless(splits: Splits, split: str, n: int, seed: int) -> list[str]:
    """User prompts beyond plain benign ones whose base answers the KL term keeps (`meta.kl_answers: "harmless"`):
    n borderline-safe, n alarming-word, and n benign requests inside the training attack templates (taken from the
    end of the benign pool, away from the plain ones), each template drawn with its own seeded generator."""
    rng, fams = random.Random(seed + 1), attacks.attack_families()
    wrapped = [attacks.wrap(rng.choice(fams[splits.train_families[i % len(splits.train_families)]]), p.text)
               for i, p in enumerate(splits.benign[split][-(n + 8):-8])]
    return [p.text for p in splits.borderline[split][:n]] + [p.text for p in splits.alarming[split][:n]] + wrapped


def _interleave(a: list, b: list) -> list:
    """a and b merged in proportion (so a prefix holds both kinds)."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and i * len(b) <= j * len(a)):
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out


@dataclass
class Batch:
    """One pair batch per role ("harmful", "benign", "answers", and the opening variants), and, when training behind
    a gate, each row's gate strength per role (None: every row gets the whole modulation)."""

    pairs: dict[str, PairBatch]
    strengths: dict[str, torch.Tensor | None]


class Objective:
    """The loss terms of one batch: each role in one forward pass with its rows' modulation (plus a no-grad base pass
    for KL). Behind a gate, each prompt gets the modulation at the strength the gate reads from it, unmodulated
    (1 + s (g - 1), s times the input terms): the refusal loss acts where the gate opens on harmful prompts, the
    over-refusal penalty and the KL term where it opens on harmless ones."""

    def __init__(self, lm, cfg: RunConfig, gate: GateProbe | None = None):
        self.lm, self.cfg, self.gate = lm, cfg, gate
        targets = prompts.targets()
        every = targets["refusal"]
        n = cfg.meta.refusal_targets
        if n is not None and n > len(every):
            raise ValueError(f"refusal_targets is {n} (meta.refusal_targets, or fold.refusal_targets for the exported "
                             f"modulation), but assets/refusal_targets.json holds {len(every)} refusal targets: set it to at "
                             f"most {len(every)}, or null for all of them.")
        self.refusals = every if n is None else every[:n]
        self.max_length = cfg.attribution.max_length
        if cfg.meta.over_refusal_span not in ("opening", "target"):
            raise ValueError(f"meta.over_refusal_span must be 'opening' or 'target', not {cfg.meta.over_refusal_span!r}.")
        if cfg.meta.kl_skip >= cfg.data.answer_tokens:
            raise ValueError(f"meta.kl_skip ({cfg.meta.kl_skip}) leaves out every one of the {cfg.data.answer_tokens} answer "
                             "tokens the KL term reads: set it below data.answer_tokens.")
        self.openings = targets.get("openings") or tuple(" ".join(r.split()[:2]) for r in every[:3])
        self._read: dict[str, float] = {}  # formatted prompt -> the gate's reading (the gate reads the unmodulated model)

    def read(self, formatted: list[str]) -> torch.Tensor | None:
        """[n] the gate's strengths for formatted prompts (read once per prompt, then cached), or None without a gate."""
        if self.gate is None:
            return None
        new = list(dict.fromkeys(p for p in formatted if p not in self._read))
        if new:
            self._read.update(zip(new, self.gate.read(self.lm, new, self.max_length).tolist()))
        return torch.tensor([self._read[p] for p in formatted])

    def batch(self, harmful: list[str], benign: list[str], answers: list[tuple[str, str]]) -> Batch:
        """One pair batch per role: attacked prompts are long and benign ones short, so padding them
        together would waste most of the compute."""
        r = self.refusals
        roles = {
            "harmful": (harmful, [r[i % len(r)] for i in range(len(harmful))]),
            "benign": (benign, [r[(i + 3) % len(r)] for i in range(len(benign))]),
            "answers": ([p for p, _ in answers], [a for _, a in answers]),
        }
        eos = {"harmful": self.cfg.meta.refusal_eos, "benign": self.cfg.meta.refusal_eos, "answers": False}
        out = {k: encode_pairs(self.lm.tokenizer, p, t, self.max_length, end_with_eos=eos[k]) for k, (p, t) in roles.items() if p}
        s = {k: self.read(p) for k, (p, _) in roles.items() if p}
        m, o = self.cfg.meta, self.openings  # every prompt with every refusal opening: p(the answer starts by refusing)
        if harmful and m.opening_weight:
            out["harmful_open"] = encode_pairs(self.lm.tokenizer, [p for p in harmful for _ in o], list(o) * len(harmful), self.max_length)
            s["harmful_open"] = None if s["harmful"] is None else s["harmful"].repeat_interleave(len(o))
        if benign and m.over_refusal_span == "opening":
            out["benign_open"] = encode_pairs(self.lm.tokenizer, [p for p in benign for _ in o], list(o) * len(benign), self.max_length)
            s["benign_open"] = None if s["benign"] is None else s["benign"].repeat_interleave(len(o))
        if m.over_refusal_span == "opening":
            out.pop("benign", None)
        return Batch(out, s)

    def _applied(self, view: tuple[torch.Tensor, dict[int, InputTerms]], s: torch.Tensor | None):
        """The modulation of one role's rows: as is, or at each row's gate strength."""
        dense, inputs = view
        if s is None:
            return modulate(self.lm.model, dense, self.lm.nmap, inputs=inputs)
        rows = at_strength(dense[None], s[:, None, None])
        row_inputs = {l: RowTerms(t.indices, s[:, None] * t.coef[None], t.direction, t.offset) for l, t in inputs.items()}
        return modulate(self.lm.model, rows, self.lm.nmap, inputs=row_inputs)

    def __call__(self, view: tuple[torch.Tensor, dict[int, InputTerms]], batch: Batch) -> tuple[torch.Tensor, dict]:
        model, m = self.lm.model, self.cfg.meta
        pairs, s = batch.pairs, batch.strengths
        terms = {}
        loss = torch.zeros(())
        if "harmful" in pairs:
            with self._applied(view, s["harmful"]):
                terms["refusal_nll"] = -target_logprob(forward(model, pairs["harmful"]), pairs["harmful"], mean=True).mean()
            loss = loss + terms["refusal_nll"]
        if "harmful_open" in pairs:
            with self._applied(view, s["harmful_open"]):
                terms["opening_nll"] = -torch.log(self._p_refuse(pairs["harmful_open"]).clamp(min=1e-9)).mean()
            loss = loss + m.opening_weight * terms["opening_nll"]
        if m.mu_over_refusal and ("benign_open" in pairs or "benign" in pairs):
            role = "benign_open" if "benign_open" in pairs else "benign"
            with self._applied(view, s[role]):
                if role == "benign_open":
                    p = self._p_refuse(pairs["benign_open"])
                else:  # the mean token probability of a whole refusal sentence
                    p = target_logprob(forward(model, pairs["benign"]), pairs["benign"], mean=True).exp()
            terms["over_refusal"] = -torch.log1p(-p.clamp(max=1 - 1e-6)).mean()
            loss = loss + m.mu_over_refusal * terms["over_refusal"]
        if "answers" in pairs and m.lam_kl:
            sub = pairs["answers"]
            with self._applied(view, s["answers"]):
                logits = forward(model, sub)
            with torch.no_grad():
                base_logits = forward(model, sub)
            mask = sub.target_mask[:, -logits.shape[1]:][:, 1:].to(logits.device)
            if m.kl_skip:  # leave each answer's first kl_skip tokens out
                mask = mask & (mask.cumsum(-1) > m.kl_skip)
            base_lp = F.log_softmax(base_logits[:, :-1][mask].float(), -1)  # [n_answer_tokens, vocab]
            mod_lp = F.log_softmax(logits[:, :-1][mask].float(), -1)
            terms["kl"] = (base_lp.exp() * (base_lp - mod_lp)).sum(-1).mean()
            loss = loss + m.lam_kl * terms["kl"]
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    def _p_refuse(self, batch: PairBatch) -> torch.Tensor:
        """[B] probability that each prompt's answer opens with one of the refusal openings (they share no prefix
        beyond a first word, so the sum is the probability of any of them)."""
        lp = target_logprob(forward(self.lm.model, batch), batch)  # [B * K], log p(opening | prompt)
        return lp.view(-1, len(self.openings)).exp().sum(-1).clamp(max=1.0)


def _sample(rng: random.Random, pool: list, n: int) -> list:
    return rng.sample(pool, min(n, len(pool)))


def train_gains(lm, selection: Selection, cfg: RunConfig = RunConfig(), *, splits: Splits | None = None,
                cache_dir=None, reporter: Reporter | None = None, gate: GateProbe | None = None,
                switch: FittedSwitch | None = None, readers: torch.Tensor | None = None) -> TrainResult:
    """Learn gains for the selected neurons (and, with `meta.conditional`, their input-side terms along each layer's
    harm direction); returns the best `Modulation` (by validation loss) and the log. With a `gate` (fitted first, on
    the unmodulated model), every training prompt gets the modulation at the strength the gate reads from it. Each
    step's log entry goes to `reporter.step`; once the reporter is cancelled, training stops and keeps the best gains.
    With a fitted `switch` (`switch_fit.fit_switch`), training runs with the switch in place and the input-side terms
    read its flag (its directions) instead of a raw harm direction; the result carries the switch. `readers`:
    [n_layers, n_neurons] bool, the neurons that get input-side terms (default: the selected ones)."""
    m = cfg.meta
    reporter = reporter or SILENT
    if m.mode not in ("fomaml", "reptile", "joint"):
        raise ValueError(f"Unknown meta-learning mode '{m.mode}'; use fomaml, reptile or joint.")
    if not bool(selection.safety.any()) and not bool(selection.utility.any()):
        raise SelectionError(f"The selection is empty (k_safety={selection.config.k_safety}, k_utility={selection.config.k_utility}, "
                             "after the overlap and protection rules): there is nothing to train. Raise k_safety or k_utility.")
    splits = splits or build_splits(cfg.data)
    tasks = build_tasks(lm, cfg, splits, Path(cache_dir) if cache_dir else default_cache_dir())
    rng = random.Random(m.seed)
    torch.manual_seed(m.seed)
    directions = None
    if m.conditional:
        chosen = selection.safety | selection.utility if readers is None else readers
        layers = [l for l in chosen.any(1).nonzero().flatten().tolist() if l >= m.input_from_layer]
        if switch is not None:
            directions = {l: switch.directions[l] for l in layers if l in switch.directions}
        else:
            directions = harm_directions(lm, *splits.harm_pools("train", m.direction_prompts, m.direction_prompts // 10), layers,
                                         reporter=reporter.muted())
    params = GainParams(selection, m.constrained, m.max_gain, directions, m.max_coef, readers)
    objective = Objective(lm, cfg, gate)
    groups = [{"params": [params.safety, params.utility], "lr": m.outer_lr}]
    if params.coef is not None:
        groups.append({"params": [params.coef], "lr": m.input_lr})
    opt = torch.optim.Adam(groups)
    families = sorted(tasks.harmful)
    val_batch = objective.batch(tasks.val_harmful, tasks.val_benign, tasks.val_answers)
    result = TrainResult(params.modulation(lm.fingerprint))
    best = (math.inf, params.snapshot(), 0)
    bad_checks = 0
    nb, nk = max(1, m.batch_benign // 2), max(1, m.batch_benign - m.batch_benign // 2)

    def task_batch(family: str | None):
        """A task's batch: harmful and benign prompts in the task's form (half of the benign ones plain);
        for joint training, every row's form drawn at random."""
        if family:
            harmful = _sample(rng, tasks.harmful[family], m.batch_harmful)
            benign = _sample(rng, tasks.benign[family], nb - nb // 2) + _sample(rng, tasks.benign["plain"], nb // 2)
        else:
            harmful = [rng.choice(tasks.harmful[rng.choice(families)]) for _ in range(m.batch_harmful)]
            benign = [rng.choice(tasks.benign[rng.choice(families)]) for _ in range(nb)]
        return objective.batch(harmful, benign, _sample(rng, tasks.answers, nk))

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad(loss, params.params(), allow_unused=True)

    with (modulate(lm.model, None, lm.nmap, switch=switch.switch) if switch is not None else nullcontext()):
        for step in range(1, m.steps + 1):
            if reporter.cancelled:
                result.stopped = "cancelled"
                break
            family = None if m.mode == "joint" else rng.choice(families)
            with torch.enable_grad():
                if m.mode == "joint":
                    loss, terms = objective(params.view(), task_batch(None))
                    outer = grads(loss)
                else:
                    # inner loop: adapt a copy of the gains to this family's support batch
                    fast = [p.detach().clone().requires_grad_(True) for p in params.params()]
                    for _ in range(m.inner_steps):
                        inner_loss, _ = objective(params.view(fast), task_batch(family))
                        g = torch.autograd.grad(inner_loss, fast, allow_unused=True)
                        fast = [(f - m.inner_lr * (gi if gi is not None else 0)).detach().requires_grad_(True) for f, gi in zip(fast, g)]
                    if m.mode == "fomaml":  # first-order: query gradient at the adapted gains
                        loss, terms = objective(params.view(fast), task_batch(family))
                        outer = torch.autograd.grad(loss, fast, allow_unused=True)
                    else:  # reptile: move towards the adapted gains
                        loss, terms = inner_loss, {}
                        outer = [p.detach() - f.detach() for p, f in zip(params.params(), fast)]
            opt.zero_grad()
            for p, g in zip(params.params(), outer):
                p.grad = None if g is None else g.detach().clone()
            previous = params.snapshot()
            opt.step()
            params.project()
            if not params.finite() or not math.isfinite(float(loss.detach())):
                params.load(previous)
                result.stopped = "non_finite"
                result.log.append({"step": step, "task": family or "mixed", "loss": float(loss.detach()),
                                   "error": f"non-finite gains or loss at step {step}: training stopped and kept the last good gains. "
                                            f"Lower meta.outer_lr (now {m.outer_lr:g}) or meta.inner_lr (now {m.inner_lr:g}) and train again."})
                break
            entry = {"step": step, "task": family or "mixed", "loss": float(loss.detach()), **terms,
                     "mean_safety_gain": float(params.safety.detach().mean()) if len(params.safety) else 1.0,
                     "mean_utility_gain": float(params.utility.detach().mean()) if len(params.utility) else 1.0}
            if params.coef is not None and len(params.coef):
                entry["mean_abs_coef"] = float(params.coef.detach().abs().mean())
            if step % m.eval_every == 0 or step == m.steps:
                with torch.no_grad():
                    dense, inputs = params.view()
                    val_loss, val_terms = objective((dense.detach(), {l: InputTerms(t.indices, t.coef.detach(), t.direction, t.offset)
                                                                      for l, t in inputs.items()}), val_batch)
                entry["val"] = float(val_loss)
                entry.update({f"val_{k}": v for k, v in val_terms.items()})
                if entry["val"] < best[0] - 1e-4:
                    best, bad_checks = (entry["val"], params.snapshot(), step), 0
                else:
                    bad_checks += 1
                    if bad_checks >= m.patience:
                        result.log.append(entry)
                        result.stopped = "early_stop"
                        reporter.step(entry)
                        break
            result.log.append(entry)
            reporter.step(entry)
    if best[2] > 0:
        params.load(best[1])
    result.best_step = best[2]
    meta = {"kind": "neurontune", "mode": m.mode, "steps_run": len(result.log), "best_step": best[2],
            "stopped": result.stopped, "k_safety": selection.config.k_safety, "k_utility": selection.config.k_utility,
            "trained_behind_gate": gate is not None, "conditional": params.coef is not None}
    result.modulation = params.modulation(lm.fingerprint, meta)
    if switch is not None:
        mod = result.modulation
        result.modulation = Modulation.from_dense(mod.dense(), mod.fingerprint, {**meta, "switch": switch.info}, mod.inputs, switch.switch)
    return result
