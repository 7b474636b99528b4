"""silu_mul_forward / silu_mul_backward against torch's silu(g)·u and its float64 gradients."""
import pytest
import torch

from kernels import silu_mul_backward, silu_mul_forward, silu_mul_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen) * 3).to(dtype).to(device) for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (17, 300), (2, 4, 1000)], ids=str)
def test_matches_torch(device, shape, dtype):
    g, u, dh = _inputs(shape, dtype, device, seed=len(shape))
    h = silu_mul_forward(g, u)
    want = silu_mul_reference(g, u)
    assert h.dtype == dtype and h.shape == want.shape
    # both round silu(g) to the dtype, then the product: at most 1 ulp apart per rounding
    tol = want.double().abs() * 2.5 * _ULP[dtype] + 1e-6
    err = (h.double() - want.double()).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"

    g64, u64 = g.double().requires_grad_(True), u.double().requires_grad_(True)
    (torch.nn.functional.silu(g64) * u64).backward(dh.double())
    dg, du = silu_mul_backward(dh, g, u)
    assert dg.dtype == du.dtype == dtype
    for got, ref in ((dg, g64.grad), (du, u64.grad)):
        # a few fp32 operations, then one rounding to the dtype
        torch.testing.assert_close(got.double(), ref, rtol=4 * _ULP[dtype] + 2**-20,
                                   atol=(4 * _ULP[dtype] + 2**-20) * float(ref.abs().max()))


def test_empty_and_bad_inputs(device):
    g, u, _ = _inputs((0, 8), torch.float32, device)
    assert silu_mul_forward(g, u).shape == (0, 8)
    g, u, _ = _inputs((4, 8), torch.float32, device)
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul_forward(g, u[:, :4].contiguous())
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul_forward(g, u.half())
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul_forward(g.t(), u.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_halves_of_one_buffer_match_contiguous_operands(device, dtype):
    """A fused gate/up output's halves in place: the same numbers as copies, gradients into one buffer."""
    gu, dh, _ = _inputs((37, 2 * 300), dtype, device, seed=3)
    dh = dh[:, :300].contiguous()
    g, u = gu[:, :300], gu[:, 300:]
    assert torch.equal(silu_mul_forward(g, u), silu_mul_forward(g.contiguous(), u.contiguous()))
    dgu = torch.full_like(gu, float("nan"))
    dg, du = silu_mul_backward(dh, g, u, out=(dgu[:, :300], dgu[:, 300:]))
    want = silu_mul_backward(dh, g.contiguous(), u.contiguous())
    assert dg.data_ptr() == dgu.data_ptr() and torch.equal(dgu, torch.cat(want, dim=1))
    with pytest.raises(ValueError, match="one row stride"):
        silu_mul_forward(g, u.contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_writes_the_leading_columns_of_a_wider_buffer(device, dtype):
    """``out=`` a row view at its own stride (a folded adapter's wide input): same numbers, other columns untouched."""
    gu, _, _ = _inputs((37, 2 * 300), dtype, device, seed=4)
    g, u = gu[:, :300], gu[:, 300:]
    wide = torch.full((37, 300 + 24), 7.0, dtype=dtype, device=device)
    h = silu_mul_forward(g, u, out=wide[:, :300])
    assert h.data_ptr() == wide.data_ptr()
    assert torch.equal(wide[:, :300], silu_mul_forward(g, u)) and bool((wide[:, 300:] == 7).all())
    with pytest.raises(ValueError, match="shape"):
        silu_mul_forward(g, u, out=wide[:, :299])
    with pytest.raises(ValueError, match="dtype"):
        silu_mul_forward(g, u, out=wide[:, :300].to(torch.float16))
    with pytest.raises(ValueError, match="column stride 1"):
        silu_mul_forward(g, u, out=torch.empty(300, 37, dtype=dtype, device=device).t())
