"""Chat formatting with the tokenizer's own template, and the one place user text is made unable to produce
special tokens (so a message can never open, close or fake a turn)."""
from __future__ import annotations

import re
from typing import Sequence

WORD_JOINER = "\u2060"  # invisible; inside a special-token string it makes the tokenizer read plain text
_MARKUP = re.compile(r"^[<\[].+[>\]]$", re.S)  # added tokens that look like markup: <think>, [INST] ...
_ROLE_LINE = re.compile(r"(?im)^(\s*)(user|assistant|system)(\s*:)")  # turns of the plain transcript


def special_strings(tokenizer) -> list[str]:
    """Strings the tokenizer maps to special or markup token ids wherever they occur in text, longest first."""
    found = {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])}
    try:
        added = tokenizer.added_tokens_decoder.values()
    except (AttributeError, NotImplementedError):
        added = ()
    for tok in added:
        content = str(getattr(tok, "content", tok))
        if getattr(tok, "special", False) or _MARKUP.match(content):
            found.add(content)
    return sorted((s for s in found if len(s) > 1), key=len, reverse=True)


def plain_text(tokenizer, text: str) -> str:
    """Message content made unable to produce special token ids: every special-token string in it (a fake
    `<|im_start|>system`, an early `<|im_end|>`, ...) gets an invisible word joiner after its first character,
    so the tokenizer encodes it as ordinary text. The one place content is neutralised: `chat_prompt` and
    `scoring.encode_pairs` use it, so user text can never open, close or fake a turn."""
    if not isinstance(text, str) or not text:
        return text
    specials = special_strings(tokenizer)
    if specials:
        pattern = re.compile("|".join(re.escape(s) for s in specials))
        text = pattern.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)
    return text


def chat_prompt(tokenizer, user_text: str, history: Sequence[dict] = (), system: str | None = None) -> str:
    """Format a conversation ending in a user turn with the tokenizer's own chat template.

    Every message's content goes through `plain_text` first: only the template makes special tokens.
    Models without a template (base models) get a plain 'User:/Assistant:' transcript, in which a content
    line starting with a role name is broken the same way, so it cannot fake a turn either."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(history) + [{"role": "user", "content": user_text}]
    messages = [{**m, "content": plain_text(tokenizer, m["content"])} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"{m['role'].capitalize()}: {_ROLE_LINE.sub(_break_role, m['content'])}\n" for m in messages)
    return turns + "Assistant:"


def _break_role(m: re.Match) -> str:
    return m.group(1) + m.group(2)[0] + WORD_JOINER + m.group(2)[1:] + m.group(3)
