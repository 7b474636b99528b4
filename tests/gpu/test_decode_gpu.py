"""GraphDecoder on CUDA: the captured step replays what the eager step computes, dense and exported sparse
(cuSPARSELt products and, where plans choose it, the few-token kernels; with and without folded adapters),
with HF's modules and fused ones (whose kernels the decoder runs on its few-row steps, captured)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsparse import fuse_model, sparse_modules, sparsify
from dsparse.decode import GraphDecoder
from dsparse.export import export_model, load_for_inference

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_plans")]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("sparse", [False, True, "adapters"])
def test_graph_replays_give_the_eager_steps_tokens(tmp_path, sparse, fused):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    model = model.to("cuda", torch.bfloat16).eval()
    if sparse:
        model = sparsify(model, {})
        if sparse == "adapters":  # folded into the operands: each step makes their wide inputs
            for _, layer in sparse_modules(model):
                layer.add_adapter(8, generator=torch.Generator().manual_seed(2))
                with torch.no_grad():
                    layer.adapter_b.normal_(0, 0.05)
        export_model(model, str(tmp_path), dtype=torch.bfloat16)
        model = load_for_inference(str(tmp_path), device="cuda", dtype=torch.bfloat16)
    if fused:
        fuse_model(model)
    prompt = torch.randint(0, 512, (8, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    eager = GraphDecoder(model, batch=8, max_len=64, graphs=False)(prompt, 16)
    captured = GraphDecoder(model, batch=8, max_len=64)
    assert captured.graphs
    assert torch.equal(captured(prompt, 16), eager)
    assert torch.equal(captured(prompt, 16), eager)  # replays after a reset
