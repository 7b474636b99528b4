import pytest
import torch

from dsparse import nm
from kernels import gather_kept, weight_grad_kept, weight_grad_kept_reference
from kernels.kept_grad import TILES, kept_grad_applies, tma_reads

SMALL = {"BLOCK_R": 32, "BLOCK_C": 64, "BLOCK_T": 16, "GROUP_R": 2}  # several tiles on test-sized shapes


def _operands(tokens, rows, cols, dtype, device, n=2, m=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(tokens, rows, generator=gen).to(dtype)
    x = torch.randn(tokens, cols, generator=gen).to(dtype)
    idx = nm.kept_positions(nm.nm_mask(torch.randn(rows, cols, generator=gen).abs(), n, m), n, m)
    return dy.to(device), x.to(device), idx.to(device)


def _close(got, want, tokens):
    """fp32: the same sums in another order; fp16/bf16: besides, one rounding of them (the interpreter
    truncates to bf16), so at most one unit of the dtype's spacing at each entry's magnitude."""
    if want.dtype == torch.float32:
        return torch.allclose(got, want, rtol=1e-5, atol=1e-5 * max(tokens, 1) ** 0.5)
    spacing = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(1.0)
    return ((got.float() - want.float()).abs() / spacing).max().item() <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, rows, cols", [(64, 128, 256), (70, 96, 136), (1, 16, 16)])
def test_weight_grad_kept_is_the_dense_gradient_at_the_kept_entries(tokens, rows, cols, dtype, device):
    dy, x, idx = _operands(tokens, rows, cols, dtype, device, seed=tokens)
    want = weight_grad_kept_reference(dy, x, idx, 2, 4)
    got = weight_grad_kept(dy, x, idx, 2, 4, config=SMALL)
    assert got.shape == (rows, cols // 2) and got.dtype == dtype
    assert _close(got, want, tokens)
    # the unfused way it replaces: the dense product's entries at the kept positions
    assert _close(got, gather_kept((dy.float().t() @ x.float()).to(dtype), idx, 2, 4), tokens)


@pytest.mark.parametrize("n, m", [(1, 4), (2, 8)])
def test_other_power_of_two_patterns(n, m, device):
    dy, x, idx = _operands(48, 64, 128, torch.float32, device, n, m)
    got = weight_grad_kept(dy, x, idx, n, m, config=SMALL)
    assert _close(got, weight_grad_kept_reference(dy, x, idx, n, m), 48)


def test_strided_operands_and_out(device):
    dy, x, idx = _operands(32, 64, 64, torch.float16, device)
    want = weight_grad_kept(dy, x, idx, 2, 4, config=SMALL)
    out = torch.full((32, 64), float("nan"), dtype=torch.float16, device=device).t()  # (64, 32), column-major
    got = weight_grad_kept(dy.t().contiguous().t(), x.t().contiguous().t(), idx, 2, 4, config=SMALL, out=out)
    assert got is out and torch.equal(out, want)


def test_every_shipped_tile_computes_the_same(device):
    """The tiles plans choose among (several programs on the GPU; one or two through the interpreter)."""
    dy, x, idx = _operands(128, 256, 256, torch.bfloat16, device)
    want = weight_grad_kept_reference(dy, x, idx, 2, 4)
    for config in TILES.values():
        assert kept_grad_applies(2, 4, config)
        assert _close(weight_grad_kept(dy, x, idx, 2, 4, config=config), want, 128), config


def test_a_tma_tile_reads_tensors_tma_cannot_take_with_pointer_loads(device):
    dy, x, idx = _operands(40, 64, 128, torch.bfloat16, device)
    wide = torch.zeros(40, 132, dtype=torch.bfloat16, device=device)
    wide[:, :128] = x
    ragged = wide[:, :128]  # rows 264 bytes apart: not 16-byte aligned
    tma = {**SMALL, "TMA": True}
    assert tma_reads(dy, x, True) and not tma_reads(dy, ragged, True)
    want = weight_grad_kept(dy, x, idx, 2, 4, config=SMALL)
    assert torch.equal(weight_grad_kept(dy, x, idx, 2, 4, config=tma), want)
    assert torch.equal(weight_grad_kept(dy, ragged, idx, 2, 4, config=tma), want)


def test_no_tokens_gives_zeros(device):
    dy, x, idx = _operands(0, 16, 32, torch.float16, device)
    assert torch.equal(weight_grad_kept(dy, x, idx, 2, 4, config=SMALL), torch.zeros(16, 16, dtype=torch.float16,
                                                                                      device=device))


def test_bad_inputs_are_refused():
    dy, x, idx = _operands(8, 16, 32, torch.float16, "cpu")
    with pytest.raises(ValueError, match="8 tokens .* but x has 4"):
        weight_grad_kept(dy, x[:4], idx, 2, 4)
    with pytest.raises(TypeError, match="x must be of dtype"):
        weight_grad_kept(dy, x.float(), idx, 2, 4)
    with pytest.raises(ValueError, match="3:6 .*powers of two.*gather_kept"):
        weight_grad_kept(dy, x[:, :30], torch.zeros(16, 15, dtype=torch.uint8), 3, 6)
    with pytest.raises(ValueError, match="idx must have shape"):
        weight_grad_kept(dy, x, idx[:, :8], 2, 4)
