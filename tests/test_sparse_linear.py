import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dsparse import SparseLinear, nm
from dsparse.backends import plans
from dsparse.backends.plans import Plan

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@st.composite
def layers(draw):
    n, m = draw(st.sampled_from([(2, 4), (1, 4), (2, 8)]))
    inp = m * draw(st.integers(1, 5))
    out = m * draw(st.integers(1, 5))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    bias = draw(st.booleans())
    compress = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    return n, m, inp, out, lead, dtype, bias, compress, seed


def _rel(a, b):
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-12)).item()


@settings(max_examples=50, deadline=None)
@given(layers())
def test_forward_input_grad_and_kept_weight_grad(case):
    n, m, inp, out, lead, dtype, bias, compress, seed = case
    torch.manual_seed(seed)
    layer = SparseLinear(inp, out, bias=bias, pattern=f"{n}:{m}", compress=compress).to(dtype)
    x = torch.randn(*lead, inp, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, out) and y.dtype == dtype
    w = layer.effective_weight().detach().requires_grad_()
    b = layer.bias.detach().requires_grad_() if bias else None
    xr = x.detach().requires_grad_()
    yr = F.linear(xr, w, b)
    assert _rel(y, yr) <= TOL[dtype]
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    assert _rel(x.grad, dy @ layer.effective_weight_t().detach().t()) <= TOL[dtype]
    kept_grad = nm.gather_kept(w.grad, layer.idx, m)
    got = layer.values.grad if compress else nm.gather_kept(layer.weight.grad, layer.idx, m)
    assert _rel(got, kept_grad) <= TOL[dtype]
    if not compress:  # pruned entries of the dense simulation weight get exactly zero gradient
        pruned = nm.scatter_kept(torch.ones_like(layer.keep_t, dtype=dtype), layer.idx, n, m) == 0
        assert (layer.weight.grad[pruned] == 0).all()
    if bias:
        assert _rel(layer.bias.grad, b.grad) <= TOL[dtype]


def test_values_grad_accumulates_over_micro_batches():
    torch.manual_seed(0)
    layer = SparseLinear(16, 8)
    xs = [torch.randn(5, 16) for _ in range(3)]
    for x in xs:
        layer(x).square().sum().backward()
    total = layer.values.grad.clone()
    layer.values.grad = None
    layer(torch.cat(xs)).square().sum().backward()
    torch.testing.assert_close(total, layer.values.grad)


class _MaskedDense(torch.autograd.Function):
    """What SLoPe computes, written densely: forward M⊙W, dX with W̃, dW masked."""

    @staticmethod
    def forward(ctx, x, w, mask, mask_t_fn):
        ctx.save_for_backward(x, w, mask)
        ctx.mask_t_fn = mask_t_fn
        return x @ (w * mask).t()

    @staticmethod
    def backward(ctx, dy):
        x, w, mask = ctx.saved_tensors
        w_tilde = ctx.mask_t_fn(w * mask)  # (out, in), double pruned
        return dy @ w_tilde, (dy.t() @ x) * mask, None, None


@pytest.mark.parametrize("freq", [0, 2, 3])
def test_adamw_on_sparse_layer_equals_adamw_on_masked_dense(freq):
    torch.manual_seed(0)
    layers = [SparseLinear(32, 16, bias=False, mask_change_freq=freq), SparseLinear(16, 32, bias=False,
                                                                                 mask_change_freq=freq)]
    model = torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1])
    dense_w = [layer.effective_weight().detach().clone().requires_grad_() for layer in layers]
    masks = [layer.effective_weight().detach() != 0 for layer in layers]
    dense_keep_t = [layer.effective_weight_t().detach().t() != 0 for layer in layers]

    def step_mask_t(i):
        return lambda w: w * dense_keep_t[i]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(dense_w, lr=1e-2, weight_decay=0.1)
    changes = 0
    for step in range(7):
        x = torch.randn(8, 32)
        target = torch.randn(8, 32)
        loss = F.mse_loss(model(x), target)
        h = F.gelu(_MaskedDense.apply(x, dense_w[0], masks[0], step_mask_t(0)))
        loss_ref = F.mse_loss(_MaskedDense.apply(h, dense_w[1], masks[1], step_mask_t(1)), target)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        opt_ref.zero_grad()
        loss.backward()
        loss_ref.backward()
        opt.step()
        opt_ref.step()
        # the reference re-chooses W̃ᵀ by magnitude when the schedule says so
        if freq and step % freq == freq - 1:
            changes += 1
            for i in range(2):
                scores = torch.where(masks[i], dense_w[i].detach().abs(), torch.full_like(dense_w[i], -1.0))
                dense_keep_t[i] = (nm.nm_mask(scores.t(), 2, 4) & (scores.t() >= 0)).t()
        for layer, w in zip(layers, dense_w):
            torch.testing.assert_close(layer.effective_weight().detach(), w.detach() * (w.detach() != 0), rtol=1e-5,
                                       atol=1e-6)
    for i, layer in enumerate(layers):
        assert layer.step == 7
        assert torch.equal(layer.effective_weight_t().detach().t() != 0, dense_keep_t[i] & masks[i])
        state = opt.state[layer.values]
        assert state["exp_avg"].shape == (layer.out_features, layer.in_features // 2)
    assert changes == (0 if freq == 0 else 7 // freq)


def test_optimizer_step_is_picked_up_without_extra_call():
    torch.manual_seed(0)
    layer = SparseLinear(16, 16, mask_change_freq=1)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    x = torch.randn(4, 16)
    before = layer(x).detach()
    layer(x).sum().backward()
    opt.step()
    after = layer(x).detach()
    torch.testing.assert_close(after, F.linear(x, layer.effective_weight(), layer.bias))
    assert not torch.allclose(before, after)
    assert layer.step == 1 and int(layer.mask_step) == 1


def test_a_copied_layer_follows_its_own_optimizer_steps():
    import copy

    layer = SparseLinear(16, 16, mask_change_freq=1)
    copied = copy.deepcopy(layer)
    opt = torch.optim.SGD(copied.parameters(), lr=1.0)
    copied(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert copied.step == 1 and layer.step == 0


def test_step_counts_stored_for_many_layers_at_once():
    """The engine's batched write of mask_step (store_steps) leaves each buffer at its layer's step."""
    from dsparse.nn.sparse_linear import store_steps

    layers = [SparseLinear(16, 16) for _ in range(3)]
    for layer, steps in zip(layers, (2, 2, 5)):
        for _ in range(steps):
            layer.on_optimizer_step(store_step=False)
    assert [int(layer.mask_step) for layer in layers] == [0, 0, 0]
    store_steps(layers)
    assert [int(layer.mask_step) for layer in layers] == [2, 2, 5]
    copies = [copy.deepcopy(layer) for layer in layers]
    for layer, restored in zip(layers, copies):
        restored._host_step = -1
        restored.load_state_dict(layer.state_dict())
        assert restored.step == layer.step


def test_operands_rebuilt_once_per_step_not_per_micro_batch():
    layer = SparseLinear(16, 16)
    calls = []
    original = layer._operands.__func__

    def counting(self):
        before = self._cache
        result = original(self)
        if self._cache is not before:
            calls.append(1)
        return result

    layer._operands = counting.__get__(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):
        for _ in range(3):  # micro-batches
            layer(torch.randn(4, 16)).sum().backward()
        opt.step()
    assert len(calls) == 2


def test_state_dict_roundtrip_keeps_masks_step_and_adapter():
    torch.manual_seed(0)
    layer = SparseLinear(16, 8, mask_change_freq=2)
    layer.add_adapter(2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    for _ in range(3):
        layer(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
    state = copy.deepcopy(layer.state_dict())
    assert set(state) == {"values", "bias", "idx", "keep_t", "mask_step", "adapter_a", "adapter_b", "adapter_active"}
    fresh = SparseLinear(16, 8, mask_change_freq=2)
    fresh.add_adapter(2, active=False)
    fresh.load_state_dict(state)
    assert fresh.step == 3 and fresh.adapter_is_active
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), layer(x))
    torch.testing.assert_close(fresh.effective_weight_t(), layer.effective_weight_t())


def test_adapter_starts_neutral_and_trains():
    torch.manual_seed(0)
    layer = SparseLinear(32, 16)
    x = torch.randn(5, 32)
    before = layer(x).detach()
    layer.add_adapter(4, alpha=2.0)
    torch.testing.assert_close(layer(x), before)
    layer(x).sum().backward()
    assert layer.adapter_b.grad.abs().sum() > 0
    expected = before + (x @ layer.adapter_a.t()) @ layer.adapter_b.t() * 0.5
    torch.testing.assert_close(layer(x), expected)
    layer.set_adapter_active(False)
    torch.testing.assert_close(layer(x), before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_features=10, out_features=8), "in_features = 10 is not divisible"),
    (dict(in_features=16, out_features=6), "out_features .* = 6 is not divisible"),
    (dict(in_features=16, out_features=8, pattern="5:4"), "0 < N < M"),
    (dict(in_features=16, out_features=8, backend="cutlass"), "unknown sparsity backend 'cutlass'"),
    (dict(in_features=16, out_features=8, mask_change_freq=-1), "mask_change_freq"),
])
def test_bad_construction_raises_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseLinear(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cusparselt_on_cpu_is_refused_with_reason():
    layer = SparseLinear(16, 16, backend="cusparselt").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="cuSPARSELt runs on CUDA GPUs only"):
        layer(torch.randn(2, 16, dtype=torch.bfloat16))


def test_input_width_mismatch():
    with pytest.raises(ValueError, match="expects 16"):
        SparseLinear(16, 8)(torch.randn(2, 12))


def test_without_double_pruning_input_grad_uses_the_forward_mask():
    torch.manual_seed(0)
    layer = SparseLinear(16, 8, double_prune=False, mask_change_freq=1)
    x = torch.randn(4, 16, requires_grad=True)
    dy = torch.randn(4, 8)
    layer(x).backward(dy)
    torch.testing.assert_close(layer.effective_weight_t(), layer.effective_weight().t())
    torch.testing.assert_close(x.grad, dy @ layer.effective_weight().detach())
    assert not layer.on_optimizer_step()  # no W̃ᵀ mask to re-choose


# ----------------------------------------------------------------- MVUE weight gradient
def test_mvue_pairs_keeps_one_per_pair_with_the_pair_mass():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(6, 32, generator=gen)
    t[0, :2] = 0.0  # an all-zero pair stays zero
    t[1, 2] = 0.0  # a pair with one zero keeps the other, exactly
    s = nm.mvue_pairs(t, torch.rand(6, 16, generator=gen))
    pairs, kept = t.view(6, 16, 2), s.view(6, 16, 2)
    assert ((kept != 0).sum(-1) <= 1).all()
    assert torch.allclose(kept.abs().sum(-1), pairs.abs().sum(-1))
    nonzero = kept != 0
    assert (torch.sign(kept[nonzero]) == torch.sign(pairs[nonzero])).all()
    assert (kept[0, 0] == 0).all() and kept[1, 1, 1] == pairs[1, 1, 1] and kept[1, 1, 0] == 0
    # 2:4 along the last dim: at most 2 nonzeros in each group of 4
    assert ((s.view(6, 8, 4) != 0).sum(-1) <= 2).all()


def test_mvue_pairs_is_unbiased():
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    draws = 4000
    mean = sum(nm.mvue_pairs(t, torch.rand(4, 32, generator=gen, dtype=torch.float64)) for _ in range(draws)) / draws
    pair_mass = t.abs().view(4, 32, 2).sum(-1, keepdim=True).expand(4, 32, 2).reshape(4, 64)
    std = (pair_mass * t.abs() - t**2).clamp_min(0).sqrt() / draws**0.5  # per-entry standard error
    assert ((mean - t).abs() <= 5 * std + 1e-12).all()


def test_mvue_weight_gradient_is_the_kept_part_of_the_sparsified_product():
    torch.manual_seed(0)
    layer = SparseLinear(32, 16, bias=False, backend="reference", mvue_dw=True, mvue_seed=3)
    x = torch.randn(2, 9, 32)  # 18 tokens: padded to 64 inside
    dy = torch.randn(2, 9, 16)
    layer(x).backward(dy)
    rand = nm.mvue_uniform(nm.mvue_key(3, 0, 0), 16, 32)  # (seed, optimizer step, micro-batch)
    dy_pad = torch.nn.functional.pad(dy.reshape(18, 16), (0, 0, 0, 46))
    x_pad = torch.nn.functional.pad(x.reshape(18, 32), (0, 0, 0, 46))
    want = nm.gather_kept(nm.mvue_pairs(dy_pad.t(), rand).mm(x_pad), layer.idx, 4)
    torch.testing.assert_close(layer.values.grad, want)
    exact = nm.gather_kept(dy.reshape(18, 16).t().mm(x.reshape(18, 32)), layer.idx, 4)
    assert not torch.allclose(layer.values.grad, exact)


def test_a_shape_whose_mvue_plan_says_dense_takes_the_exact_gradient_and_keeps_the_draws(fresh_plans):
    torch.manual_seed(0)
    layers = [SparseLinear(32, 16, bias=False, backend="reference", mvue_dw=mvue) for mvue in (True, True, False)]
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    x, dy = torch.randn(8, 32), torch.randn(8, 16)
    plans.set_plan("dw_mvue", 64, 16, 32, torch.float32, Plan(dense=True))  # 8 tokens run padded to 64
    assert not plans.mvue_pays(8, 16, 32, torch.float32) and plans.mvue_pays(8, 16, 32, torch.bfloat16)
    for layer in layers[1:]:
        layer(x).backward(dy)
    assert torch.equal(layers[1].values.grad, layers[2].values.grad)  # the exact gradient
    assert layers[1]._mvue_calls == 1  # its draw was made and left unused
    plans.set_plan("dw_mvue", 64, 16, 32, torch.float32, Plan())
    layers[0]._mvue_calls = 1
    layers[0](x).backward(dy)  # the same layer where MVUE runs: the second micro-batch's draw
    rand = nm.mvue_uniform(nm.mvue_key(0, 0, 1), 16, 32)
    dy_pad, x_pad = (torch.nn.functional.pad(t, (0, 0, 0, 56)) for t in (dy, x))
    torch.testing.assert_close(layers[0].values.grad, nm.gather_kept(nm.mvue_pairs(dy_pad.t(), rand).mm(x_pad),
                                                                      layers[0].idx, 4))


def test_mvue_draws_depend_on_step_and_micro_batch_only():
    def grads(layer, micro_batches):
        out = []
        for x, dy in micro_batches:
            layer.values.grad = None
            layer(x).backward(dy)
            out.append(layer.values.grad.clone())
        return out

    torch.manual_seed(0)
    a = SparseLinear(32, 16, backend="reference", mvue_dw=True)
    b = SparseLinear(32, 16, backend="reference", mvue_dw=True)
    b.load_state_dict(a.state_dict())
    batches = [(torch.randn(8, 32), torch.randn(8, 16)) for _ in range(2)]
    ga = grads(a, batches)
    assert not torch.equal(ga[0], grads(a, batches[:1])[0])  # the next micro-batch draws anew
    gb = grads(b, batches)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))  # same step and micro-batches: same draws
    a.on_optimizer_step()
    b.on_optimizer_step()
    assert torch.equal(grads(a, batches[:1])[0], grads(b, batches[:1])[0])
    assert not torch.equal(grads(a, batches[:1])[0], ga[0])  # another step draws anew


def test_mvue_uniform_draws_are_uniform_and_keyed():
    u = nm.mvue_uniform(nm.mvue_key(1, 2, 3), 64, 4096)
    assert u.dtype == torch.float32 and u.shape == (64, 4096) and 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (counts - 0.1).abs().max() < 0.005
    assert torch.equal(u, nm.mvue_uniform(nm.mvue_key(1, 2, 3), 64, 4096))
    assert (u != nm.mvue_uniform(nm.mvue_key(1, 2, 4), 64, 4096)).float().mean() > 0.99
    assert (u[:, 1:] - u[:, :-1]).abs().mean().sub(1 / 3).abs() < 0.01  # neighbours independent
