"""dsparse.fuse_projections: q/k/v and gate/up as one product compute what the separate layers compute."""
import copy
from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kernels
from dsparse import SparseLinear, fuse_projections, fused_counts, sparse_modules, sparsify
from dsparse.nn.operand_refresh import OperandRefresh
from dsparse.nn.projections import ProjectionGroup, projection_groups


def _llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _pair(sparse: bool, **sparsity):
    model = _llama()
    if sparse:
        sparsify(model, {"mask_change_freq": 2, **sparsity})
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 4  # q/k/v and gate/up of 2 blocks
    return model, fused


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_grouped_projections_give_the_separate_layers_losses_and_gradients(sparse, grad_ckpt):
    model, fused = _pair(sparse)
    if sparse:  # active adapters add onto their layer's slice
        for m in (model, fused):
            for i, (_, layer) in enumerate(sparse_modules(m)):
                layer.add_adapter(4, generator=torch.Generator().manual_seed(i))
                torch.nn.init.normal_(layer.adapter_b, generator=torch.Generator().manual_seed(i))
    assert list(fused.state_dict()) == list(model.state_dict())
    assert fused_counts(fused)["projections"] == 4 and fused_counts(model)["projections"] == 0
    for m in (model, fused):
        if grad_ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        m(input_ids=_ids(0), labels=_ids(0)).loss.backward()
    want, got = _grads(model), _grads(fused)
    assert want.keys() == got.keys() and len(want) == len(list(model.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_group_runs_one_product_with_its_own_operands_only():
    _, fused = _pair(True)
    group = fused.model.layers[0].self_attn.q_proj.projection_group
    attn = fused.model.layers[0].self_attn
    assert isinstance(group, ProjectionGroup) and group.layers == [attn.q_proj, attn.k_proj, attn.v_proj]
    calls = []
    linear = type(group.layers[0]._resolve_backend()).linear

    def counted(self, ops, x2d, bias):
        calls.append(ops.weight.shape)
        return linear(self, ops, x2d, bias)

    type(group.layers[0]._resolve_backend()).linear = counted
    try:
        fused(input_ids=_ids(0))
    finally:
        type(group.layers[0]._resolve_backend()).linear = linear
    # per block: one q/k/v product (32+16+16 out), o_proj, one gate/up product (64+64 out), down_proj
    assert [shape[0] for shape in calls] == [64, 32, 128, 32] * 2
    layers = [layer for _, layer in sparse_modules(fused)]
    assert all(layer._cache is None for layer in layers if layer.projection_group is not None)
    assert all(g._cache is not None for g in projection_groups(fused))


def test_grouped_training_follows_the_mask_schedule_like_separate_layers():
    """AdamW steps with W̃ᵀ masks re-chosen every 2 steps and operands refreshed after each: same losses."""
    model, fused = _pair(True)
    losses = {}
    for name, m in (("separate", model), ("grouped", fused)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        refresh = OperandRefresh([layer for _, layer in sparse_modules(m)])
        losses[name] = []
        for step in range(5):
            loss = m(input_ids=_ids(step), labels=_ids(step)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            refresh()
            losses[name].append(loss.item())
        for group in projection_groups(m):  # refreshed: the next forward rebuilds nothing
            assert group._cache[0] == group._mask_key() and group._cache[1] == group._value_key()
    torch.testing.assert_close(losses["grouped"], losses["separate"], rtol=1e-5, atol=0)
    assert fused.model.layers[0].mlp.up_proj.step == model.model.layers[0].mlp.up_proj.step == 5
    assert all(torch.equal(a.keep_t, b.keep_t) for (_, a), (_, b) in zip(sparse_modules(model), sparse_modules(fused)))


def test_mvue_weight_gradients_of_a_group_repeat_exactly():
    runs = []
    for _ in range(2):
        _, fused = _pair(True, mvue_dw=True)
        fused(input_ids=_ids(0), labels=_ids(0)).loss.backward()
        runs.append(_grads(fused))
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
    assert all(torch.isfinite(g).all() for g in runs[0].values())


def test_layers_run_alone_in_a_dense_warm_up():
    model, fused = _pair(True, compress=False)
    for m in (model, fused):
        for _, layer in sparse_modules(m):
            layer.dense_mode = True
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=_ids(1)).logits, model(input_ids=_ids(1)).logits, rtol=0, atol=0)
    assert all(g._cache is None and not g.runs_fused for g in projection_groups(fused))


@pytest.mark.parametrize("adapters", [False, True])
def test_a_group_frozen_for_inference_runs_one_operand_and_frees_the_layers(adapters):
    model, fused = _pair(True)
    if adapters:
        for m in (model, fused):
            for i, (_, layer) in enumerate(sparse_modules(m)):
                layer.add_adapter(2, generator=torch.Generator().manual_seed(i))
                torch.nn.init.normal_(layer.adapter_b, generator=torch.Generator().manual_seed(i))
    for m, fold in ((model, False), (fused, True)):  # the separate layers add their adapters after the product
        for _, layer in sparse_modules(m):
            layer.prepare_inference(fold_adapters=fold)
    groups = projection_groups(fused)
    assert all(g.runs_fused and g._inference is not None for g in groups)
    for group in groups:  # one forward operand for the group, the layers' values and masks freed
        assert all(layer._inference is group._inference and layer.values.numel() == 0 and layer.idx.numel() == 0
                   for layer in group.layers)
        assert group.folds_adapters == adapters and group.adds_adapters == adapters
        # folded: the adapters' 2·(2+2(+2)) ranks padded to 2·8 more input columns
        extra = 16 if adapters else 0
        assert group._inference[1].weight.shape == (group.out_features, group.in_features + extra)
        assert all(layer.adapter_a.numel() == 0 for layer in group.layers if adapters)
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=_ids(1)).logits, model(input_ids=_ids(1)).logits, rtol=1e-5,
                                   atol=1e-6)
        # decoding with a KV cache: one product per group on each step's few rows
        tokens = [m.generate(_ids(1)[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0) for m in (model, fused)]
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("alphas", ["rank", "one"])
def test_a_group_adds_its_adapters_as_one_product_unless_one_is_inactive(monkeypatch, alphas):
    """Adapters of ranks 2, 4, 3: one scale (alpha = rank) or three (alpha = 1, folded into A)."""
    from dsparse.nn import projections

    ranks = (2, 4, 3)
    layers = [SparseLinear(32, out, bias=False) for out in (16, 8, 8)]
    for i, (layer, rank) in enumerate(zip(layers, ranks)):
        layer.add_adapter(rank, alpha=rank if alphas == "rank" else 1.0,
                          generator=torch.Generator().manual_seed(i), active=True)
        torch.nn.init.normal_(layer.adapter_b, generator=torch.Generator().manual_seed(i))
    alone = copy.deepcopy(layers)
    group = ProjectionGroup(layers)
    for layer in layers:
        layer.projection_group = group
    calls = []
    add = projections.lowrank_add
    monkeypatch.setattr(projections, "lowrank_add", lambda y, u, b, scale: calls.append(b.shape) or add(y, u, b, scale))
    x = torch.randn(2, 5, 32)
    for active in (True, False):  # all active: the group adds them; one inactive: each layer its own
        layers[2].set_adapter_active(active)
        alone[2].set_adapter_active(active)
        calls.clear()
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        outs = [[layer(xi) for layer in siblings] for xi, siblings in zip(xs, (layers, alone))]
        assert group.adds_adapters == active and calls == ([(32, 9)] if active else [])
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for xi, out in zip(xs, outs):
            sum((o * torch.arange(o.shape[-1])).sum() for o in out).backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
        for layer, ref in zip(layers, alone):  # each adapter gets its own gradient (zero off its block)
            for name in ("adapter_a", "adapter_b"):
                got, want = getattr(layer, name), getattr(ref, name)
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=name)
                got.grad = want.grad = None


def test_siblings_of_different_settings_stay_apart():
    model = _llama()
    sparsify(model, {"exclude": [r"k_proj"]})  # q/v sparse, k dense: not one kind
    layers = model.model.layers[0]
    layers.mlp.up_proj.mvue_dw = True  # block 0's gate/up differ in a setting
    assert fuse_projections(model) == 1  # block 1's gate/up only
    assert [name for name, layer in sparse_modules(model) if layer.projection_group is not None] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert "forward" not in vars(layers.self_attn.k_proj)


def test_a_single_sibling_call_still_gets_its_slice():
    layers = [SparseLinear(32, 16, bias=True), SparseLinear(32, 8, bias=True)]
    alone = copy.deepcopy(layers)
    group = ProjectionGroup(layers)
    for layer in layers:
        layer.projection_group = group
    x = torch.randn(4, 32)
    torch.testing.assert_close(layers[1](x), alone[1](x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layers[1](x), alone[1](x), rtol=1e-6, atol=1e-6)  # the same sibling twice: anew
    y = x.clone()
    torch.testing.assert_close(layers[0](y), alone[0](y), rtol=1e-6, atol=1e-6)
    input_grads = []
    for siblings in (layers, alone):  # biases (as Qwen2's q/k/v have) get their slices' gradients
        xg = x.clone().requires_grad_(True)
        sum(layer(xg).square().sum() for layer in siblings).backward()
        input_grads.append(xg.grad)
    torch.testing.assert_close(input_grads[0], input_grads[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(layers, alone):
        for name in ("values", "bias"):
            torch.testing.assert_close(getattr(a, name).grad, getattr(b, name).grad, rtol=1e-5, atol=1e-6)


def _graph_nodes(fn) -> set[str]:
    """The names of the autograd graph's nodes below ``fn``."""
    seen, names, stack = set(), set(), [fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            names.add(node.name())
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("sparse, adapters", [(True, None), (False, None), (True, "one scale"), (True, "two scales"),
                                              (True, "one inactive")])
def test_fused_swiglu_reads_a_grouped_gate_up_output_in_place(sparse, adapters):
    """Also with active adapters, of one scale or several, which the group's output includes; while
    one of gate/up's is inactive, the MLP calls gate/up as layers."""
    from dsparse import fuse_model

    model = _llama()
    fuse_model(model, min_rows=0)
    if sparse:
        sparsify(model, {})
    if adapters:
        for i, (name, layer) in enumerate(sparse_modules(model)):
            rank = 1 + i % 3 if adapters == "two scales" or not name.endswith(("gate_proj", "up_proj")) else 2
            layer.add_adapter(rank, generator=torch.Generator().manual_seed(i))
            torch.nn.init.normal_(layer.adapter_b, generator=torch.Generator().manual_seed(i))
            layer.set_adapter_active(not (adapters == "one inactive" and name.endswith("up_proj")))
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    losses = [m(input_ids=_ids(2), labels=_ids(2)).loss for m in (model, fused)]
    packed = adapters != "one inactive"
    assert any("PackedSiluMul" in name for name in _graph_nodes(losses[1].grad_fn)) == packed
    assert not any("PackedSiluMul" in name for name in _graph_nodes(losses[0].grad_fn))
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    tol = {"rtol": 1e-4, "atol": 1e-6} if adapters else {"rtol": 1e-5, "atol": 1e-7}  # scales folded into A
    for (name, a), (_, b) in zip(model.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tol, msg=name)
    # without autograd, grouped gate/up adapters add on inside the gate's pass (kernels.lowrank_silu_mul)
    with torch.no_grad(), mock.patch.object(kernels, "lowrank_silu_mul", wraps=kernels.lowrank_silu_mul) as spy:
        logits = [m(input_ids=_ids(2)).logits for m in (model, fused)]
    assert spy.call_count == (len(fused.model.layers) if sparse and packed and adapters else 0)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6)


def test_grouping_puts_sibling_weights_back_to_back_so_the_stack_is_a_view():
    from dsparse.nn.projections import stacked_rows

    for sparse in (True, False):
        _, fused = _pair(sparse)
        attn = fused.model.layers[0].self_attn
        weights = [layer.values if sparse else layer.weight for layer in (attn.q_proj, attn.k_proj, attn.v_proj)]
        stack = stacked_rows(weights)
        assert stack.data_ptr() == weights[0].data_ptr() and stack.shape[0] == sum(w.shape[0] for w in weights)
        torch.testing.assert_close(stack, torch.cat(weights), rtol=0, atol=0)
        if sparse:
            assert all(g.values_stacked_in_place for g in projection_groups(fused))
    apart = [torch.randn(4, 3), torch.randn(2, 3)]
    assert stacked_rows(apart).data_ptr() != apart[0].data_ptr()
    torch.testing.assert_close(stacked_rows(apart), torch.cat(apart), rtol=0, atol=0)
