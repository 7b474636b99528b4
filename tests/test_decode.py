"""dsparse.decode.GraphDecoder: greedy decoding on a static KV cache gives generate's tokens (eager on the CPU;
the CUDA-graph replay is checked against this eager path in tests/gpu/test_decode_gpu.py)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsparse import fuse_model, sparse_modules, sparsify
from dsparse.decode import GraphDecoder
from dsparse.nn.fused import _min_rows
from dsparse.export import export_model, load_for_inference


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def _generate(model, prompt, new_tokens):
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:]


@pytest.mark.parametrize("sparse", [False, True])
def test_static_cache_decoding_gives_generates_tokens(tmp_path, sparse):
    model = _llama()
    if sparse:  # an exported model: frozen products on the compressed forward operand
        export_model(sparsify(model, {}), str(tmp_path), dtype=torch.float32)
        model = load_for_inference(str(tmp_path), device="cpu")
    prompt = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    decoder = GraphDecoder(model, batch=3, max_len=20)
    assert not decoder.graphs  # CPU: eager steps
    want = _generate(model, prompt, 9)
    assert torch.equal(decoder(prompt, 9), want)
    assert torch.equal(decoder(prompt, 9), want)  # the cache is reset between calls
    other = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(2))
    assert torch.equal(decoder(other, 9), _generate(model, other, 9))
    # step by step (as bench.infer times a step): the same tokens
    steps = [decoder.start(prompt).clone()] + [decoder.step().clone() for _ in range(8)]
    assert torch.equal(torch.cat(steps, dim=1), want)


@pytest.mark.parametrize("fused_rows", [1, None])
@pytest.mark.parametrize("sparse", [False, True])
def test_a_fused_models_decoding_steps_run_the_kernels_from_fused_rows(tmp_path, sparse, fused_rows):
    """The decoder runs a fused model's kernels on its few-row steps (fused_rows=1; the Triton interpreter
    here) or leaves each module's threshold (None), and gives generate's tokens (HF's code per step) either way;
    also exported with adapters folded into the sparse operands, where the fused norm and gate write the wide
    inputs of the products reading them."""
    model = _llama()
    if sparse:
        sparsify(model, {})
        gen = torch.Generator().manual_seed(0)
        for _, layer in sparse_modules(model):
            layer.add_adapter(4, generator=gen)
            with torch.no_grad():
                layer.adapter_b.normal_(0, 0.05)
        export_model(model, str(tmp_path), dtype=torch.float32)
        model = load_for_inference(str(tmp_path), device="cpu")
        assert all(layer.operand_owner()._fold is not None for _, layer in sparse_modules(model))  # folded
    fuse_model(model)  # the default threshold (256 rows) sends generate's decoding steps to HF's code
    seen = []
    model.model.norm.register_forward_pre_hook(lambda module, args: seen.append(_min_rows(module.min_rows)))
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    want = _generate(model, prompt, 4)
    seen.clear()
    assert torch.equal(GraphDecoder(model, batch=2, max_len=12, fused_rows=fused_rows)(prompt, 4), want)
    assert set(seen) == {1 if fused_rows else 256}


def test_sizes_the_decoder_was_not_built_for_are_refused_with_the_fix():
    model = _llama()
    decoder = GraphDecoder(model, batch=2, max_len=16)
    with pytest.raises(ValueError, match="build another decoder"):
        decoder(torch.zeros(3, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="up to 16 tokens"):
        decoder(torch.zeros(2, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="at least one new token must fit"):
        decoder.start(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="pass graphs=False"):
        GraphDecoder(model, batch=2, max_len=16, graphs=True)
