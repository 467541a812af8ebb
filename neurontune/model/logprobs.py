"""Teacher-forced log-probabilities: batch (chat prompt, target) pairs and compute log p(target | prompt).

Shared by attribution (gradient of the refusal log-probability), meta-learning losses, perplexity, multiple
choice and the fast refusal proxy of the evaluation, so all of them read the same tokens the same way. Rows are left-padded
(with explicit position ids) so every target ends at the last position: the LM head and softmax then
run on the last `keep` positions only, a large saving with a 49k-token vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.chat import plain_text


@dataclass
class PairBatch:
    """Left-padded token ids of prompt+target. `target_mask[b, t]` marks tokens whose log-prob counts."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T] bool, True on target tokens
    n_truncated: int = 0

    @property
    def keep(self) -> int:
        """How many final positions' logits the targets need (one before the first target token)."""
        first = self.target_mask.float().argmax(-1)
        has = self.target_mask.any(-1)
        width = self.input_ids.shape[1]
        return int(((width - first) * has).max()) + 1 if bool(has.any()) else 1

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device), self.n_truncated)


def encode_pairs(tokenizer, prompts: Sequence[str], targets: Sequence[str], max_length: int = 256,
                 end_with_eos: bool = False) -> PairBatch:
    """Tokenise formatted prompts and their targets separately (no merge across the boundary) and pad.

    A prompt too long for `max_length` keeps its end (where the request and the assistant header are).
    Prompts come from `data.chat_prompt` (content already plain text); targets are content, made plain here.
    `end_with_eos` appends the tokenizer's end-of-sequence id to every non-empty target."""
    rows, masks, n_truncated = [], [], 0
    for prompt, target in zip(prompts, targets, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(plain_text(tokenizer, target), add_special_tokens=False)["input_ids"] if target else []
        if t and end_with_eos and tokenizer.eos_token_id is not None:
            t = t + [tokenizer.eos_token_id]  # the answer ends here (end-of-turn), so a refusal stops instead of looping
        room = max_length - len(t)
        if len(p) > room:
            p, n_truncated = p[len(p) - room:], n_truncated + 1
        rows.append(p + t)
        masks.append([False] * len(p) + [True] * len(t))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    tmask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (r, m) in enumerate(zip(rows, masks)):
        ids[b, width - len(r):] = torch.tensor(r)
        attn[b, width - len(r):] = 1
        tmask[b, width - len(m):] = torch.tensor(m)
    return PairBatch(ids, attn, tmask, n_truncated)


def token_logprobs(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """Log-prob of each target token given everything before it: [B, K-1] for logits of the last K
    positions (K = T for full logits), zero off-target."""
    k = logits.shape[1]
    ids, tmask = batch.input_ids[:, -k:][:, 1:], batch.target_mask[:, -k:][:, 1:]
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[:, :, None].to(logp.device)).squeeze(-1)
    return picked * tmask.to(picked.device)


def target_logprob(logits: torch.Tensor, batch: PairBatch, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) over target tokens of log p(token): [B]."""
    lp = token_logprobs(logits, batch).sum(-1)
    if mean:
        lp = lp / batch.target_mask.sum(-1).clamp(min=1).to(lp.device)
    return lp


def forward(model, batch: PairBatch, inputs_embeds: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
    """Logits for a pair batch on the model's input device (works under device_map="auto"): those of
    the last `batch.keep` positions, which is all the targets need, or every position."""
    device = model.get_input_embeddings().weight.device
    kwargs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch.input_ids.to(device)}
    return model(attention_mask=batch.attention_mask.to(device), position_ids=batch.position_ids.to(device),
                 use_cache=False, logits_to_keep=0 if all_logits else batch.keep, **kwargs).logits


def last_token_index(batch: PairBatch) -> torch.Tensor:
    """[B] position of each row's last real token (whichever side the batch is padded on)."""
    mask = batch.attention_mask
    return mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
