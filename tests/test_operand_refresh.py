"""OperandRefresh: after each optimizer step every layer's operands match its new values (CPU: eager)."""
import torch

from dsparse import SparseLinear
from dsparse.nn.operand_refresh import OperandRefresh


def step_values(layers, gen):
    """An optimizer step's worth of change: new values in place, the schedule advanced (``gen`` on the
    layers' device)."""
    with torch.no_grad():
        for layer in layers:
            values = layer.values
            values.add_(torch.randn(values.shape, generator=gen, dtype=values.dtype, device=values.device))
            layer.on_optimizer_step()


def test_operands_follow_the_values_without_a_forward_refresh():
    gen = torch.Generator().manual_seed(0)
    layers = [SparseLinear(32, 16, mask_change_freq=2), SparseLinear(16, 32, mask_change_freq=2)]
    x = torch.randn(8, 32, generator=gen)
    layers[0](x)  # operands built
    refresh = OperandRefresh(layers)
    for _ in range(3):  # the second step re-chooses W̃ᵀ's masks
        step_values(layers, gen)
        refresh()
        for layer in layers:
            assert layer._cache[1] == layer._value_key()  # current: the forward will not refresh
            backend, ops = layer._cache[2], layer._cache[3]
            fresh = backend.prepare(layer.values.detach(), layer.idx, layer.keep_t, 2, 4)
            y = torch.randn(8, layer.in_features, generator=gen)
            torch.testing.assert_close(backend.linear(ops, y, None), backend.linear(fresh, y, None), rtol=0, atol=0)
            dy = torch.randn(8, layer.out_features, generator=gen)
            torch.testing.assert_close(backend.grad_input(ops, dy), backend.grad_input(fresh, dy), rtol=0, atol=0)
    assert refresh.replays == 0  # no CUDA graph off the GPU


def test_layers_without_cached_operands_are_left_alone():
    layer = SparseLinear(32, 16, cache_operands=False)
    layer(torch.randn(4, 32))
    OperandRefresh([layer])()
    assert layer._cache is None
