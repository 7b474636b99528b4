"""OperandRefresh on a GPU: the replayed CUDA graph writes exactly what a fresh compression gives."""
import pytest
import torch

from dsparse import SparseLinear
from dsparse.nn.operand_refresh import OperandRefresh
from test_operand_refresh import step_values

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graph_replay_equals_fresh_operands_across_a_mask_change(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [SparseLinear(256, 128, backend="cusparselt", mask_change_freq=3, device="cuda").to(dtype),
              SparseLinear(128, 512, backend="cusparselt", mask_change_freq=3, device="cuda").to(dtype)]
    layers[0](torch.randn(64, 256, device="cuda", dtype=dtype))
    layers[1](torch.randn(64, 128, device="cuda", dtype=dtype))
    refresh = OperandRefresh(layers)
    for step in range(8):  # steps 2 and 5 re-choose W̃ᵀ's masks: eager, then a new graph
        step_values(layers, gen)
        refresh()
        for layer in layers:
            backend, ops = layer._cache[2], layer._cache[3]
            assert layer._cache[1] == layer._value_key()
            fresh = backend.prepare(layer.values.detach(), layer.idx, layer.keep_t, 2, 4)
            for got, want in ((ops.weight, fresh.weight), (ops.weight_t, fresh.weight_t)):
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), step
    assert refresh.replays == 3  # steps 1, 4 and 7 (0, 3 and 6 capture)
