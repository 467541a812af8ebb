"""Fast refusal measures without a full evaluation: the first-token refusal proxy (one forward, no generation)
and the judged refusal of short greedy answers; used by sweeps and by the direction baseline's search."""
from __future__ import annotations

from typing import Sequence

import torch

from ..data import prompts
from ..data.chat import chat_prompt
from ..data.splits import Splits, check_split
from ..interventions.generation import generate
from ..interventions.protocol import applied
from ..model.logprobs import encode_pairs, forward, last_token_index
from .judge import REFUSALS
from .judges import RULES
from .stats import mean


def refusal_tokens(tokenizer) -> list[int]:
    """First tokens of the refusal openings (prompts.targets()["refusal"] plus "I", "Sorry", "As", each also
    with a leading space), minus any that also open a compliance target."""
    def firsts(texts):
        out = set()
        for t in texts:
            for variant in (t, " " + t):
                ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
                if ids:
                    out.add(ids[0])
        return out
    tg = prompts.targets()
    return sorted(firsts(list(tg["refusal"]) + ["I", "Sorry", "As"]) - firsts(tg["compliance"]))


@torch.no_grad()
def refusal_proxy(lm, intervention, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """[n] probability that the answer *starts* like a refusal, without generating: the next-token
    probability mass, at the first answer position, on `refusal_tokens`. One forward pass per batch.

    It over-counts ("I'd be happy to..." starts with "I") and is a relative signal for sweeps: compare it
    between interventions on the same prompts, not with the judged refusal rate."""
    tok_ids = torch.tensor(refusal_tokens(lm.tokenizer))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = [chat_prompt(lm.tokenizer, p) for p in prompts[start:start + batch_size]]
        batch = encode_pairs(lm.tokenizer, chunk, [""] * len(chunk))
        with applied(intervention, lm):
            logits = forward(lm.model, batch)
        last = last_token_index(batch) - (batch.input_ids.shape[1] - logits.shape[1])  # logits may cover the end only
        probs = logits[torch.arange(len(chunk), device=logits.device), last.to(logits.device)].float().softmax(-1)
        out.append(probs[:, tok_ids.to(probs.device)].sum(-1).clamp(0, 1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def judged_refusal(lm, intervention, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 16) -> float:
    """Fraction of short greedy answers the rules judge calls refusals, full or partial (refusals show in the first
    words; a search runs this many times, so it is always the fast rules)."""
    if not prompts:
        return float("nan")
    with applied(intervention, lm):
        answers = generate(lm, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size)
    return mean([float(v in REFUSALS) for v in RULES.verdicts(prompts, answers)])


def proxy_metrics(lm, intervention, splits: Splits, n: int = 32, *, split: str = "validation", batch_size: int = 16) -> dict[str, float]:
    """Mean refusal proxy on n harmful, benign and borderline prompts of one split (validation by default)."""
    check_split(split)
    out = {}
    for key, kind in (("harmful_refusal_proxy", "harmful"), ("benign_over_refusal_proxy", "benign"),
                      ("borderline_over_refusal_proxy", "borderline")):
        prompts = [p.text for p in getattr(splits, kind)[split][:n]]
        out[key] = float(refusal_proxy(lm, intervention, prompts, batch_size).mean()) if prompts else float("nan")
    return out
