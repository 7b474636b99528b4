import pytest
import torch

from dsparse import nm
from kernels import mvue_transpose, mvue_transpose_reference


@pytest.mark.parametrize("tokens, cols, padded", [(16, 32, 16), (18, 48, 32), (7, 20, 8), (33, 16, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mvue_transpose_equals_torch(tokens, cols, padded, dtype, device):
    gen = torch.Generator().manual_seed(tokens * cols)
    dy = torch.randn(tokens, cols, generator=gen).to(dtype)
    dy[0, :3] = 0.0  # zero pairs and pairs with one zero
    dy[1, :2] = 0.0
    rand = torch.rand(cols, padded // 2, generator=gen)
    dy, rand = dy.to(device), rand.to(device)
    want = mvue_transpose_reference(dy, rand, padded)
    padded_dy = torch.nn.functional.pad(dy, (0, 0, 0, padded - tokens))
    assert torch.equal(want, nm.mvue_pairs(padded_dy.t(), rand))
    got = mvue_transpose(dy, rand, padded, config={"BLOCK_C": 16, "BLOCK_P": 8})
    assert got.dtype == dtype and got.shape == (cols, padded)
    assert torch.equal(got, want)
    assert torch.equal(mvue_transpose(dy.t().contiguous().t(), rand, padded), want)  # strided input


def test_mvue_transpose_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be even and at least"):
        mvue_transpose(torch.randn(8, 4), torch.rand(4, 2), 6)
    with pytest.raises(ValueError, match="rand must have shape"):
        mvue_transpose(torch.randn(8, 4), torch.rand(4, 3), 8)
