// x @ Aᵀ (+ bias) for a few tokens on the sparse tensor cores (mma.sp), straight from cuSPARSELt's
// compressed 2:4 operand A (kernels/cslt_meta.py describes its layout). See kernels/skinny_mma.py.
//
// A warp owns 16 * MT rows of A and a share of k in spans of 128 columns: a row's span is 64 kept values,
// one 128-byte line, read as two 16-byte loads per thread (thread t of a row: groups 4t .. 4t + 3 and
// 16 + 4t .. 16 + 4t + 3 of the span's 32). A sum over k may take k in any order, so mma.sp number u
// (0-3) of a span multiplies the span's groups 4G + u, G = 0..7, as its logical groups G: each thread's
// A fragment is component u of its loads, x is read in the same order, and each metadata register is
// gathered from the span's four 8-byte words of the row pair (cuSPARSELt's word of chunk c, 32 columns,
// holds group gc of rows r | r + 8 in byte (gc % 4) * 2 + gc / 4; mma.sp wants logical groups 0-3
// (thread 4i) or 4-7 (thread 4i + 1) of row r in bits 0-15 and of row r + 8 in bits 16-31). Where
// K % 128 = 64 the last span is half: its upper groups multiply zeros.
// The block's warps split k; warp 0 adds their fp32 sums in warp order (deterministic), adds the bias in
// fp32 and rounds once, as cuSPARSELt does.
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

constexpr int kSpan = 128;  // columns of A a warp reads per row and step: 4 x mma.sp.m16n8k32
constexpr uint32_t kFillerMeta = 0x44444444u;  // kept positions (0, 1) in every group: valid metadata for zeros

// A read once: past L1 (the operand streams; x and the metadata are what caches should keep). Volatile,
// so that the compiler issues a batch's loads where they are written, not next to each use.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t component(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ uint4 masked(uint4 v, uint32_t keep) {
  return make_uint4(v.x & keep, v.y & keep, v.z & keep, v.w & keep);
}

// The metadata register of mma.sp u of a span for thread 4i + h, from the words of chunks 2h (w0) and 2h + 1
// (w1) of the span: logical group 4h + j is the span's group 16h + 4j + u, in chunk 2h + j / 2 at byte
// 2u + j % 2, so bytes j = 0..3 are halfword u of w0, then of w1; each byte holds row r's nibble low and
// row r + 8's high.
__device__ __forceinline__ uint32_t metadata_register(uint2 w0, uint2 w1, int u) {
  const uint32_t bytes = __byte_perm(u < 2 ? w0.x : w0.y, u < 2 ? w1.x : w1.y, (u & 1) ? 0x7632 : 0x5410);
  uint32_t low = bytes & 0x0F0F0F0Fu;  // row r's nibbles, one per byte
  uint32_t high = (bytes >> 4) & 0x0F0F0F0Fu;  // row r + 8's
  low |= low >> 4;  // bytes 0 and 2 now hold nibble pairs (j = 0, 1) and (2, 3)
  high |= high >> 4;
  return __byte_perm(low, high, 0x6420);
}

// grid.x: tiles of 16 * MT rows; block: 32 x warps threads (warp w takes the w-th share of k's spans).
// NT: token tiles of 8; BATCH: spans a warp loads before it multiplies them. x (tokens, K) with row stride
// sx; y (tokens, R) with row stride sy.
template <typename T, int NT, int MT, int BATCH>
__global__ void __launch_bounds__(256) skinny_mma_kernel(const T* __restrict__ packed, const T* __restrict__ x,
                                                         const T* __restrict__ bias, T* __restrict__ y, int tokens,
                                                         int R, int K, int64_t sx, int64_t sy) {
  extern __shared__ float partial[];  // (warps - 1) x 32 lanes x MT x NT x 4
  const int lane = threadIdx.x, warp = threadIdx.y, warps = blockDim.y;
  const int g = lane >> 2, t = lane & 3, odd = t & 1;
  const int64_t r0 = int64_t(blockIdx.x) * 16 * MT;
  const int halves = K / 64, spans = (halves + 1) / 2;  // the last span is half where K % 128 = 64
  const int per_warp = (spans + warps - 1) / warps;
  const int s_begin = warp * per_warp, s_end = min(spans, s_begin + per_warp);
  const int64_t half_k = K / 2;  // kept values per row; uint4 units: rows r and r + 8 are half_k apart

  const uint4* rows[MT];  // row r0 + 16m + g, from its uint4 t (a span is 8 uint4 of a row)
  const uint2* words[MT];  // the row pair's word of chunk 2 * (t % 2) of span 0 (chunk c: 32 words further)
  for (int m = 0; m < MT; ++m) {
    const int64_t r = r0 + 16 * m;
    rows[m] = reinterpret_cast<const uint4*>(packed + (r + g) * half_k) + t;
    words[m] = reinterpret_cast<const uint2*>(packed + int64_t(R) * half_k) + (r / 64) * K + (r / 16 % 4) * 8 + g +
               64 * odd;
  }
  const uint4* xs[NT];  // token 8n + g's pairs 8 (t / 2) .. 8 (t / 2) + 7 of span 0, as two uint4
  bool live[NT];
  for (int n = 0; n < NT; ++n) {
    const int token = n * 8 + g;
    live[n] = token < tokens;
    xs[n] = reinterpret_cast<const uint4*>(x + int64_t(live[n] ? token : 0) * sx) + 2 * (t >> 1);
  }

  float acc[MT][NT][4] = {};
  for (int s0 = s_begin; s0 < s_end; s0 += BATCH) {
    // all of a batch's loads of A first, so that each warp keeps BATCH spans of A in flight; spans past the
    // warp's end multiply zeros (no branch between the loads and their use, which would let the compiler
    // sink each load next to its product)
    uint4 lo[BATCH][MT][2], hi[BATCH][MT][2];  // [.][.][row g | g + 8]: the span's groups 4t.. and 16 + 4t..
    uint2 w[BATCH][MT][2];  // chunks 2h and 2h + 1 of the span, h = t % 2
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int s = min(s0 + b, s_end - 1);
      const bool whole = 2 * s + 1 < halves;
      const uint32_t keep = s0 + b < s_end ? 0xFFFFFFFFu : 0u, keep_hi = whole ? keep : 0u;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const uint4* p = rows[m] + 8 * s;
        lo[b][m][0] = masked(load_stream(p), keep);
        lo[b][m][1] = masked(load_stream(p + half_k), keep);
        hi[b][m][0] = masked(load_stream(p + (whole ? 4 : 0)), keep_hi);
        hi[b][m][1] = masked(load_stream(p + half_k + (whole ? 4 : 0)), keep_hi);
        const uint2* q = words[m] + 128 * s - (whole ? 0 : 64 * odd);  // a half span has chunks 0 and 1 only
        w[b][m][0] = __ldg(q);
        w[b][m][1] = __ldg(q + 32);
        if (!whole && odd) w[b][m][0] = w[b][m][1] = make_uint2(kFillerMeta, kFillerMeta);
      }
    }
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int s = min(s0 + b, s_end - 1);
      const bool whole = 2 * s + 1 < halves;
      uint32_t e[MT][4];  // (threads 4i + 2, + 3: not read by mma.sp)
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int u = 0; u < 4; ++u) e[m][u] = metadata_register(w[b][m][0], w[b][m][1], u);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        // x's pairs 16j + 8 (t / 2) .. + 7 of the span, j = 0..3 (a half span: zeros for j = 2, 3)
        uint4 xv[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const bool read = live[n] && (whole || j < 2);
#pragma unroll
          for (int p = 0; p < 2; ++p)
            xv[j][p] = read ? __ldg(xs[n] + 16 * s + 4 * (j < 2 || whole ? j : j - 2) + p) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          // B of logical k 8j + 2t, +1: the span's pair 16j + 8 (t / 2) + 2u + t % 2
          uint32_t bf[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) bf[j] = component(xv[j][u >> 1], 2 * (u & 1) + odd);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const uint32_t a[4] = {component(lo[b][m][0], u), component(lo[b][m][1], u), component(hi[b][m][0], u),
                                   component(hi[b][m][1], u)};
            mma_sp<T>(acc[m][n], a, bf, e[m][u]);
          }
        }
      }
    }
  }

  // accumulators: acc[m][n][0..1] row r0 + 16m + g, tokens 8n + 2t, +1; acc[m][n][2..3] row r0 + 16m + g + 8
  constexpr int kSums = MT * NT * 4;
  if (warp > 0) {
    float* mine = partial + ((warp - 1) * 32 + lane) * kSums;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) mine[(m * NT + n) * 4 + i] = acc[m][n][i];
  }
  __syncthreads();
  if (warp != 0) return;
  for (int v = 1; v < warps; ++v) {
    const float* theirs = partial + ((v - 1) * 32 + lane) * kSums;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][n][i] += theirs[(m * NT + n) * 4 + i];
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int64_t r = r0 + 16 * m + g;
    const float b_lo = bias != nullptr ? to_float(bias[r]) : 0.f, b_hi = bias != nullptr ? to_float(bias[r + 8]) : 0.f;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int token = n * 8 + 2 * t + i;
        if (token < tokens) {
          y[token * sy + r] = from_float<T>(acc[m][n][i] + b_lo);
          y[token * sy + r + 8] = from_float<T>(acc[m][n][2 + i] + b_hi);
        }
      }
  }
}

template <typename T, int NT, int MT, int BATCH>
void launch(const at::Tensor& packed, const at::Tensor& x, const c10::optional<at::Tensor>& bias, at::Tensor& y,
            int warps_k) {
  const int R = packed.size(0), K = x.size(1), tokens = x.size(0);
  const dim3 grid(R / (16 * MT)), block(32, warps_k);
  const size_t smem = size_t(warps_k - 1) * 32 * MT * NT * 4 * sizeof(float);
  const T* bias_ptr = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  skinny_mma_kernel<T, NT, MT, BATCH><<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(packed.data_ptr()), reinterpret_cast<const T*>(x.data_ptr()), bias_ptr,
      reinterpret_cast<T*>(y.data_ptr()), tokens, R, K, x.stride(0), y.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NT>
void launch_tiles(const at::Tensor& packed, const at::Tensor& x, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                  int64_t warps_k, int64_t row_tiles, int64_t batch) {
  if (row_tiles == 1) {
    batch == 1 ? launch<T, NT, 1, 1>(packed, x, bias, y, warps_k) : launch<T, NT, 1, 2>(packed, x, bias, y, warps_k);
  } else {
    batch == 1 ? launch<T, NT, 2, 1>(packed, x, bias, y, warps_k) : launch<T, NT, 2, 2>(packed, x, bias, y, warps_k);
  }
}

// The Python wrapper (kernels/skinny_mma.py) checks shapes, dtypes and alignment with messages that
// name the fix; these checks only guard the launch against what would read out of bounds.
at::Tensor skinny_mma(const at::Tensor& packed, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                      int64_t warps_k, int64_t row_tiles, int64_t batch) {
  TORCH_CHECK(packed.is_cuda() && x.is_cuda() && packed.dim() == 2 && x.dim() == 2, "skinny_mma: 2-D CUDA tensors");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), "skinny_mma: packed and x of one dtype");
  const int64_t R = packed.size(0), K = x.size(1);
  TORCH_CHECK(R % 64 == 0 && K % 64 == 0 && packed.is_contiguous() && packed.size(1) == K / 2 + K / 16 &&
                  reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0,
              "skinny_mma: packed must be the contiguous, 16-byte aligned compressed (R, K) operand, R and K "
              "multiples of 64");
  TORCH_CHECK(x.stride(1) == 1 && x.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "skinny_mma: x needs unit column stride, a row stride that is a multiple of 8 and 16-byte alignment");
  TORCH_CHECK(x.size(0) <= 16, "skinny_mma: at most 16 tokens");
  TORCH_CHECK(warps_k >= 1 && warps_k <= 8, "skinny_mma: warps_k in 1..8");
  TORCH_CHECK((row_tiles == 1 || row_tiles == 2) && (batch == 1 || batch == 2), "skinny_mma: row_tiles and batch in 1..2");
  if (bias.has_value())
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == R && bias->scalar_type() == x.scalar_type(),
                "skinny_mma: bias (R,) contiguous, x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), R}, x.options());
  if (x.size(0) == 0) return y;
  const bool two = x.size(0) > 8;
  if (x.scalar_type() == at::kBFloat16) {
    two ? launch_tiles<__nv_bfloat16, 2>(packed, x, bias, y, warps_k, row_tiles, batch)
        : launch_tiles<__nv_bfloat16, 1>(packed, x, bias, y, warps_k, row_tiles, batch);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kHalf, "skinny_mma: fp16 or bf16");
    two ? launch_tiles<__half, 2>(packed, x, bias, y, warps_k, row_tiles, batch)
        : launch_tiles<__half, 1>(packed, x, bias, y, warps_k, row_tiles, batch);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(dsparse_mma, m) {
  m.def("skinny_mma(Tensor packed, Tensor x, Tensor? bias, int warps_k, int row_tiles, int batch) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsparse_mma, CUDA, m) { m.impl("skinny_mma", &skinny_mma); }
