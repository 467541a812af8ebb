"""Tiny randomly initialised models (LLaMA-style and GPT-2-style) with a byte-level tokenizer.

Built from a config in well under a second and with no download, they let tests, demos and the CI
exercise every code path of the engine and the studio. Deterministic under a seed.
"""
from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens + ChatML specials, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_vocab = {tok: i for i, tok in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    byte_vocab = {tok: i for i, tok in enumerate(sorted(byte_vocab))}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def tiny_model(arch: str = "llama", seed: int = 0, n_layers: int = 3, d_model: int = 64, d_mlp: int = 128):
    """A float32 tiny model of the given family in eval mode, and its tokenizer."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    vocab = len(tok)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_embd=d_model, n_inner=d_mlp, n_layer=n_layers, n_head=4, n_positions=512,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"Unknown tiny architecture '{arch}'; use 'llama' or 'gpt2'.")
    # Random init gives near-uniform outputs; a larger scale makes neurons matter and tests sharper.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok
