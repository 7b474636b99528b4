// x @ Aᵀ (+ bias) for a few tokens on the sparse tensor cores (mma.sp), straight from cuSPARSELt's
// compressed 2:4 operand A (kernels/cslt_meta.py describes its layout). See kernels/skinny_mma.py.
//
// One warp owns 16 rows of A and a range of k; each step of 32 columns is one
// mma.sp.m16n8k32 per 8 tokens: A's fragment is 4 registers of kept values read from global
// memory as they lie, its metadata one register rebuilt from cuSPARSELt's 8-byte word of the
// row pair (bytes (g % 4) * 2 + g / 4 hold groups g of rows r | r + 8; mma.sp wants groups 0-3
// (thread 4i) or 4-7 (thread 4i + 1) of row r in bits 0-15 and of row r + 8 in bits 16-31).
// The block's warps split k; warp 0 adds their fp32 sums in warp order (deterministic), adds
// the bias in fp32 and rounds once, as cuSPARSELt does.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "mma_sp.cuh"

namespace {

using dsparse_mma::from_float;
using dsparse_mma::mma_sp;
using dsparse_mma::to_float;

constexpr int kChunk = 32;  // columns of A per mma.sp (m16n8k32)
constexpr int kBatch = 8;  // chunks of A a warp loads before it multiplies them

// A read once: past L1 (the operand streams; x and the metadata are what caches should keep). Volatile,
// so that the compiler issues a batch's loads where they are written, not next to each use.
__device__ __forceinline__ uint32_t load_stream(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

// The metadata register of thread 4i + half (half 0: groups 0-3, 1: groups 4-7) from the row pair's
// 8-byte word: its bytes 2j + half hold group 4 * half + j, row r in the low nibble, r + 8 in the high.
__device__ __forceinline__ uint32_t metadata_register(uint2 word, int half) {
  const uint32_t bytes = __byte_perm(word.x, word.y, half ? 0x7531 : 0x6420);  // groups 4h .. 4h+3
  uint32_t low = bytes & 0x0F0F0F0Fu;  // row r's nibbles, one per byte
  uint32_t high = (bytes >> 4) & 0x0F0F0F0Fu;  // row r + 8's
  low |= low >> 4;  // bytes 0 and 2 now hold nibble pairs (j = 0, 1) and (2, 3)
  high |= high >> 4;
  return __byte_perm(low, high, 0x6420);
}

// grid.x: tiles of 16 rows; block: 32 x WARPS_K threads (warp w takes the w-th share of k's chunks).
// NT: token tiles of 8. x (tokens, K) with row stride sx; y (tokens, R) with row stride sy.
template <typename T, int NT>
__global__ void __launch_bounds__(256) skinny_mma_kernel(const T* __restrict__ packed, const T* __restrict__ x,
                                                         const T* __restrict__ bias, T* __restrict__ y, int tokens,
                                                         int R, int K, int64_t sx, int64_t sy) {
  extern __shared__ float partial[];  // (WARPS_K - 1) x 32 lanes x NT x 4
  const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
  const int g = lane >> 2, t = lane & 3;
  const int64_t r0 = int64_t(blockIdx.x) * 16;
  const int chunks = K / kChunk, per_warp = (chunks + warps - 1) / warps;
  const int c_begin = warp * per_warp, c_end = min(chunks, c_begin + per_warp);

  const int64_t half_k = K / 2;  // kept values per row
  const uint32_t* v_lo = reinterpret_cast<const uint32_t*>(packed + (r0 + g) * half_k) + t;  // row r0 + g
  const uint32_t* v_hi = v_lo + 8 * half_k / 2;  // row r0 + g + 8 (uint32 units: two values each)
  // metadata: 8-byte words after R * K / 2 values; row pair (r0 + g, r0 + g + 8), chunk c at
  // (r0 / 64) * K + c * 32 + (r0 / 16 % 4) * 8 + g
  const uint2* meta = reinterpret_cast<const uint2*>(packed + int64_t(R) * half_k) + (r0 / 64) * K +
                      (r0 / 16 % 4) * 8 + g;
  const uint32_t* xs[NT];
  bool live[NT];
  for (int n = 0; n < NT; ++n) {
    const int token = n * 8 + g;
    live[n] = token < tokens;
    xs[n] = reinterpret_cast<const uint32_t*>(x + int64_t(live[n] ? token : 0) * sx) + t;
  }

  float acc[NT][4] = {};
  for (int c0 = c_begin; c0 < c_end; c0 += kBatch) {
    // all of a batch's loads of A first, so that each warp keeps kBatch chunks of A in flight; chunks past
    // the warp's end multiply zeros (no branch between the loads and their use, which would let the
    // compiler sink each load next to its product)
    uint32_t a[kBatch][4];
    uint2 words[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = min(c0 + u, c_end - 1);
      const uint32_t keep = c0 + u < c_end ? 0xFFFFFFFFu : 0u;
      // compressed columns 16c + 2t, +1 and 16c + 8 + 2t, +1 of rows r0 + g and r0 + g + 8 (uint32 8c + t, +4)
      a[u][0] = load_stream(v_lo + 8 * c) & keep;
      a[u][1] = load_stream(v_hi + 8 * c) & keep;
      a[u][2] = load_stream(v_lo + 8 * c + 4) & keep;
      a[u][3] = load_stream(v_hi + 8 * c + 4) & keep;
      words[u] = t < 2 ? __ldg(meta + int64_t(c) * 32) : make_uint2(0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int c = min(c0 + u, c_end - 1);
      const uint32_t e = metadata_register(words[u], t & 1);  // (threads 4i + 2, + 3: not read by mma.sp)
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        // B: x[token][32c + 8j + 2t, +1], j = 0..3 (uint32 16c + 4j + t); tokens past the end: zeros
        uint32_t b[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = live[n] ? __ldg(xs[n] + 16 * c + 4 * j) : 0u;
        mma_sp<T>(acc[n], a[u], b, e);
      }
    }
  }

  // accumulators: acc[n][0..1] rows r0 + g, tokens 8n + 2t, +1; acc[n][2..3] row r0 + g + 8
  if (warp > 0) {
    float* mine = partial + ((warp - 1) * 32 + lane) * NT * 4;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) mine[n * 4 + i] = acc[n][i];
  }
  __syncthreads();
  if (warp != 0) return;
  for (int w = 1; w < warps; ++w) {
    const float* theirs = partial + ((w - 1) * 32 + lane) * NT * 4;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[n][i] += theirs[n * 4 + i];
  }
  float b_lo = 0.f, b_hi = 0.f;
  if (bias != nullptr) {
    b_lo = to_float(bias[r0 + g]);
    b_hi = to_float(bias[r0 + g + 8]);
  }
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int token = n * 8 + 2 * t + i;
      if (token < tokens) {
        y[token * sy + r0 + g] = from_float<T>(acc[n][i] + b_lo);
        y[token * sy + r0 + g + 8] = from_float<T>(acc[n][2 + i] + b_hi);
      }
    }
}

template <typename T, int NT>
void launch(const at::Tensor& packed, const at::Tensor& x, const c10::optional<at::Tensor>& bias, at::Tensor& y,
            int warps_k) {
  const int R = packed.size(0), K = x.size(1), tokens = x.size(0);
  const dim3 grid(R / 16), block(32, warps_k);
  const size_t smem = size_t(warps_k - 1) * 32 * NT * 4 * sizeof(float);
  const T* bias_ptr = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  skinny_mma_kernel<T, NT><<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(packed.data_ptr()), reinterpret_cast<const T*>(x.data_ptr()), bias_ptr,
      reinterpret_cast<T*>(y.data_ptr()), tokens, R, K, x.stride(0), y.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The Python wrapper (kernels/skinny_mma.py) checks shapes, dtypes and alignment with messages that
// name the fix; these checks only guard the launch against what would read out of bounds.
at::Tensor skinny_mma(const at::Tensor& packed, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                      int64_t warps_k) {
  TORCH_CHECK(packed.is_cuda() && x.is_cuda() && packed.dim() == 2 && x.dim() == 2, "skinny_mma: 2-D CUDA tensors");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), "skinny_mma: packed and x of one dtype");
  const int64_t R = packed.size(0), K = x.size(1);
  TORCH_CHECK(R % 64 == 0 && K % 64 == 0 && packed.is_contiguous() && packed.size(1) == K / 2 + K / 16,
              "skinny_mma: packed must be the contiguous compressed (R, K) operand, R and K multiples of 64");
  TORCH_CHECK(x.stride(1) == 1 && x.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0,
              "skinny_mma: x needs unit column stride, an even row stride and 4-byte alignment");
  TORCH_CHECK(x.size(0) <= 16, "skinny_mma: at most 16 tokens");
  TORCH_CHECK(warps_k >= 1 && warps_k <= 8, "skinny_mma: warps_k in 1..8");
  if (bias.has_value())
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == R && bias->scalar_type() == x.scalar_type(),
                "skinny_mma: bias (R,) contiguous, x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), R}, x.options());
  if (x.size(0) == 0) return y;
  const bool two = x.size(0) > 8;
  if (x.scalar_type() == at::kBFloat16) {
    two ? launch<__nv_bfloat16, 2>(packed, x, bias, y, warps_k) : launch<__nv_bfloat16, 1>(packed, x, bias, y, warps_k);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kHalf, "skinny_mma: fp16 or bf16");
    two ? launch<__half, 2>(packed, x, bias, y, warps_k) : launch<__half, 1>(packed, x, bias, y, warps_k);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(dsparse_mma, m) { m.def("skinny_mma(Tensor packed, Tensor x, Tensor? bias, int warps_k) -> Tensor"); }

TORCH_LIBRARY_IMPL(dsparse_mma, CUDA, m) { m.impl("skinny_mma", &skinny_mma); }
