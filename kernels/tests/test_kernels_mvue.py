import pytest
import torch

from dsparse import nm
from kernels import mvue_compress, mvue_compress_reference, mvue_transpose, mvue_transpose_reference


@pytest.mark.parametrize("tokens, cols, padded", [(16, 32, 16), (18, 48, 32), (7, 20, 8), (33, 16, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mvue_transpose_equals_torch(tokens, cols, padded, dtype, device):
    gen = torch.Generator().manual_seed(tokens * cols)
    dy = torch.randn(tokens, cols, generator=gen).to(dtype)
    dy[0, :3] = 0.0  # zero pairs and pairs with one zero
    dy[1, :2] = 0.0
    key = nm.mvue_key(tokens, cols)
    dy = dy.to(device)
    want = mvue_transpose_reference(dy, key, padded)
    padded_dy = torch.nn.functional.pad(dy, (0, 0, 0, padded - tokens))
    assert torch.equal(want, nm.mvue_pairs(padded_dy.t(), nm.mvue_uniform(key, cols, padded // 2, device)))
    got = mvue_transpose(dy, key, padded, config={"BLOCK_C": 16, "BLOCK_P": 8})
    assert got.dtype == dtype and got.shape == (cols, padded)
    assert torch.equal(got, want)
    assert torch.equal(mvue_transpose(dy.t().contiguous().t(), key, padded), want)  # strided input
    assert not torch.equal(mvue_transpose(dy, key + 1, padded), want)  # another key draws anew


def test_mvue_transpose_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be even and at least"):
        mvue_transpose(torch.randn(8, 4), 0, 6)
    with pytest.raises(ValueError, match="key must be in"):
        mvue_transpose(torch.randn(8, 4), -1, 8)


@pytest.mark.parametrize("tokens, cols, padded", [(64, 64, 64), (60, 128, 64), (130, 64, 192)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mvue_compress_equals_torch(tokens, cols, padded, dtype, device):
    gen = torch.Generator().manual_seed(tokens + cols)
    dy = torch.randn(tokens, cols, generator=gen).to(dtype)
    dy[0, :3] = 0.0  # a pair of zeros keeps its first entry
    dy[2:4, 5] = 0.0
    key = nm.mvue_key(tokens, cols, 7)
    dy = dy.to(device)
    want = mvue_compress_reference(dy, key, padded)
    got = mvue_compress(dy, key, padded, config={"BLOCK_C": 128, "BLOCK_P": 16})
    assert got.shape == (cols, padded // 2 + padded // 16) and got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(mvue_compress(dy, key, padded).view(torch.uint8), want.view(torch.uint8))  # default tiles
    int64 = mvue_compress(dy, key, padded, config={"INT64": True, "BLOCK_P": 64})  # offsets past 2**31; part-blocks
    assert torch.equal(int64.view(torch.uint8), want.view(torch.uint8))
    if device == "cuda":  # cuSPARSELt reads it as S (its own compress may place a zero group's slots elsewhere)
        eye = torch.eye(padded, dtype=dtype, device=device)
        assert torch.equal(torch._cslt_sparse_mm(got, eye), mvue_transpose(dy, key, padded))


def test_mvue_compress_rejects_shapes_cusparselt_pads_and_other_dtypes():
    with pytest.raises(ValueError, match="multiples of 64"):
        mvue_compress(torch.randn(64, 48).half(), 0, 64)
    with pytest.raises(ValueError, match="multiples of 64"):
        mvue_compress(torch.randn(30, 64).half(), 0, 32)
    with pytest.raises(TypeError, match="fp16 or bf16"):
        mvue_compress(torch.randn(64, 64), 0, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mvue_draws_are_the_references_at_training_size(dtype):
    """16384 tokens x 4096 outputs, 33.5M draws: compiled fp32 division is approximate unless asked
    otherwise, and at this count a ratio rounded the other way flips some draw."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    dy = torch.randn(16384, 4096, generator=gen, device="cuda").to(dtype)
    key = nm.mvue_key(3, 1)
    got = mvue_compress(dy, key, 16384)
    assert torch.equal(got.view(torch.uint8), mvue_compress_reference(dy, key, 16384).view(torch.uint8))


@pytest.mark.parametrize("tokens, width, padded", [(64, 64, 64), (70, 128, 128), (130, 64, 192)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mvue_compress_swiglu_is_the_two_kernels(tokens, width, padded, dtype, device):
    """SwiGLU's backward with S(dYᵀ) of its result compressed in the same pass: bit for bit what
    silu_mul_backward then mvue_compress give (tokens past the end and padded rows of S included)."""
    from kernels import mvue_compress_swiglu, silu_mul_backward

    gen = torch.Generator().manual_seed(tokens + width)
    gate_up = (2 * torch.randn(tokens, 2 * width, generator=gen)).to(dtype).to(device)
    dh = torch.randn(tokens, width, generator=gen).to(dtype).to(device)
    dh[:2, :5] = 0.0  # zero gradients: pairs of zeros in dY
    key = nm.mvue_key(tokens, width, 3)
    want = torch.empty_like(gate_up)
    silu_mul_backward(dh, gate_up[:, :width], gate_up[:, width:], out=(want[:, :width], want[:, width:]))
    want_packed = mvue_compress(want, key, padded)
    assert torch.equal(want_packed.view(torch.uint8), mvue_compress_reference(want, key, padded).view(torch.uint8))
    for config in (None, {"BLOCK_C": 128, "BLOCK_P": 32}, {"INT64": True}):
        out = torch.full_like(gate_up, float("nan"))
        dgu, packed = mvue_compress_swiglu(dh, gate_up, key, padded, out=out, config=config)
        assert dgu is out and torch.equal(dgu.view(torch.int16), want.view(torch.int16))
        assert torch.equal(packed.view(torch.uint8), want_packed.view(torch.uint8))
    dgu, packed = mvue_compress_swiglu(dh.t().contiguous().t(), gate_up, key + 1, padded)  # strided dh, new draws
    assert torch.equal(dgu, want) and not torch.equal(packed.view(torch.uint8), want_packed.view(torch.uint8))


def test_mvue_compress_swiglu_rejects_bad_arguments():
    from kernels import mvue_compress_swiglu

    gate_up, dh = torch.randn(64, 256).half(), torch.randn(64, 128).half()
    with pytest.raises(ValueError, match="I a multiple of 64"):
        mvue_compress_swiglu(torch.randn(64, 96).half(), torch.randn(64, 48).half(), 0, 64)
    with pytest.raises(ValueError, match="I a multiple of 64"):
        mvue_compress_swiglu(dh[:, :64], gate_up, 0, 64)
    with pytest.raises(TypeError, match="dh must be of dtype float16"):
        mvue_compress_swiglu(dh.bfloat16(), gate_up, 0, 64)
    with pytest.raises(TypeError, match="gate_up must be of dtype"):
        mvue_compress_swiglu(dh.float(), gate_up.float(), 0, 64)
    with pytest.raises(ValueError, match="multiples of 64"):
        mvue_compress_swiglu(dh, gate_up, 0, 96)
