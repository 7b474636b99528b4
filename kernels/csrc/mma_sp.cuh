// The sparse tensor cores' m16n8k32 product (mma.sp) for fp16/bf16, and the fp32 conversions around it:
// shared by skinny_mma.cu and the GPU test that checks the instruction's operand layouts
// (kernels/tests/test_kernels_skinny_mma.py).
//
// Operand layouts (PTX ISA, sparse mma.m16n8k32 .f16/.bf16; lane = 4 * g + t):
//   A (16 x 32, 2:4 along k, 16 x 16 kept values): a[0] = row g, kept values 2t, 2t + 1 (group t);
//     a[1] = row g + 8, the same; a[2] = row g, kept values 8 + 2t, 9 + 2t (group 4 + t); a[3] = row g + 8, the same
//   metadata e (selector 0, threads 4g and 4g + 1): thread 4g + h holds groups 4h .. 4h + 3 (k 16h .. 16h + 15),
//     row g in bits 0-15 and row g + 8 in bits 16-31, a nibble per group (lower kept position in its low 2 bits)
//   B (32 x 8): b[j] = column g, rows 8j + 2t, 8j + 2t + 1
//   D (16 x 8, fp32): d[0], d[1] = row g, columns 2t, 2t + 1; d[2], d[3] = row g + 8, the same
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace dsparse_mma {

template <typename T>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
#endif
}

// fp32 <-> T by intrinsics (torch's extension build turns off the types' implicit conversions); rn: round once.
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return __float2half_rn(v);
  }
}

}  // namespace dsparse_mma
