"""Model presets for pretraining, built from HF configs (weights are initialised, never downloaded)."""
from __future__ import annotations

import os
from typing import Any

import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, PretrainedConfig


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, positions: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=positions,
                       tie_word_embeddings=False)


PRESETS: dict[str, Any] = {
    "gpt2-tiny": lambda: GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=1024),
    "llama-tiny": lambda: _llama(256, 704, 4, 4, 4, 2048),
    "gpt2-small": lambda: GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "llama-1b": lambda: _llama(2048, 5632, 22, 32, 4, 2048),
    "llama-7b": lambda: _llama(4096, 11008, 32, 32, 32, 4096),
    "opt-1.3b": lambda: OPTConfig(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                                  max_position_embeddings=2048, word_embed_proj_dim=2048),
}


def load_config(spec: str) -> PretrainedConfig:
    """A preset name, or a HF ``config.json`` (or the directory holding one)."""
    if spec in PRESETS:
        return PRESETS[spec]()
    path = spec
    if os.path.isfile(path):
        if os.path.basename(path) != "config.json":
            raise ValueError(f"--model {spec}: a model file must be a HF config.json")
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a path to a HF "
                         "config.json")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def max_positions(config: PretrainedConfig) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def model_config(spec: str, seq_len: int) -> PretrainedConfig:
    """The config for ``spec``, checked against the sequence length it will train at."""
    config = load_config(spec)
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq_len {seq_len} exceeds the model's maximum of {limit} positions; lower --seq_len "
                         "or raise max_position_embeddings in the model config")
    return config


def build_model(spec: str, vocab_size: int, seq_len: int, seed: int = 0) -> nn.Module:
    """A freshly initialised causal LM for ``spec`` with the tokenizer's vocabulary (padded to a multiple of 64)."""
    import torch

    config = model_config(spec, seq_len)
    config.vocab_size = (vocab_size + 63) // 64 * 64
    torch.manual_seed(seed)  # every rank builds the same weights
    return AutoModelForCausalLM.from_config(config)
