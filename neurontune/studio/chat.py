"""Side-by-side chat: the base model (left) and the session's modulated model (right) answer the same
conversation in ONE batched, streamed generate call (per-row gains), each answer with the judge's verdict.
When the gains have an input gate, the right row's gains are scaled by the gate's strength s for the last
user message, read alone (one unmodulated forward of it first, as the evaluation's "neurontune + gate" reads a
single prompt): an earlier harmful turn does not hold the gate open for the next message."""
from __future__ import annotations

from typing import Iterator

from ..data import attacks, prompts
from ..data.chat import chat_prompt
from ..data.splits import build_splits
from ..eval.judge import REFUSALS, read
from ..eval.judges import WORDS, Judge
from ..interventions.gating import row_modulations
from ..interventions.generation import fit_lengths, stream_generate
from ..interventions.modulation import Modulation
from .handlers import gains_text
from .judging import judge_for
from .state import Session, Studio
from .views import returns

MAX_CHARS = 4000  # a longer message is cut (and the user told) instead of filling the context
CHAT_PROMPT_TOKENS = 2048  # conversation tokens the models read at most (long prompts are slow on a CPU)


def _n_tokens(tok, conv: list[dict]) -> int:
    return len(tok(chat_prompt(tok, conv[-1]["content"], history=conv[:-1]), add_special_tokens=False)["input_ids"])


def fit_message(tok, message: str, budget: int) -> str:
    """The message cut (at a token boundary) so that a conversation of it alone fits `budget` tokens."""
    ids = tok(message, add_special_tokens=False)["input_ids"]
    keep = len(ids) - (_n_tokens(tok, [{"role": "user", "content": message}]) - budget)
    while keep > 0:
        cut = tok.decode(ids[:keep]).rstrip("\ufffd")  # never end inside a multi-byte character
        over = _n_tokens(tok, [{"role": "user", "content": cut}]) - budget
        if over <= 0:
            return cut
        keep -= max(1, over)
    return ""


def fit_history(tok, conv: list[dict], budget: int) -> list[dict]:
    """What a pane's model reads: the oldest turns left out until the conversation fits `budget` tokens."""
    while len(conv) > 1 and _n_tokens(tok, conv) > budget:
        conv = conv[2:] if len(conv) > 2 else conv[-1:]
    return conv


def verdict(text: str, v: str | None = None) -> str:
    """An answer's verdict line: `v` (a judge's verdict; by default the rules'), and the clause the rules read."""
    if not text.strip():
        return "empty answer"
    r = read(text)
    v = v or r.verdict
    phrase = r.phrase if v in REFUSALS else None
    return f"**{WORDS.get(v, v)}**" + (f" (“{phrase}”)" if phrase else " (no refusal phrase)" if v == "comply" else "")


def judged_lines(judge: Judge, prompt: str, answers: list[str]) -> list[str]:
    """Each finished answer's verdict line from `judge` (its name, and the second opinion where it has one)."""
    verdicts = judge.verdicts([prompt] * len(answers), answers)
    second = judge.second.verdicts([prompt] * len(answers), answers) if judge.second is not None else [None] * len(answers)
    lines = []
    for a, v, v2 in zip(answers, verdicts, second):
        line = verdict(a, v)
        if judge.name != "rules":
            line += f" · {judge.name}" + (f" (second opinion, {judge.second.name}: {WORDS.get(v2, v2)})" if v2 is not None else "")
        lines.append(line)
    return lines


def gate_reading(s: float) -> str:
    """The gate strength in words: how much of the gains the right pane applied."""
    if s < 0.2:
        return f"gate {s:.2f}: looks benign, gains mostly off"
    if s > 0.8:
        return f"gate {s:.2f}: looks harmful, gains on"
    return f"gate {s:.2f}: unsure, gains partly on"


def display(conv: list[dict], partial: str | None = None) -> list[dict]:
    """The chatbot's messages: each finished answer followed by the judge's verdict line (and the gate's reading)."""
    out = []
    for m in conv:
        content = m["content"] if m["role"] == "user" else f"{m['content']}\n\n*judge:* {m.get('verdict') or verdict(m['content'])}"
        if m.get("gate") is not None:
            content += f" · *{gate_reading(m['gate'])}*"
        out.append({"role": m["role"], "content": content})
    if partial is not None:
        out.append({"role": "assistant", "content": partial or "…"})
    return out


def examples(studio: Studio, session: Session) -> list[tuple[str, str]]:
    """(label, prompt) quick picks: a held-out harmful request, the same in each attack family, benign, borderline."""
    try:
        splits = build_splits(session.cfg.data)
        harmful, benign, border = splits.harmful_test[0].text, splits.benign_test[0].text, splits.borderline_test[0].text
    except (ValueError, IndexError):
        harmful, benign, border = prompts.harmful()[0].text, prompts.benign()[0].text, prompts.borderline()[0].text
    picks = [("harmful", harmful)]
    trained = set(session.cfg.data.train_families)  # every other family is one tuning never saw
    for family, templates in sorted(attacks.attack_families().items(), key=lambda kv: (kv[0] in trained, kv[0])):
        tag = "attack" if family in trained else "unseen attack"
        picks.append((f"harmful · {family.replace('_', ' ')} ({tag})", attacks.wrap(templates[0], harmful)))
    return picks + [("benign", benign), ("borderline-safe", border)]


def right_gains(lm, session: Session, conv: list[dict], strength: float, use_gate: bool, budget: int) -> tuple[Modulation | None, float | None]:
    """The right pane's gains for this conversation, and the gate strength s when the gate is used: the
    gains scaled by strength × s, s read on the LAST user message alone (unmodulated, as `Gated`
    measures a single prompt), so a previous harmful turn does not open the gate for a benign follow-up."""
    mod, gate, _ = session.tuned_side(use_gate)
    scale = float(strength)
    if mod is None:
        return None, None
    gains, readings = row_modulations(lm, mod, gate, [conv[-1]["content"]], strength=scale, max_length=budget)
    return gains[0], (None if readings is None else float(readings[0]))


@returns("left", "right", "msg", "chat_status")
def chat(studio: Studio, session: Session, message: str, strength: float = 1.0, max_new_tokens: int = 64,
         sample: bool = False, temperature: float = 0.7, use_gate: bool = True, judge: str = "rules") -> Iterator[dict]:
    """Stream both panes. Strength scales the gains towards 1 (0 = both panes the base model); with the
    session's gate on, the right pane's gains are scaled by strength × the gate's s for the conversation. Each
    finished answer gets `judge`'s verdict line ("rules" or "model:NAME")."""
    message = (message or "").strip()
    if not message:
        yield {"chat_status": "Type a message, or pick an example below."}
        return
    note = ""
    if len(message) > MAX_CHARS:
        message, note = message[:MAX_CHARS], f" Your message was cut to its first {MAX_CHARS:,} characters."
    lm = studio.model(session)
    budget, new_tokens = fit_lengths(lm, int(max_new_tokens), CHAT_PROMPT_TOKENS)
    if _n_tokens(lm.tokenizer, [{"role": "user", "content": message}]) > budget:
        message = fit_message(lm.tokenizer, message, budget)
        if not message.strip():
            yield {"chat_status": f"✗ Even a short message leaves no room for {new_tokens} new tokens in this model's context: lower max new tokens."}
            return
        note = (f" Your message was cut to its first {len(message):,} characters to fit the model's context "
                f"({budget:,} prompt tokens with {new_tokens} new ones).")
    if new_tokens < int(max_new_tokens):
        note += f" Answers are limited to {new_tokens} new tokens by the model's context."
    mod = session.modulation
    if mod is not None and mod.fingerprint and mod.fingerprint != lm.fingerprint:
        yield {"chat_status": "✗ The session's gains were made for another model; train or load gains for this one."}
        return
    convs = [c + [{"role": "user", "content": message}] for c in session.chat]  # what the panes show
    seen = [fit_history(lm.tokenizer, [{"role": m["role"], "content": m["content"]} for m in c], budget)
            for c in convs]  # what the models read (without the gate readings kept for display)
    if any(len(a) < len(b) for a, b in zip(seen, convs)):
        note += " The oldest turns were left out of what the models read, to fit the context (they stay on screen)."
    gains, s = right_gains(lm, session, seen[1], strength, bool(use_gate), budget)
    texts = ["", ""]
    for texts in stream_generate(lm, seen, [None, gains], max_new_tokens=new_tokens, do_sample=bool(sample),
                                 temperature=float(temperature), seed=0 if sample else None, max_prompt_tokens=budget):
        yield {"left": display(convs[0], texts[0]), "right": display(convs[1], texts[1]), "msg": ""}
    try:
        lines = judged_lines(judge_for(studio, judge), message, list(texts))
    except ValueError as exc:  # a malformed judge choice: the rules' lines, and the reason
        lines, note = [verdict(t) for t in texts], note + f" ✗ {exc}"
    session.chat = [convs[0] + [{"role": "assistant", "content": texts[0], "verdict": lines[0]}],
                    convs[1] + [{"role": "assistant", "content": texts[1], "verdict": lines[1], **({"gate": s} if s is not None else {})}]]
    same = "identical answers" if texts[0] == texts[1] else "the answers differ"
    if s is not None:
        applied = f"Strength ×{float(strength):g} × {gate_reading(s)} (applied ×{float(strength) * s:.2f}; {session.tuned_side(True)[2]})"
    elif mod is not None:
        applied = f"Strength ×{float(strength):g}, {'input gate off, ' if session.gate is not None else ''}{session.tuned_side(False)[2]}"
    else:
        applied = f"Strength ×{float(strength):g}"
    yield {"left": display(session.chat[0]), "right": display(session.chat[1]), "msg": "",
           "chat_status": f"{gains_text(session)} {applied}: {same}.{note}"}


@returns("left", "right", "chat_status")
def clear(studio: Studio, session: Session) -> dict:
    session.chat = [[], []]
    return {"left": [], "right": [], "chat_status": gains_text(session)}
