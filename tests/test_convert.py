import logging

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import dsparse
from dsparse import SparseLinear, SparsityConfig, sparse_modules, sparsify


def tiny_llama(layers=2, hidden=32):
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def tiny_gpt2():
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def test_llama_every_linear_but_the_head_becomes_sparse():
    model = sparsify(tiny_llama(), {})
    names = [n for n, _ in sparse_modules(model)]
    assert len(names) == 2 * 7  # q k v o gate up down per block
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, SparseLinear)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")


def test_gpt2_conv1d_is_converted_with_the_same_function():
    model = tiny_gpt2().eval()
    ids = torch.randint(0, 64, (2, 10))
    dense_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 10, 32)
    sparsify(model, {})
    sparse_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(sparse_attn, SparseLinear) and sparse_attn.out_features == 96
    mask = sparse_attn.effective_weight().t() != 0  # Conv1D weight is (in, out)
    expected = x @ (dense_attn.weight * mask) + dense_attn.bias
    torch.testing.assert_close(sparse_attn(x), expected)
    assert len(list(sparse_modules(model))) == 2 * 4
    out = model(ids, labels=ids)
    out.loss.backward()
    assert sparse_attn.values.grad is not None


def test_include_exclude_and_per_layer_patterns():
    config = {"include": [r"\.mlp\."], "exclude": [r"layers\.0\."],
              "layer_patterns": [{"match": r"down_proj", "pattern": "2:8"}]}
    model = sparsify(tiny_llama(), config)
    got = {n: f"{m.n}:{m.m}" for n, m in sparse_modules(model)}
    assert got == {"model.layers.1.mlp.gate_proj": "2:4", "model.layers.1.mlp.up_proj": "2:4",
                   "model.layers.1.mlp.down_proj": "2:8"}


def test_compress_false_simulates_with_dense_storage():
    a, b = tiny_llama(), tiny_llama()
    sparsify(a, {})
    sparsify(b, {"compress": False})
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(a(ids).logits, b(ids).logits)
    layer = b.model.layers[0].mlp.up_proj
    assert layer.weight.shape == (64, 32) and not hasattr(layer, "values")


def test_indivisible_layer_raises_naming_it_or_is_skipped_with_a_log(caplog):
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 6))
    with pytest.raises(ValueError, match=r"layer '1' .*out_features .* = 6 is not divisible.*exclude"):
        sparsify(model, {"exclude_output_head": False})
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 6))
    with caplog.at_level(logging.WARNING):
        sparsify(model, {"skip_incompatible": True})
    assert isinstance(model[0], SparseLinear) and isinstance(model[1], nn.Linear)
    assert "skipping 1" in caplog.text


def test_unsupported_dtype_is_refused():
    model = nn.Sequential(nn.Linear(16, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="dtype torch.complex64 is not supported"):
        sparsify(model, {})


@pytest.mark.parametrize("section, match", [
    ({"patern": "2:4"}, "unknown key 'patern' in sparsity; did you mean 'pattern'"),
    ({"pattern": "5:4"}, "0 < N < M"),
    ({"include": ["("]}, r"sparsity.include: '\(' is not a valid regular expression"),
    ({"backend": "cuda"}, "unknown sparsity backend 'cuda'"),
    ({"adapters": {"rnk": 4}}, "unknown key 'rnk' in sparsity.adapters; did you mean 'rank'"),
    ({"layer_patterns": [{"match": "x", "pattern": "3:2"}]}, r"layer_patterns\[0\].pattern"),
    ({"mask_change_freq": -5}, "mask_change_freq must be >= 0"),
])
def test_bad_config_raises_naming_the_key(section, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig.from_dict(section)


def test_config_roundtrip():
    cfg = SparsityConfig.from_dict({"pattern": "2:8", "adapters": {"rank": 4}, "total_steps": 100})
    again = SparsityConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.adapter_start_step() == 99


def test_public_api():
    assert {"sparsify", "sparse_modules", "SparseLinear", "SparsityConfig"} <= set(dsparse.__all__)


def test_mvue_dw_reaches_every_layer_with_its_own_seed():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    sparsify(model, {"mvue_dw": True, "exclude_output_head": False, "backend": "reference"})
    layers = [m for _, m in sparse_modules(model)]
    assert len(layers) == 2 and all(layer.mvue_dw for layer in layers)
    assert len({layer.mvue_seed for layer in layers}) == 2
