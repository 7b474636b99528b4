import pytest
import torch

from dsparse import nm
from kernels import gather_kept, gather_kept_reference


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (3, 6)])
@pytest.mark.parametrize("shape", [(16, 16), (48, 80), (33, 136)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_kept_equals_torch(n, m, shape, dtype, device):
    rows, cols = shape
    cols = cols // m * m
    gen = torch.Generator().manual_seed(rows * cols + n)
    dense = torch.randn(rows, cols, generator=gen).to(dtype)
    idx = nm.kept_positions(nm.nm_mask(torch.randn(rows, cols, generator=gen).abs(), n, m), n, m)
    dense, idx = dense.to(device), idx.to(device)
    expected = nm.gather_kept(dense, idx, m)
    assert torch.equal(gather_kept_reference(dense, idx, n, m), expected)
    assert torch.equal(gather_kept(dense, idx, n, m, config={"BLOCK_R": 16, "BLOCK_G": 8}), expected)
    out = torch.full_like(expected.t(), float("nan")).t()  # strided output
    gather_kept(dense.t().contiguous().t(), idx, n, m, out=out)
    assert torch.equal(out, expected)


def test_gather_kept_copies_bits_exactly(device):
    """Signed zeros and NaN payloads come through unchanged (the pick is an integer sum of bits)."""
    bits = torch.tensor([[-0x8000, 0x7FC1, 0x3F80, -1, 0x0001, -0x8000, 0x7F80, 0x0000]], dtype=torch.int16)
    dense = bits.view(torch.bfloat16).to(device)
    idx = torch.tensor([[0, 1, 1, 2]], dtype=torch.uint8, device=device)
    picked = gather_kept(dense, idx, 2, 4).view(torch.int16).cpu()
    assert torch.equal(picked, bits[:, [0, 1, 5, 6]])


def test_gather_kept_rejects_bad_shapes():
    with pytest.raises(ValueError, match="groups of M = 4"):
        gather_kept(torch.randn(4, 6), torch.zeros(4, 3, dtype=torch.uint8), 2, 4)
    with pytest.raises(ValueError, match="idx must have shape"):
        gather_kept(torch.randn(4, 8), torch.zeros(4, 3, dtype=torch.uint8), 2, 4)
    with pytest.raises(TypeError, match="dense must be of dtype"):
        gather_kept(torch.zeros(4, 8, dtype=torch.int32), torch.zeros(4, 4, dtype=torch.uint8), 2, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_repeated_launches_go_straight_to_the_compiled_kernel_and_stay_exact():
    from kernels import gather as module

    module._KERNEL._compiled.clear()
    for rows, cols, offset in [(64, 128, 0), (64, 128, 0), (48, 128, 0), (64, 128, 1), (33, 40, 0), (64, 128, 0)]:
        dense = torch.randn(rows * cols + offset, device="cuda")[offset:].view(rows, cols)  # offset 1: misaligned
        idx = _positions(rows, cols)
        assert torch.equal(gather_kept(dense, idx, 2, 4), gather_kept_reference(dense, idx, 2, 4))
    # (64, 128) and (48, 128): sizes multiple of 16, aligned; (64, 128, 1): misaligned; (33, 40): other sizes
    assert len(module._KERNEL._compiled) == 3


def _positions(rows: int, cols: int) -> torch.Tensor:
    scores = torch.rand(rows, cols // 4, 4, device="cuda")
    return scores.topk(2, dim=-1).indices.sort(dim=-1).values.to(torch.uint8).reshape(rows, cols // 2)
