"""transpose_keep_and_slots against dsparse's nm.transpose_keep + cusparselt.transpose_slots, ties included."""
import pytest
import torch

from dsparse import nm
from dsparse.backends.cusparselt import _transpose_values, transpose_slots
from kernels import transpose_keep_and_slots, transpose_keep_and_slots_reference, transpose_values
from kernels._testing import random_kept

SHAPES = [(16, 16), (48, 80), (80, 48)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _reference(values, idx):
    keep_t = nm.transpose_keep(values, idx, 2, 4)
    return keep_t, transpose_slots(idx, keep_t)


def _check(values, idx, **kwargs):
    keep_t, slots_t = transpose_keep_and_slots(values, idx, **kwargs)
    want_keep, want_slots = _reference(values, idx)
    assert keep_t.dtype == torch.bool and keep_t.shape == idx.shape
    assert slots_t.dtype == torch.uint8 and slots_t.shape == (idx.shape[1] * 2, idx.shape[0] // 2)
    assert torch.equal(keep_t, want_keep)
    assert torch.equal(slots_t, want_slots)
    ref_keep, ref_slots = transpose_keep_and_slots_reference(values, idx)
    assert torch.equal(ref_keep, want_keep) and torch.equal(ref_slots, want_slots)
    return keep_t, slots_t


@pytest.mark.parametrize("mode", ["randn", "ties", "random_mask"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(device, shape, dtype, mode):
    values, idx = random_kept(*shape, dtype, device, mode, seed=shape[1])
    _check(values, idx)


def test_several_programs(device):
    """A shape spanning several programs along both axes with partial tiles (default config)."""
    values, idx = random_kept(132, 260, torch.bfloat16, device, "ties", seed=4)
    _check(values, idx)


def test_all_zero(device):
    values, idx = random_kept(48, 80, torch.bfloat16, device, "zeros")
    _check(values, idx)


def test_special_values(device):
    """-0.0, ±inf, NaN (the largest magnitude for the reference's sort), subnormals, heavy ties."""
    values, idx = random_kept(48, 80, torch.float32, device, "ties", seed=1)
    flat = values.view(-1)
    flat[0::7] = -0.0
    flat[1::11] = float("inf")
    flat[2::13] = float("-inf")
    flat[3::17] = float("nan")
    flat[4::19] = 1e-40
    flat[5::23] = -1e-40
    _check(values, idx)


def test_small_tiles(device):
    """Many programs with partial tiles on both axes."""
    values, idx = random_kept(48, 80, torch.float16, device, "ties", seed=2)
    _check(values, idx, config={"BLOCK_H": 2, "BLOCK_G": 8, "num_warps": 1})


def test_feeds_transpose_values(device):
    """The mask-change pipeline on kernels alone equals the torch pipeline."""
    values, idx = random_kept(80, 48, torch.bfloat16, device, "ties", seed=3)
    keep_t, _ = transpose_keep_and_slots(values, idx)
    got = transpose_values(values, idx, keep_t)
    want_keep, want_slots = _reference(values, idx)
    assert torch.equal(got, _transpose_values(values, idx, want_keep, want_slots))


def test_validation():
    values, idx = random_kept(16, 32, torch.float32, "cpu")
    with pytest.raises(TypeError, match="idx must be of dtype uint8"):
        transpose_keep_and_slots(values, idx.to(torch.int64))
    with pytest.raises(ValueError, match="multiple of 4"):
        transpose_keep_and_slots(values[:6], idx[:6])
    with pytest.raises(ValueError, match=r"idx must have shape \(16, 16\)"):
        transpose_keep_and_slots(values, idx[:, :8])
    with pytest.raises(TypeError, match="values must be of dtype"):
        transpose_keep_and_slots(values.double(), idx)


def test_slots_from_a_given_keep_t_by_ranking_it_as_magnitudes():
    """dsparse's cuSPARSELt backend feeds keep_t (as 1.0 / 0.0) to the kernel to get W̃ᵀ's slots
    for a mask chosen earlier; that must equal the torch scoring it replaces."""
    from dsparse import nm
    from dsparse.backends import cusparselt

    gen = torch.Generator().manual_seed(3)
    for out_f, in_f in ((16, 16), (48, 80), (80, 48)):
        w = torch.round(torch.randn(out_f, in_f, generator=gen) * 2) / 2
        idx = nm.kept_positions(nm.nm_mask(w.abs(), 2, 4), 2, 4)
        keep_t = torch.rand(out_f, in_f // 2, generator=gen) < 0.5  # any mask, not one from the values
        got = transpose_keep_and_slots(keep_t.to(torch.float16), idx)[1]
        assert torch.equal(got, cusparselt.transpose_slots(idx, keep_t))
