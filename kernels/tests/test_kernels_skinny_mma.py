"""kernels.skinny_mma_sparse_mm: few-token products on the sparse tensor cores, against the reference and
against what cuSPARSELt itself compresses and multiplies; first, the instruction's own operand layouts, which
the kernel's are built on."""
import functools
import os

import pytest
import torch

from kernels import skinny_sparse_mm_reference
from kernels._testing import compressed_operand
from kernels.skinny_mma import MAX_TOKENS, SOURCE, available, skinny_mma_sparse_mm

needs_sparse_cores = pytest.mark.skipif(not available("cuda"), reason="needs a CUDA GPU of compute capability 8.0+")

# One mma.sp of a dense 16 x 32 A (two nonzeros in each group of 4 along k) and a 32 x 8 B, its registers built
# from the dense matrices as csrc/mma_sp.cuh describes the layouts; the metadata per `layout`: 0 as there
# (thread 4g + h: groups 4h .. 4h + 3 of rows g and g + 8), 1 the other reading of two threads per row pair
# (thread 4g + h: the 8 groups of row g + 8h). Independent of cuSPARSELt's compressed layout.
_PROBE = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
#include "mma_sp.cuh"

template <typename T>
__device__ uint32_t kept_pair(const T* a, int row, int group, uint32_t* nibble) {  // the group's two nonzeros
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(a) + row * 32 + 4 * group;
  int p[2] = {0, 1}, n = 0;
  for (int i = 0; i < 4; ++i)
    if ((bits[i] & 0x7fff) && n < 2) p[n++] = i;
  *nibble = p[0] | (p[1] << 2);
  return uint32_t(bits[p[0]]) | (uint32_t(bits[p[1]]) << 16);
}

template <typename T>
__global__ void probe_kernel(const T* a, const T* b, float* d, int layout) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3, h = t & 1;
  uint32_t af[4], bf[4], e = 0, nib;
  af[0] = kept_pair(a, g, t, &nib);
  af[1] = kept_pair(a, g + 8, t, &nib);
  af[2] = kept_pair(a, g, 4 + t, &nib);
  af[3] = kept_pair(a, g + 8, 4 + t, &nib);
  for (int j = 0; j < (layout == 0 ? 4 : 8); ++j) {
    if (layout == 0) {
      kept_pair(a, g, 4 * h + j, &nib);
      e |= nib << (4 * j);
      kept_pair(a, g + 8, 4 * h + j, &nib);
      e |= nib << (16 + 4 * j);
    } else {
      kept_pair(a, g + 8 * h, j, &nib);
      e |= nib << (4 * j);
    }
  }
  const uint16_t* bb = reinterpret_cast<const uint16_t*>(b);
  for (int j = 0; j < 4; ++j) bf[j] = uint32_t(bb[(8 * j + 2 * t) * 8 + g]) | (uint32_t(bb[(8 * j + 2 * t + 1) * 8 + g]) << 16);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  dsparse_mma::mma_sp<T>(acc, af, bf, e);
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

at::Tensor probe(const at::Tensor& a, const at::Tensor& b, int64_t layout) {
  at::Tensor d = at::empty({16, 8}, a.options().dtype(at::kFloat));
  if (a.scalar_type() == at::kBFloat16) {
    probe_kernel<__nv_bfloat16><<<1, 32>>>(reinterpret_cast<const __nv_bfloat16*>(a.data_ptr()),
                                           reinterpret_cast<const __nv_bfloat16*>(b.data_ptr()), d.data_ptr<float>(), layout);
  } else {
    probe_kernel<__half><<<1, 32>>>(reinterpret_cast<const __half*>(a.data_ptr()),
                                    reinterpret_cast<const __half*>(b.data_ptr()), d.data_ptr<float>(), layout);
  }
  return d;
}

TORCH_LIBRARY(dsparse_mma_probe, m) { m.def("probe(Tensor a, Tensor b, int layout) -> Tensor"); }
TORCH_LIBRARY_IMPL(dsparse_mma_probe, CUDA, m) { m.impl("probe", &probe); }
"""


@functools.cache
def _probe():
    from torch.utils.cpp_extension import load_inline

    load_inline("dsparse_mma_probe", cpp_sources="", cuda_sources=_PROBE, is_python_module=False,
                extra_include_paths=[os.path.dirname(SOURCE)], no_implicit_headers=True)
    return torch.ops.dsparse_mma_probe.probe


@pytest.mark.gpu
@needs_sparse_cores
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_sparse_tensor_cores_read_the_operand_layouts_the_kernel_assumes(dtype):
    """One mma.sp from registers built per csrc/mma_sp.cuh gives A @ B; the metadata's other reading does
    not. A failure says which reading the hardware took, and which rows and columns of D came out wrong."""
    gen = torch.Generator().manual_seed(11)
    keep = torch.rand(16, 8, 4, generator=gen).argsort(-1).argsort(-1) < 2  # two of each group of 4, at random
    a = torch.where(keep.view(16, 32), torch.randn(16, 32, generator=gen), 0.0).to(dtype).cuda()
    b = torch.randn(32, 8, generator=gen).to(dtype).cuda()
    want = a.float() @ b.float()
    got = [_probe()(a, b, layout) for layout in (0, 1)]
    close = [torch.allclose(d, want, rtol=1e-3, atol=1e-3) for d in got]
    wrong = sorted({tuple(ij) for ij in (~torch.isclose(got[0], want, rtol=1e-3, atol=1e-3)).nonzero().tolist()})
    other = "the other reading (a row's 8 groups per thread) matches" if close[1] else "the other reading fails too"
    assert close[0], f"mma.sp with the assumed layouts is wrong at (row, column) of D {wrong[:20]}; {other}"
    assert not close[1]  # the two readings give different products: the probe tells them apart


def test_bad_operands_are_refused_with_the_fix():
    packed, _ = compressed_operand(64, 128, torch.bfloat16)
    x = torch.randn(4, 128).bfloat16()
    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS} tokens"):
        skinny_mma_sparse_mm(packed, torch.randn(MAX_TOKENS + 1, 128).bfloat16())
    with pytest.raises(ValueError, match="multiple of 8 elements"):
        skinny_mma_sparse_mm(packed, torch.randn(4, 130).bfloat16()[:, :128])
    with pytest.raises(ValueError, match="warps_k must be in 1..8"):
        skinny_mma_sparse_mm(packed, x, warps_k=9)
    with pytest.raises(ValueError, match="row_tiles and batch must be 1 or 2"):
        skinny_mma_sparse_mm(packed, x, row_tiles=4)
    with pytest.raises(ValueError, match="use kernels.skinny_sparse_mm"):
        skinny_mma_sparse_mm(packed, x)  # a CPU tensor
    with pytest.raises(ValueError, match="contiguous compressed form"):  # the operand contract of kernels.skinny
        skinny_mma_sparse_mm(packed, torch.randn(4, 64).bfloat16())


@pytest.mark.gpu
@needs_sparse_cores
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("row_tiles, batch", [(1, 1), (1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("rows, cols, tokens, warps_k", [(64, 64, 1, 1), (128, 320, 8, 3), (192, 256, 16, 8),
                                                          (64, 128, 9, 2), (2048, 5632, 8, 8), (640, 2048, 5, 8),
                                                          (256, 2112, 16, 4), (128, 448, 3, 8)])
def test_matches_the_dense_product_in_fp32(rows, cols, tokens, warps_k, row_tiles, batch, dtype):
    """Spans of 128 columns, a last half span (cols % 128 = 64: 64, 320, 2112, 448), warps without a span
    (448 over 8 warps), one or two token tiles, one or two row tiles per warp, one or two spans per load."""
    packed, dense = compressed_operand(rows, cols, dtype, "cuda", seed=rows + tokens)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cols, generator=gen).to(dtype).cuda()
    bias = torch.randn(rows, generator=gen).to(dtype).cuda()
    for b in (None, bias):
        got = skinny_mma_sparse_mm(packed, x, b, warps_k=warps_k, row_tiles=row_tiles, batch=batch)
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
