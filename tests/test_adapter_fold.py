"""Adapters folded into a frozen sparse product's forward operand compute what adding them after it computes."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsparse import SparseLinear, fuse_model, fuse_projections, sparse_modules, sparsify
from dsparse import nm
from dsparse.nn import adapter_fold
from dsparse.nn.projections import ProjectionGroup, projection_groups


def _with_adapter(layer: SparseLinear, rank: int, alpha: float, seed: int) -> SparseLinear:
    layer.add_adapter(rank, alpha=alpha, generator=torch.Generator().manual_seed(seed))
    torch.nn.init.normal_(layer.adapter_b, std=0.5, generator=torch.Generator().manual_seed(seed + 100))
    return layer


@pytest.mark.parametrize("pattern, ranks, extra", [
    ("2:4", (6,), 16),  # 3 slots of 2 values: 3 groups of 4 columns, lane 1 unused; padded to 16 columns
    ("1:4", (6,), 32),  # 6 slots of 1: 6 groups, padded to 8
    ("2:8", (3,), 16),  # 2 slots: 2 groups of 8
    ("2:4", (16,), 32),  # 8 slots: 8 groups
    ("2:4", (16, 16), 32),  # gate/up-like: the two share 8 groups, one lane each
    ("2:4", (16, 4, 4), 32),  # q/k/v-like: q's 8 slots in lane 0, k's and v's 2 each in lane 1
    ("2:4", (6, None, 10), 32),  # rows without an adapter between two with
])
def test_the_wide_operand_times_the_wide_input_is_the_product_plus_the_adapters(pattern, ranks, extra):
    n, m = nm.parse_pattern(pattern)
    torch.manual_seed(0)
    sizes = [24, 8, 16][:len(ranks)]
    layers = [SparseLinear(32, size, bias=False, pattern=pattern, dtype=torch.float64) for size in sizes]
    for i, (layer, rank) in enumerate(zip(layers, ranks)):
        if rank is not None:
            _with_adapter(layer, rank, 3.0 + i, i)
    values, idx, keep_t = (torch.cat(parts) for parts in zip(*(layer._sources() for layer in layers)))
    adapters = [layer if rank is not None else None for layer, rank in zip(layers, ranks)]
    wide_values, wide_idx, wide_keep_t, fold = adapter_fold.fold(values, idx, keep_t, adapters, sizes, n, m)
    assert fold.width == 32 + extra and fold.a_wide.shape == (extra, 32)
    assert wide_idx.shape == wide_values.shape == wide_keep_t.shape == (sum(sizes), fold.width * n // m)
    assert not wide_keep_t[:, values.shape[1]:].any()
    x = torch.randn(5, 32, dtype=torch.float64)
    got = fold.wide_input(x) @ nm.dense_from_kept(wide_values, wide_idx, n, m).t()
    want = torch.cat([x @ layer.effective_weight().t() + (0 if rank is None else layer.adapter_scale * (
        x @ layer.adapter_a.t()) @ layer.adapter_b.t()) for layer, rank in zip(layers, ranks)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_folded_layer_matches_its_adapter_added_after_the_product(dtype):
    torch.manual_seed(1)
    layer = _with_adapter(SparseLinear(64, 32, bias=True, backend="reference", dtype=dtype), 6, 2.0, 1)
    unfolded = copy.deepcopy(layer)
    layer.prepare_inference()
    unfolded.prepare_inference(fold_adapters=False)
    assert layer._fold is not None and unfolded._fold is None
    assert layer.adapter_a.numel() == layer.adapter_b.numel() == 0  # inside the operand now
    assert layer.adapter_rank == 6 and "adapter_rank=6" in repr(layer)
    assert unfolded.adapter_a.numel() > 0
    x = torch.randn(3, 7, 64, dtype=dtype)
    with torch.no_grad():
        got, want = layer(x), unfolded(x)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
    with torch.no_grad():  # a deep copy computes the same
        assert torch.equal(copy.deepcopy(layer)(x), got)
    # inference only: no gradients through it, and the adapter can no longer be switched
    out = layer(x.requires_grad_(True))
    with pytest.raises(RuntimeError, match="inference only"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="fold_adapters=False"):
        layer.set_adapter_active(False)


def test_a_group_folds_each_active_adapter_onto_its_own_rows():
    """q/k/v-like siblings: adapters of ranks 2 and 4 with their own scales, the third layer's inactive."""
    torch.manual_seed(2)
    layers = [SparseLinear(32, out, bias=True, backend="reference") for out in (16, 8, 8)]
    for i, (rank, alpha) in enumerate(((2, 1.0), (4, 8.0), (3, 1.0))):
        _with_adapter(layers[i], rank, alpha, i)
    layers[2].set_adapter_active(False)
    alone = copy.deepcopy(layers)
    group = ProjectionGroup(layers)
    for layer in layers:
        layer.projection_group = group
    for layer in layers + alone:
        layer.prepare_inference()
    assert group.folds_adapters and group.adds_adapters and all(a._fold is not None for a in alone[:2])
    assert alone[2]._fold is None  # its adapter is off: nothing to fold
    assert group._fold.width == 32 + 2 * 8  # ranks 2 + 4, padded to 8, two copies
    x = torch.randn(6, 32)
    with torch.no_grad():
        got = torch.cat([layer(x) for layer in layers], dim=-1)
        want = torch.cat([layer(x) for layer in alone], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patterns_without_whole_copies_add_adapters_after_the_product():
    layer = _with_adapter(SparseLinear(48, 16, bias=False, pattern="3:8", backend="reference"), 2, 1.0, 0)
    want_layer = copy.deepcopy(layer)
    layer.prepare_inference()
    assert layer._fold is None and layer.adapter_a.numel() > 0
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want_layer(x))


def _llama_with_adapters(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    sparsify(model, {"backend": "reference"})
    for i, (_, layer) in enumerate(sparse_modules(model)):
        _with_adapter(layer, 2, 2.0, i)
    return model


def test_the_norm_and_the_gate_write_straight_into_the_folded_products_inputs(monkeypatch):
    """In a fused LLaMA frozen with folded adapters the RMSNorms write q/k/v's and gate/up's wide inputs and the
    SwiGLU gate down's; o_proj's input (attention's output) is copied in. Logits and greedy tokens match
    adapters added after the product."""
    folded, unfolded = _llama_with_adapters(), _llama_with_adapters()
    for model, fold in ((folded, True), (unfolded, False)):
        fuse_model(model, min_rows=0)
        fuse_projections(model)
        for _, layer in sparse_modules(model):
            layer.prepare_inference(fold_adapters=fold)
    wide_input = adapter_fold.AdapterFold.wide_input
    in_place = []
    monkeypatch.setattr(adapter_fold.AdapterFold, "wide_input",
                        lambda self, x2d: in_place.append((self.width, self.holds(x2d))) or wide_input(self, x2d))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = folded(input_ids=ids).logits, unfolded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    qkv, o, gate_up, down = (64 + 16, 64 + 16, 64 + 16, 128 + 16)  # ranks 2·3 / 2 / 2·2 / 2, padded to 8, twice
    assert in_place == [(qkv, True), (o, False), (gate_up, True), (down, True)] * 2  # q/k/v: one product
    assert len(projection_groups(folded)) == 4 and all(g.folds_adapters for g in projection_groups(folded))
    with torch.no_grad():
        tokens = [m.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0) for m in (folded, unfolded)]
    assert torch.equal(tokens[0], tokens[1])
