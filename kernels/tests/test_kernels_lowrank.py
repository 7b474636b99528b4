"""lowrank_addmm / bias_add against float64 torch, within fp32-accumulation (plus output rounding) error."""
import pytest
import torch

from kernels import (bias_add, bias_add_reference, lowrank_addmm, lowrank_addmm_reference, lowrank_silu_mul,
                     silu_mul_forward)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative size of one unit in the last place of the output dtype (the interpreter truncates to bf16)
_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _inputs(tokens, n, rank, dtype, device, seed=0, b_dtype=None, bias=True):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(tokens, n, generator=gen).to(dtype).to(device)
    u = torch.randn(tokens, rank, generator=gen).to(dtype).to(device)
    b = (torch.randn(n, rank, generator=gen) / 4).to(b_dtype or dtype).to(device)
    bias_t = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return y, u, b, bias_t


def _assert_close(got, y, u, b, scale, bias):
    y64, want = y.double(), y.double()
    mag = y64.abs()
    if u is not None and u.shape[1]:
        want = want + scale * (u.double() @ b.double().t())
        mag = mag + abs(scale) * (u.double().abs() @ b.double().abs().t())
    if bias is not None:
        want = want + bias.double()
        mag = mag + bias.double().abs()
    rank = 0 if u is None else u.shape[1]
    tol = mag * (rank + 3) * 2.0**-23 + want.abs() * _ULP[got.dtype] + 2.0**-24
    err = (got.double() - want).abs()
    assert got.dtype == y.dtype and got.shape == y.shape
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}, worst excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 48, 5), (64, 80, 16), (20, 130, 100), (7, 16, 1)],
                         ids=lambda s: f"T{s[0]}-out{s[1]}-r{s[2]}")
def test_matches_float64(device, shape, dtype):
    y, u, b, bias = _inputs(*shape, dtype, device, seed=shape[2])
    _assert_close(lowrank_addmm(y, u, b, 0.75, bias), y, u, b, 0.75, bias)
    _assert_close(lowrank_addmm(y, u, b, -2.0), y, u, b, -2.0, None)


def test_reference_matches_float64(device):
    y, u, b, bias = _inputs(33, 48, 5, torch.bfloat16, device)
    _assert_close(lowrank_addmm_reference(y, u, b, 0.5, bias), y, u, b, 0.5, bias)


def test_rank_zero_is_bias_add(device):
    y, u, b, bias = _inputs(9, 40, 0, torch.bfloat16, device)
    _assert_close(lowrank_addmm(y, u, b, 3.0, bias), y, None, None, 3.0, bias)
    _assert_close(bias_add(y, bias), y, None, None, 1.0, bias)
    _assert_close(bias_add_reference(y, bias), y, None, None, 1.0, bias)


def test_mixed_operand_dtypes(device):
    """bf16 activations with fp32 adapter weights: full fp32 products."""
    y, u, b, bias = _inputs(24, 48, 12, torch.bfloat16, device, b_dtype=torch.float32)
    _assert_close(lowrank_addmm(y, u, b, 0.5, bias.float()), y, u, b, 0.5, bias.float())


def test_bf16_never_through_fp16(device):
    """bf16 outputs beyond fp16's range (65504) stay finite and right."""
    y, u, b, bias = _inputs(16, 32, 8, torch.bfloat16, device)
    y = y * 1e6
    u = u * 1e3
    got = lowrank_addmm(y, u, b, 1.0, bias)
    assert bool(torch.isfinite(got).all())
    _assert_close(got, y, u, b, 1.0, bias)


def test_inplace_out_and_strides(device):
    y, u, b, bias = _inputs(40, 48, 6, torch.float16, device)
    want = lowrank_addmm(y, u, b, 0.5, bias)
    y2 = y.clone()
    ret = lowrank_addmm(y2, u, b, 0.5, bias, inplace=True)
    assert ret is y2 and torch.equal(y2, want)
    out = torch.empty_like(y)
    assert lowrank_addmm(y, u, b, 0.5, bias, out=out) is out and torch.equal(out, want)
    # transposed views everywhere (e.g. a GEMM that wrote its result transposed)
    y_t = y.t().contiguous().t()
    u_t = u.t().contiguous().t()
    b_t = b.t().contiguous().t()
    _assert_close(lowrank_addmm(y_t, u_t, b_t, 0.5, bias), y, u, b, 0.5, bias)
    z = y.t().contiguous().t()
    assert lowrank_addmm(z, u, b, 0.5, bias, inplace=True) is z
    _assert_close(z, y, u, b, 0.5, bias)


def test_small_tiles(device):
    """Several programs along both axes and several r chunks."""
    y, u, b, bias = _inputs(50, 72, 70, torch.bfloat16, device)
    got = lowrank_addmm(y, u, b, 0.5, bias, config={"BLOCK_T": 16, "BLOCK_N": 32, "num_warps": 1})
    _assert_close(got, y, u, b, 0.5, bias)


def test_validation():
    y, u, b, bias = _inputs(8, 16, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="u has 7 rows"):
        lowrank_addmm(y, u[:7], b)
    with pytest.raises(ValueError, match=r"b must have shape \(out, r\)"):
        lowrank_addmm(y, u, b[:, :3])
    with pytest.raises(ValueError, match=r"bias must have shape \(out,\)"):
        lowrank_addmm(y, u, b, bias=bias[:3])
    with pytest.raises(TypeError, match="out must be of dtype float32"):
        lowrank_addmm(y, u, b, out=torch.empty(8, 16, dtype=torch.float16))
    with pytest.raises(TypeError, match="y must be of dtype"):
        lowrank_addmm(y.double(), u, b)
    with pytest.raises(ValueError, match="either inplace=True or out="):
        lowrank_addmm(y, u, b, inplace=True, out=torch.empty_like(y))
    with pytest.raises(ValueError, match="bias is required"):
        bias_add(y, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 72, 12), (130, 64, 70)], ids=lambda s: f"T{s[0]}-width{s[1]}-r{s[2]}")
def test_lowrank_silu_mul_is_lowrank_addmm_then_the_gate(device, shape, dtype):
    tokens, width, rank = shape
    y, u, b, _ = _inputs(tokens, 2 * width, rank, dtype, device, seed=rank, bias=False)
    gate, up = lowrank_addmm(y, u, b, 0.5).chunk(2, dim=-1)
    assert torch.equal(lowrank_silu_mul(y, u, b, 0.5), silu_mul_forward(gate, up))
    out = torch.full((tokens, 2 * width), float("nan"), dtype=dtype, device=device)[:, :width]  # strided output
    lowrank_silu_mul(y, u, b, 0.5, out=out)
    assert torch.equal(out, silu_mul_forward(gate, up))


def test_lowrank_silu_mul_needs_a_gate_up_pair():
    y, u, b, _ = _inputs(4, 9, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="even width"):
        lowrank_silu_mul(y, u, b)
