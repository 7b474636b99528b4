"""lowrank_project against float64 torch (fp32-accumulation plus one output rounding), its copy of x bit for
bit, strided outputs (a wide input's column slice), and its errors."""
import pytest
import torch

from kernels import lowrank_project, lowrank_project_reference

_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _inputs(tokens, k, rank, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(dtype).to(device)
    a = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype).to(device)
    return x, a


def _assert_close(got, x, a):
    want = x.double() @ a.double().t()
    mag = x.double().abs() @ a.double().abs().t()
    tol = mag * (x.shape[1] + 2) * 2.0**-23 + want.abs() * _ULP[got.dtype] + 2.0**-24
    err = (got.double() - want).abs()
    assert got.dtype == x.dtype and got.shape == want.shape
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}, worst excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 2048, 64), (3, 300, 20), (16, 512, 16), (40, 96, 33)],
                         ids=lambda s: f"T{s[0]}-in{s[1]}-r{s[2]}")
def test_matches_float64(device, shape, dtype):
    x, a = _inputs(*shape, dtype, device, seed=shape[2])
    _assert_close(lowrank_project(x, a), x, a)


def test_reference_matches_float64(device):
    x, a = _inputs(8, 200, 24, torch.bfloat16, device)
    _assert_close(lowrank_project_reference(x, a), x, a)


def test_writes_a_wide_input(device):
    """The folded adapter's use: U' into the last columns of a wide buffer, x copied into its first ones."""
    x, a = _inputs(8, 320, 48, torch.bfloat16, device, seed=3)
    wide = torch.full((8, 320 + 48), float("nan"), dtype=x.dtype, device=device)
    ret = lowrank_project(x, a, out=wide[:, 320:], x_copy=wide[:, :320])
    assert ret.data_ptr() == wide[:, 320:].data_ptr()
    assert torch.equal(wide[:, :320], x)
    _assert_close(wide[:, 320:], x, a)
    strided = torch.randn(8, 2 * 320, dtype=x.dtype, device=device)[:, ::2]  # a non-contiguous x
    _assert_close(lowrank_project(strided, a), strided, a)


def test_errors(device):
    x, a = _inputs(4, 64, 16, torch.bfloat16, device)
    with pytest.raises(ValueError, match=r"shape \(r, in\) with in = 64"):
        lowrank_project(x, a[:, :32])
    with pytest.raises(TypeError, match="a must be of dtype bfloat16"):
        lowrank_project(x, a.half())
    with pytest.raises(ValueError, match=r"out must have shape \(4, 16\)"):
        lowrank_project(x, a, out=torch.empty(4, 8, dtype=x.dtype, device=device))
    with pytest.raises(ValueError, match=r"x_copy must have shape \(4, 64\)"):
        lowrank_project(x, a, x_copy=torch.empty(4, 8, dtype=x.dtype, device=device))
