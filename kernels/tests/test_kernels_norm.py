"""rms_norm_forward / rms_norm_backward against HF's RMSNorm math (torch), and their input checks."""
import pytest
import torch

from kernels import rms_norm_backward, rms_norm_forward, rms_norm_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
EPS = 1e-6


def _inputs(rows, cols, dtype, device, seed=0, w_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=gen) * 3).to(dtype).to(device)
    w = (1 + torch.randn(cols, generator=gen) / 4).to(w_dtype or dtype).to(device)
    dy = torch.randn(rows, cols, generator=gen).to(dtype).to(device)
    return x, w, dy


def _grads64(x, w, dy):
    """dx, dw of weight · x·rsqrt(mean(x²) + eps) in float64 (no intermediate rounding)."""
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    y = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS))
    y.backward(dy.double())
    return x64.grad, w64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (7, 100), (33, 256), (5, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_matches_hf_math(device, shape, dtype):
    x, w, _ = _inputs(*shape, dtype, device, seed=shape[1])
    y, rstd = rms_norm_forward(x, w, EPS)
    want = rms_norm_reference(x, w, EPS)
    assert y.dtype == want.dtype and y.shape == want.shape
    # the kernel sums mean(x²) in another order than torch: x·rstd may round to the neighbouring
    # value (1 ulp of x's dtype), and the product with w once more
    tol = want.double().abs() * 2.5 * _ULP[dtype] + 1e-6
    err = (y.double() - want.double()).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"
    want_rstd = torch.rsqrt(x.double().pow(2).mean(-1) + EPS)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_float64_autograd(device, dtype):
    x, w, dy = _inputs(37, 200, dtype, device, seed=3)
    _, rstd = rms_norm_forward(x, w, EPS)
    dx, dw = rms_norm_backward(dy, x, w, rstd)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype and dw.shape == w.shape
    dx64, dw64 = _grads64(x, w, dy)
    # dw sums round(x̂)·dy: the kernel rounds x̂ to x's dtype as the forward does
    xhat = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS)).to(dtype).double()
    torch.testing.assert_close(dw.double(), (dy.double() * xhat).sum(0), rtol=_ULP[w.dtype] * 4,
                               atol=_ULP[w.dtype] * 4 * (dy.double() * xhat).abs().sum(0).max().item())
    scale = (dy.double().abs() * w.double().abs()).max() * rstd.double().max()
    torch.testing.assert_close(dx.double(), dx64, rtol=4 * _ULP[dtype], atol=float(scale) * 1e-5 + 1e-7)
    torch.testing.assert_close(dw.double(), dw64, rtol=0.02 if dtype != torch.float32 else 1e-5,
                               atol=float(dw64.abs().max()) * (0.02 if dtype != torch.float32 else 1e-5))


def test_fp32_weight_with_bf16_input_promotes(device):
    x, w, dy = _inputs(9, 64, torch.bfloat16, device, w_dtype=torch.float32)
    y, rstd = rms_norm_forward(x, w, EPS)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm_reference(x, w, EPS), rtol=2 * _ULP[torch.bfloat16], atol=1e-6)
    dx, dw = rms_norm_backward(dy, x, w, rstd)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32


def test_strided_rows_and_many_rows_per_program(device):
    """Rows with a stride wider than the row (a slice of a wider tensor); more rows than programs."""
    wide, w, _ = _inputs(300, 96, torch.float32, device, seed=5)
    x = wide[:, :48]
    w = w[:48].contiguous()
    y, rstd = rms_norm_forward(x, w, EPS)
    torch.testing.assert_close(y, rms_norm_reference(x, w, EPS), rtol=1e-6, atol=1e-6)
    dy = torch.randn(300, 48, generator=torch.Generator().manual_seed(1)).to(device)
    dx, dw = rms_norm_backward(dy, x, w, rstd)
    dx64, dw64 = _grads64(x, w, dy)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-5)


def test_no_rows(device):
    x, w, _ = _inputs(0, 32, torch.float32, device)
    y, rstd = rms_norm_forward(x, w, EPS)
    dx, dw = rms_norm_backward(torch.empty_like(x), x, w, rstd)
    assert y.shape == (0, 32) and dx.shape == (0, 32) and bool((dw == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_writes_the_leading_columns_of_a_wider_buffer(device, dtype):
    """``out=`` a row view at its own stride (a folded adapter's wide input): same numbers, other columns untouched."""
    x, w, _ = _inputs(19, 96, dtype, device)
    wide = torch.full((19, 96 + 16), 7.0, dtype=dtype, device=device)
    y, rstd = rms_norm_forward(x, w, EPS, out=wide[:, :96])
    want, want_rstd = rms_norm_forward(x, w, EPS)
    assert y.data_ptr() == wide.data_ptr() and torch.equal(y, want) and torch.equal(rstd, want_rstd)
    assert bool((wide[:, 96:] == 7).all())
    with pytest.raises(ValueError, match="out must have shape"):
        rms_norm_forward(x, w, EPS, out=wide[:, :95])
    with pytest.raises(TypeError, match="out must be of dtype"):
        rms_norm_forward(x, w, EPS, out=wide[:, :96].to(torch.float16))
    with pytest.raises(ValueError, match="column stride 1"):
        rms_norm_forward(x, w, EPS, out=torch.empty(96, 19, dtype=dtype, device=device).t())


def test_bad_inputs_are_named():
    x, w, dy = _inputs(4, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight must be .* shape \(32,\)"):
        rms_norm_forward(x, w[:16], EPS)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm_forward(x.t().contiguous().t(), w, EPS)
    with pytest.raises(TypeError, match="dtype"):
        rms_norm_forward(x.to(torch.int32), w, EPS)
    _, rstd = rms_norm_forward(x, w, EPS)
    with pytest.raises(ValueError, match="rstd"):
        rms_norm_backward(dy, x, w, rstd.double())
