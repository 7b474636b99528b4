"""Export for inference and load back: same function, forward operands only, training state released."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dsparse import fused_counts, sparse_modules, sparsify
from dsparse.export import export_model, load_for_inference


def _model(kind):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("adapters", [False, True])
def test_exported_model_computes_what_the_trained_one_did(tmp_path, kind, adapters):
    model = sparsify(_model(kind), {})
    if adapters:
        for _, layer in sparse_modules(model):
            layer.add_adapter(4, alpha=2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # train, so that values, masks and adapters all moved
        ids = torch.randint(0, 64, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    export_model(model, str(tmp_path), dtype=torch.float32)
    loaded = load_for_inference(str(tmp_path), device="cpu")
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    layers = [layer for _, layer in sparse_modules(loaded)]
    assert len(layers) == len(list(sparse_modules(model)))
    assert all(layer.values.numel() == 0 and layer.idx.numel() == 0 for layer in layers)  # operands only
    assert all(layer.adapter_is_active == adapters for layer in layers)
    assert fused_counts(loaded)["projections"] == (4 if kind == "llama" else 0)  # q/k/v, gate/up: one product each
    with pytest.raises(RuntimeError, match="inference only"):
        x = torch.randn(3, layers[0].in_features, requires_grad=True)
        layers[0](x).sum().backward()
