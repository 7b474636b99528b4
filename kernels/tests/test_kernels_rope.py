"""rope_forward / rope_backward against HF's rotate-half rotary embedding and its autograd."""
import pytest
import torch

from kernels import rope_backward, rope_forward, rope_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(b, h, s, d, dtype, device, table_batch=1, seed=0):
    """q as HF makes it, ``proj(x).view(b, s, h, d).transpose(1, 2)``, and HF-style cos/sin tables."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, s, h, d, generator=gen) * 3).to(dtype).to(device).transpose(1, 2)
    angles = torch.rand(table_batch, s, d // 2, generator=gen) * 100
    emb = torch.cat((angles, angles), dim=-1)
    return x, emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def _assert_matches(got, want, x, cos, sin, device):
    assert got.dtype == want.dtype and got.shape == want.shape
    if device == "cuda" or got.dtype != torch.bfloat16:
        # every product and sum rounds where torch's do (16-bit products are exact in fp32; no FMA)
        assert torch.equal(got, want)
    else:  # the interpreter's fp32 -> bf16 cast truncates: up to 1 ulp of each product and of their sum
        x1, x2 = x.float().chunk(2, dim=-1)
        terms = ((x.float() * cos.float().unsqueeze(1)).abs()
                 + (torch.cat((x2, x1), -1) * sin.float().unsqueeze(1)).abs())
        assert bool(((got.float() - want.float()).abs() <= 2 * 2.0**-7 * terms).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,s,d,table_batch", [(2, 3, 5, 8, 1), (2, 20, 7, 64, 2), (1, 4, 3, 6, 1)], ids=str)
def test_matches_hf_forward_and_backward(device, b, h, s, d, table_batch, dtype):
    x, cos, sin = _inputs(b, h, s, d, dtype, device, table_batch, seed=h)
    out = rope_forward(x, cos, sin)
    _assert_matches(out, rope_reference(x, cos, sin), x, cos, sin, device)
    assert out.stride() == x.stride()  # the projection's layout, as torch's elementwise ops keep it

    xr = x.detach().clone().requires_grad_(True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    rope_reference(xr, cos, sin).backward(grad)
    _assert_matches(rope_backward(grad, cos, sin), xr.grad, grad, cos, sin, device)


def test_backward_is_the_transpose(device):
    """<rope(x), g> = <x, rope_backward(g)> in float64-exact fp32 inputs with a general (not
    half-repeated) table: the backward kernel is the forward's transpose for any cos/sin."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, 8, generator=gen).to(device)
    g = torch.randn(2, 3, 5, 8, generator=gen).to(device)
    cos, sin = torch.randn(2, 5, 8, generator=gen).to(device), torch.randn(2, 5, 8, generator=gen).to(device)
    lhs = (rope_forward(x, cos, sin).double() * g.double()).sum()
    rhs = (x.double() * rope_backward(g, cos, sin).double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_mismatched_tables_are_expanded(device):
    x, cos, sin = _inputs(2, 3, 5, 8, torch.float32, device, table_batch=2)
    out = rope_forward(x, cos[:1], sin)  # cos broadcast over the batch, sin per sequence
    assert torch.equal(out, rope_reference(x, cos[:1].expand_as(sin), sin))


def test_bad_inputs(device):
    x, cos, sin = _inputs(2, 3, 5, 8, torch.float32, device)
    with pytest.raises(ValueError, match="cast the tables"):
        rope_forward(x, cos.half(), sin)
    with pytest.raises(ValueError, match="even head_dim"):
        rope_forward(x[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match=r"must be \(2 or 1, 5, 8\)"):
        rope_forward(x, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        rope_forward(x.transpose(-1, -2), cos, sin)
    assert rope_forward(x[:, :, :0], cos[:, :0], sin[:, :0]).shape == (2, 3, 0, 8)
