"""How many positions a model attends to: the one context-length rule of the project (generation budgets,
attribution lengths and the chat's history trimming all ask here)."""
from __future__ import annotations

DEFAULT_CONTEXT = 2048
_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(lm) -> int:
    """The config's position limit (of its text part, for multimodal configs), else the tokenizer's, else 2048."""
    config = lm.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(lm.tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else DEFAULT_CONTEXT
