"""transpose_values (W̃ᵀ's compressed values) against the torch references, bit for bit."""
import pytest
import torch

from dsparse import nm
from dsparse.backends.cusparselt import _transpose_values, transpose_slots
from kernels import transpose_values, transpose_values_reference
from kernels._testing import bits, random_keep_t, random_kept

SHAPES = [(16, 16), (48, 80), (80, 48), (132, 260)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _double_pruned(out_features, in_features, dtype, device, mode="randn", seed=0):
    values, idx = random_kept(out_features, in_features, dtype, device, mode, seed)
    keep_t = nm.transpose_keep(values, idx, 2, 4)
    slots_t = transpose_slots(idx, keep_t)
    return values, idx, keep_t, slots_t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(device, shape, dtype):
    values, idx, keep_t, slots_t = _double_pruned(*shape, dtype, device, seed=shape[0])
    got = transpose_values(values, idx, keep_t)
    want = _transpose_values(values, idx, keep_t, slots_t)
    assert got.shape == (shape[1], shape[0] // 2) and got.dtype == dtype
    assert torch.equal(bits(got), bits(want))
    assert torch.equal(bits(transpose_values_reference(values, idx, keep_t)), bits(want))


@pytest.mark.parametrize("mode", ["ties", "zeros", "random_mask"])
def test_ties_and_zeros(device, mode):
    values, idx, keep_t, slots_t = _double_pruned(48, 80, torch.bfloat16, device, mode)
    got = transpose_values(values, idx, keep_t)
    assert torch.equal(bits(got), bits(_transpose_values(values, idx, keep_t, slots_t)))


def test_arbitrary_keep_t(device):
    """Any keep_t (not derived from the values, up to 4 kept per column of a block): the slots are
    still chosen as transpose_slots chooses them, and the values gathered there."""
    values, idx = random_kept(64, 96, torch.float32, device, "random_mask", seed=3)
    keep_t = random_keep_t(64, 96, device, seed=4)
    slots_t = transpose_slots(idx, keep_t)
    got = transpose_values(values, idx, keep_t)
    assert torch.equal(bits(got), bits(_transpose_values(values, idx, keep_t, slots_t)))
    assert torch.equal(bits(got), bits(transpose_values_reference(values, idx, keep_t)))


def test_float64_and_small_tiles(device):
    """Many programs with partial tiles on both axes (a small config), and fp64 values."""
    values, idx, keep_t, slots_t = _double_pruned(48, 80, torch.float64, device, seed=5)
    got = transpose_values(values, idx, keep_t, config={"BLOCK_H": 4, "BLOCK_G": 8, "num_warps": 1})
    assert torch.equal(bits(got), bits(_transpose_values(values, idx, keep_t, slots_t)))


def test_special_values_bit_exact(device):
    values, idx, keep_t, slots_t = _double_pruned(16, 32, torch.float32, device, seed=6)
    flat = values.view(-1)
    flat[0::7] = -0.0
    flat[1::11] = float("inf")
    flat[2::13] = float("-inf")
    flat[3::17] = float("nan")
    flat[4::19] = 1e-40  # subnormal
    got = transpose_values(values, idx, keep_t)
    assert torch.equal(bits(got), bits(_transpose_values(values, idx, keep_t, slots_t)))


def test_out_into_compressed_values_region(device):
    """``out=``: the values region at the front of a larger (compressed-operand-like) buffer."""
    rows, cols = 48, 80
    values, idx, keep_t, slots_t = _double_pruned(rows, cols, torch.float16, device, seed=7)
    packed = torch.full((cols * rows // 2 + 100,), 7.0, dtype=torch.float16, device=device)
    region = packed.view(-1)[: cols * rows // 2].view(cols, rows // 2)
    ret = transpose_values(values, idx, keep_t, out=region)
    assert ret.data_ptr() == region.data_ptr()
    assert torch.equal(bits(region), bits(_transpose_values(values, idx, keep_t, slots_t)))
    assert bool((packed[cols * rows // 2:] == 7.0).all()), "wrote past the values region"


def test_values_out_copies_w_values(device):
    """``values_out``: W's values region filled in the same pass (the whole refresh in one kernel)."""
    rows, cols = 48, 80
    values, idx, keep_t, slots_t = _double_pruned(rows, cols, torch.bfloat16, device, seed=9)
    w_packed = torch.zeros(rows * cols // 2 + 64, dtype=values.dtype, device=device)
    wt_packed = torch.zeros(rows * cols // 2 + 64, dtype=values.dtype, device=device)
    w_region = w_packed[: rows * cols // 2].view(rows, cols // 2)
    wt_region = wt_packed[: rows * cols // 2].view(cols, rows // 2)
    transpose_values(values, idx, keep_t, out=wt_region, values_out=w_region,
                     config={"BLOCK_H": 4, "BLOCK_G": 4, "num_warps": 1})
    assert torch.equal(bits(w_region), bits(values))
    assert torch.equal(bits(wt_region), bits(_transpose_values(values, idx, keep_t, slots_t)))
    assert bool((w_packed[rows * cols // 2:] == 0).all()) and bool((wt_packed[rows * cols // 2:] == 0).all())


def test_strided_operands(device):
    """Non-contiguous inputs and a transposed ``out`` view."""
    values, idx, keep_t, slots_t = _double_pruned(32, 48, torch.bfloat16, device, seed=8)
    wide = torch.zeros(32, 40, dtype=values.dtype, device=device)
    wide[:, 8:32] = values
    v_view = wide[:, 8:32]
    out_t = torch.empty(16, 48, dtype=values.dtype, device=device)  # (out/2, in), written through .t()
    got = transpose_values(v_view, idx, keep_t, out=out_t.t())
    assert torch.equal(bits(got), bits(_transpose_values(values, idx, keep_t, slots_t)))


def test_validation():
    values, idx, keep_t, _ = _double_pruned(16, 32, torch.float32, "cpu")
    with pytest.raises(TypeError, match="idx must be of dtype uint8"):
        transpose_values(values, idx.long(), keep_t)
    with pytest.raises(TypeError, match="keep_t must be of dtype bool"):
        transpose_values(values, idx, keep_t.to(torch.uint8))
    with pytest.raises(ValueError, match=r"keep_t must have shape \(16, 16\)"):
        transpose_values(values, idx, keep_t[:, :4])
    with pytest.raises(ValueError, match="multiple of 4"):
        transpose_values(values[:14], idx[:14], keep_t[:14])
    with pytest.raises(TypeError, match="out must be of dtype float32"):
        transpose_values(values, idx, keep_t, out=torch.empty(32, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="values must be of dtype"):
        transpose_values(values.to(torch.int32), idx, keep_t)
    with pytest.raises(ValueError, match="2-D"):
        transpose_values(values[None], idx, keep_t)
    with pytest.raises(ValueError, match=r"values_out must have shape \(16, 16\)"):
        transpose_values(values, idx, keep_t, values_out=torch.empty(16, 8))
