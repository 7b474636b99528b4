"""kernels.skinny_mma_sparse_mm: few-token products on the sparse tensor cores, against the reference and
against what cuSPARSELt itself compresses and multiplies."""
import pytest
import torch

from kernels import skinny_sparse_mm_reference
from kernels._testing import compressed_operand
from kernels.skinny_mma import MAX_TOKENS, available, skinny_mma_sparse_mm

needs_sparse_cores = pytest.mark.skipif(not available("cuda"), reason="needs a CUDA GPU of compute capability 8.0+")


def test_bad_operands_are_refused_with_the_fix():
    packed, _ = compressed_operand(64, 128, torch.bfloat16)
    x = torch.randn(4, 128).bfloat16()
    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS} tokens"):
        skinny_mma_sparse_mm(packed, torch.randn(MAX_TOKENS + 1, 128).bfloat16())
    with pytest.raises(ValueError, match="row stride must be even"):
        skinny_mma_sparse_mm(packed, torch.randn(4, 129).bfloat16()[:, :128])
    with pytest.raises(ValueError, match="warps_k must be in 1..8"):
        skinny_mma_sparse_mm(packed, x, warps_k=9)
    with pytest.raises(ValueError, match="use kernels.skinny_sparse_mm"):
        skinny_mma_sparse_mm(packed, x)  # a CPU tensor
    with pytest.raises(ValueError, match="contiguous compressed form"):  # the operand contract of kernels.skinny
        skinny_mma_sparse_mm(packed, torch.randn(4, 64).bfloat16())


@pytest.mark.gpu
@needs_sparse_cores
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, cols, tokens, warps_k", [(64, 64, 1, 1), (128, 320, 8, 3), (192, 256, 16, 8),
                                                          (64, 128, 9, 2), (2048, 5632, 8, 8), (640, 2048, 5, 8)])
def test_matches_the_dense_product_in_fp32(rows, cols, tokens, warps_k, dtype):
    packed, dense = compressed_operand(rows, cols, dtype, "cuda", seed=rows + tokens)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cols, generator=gen).to(dtype).cuda()
    bias = torch.randn(rows, generator=gen).to(dtype).cuda()
    for b in (None, bias):
        got = skinny_mma_sparse_mm(packed, x, b, warps_k=warps_k)
        want = x.float() @ dense.float().t() + (0 if b is None else b.float())
        assert got.shape == (tokens, rows) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=2e-2)  # one rounding of an fp32 sum
        torch.testing.assert_close(got, skinny_sparse_mm_reference(packed, x, b), rtol=2 ** -7, atol=2e-2)


@pytest.mark.gpu
@needs_sparse_cores
@pytest.mark.parametrize("mode", ["randn", "ties", "zeros"])
def test_reads_what_cusparselt_compresses_as_cusparselt_multiplies_it(mode):
    """The operand from torch._cslt_compress itself (groups of zeros name positions 2 and 3), and the
    product next to torch._cslt_sparse_mm's."""
    _, dense = compressed_operand(256, 1024, torch.bfloat16, "cuda", mode=mode, seed=3)
    packed = torch._cslt_compress(dense)
    x = torch.randn(8, 1024, device="cuda").bfloat16()
    got = skinny_mma_sparse_mm(packed, x)
    torch.testing.assert_close(got.float(), x.float() @ dense.float().t(), rtol=2 ** -7, atol=2e-2)
    torch.testing.assert_close(got, torch._cslt_sparse_mm(packed, x.t()).t(), rtol=2 ** -7, atol=2e-2)


@pytest.mark.gpu
@needs_sparse_cores
def test_reads_rows_at_their_stride_and_replays_in_a_cuda_graph_bit_for_bit():
    """Deterministic (the warps' sums added in order), and capturable as GraphDecoder captures a step."""
    packed, dense = compressed_operand(512, 2048, torch.bfloat16, "cuda", seed=5)
    wide = torch.randn(8, 2304, device="cuda").bfloat16()
    x = wide[:, :2048]  # rows 2304 apart
    eager = skinny_mma_sparse_mm(packed, x)
    assert torch.equal(eager, skinny_mma_sparse_mm(packed, x.contiguous()))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        skinny_mma_sparse_mm(packed, x)  # warm-up off the default stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_mma_sparse_mm(packed, x)
    for _ in range(3):
        wide.copy_(torch.randn_like(wide))
        graph.replay()
        assert torch.equal(y, skinny_mma_sparse_mm(packed, x))
    torch.testing.assert_close(y.float(), x.float() @ dense.float().t(), rtol=2 ** -7, atol=2e-2)


@pytest.mark.gpu
@needs_sparse_cores
def test_one_hot_tokens_read_back_the_operands_columns_exactly():
    """Token ``t`` = column ``k``'s unit vector reads back ``A[:, k]`` (one nonzero product: exact), so every
    kept value and metadata nibble is checked where it lands; a failure names the (row % 16, column % 32)
    positions that came out wrong, which locates a fragment or metadata layout error."""
    rows, cols = 64, 256
    _, dense = compressed_operand(rows, cols, torch.bfloat16, "cuda", mode="random_mask", seed=7)
    packed = torch._cslt_compress(dense)
    eye = torch.eye(cols, device="cuda", dtype=torch.bfloat16)
    got = torch.cat([skinny_mma_sparse_mm(packed, eye[k:k + MAX_TOKENS]) for k in range(0, cols, MAX_TOKENS)])
    wrong = (got.t() != dense).nonzero()
    where = sorted({(r % 16, c % 32) for r, c in wrong.tolist()})
    assert not where, f"{len(wrong)} entries differ, at (row % 16, column % 32): {where[:40]}"
