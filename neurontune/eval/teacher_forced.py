"""Teacher-forced utility metrics: perplexity of held-out benign answers and multiple-choice accuracy, each
computed under an intervention in batched forwards (no generation)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..config import EvalConfig
from ..data import prompts
from ..data.chat import chat_prompt
from ..infra.progress import Reporter
from ..interventions.protocol import applied_rows
from ..model.logprobs import encode_pairs, forward, target_logprob, token_logprobs
from .stats import mean


def _rows(strengths: Sequence[float] | None, start: int, n: int) -> torch.Tensor:
    return torch.ones(n) if strengths is None else torch.tensor(list(strengths[start:start + n]), dtype=torch.float32)


@torch.no_grad()
def answer_nll(lm, intervention, prompts: list[str], answers: list[str], batch_size: int, tick, reporter: Reporter,
               strengths: Sequence[float] | None = None) -> list[list[float]]:
    """Per prompt [sum of -log p(answer tokens), number of answer tokens] under the intervention, each row at
    its strength (a gate's reading of the prompt alone, so the answer never moves it; None = 1)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        reporter.check("Evaluation")
        batch = encode_pairs(lm.tokenizer, [chat_prompt(lm.tokenizer, p) for p in prompts[start:start + batch_size]],
                             answers[start:start + batch_size])
        with applied_rows(intervention, lm, _rows(strengths, start, len(batch.input_ids))):
            logits = forward(lm.model, batch)
        lp = token_logprobs(logits, batch).sum(-1)
        counts = batch.target_mask[:, 1:].sum(-1)
        out += [[-float(a), int(c)] for a, c in zip(lp.cpu(), counts)]
        tick(len(lp), "perplexity")
    return out


def perplexity(nll: list[list[float]]) -> float:
    total = sum(n for _, n in nll)
    return math.exp(sum(s for s, _ in nll) / total) if total else float("nan")


LETTERS = "ABCDEFGHIJ"


def mc_items(style: str, tokenizer, questions: Sequence[dict]) -> list[tuple[str, list[str]]]:
    """(formatted prompt, candidate answers) per question.

    "cloze" (default; the one that works on small models: SmolLM2-135M scores ~50% on the built-in set
    against ~20% for letters): the prompt is the question alone and each choice's text is scored as the
    answer by its mean token log-prob. "letter": the prompt lists the choices as A-D and the letters are scored."""
    items = []
    for q in questions:
        if style == "letter":
            body = q["question"] + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q["choices"]))
            items.append((chat_prompt(tokenizer, body + "\nAnswer with the letter of the correct choice."),
                          [LETTERS[i] for i in range(len(q["choices"]))]))
        else:
            items.append((chat_prompt(tokenizer, q["question"]), [str(c) for c in q["choices"]]))
    return items


def mc_questions(cfg: EvalConfig) -> tuple[dict, ...]:
    return prompts.multiple_choice()[: cfg.n_mc] if cfg.n_mc is not None else prompts.multiple_choice()


@torch.no_grad()
def mc_predictions(lm, intervention, cfg: EvalConfig, tick, reporter: Reporter, strengths: Sequence[float] | None = None) -> list[int]:
    """The chosen answer of each question under the intervention; `strengths`: one per question (read from
    the question's prompt alone), applied to every candidate's row."""
    items = mc_items(cfg.mc_style, lm.tokenizer, mc_questions(cfg))
    flat = [(qi, p, c) for qi, (p, cands) in enumerate(items) for c in cands]
    scores: list[float] = []
    for start in range(0, len(flat), cfg.batch_size):
        reporter.check("Evaluation")
        chunk = flat[start:start + cfg.batch_size]
        batch = encode_pairs(lm.tokenizer, [p for _, p, _ in chunk], [c for _, _, c in chunk])
        rows = torch.ones(len(chunk)) if strengths is None else torch.tensor([float(strengths[qi]) for qi, _, _ in chunk])
        with applied_rows(intervention, lm, rows):
            logits = forward(lm.model, batch)
        scores += target_logprob(logits, batch, mean=True).cpu().tolist()
        tick(len(chunk), "multiple_choice")
    preds, pos = [], 0
    for _, cands in items:
        s = scores[pos:pos + len(cands)]
        preds.append(max(range(len(s)), key=s.__getitem__))
        pos += len(cands)
    return preds


def mc_accuracy(preds: list[int], cfg: EvalConfig) -> float:
    return mean([float(p == q["answer"]) for p, q in zip(preds, mc_questions(cfg))])
