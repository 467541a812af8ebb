"""Batched generation with per-row modulation: the base and the tuned model answer in one call.

Rows are left-padded by hand (the shared tokenizer is never mutated), each row may carry its own
`Modulation` (or None), and `stream_generate` yields every row's text as tokens arrive.
"""
from __future__ import annotations

import contextvars
import logging
import queue
import threading
from typing import Iterator, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from ..data.chat import chat_prompt
from ..infra.progress import Reporter
from ..model.context import context_length
from .modulation import Modulation, modulate

log = logging.getLogger(__name__)

RowGains = Sequence[Modulation | None] | Modulation | None
PROMPT_CAP = 1024  # prompt tokens kept by default, even when the model's context is longer


def fit_lengths(lm, max_new_tokens: int, cap: int = PROMPT_CAP) -> tuple[int, int]:
    """(prompt tokens kept, new tokens) so that prompt + answer fit the model's context."""
    ctx = context_length(lm)
    new = max(1, min(int(max_new_tokens), ctx // 2))
    return max(1, min(cap, ctx - new)), new


def encode_left(tokenizer, texts: Sequence[str], max_length: int = PROMPT_CAP) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask for already formatted prompts (keeps each prompt's end if too long, and says so)."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    cut = sum(len(r) > max_length for r in rows)
    if cut:
        log.warning("%d of %d prompts were longer than %d tokens: only their last %d tokens were kept.", cut, len(rows), max_length, max_length)
    rows = [r[-max_length:] for r in rows]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r):] = torch.tensor(r)
            mask[b, width - len(r):] = 1
    return ids, mask


def _row_gains(gains: RowGains, n: int) -> list | Modulation | None:
    if gains is None or isinstance(gains, Modulation):
        return gains
    if len(gains) != n:
        raise ValueError(f"{len(gains)} per-row modulations for {n} prompts.")
    return None if all(g is None for g in gains) else list(gains)


def _generate_kwargs(lm, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, seed: int | None) -> dict:
    tok = lm.tokenizer
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
        if seed is not None:
            torch.manual_seed(seed)
    else:  # explicit greedy: the model's generation_config may ask for sampling by default
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def generate(lm, prompts: Sequence[str], gains: RowGains = None, *, max_new_tokens: int = 48, do_sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 16, formatted: bool = False,
             seed: int | None = None, reporter: Reporter | None = None) -> list[str]:
    """Answer each user prompt; `gains` is one modulation for all rows or one per row (None = base)."""
    texts = list(prompts) if formatted else [chat_prompt(lm.tokenizer, p) for p in prompts]
    per_row = not (gains is None or isinstance(gains, Modulation))
    budget, max_new_tokens = fit_lengths(lm, max_new_tokens)
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        g = _row_gains(gains[start:start + batch_size] if per_row else gains, len(chunk))
        ids, mask = encode_left(lm.tokenizer, chunk, budget)
        device = lm.model.get_input_embeddings().weight.device
        with modulate(lm.model, g, lm.nmap):
            seqs = lm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     **_generate_kwargs(lm, max_new_tokens, do_sample, temperature, top_p, seed))
        out += lm.tokenizer.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True)
        if reporter is not None:
            reporter.progress(min(start + batch_size, len(texts)), len(texts), "generate")
    return [o.strip() for o in out]


class _RowStreamer(BaseStreamer):
    """Collects the new tokens of every row and publishes all rows' decoded text after each step."""

    def __init__(self, tokenizer, n_rows: int):
        self.tokenizer, self.ids, self.queue, self.first = tokenizer, [[] for _ in range(n_rows)], queue.Queue(), True
        self.done = [False] * n_rows

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate() first hands over the prompt
            self.first = False
            return
        for row, tok in enumerate(value.reshape(len(self.ids), -1)[:, -1].tolist()):
            if not self.done[row]:
                if tok in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
                    self.done[row] = True
                else:
                    self.ids[row].append(tok)
        self.queue.put([self.tokenizer.decode(r, skip_special_tokens=True) for r in self.ids])

    def end(self) -> None:
        self.queue.put(None)


def stream_generate(lm, conversations: Sequence[Sequence[dict]], gains: RowGains = None, *, max_new_tokens: int = 128,
                    do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
                    seed: int | None = None, max_prompt_tokens: int = PROMPT_CAP) -> Iterator[list[str]]:
    """Stream several conversations (each a list of chat messages ending with the user turn) in one
    batched generate call; yields the list of every row's answer so far after each new token.
    A conversation longer than the context keeps its end (the studio's chat fits it first and says so)."""
    texts = [chat_prompt(lm.tokenizer, conv[-1]["content"], history=conv[:-1]) for conv in conversations]
    budget, max_new_tokens = fit_lengths(lm, max_new_tokens, max_prompt_tokens)
    ids, mask = encode_left(lm.tokenizer, texts, budget)
    streamer = _RowStreamer(lm.tokenizer, len(texts))
    g = _row_gains(gains, len(texts))
    device = lm.model.get_input_embeddings().weight.device
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with modulate(lm.model, g, lm.nmap), torch.no_grad():
                lm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), streamer=streamer,
                                  **_generate_kwargs(lm, max_new_tokens, do_sample, temperature, top_p, seed))
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)
            streamer.end()

    # Run in this context's copy so scoped hooks opened by the caller apply inside the worker thread too.
    worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
    worker.start()
    last = [""] * len(texts)
    while (item := streamer.queue.get()) is not None:
        last = item
        yield [t.strip() for t in item]
    worker.join()
    if errors:
        raise errors[0]
    yield [t.strip() for t in last]
