import pytest
import torch

from dsparse import nm
from kernels.cslt_meta import compress_reference, decompress_reference, metadata_nibbles


def _random_24(rows, cols, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=gen).to(dtype)
    idx = nm.kept_positions(nm.nm_mask(dense.abs().float(), 2, 4), 2, 4)
    return dense, nm.gather_kept(dense, idx, 4), idx


@pytest.mark.parametrize("rows, cols", [(64, 64), (128, 320), (192, 128)])
def test_every_group_has_its_own_nibble_and_each_byte_holds_rows_r_and_r_plus_8(rows, cols):
    nib = metadata_nibbles(rows, cols)
    assert torch.equal(nib.reshape(-1).sort().values, torch.arange(rows * cols // 4))
    assert torch.equal(nib[8:16] // 2, nib[0:8] // 2) and torch.equal(nib[8:16] % 2, torch.ones_like(nib[8:16]))


@pytest.mark.parametrize("rows, cols", [(64, 64), (128, 320)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compress_reference_stores_values_row_major_and_decodes_back(rows, cols, dtype, device):
    dense, values, idx = _random_24(rows, cols, dtype, rows + cols)
    dense, values, idx = dense.to(device), values.to(device), idx.to(device)
    packed = compress_reference(values, idx)
    assert packed.shape == (rows, cols // 2 + cols // 16) and packed.dtype == dtype
    flat = packed.reshape(-1)
    assert torch.equal(flat[: rows * cols // 2].view(rows, cols // 2), values)
    assert torch.equal(decompress_reference(packed, cols), nm.scatter_kept(values, idx, 2, 4))
    if device == "cuda":  # what cuSPARSELt itself writes
        want = torch._cslt_compress(nm.scatter_kept(values, idx, 2, 4))
        assert torch.equal(packed.view(torch.uint8), want.view(torch.uint8))


def test_shapes_cusparselt_pads_are_refused():
    with pytest.raises(ValueError, match="multiples of 64"):
        compress_reference(torch.zeros(96, 32, dtype=torch.float16), torch.zeros(96, 32, dtype=torch.uint8))
