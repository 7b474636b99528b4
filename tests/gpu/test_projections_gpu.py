"""Projection groups on cuSPARSELt: one stacked product per group, refreshed by the captured CUDA graph."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsparse import SparseLinear, fuse_projections, sparse_modules, sparsify
from dsparse.nn.operand_refresh import OperandRefresh
from test_operand_refresh import step_values
from dsparse.nn.projections import ProjectionGroup

pytestmark = pytest.mark.gpu


def test_grouped_llama_trains_like_separate_layers_on_cusparselt():
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    sparsify(model, {"backend": "cusparselt"})
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 4
    ids = torch.randint(0, 256, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = []
    for m in (model, fused):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.float())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=0)
    for (name, a), (_, b) in zip(model.named_parameters(), fused.named_parameters()):
        scale = a.grad.float().abs().max()
        assert (a.grad.float() - b.grad.float()).abs().max() <= 3e-2 * scale, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_graph_replay_equals_fresh_operands_across_a_mask_change(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [SparseLinear(256, 128, backend="cusparselt", mask_change_freq=3, device="cuda").to(dtype),
              SparseLinear(256, 64, backend="cusparselt", mask_change_freq=3, device="cuda").to(dtype)]
    group = ProjectionGroup(layers)
    for layer in layers:
        layer.projection_group = group
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    layers[0](x), layers[1](x)
    refresh = OperandRefresh(layers)
    for step in range(8):  # steps 2 and 5 re-choose W̃ᵀ's masks: eager, then a new graph
        step_values(layers, gen)
        refresh()
        assert group._cache[1] == group._value_key() and all(layer._cache is None for layer in layers)
        backend, ops = group._cache[2], group._cache[3]
        fresh = backend.prepare(*group._sources(), 2, 4)
        for got, want in ((ops.weight, fresh.weight), (ops.weight_t, fresh.weight_t)):
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), step
        y = torch.cat([layer(x) for layer in layers], dim=-1)  # a new input: the group's product anew
        want = x @ torch.cat([layer.effective_weight() for layer in layers]).t() + torch.cat(
            [layer.bias for layer in layers])
        torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert refresh.replays == 3  # steps 1, 4 and 7 (0, 3 and 6 capture)


def _export_with_adapters(path) -> str:
    """A 2-layer LLaMA, sparse, rank-4 adapters with nonzero B, exported in bf16 to ``path``."""
    from dsparse.export import export_model

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = sparsify(LlamaForCausalLM(cfg), {})
    for _, layer in sparse_modules(model):
        layer.add_adapter(4)
        torch.nn.init.normal_(layer.adapter_b, std=0.01)
    export_model(model, str(path), dtype=torch.bfloat16)
    return str(path)


def test_loaded_export_with_groups_computes_what_separate_layers_do(tmp_path):
    from dsparse.export import load_for_inference

    export = _export_with_adapters(tmp_path)
    grouped, apart = (load_for_inference(export, device="cuda", projections=p) for p in (True, False))
    ids = torch.randint(0, 256, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grouped(input_ids=ids).logits.float(), apart(input_ids=ids).logits.float(),
                                   rtol=2e-2, atol=2e-2)


def test_folded_adapters_on_cusparselt_match_adapters_added_after_the_product(tmp_path, monkeypatch):
    """The exported model with fused blocks: folded adapters (the norms and the gate writing the wide inputs) give
    the logits and greedy tokens of the lowrank_addmm path."""
    from dsparse import fuse_model
    from dsparse.export import load_for_inference
    from dsparse.nn import adapter_fold

    export = _export_with_adapters(tmp_path)
    folded, added = (load_for_inference(export, device="cuda", fold_adapters=f) for f in (True, False))
    for m in (folded, added):
        fuse_model(m, min_rows=0)
    wide_input = adapter_fold.AdapterFold.wide_input
    in_place = []
    monkeypatch.setattr(adapter_fold.AdapterFold, "wide_input",
                        lambda self, x2d: in_place.append(self.holds(x2d)) or wide_input(self, x2d))
    ids = torch.randint(0, 256, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits.float(), added(input_ids=ids).logits.float(),
                                   rtol=2e-2, atol=2e-2)
        assert in_place == [True, False, True, True] * 2  # q/k/v, o (copied in), gate/up, down
        tokens = [m.generate(ids[:, :16], max_new_tokens=8, do_sample=False, pad_token_id=0) for m in (folded, added)]
    assert (tokens[0] == tokens[1]).float().mean() > 0.9  # bf16 roundings differ: near-ties may flip


def test_swiglu_backward_hands_the_gate_up_group_its_mvue_operand(monkeypatch):
    """MVUE weight gradients on cuSPARSELt: SwiGLU's backward writes the gate/up group's compressed S(dYᵀ)
    (kernels.mvue_compress_swiglu); the gradients are bit for bit those of the group compressing it itself."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from dsparse import fuse_model
    from dsparse.nn.sparse_product import SparseProduct

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512)
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(384, 256, device="cuda", generator=gen).to(torch.bfloat16)
    dout = torch.randn(384, 256, device="cuda", generator=gen).to(torch.bfloat16)
    grads, handed = [], []
    hold = SparseProduct.hold_dw_operand
    monkeypatch.setattr(SparseProduct, "hold_dw_operand", lambda self, *a: handed.append(a[0].shape) or hold(self, *a))
    for fused_operand in (True, False):  # fusion.swiglu_mvue on, then off
        torch.manual_seed(0)
        block = torch.nn.Sequential(LlamaMLP(cfg)).to("cuda", torch.bfloat16)
        sparsify(block, {"backend": "cusparselt", "mvue_dw": True})
        fuse_model(block, min_rows=0, swiglu_mvue=fused_operand)
        assert fuse_projections(block) == 1
        xi = x.clone().requires_grad_(True)
        block(xi).backward(dout)
        grads.append([xi.grad, *(p.grad for p in block.parameters())])
    assert handed == [(384, 1024)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
