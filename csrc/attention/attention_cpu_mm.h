// The one register-blocked micro-kernel every attention product uses.
//
//   C[r][n] (+)= sum_k A(k, r) * B[k][n]    for r < MR, n < NV * W
//
// A is read by broadcast (packed at compile-time strides, or fp32 rows in place); B rows are
// vector loads at b + k * ldb. The attention kernels keep every operand in a layout that makes
// one of these cheap:
//   S^T = K Q^T       A = K rows in place, or K panels [d][MR keys]   B = (scale Q)^T [d][32 queries]
//   O^T += V^T P^T    A = V rows [key][d]          B = P^T [key][32 queries]   (the forward)
//   dV += P^T dO, dK += dS^T Q, dQ += dS K, dP^T = V dO^T: the same with other strides.
// Scores are kept transposed (keys x 32 queries) so that the softmax runs down columns of
// vectors: a query's max, sum and rescale are lane-wise, with no horizontal reductions.
// With W = 16 (AVX-512) the usual shape is MR = 8..12 rows x 2 vectors: 16..24 accumulators,
// 2 loads and MR broadcasts per MR * 2 FMAs, so the loop is bound by the FMA pipe.
#pragma once

#include <cstdint>

#include "common/simd.h"

namespace imgtx {
namespace IMGTX_CPU_NS {
namespace attn_mm {

// How the micro-kernel reads A(k, r): packed operands at compile-time strides (one pointer and
// constant displacements address all MR rows), or in place at a run-time stride.
template <int AK, int AR>
struct Strided {  // A(k, r) = a[k * AK + r * AR]
  const float* a;
  float operator()(int64_t k, int r) const { return a[k * AK + r * AR]; }
};
struct RowStride {  // A(k, r) = a[r * ld + k]: S^T = K Q^T with K's fp32 rows read in place
  const float* a;
  int64_t ld;
  float operator()(int64_t k, int r) const { return a[r * ld + k]; }
};
struct KStride {  // A(k, r) = a[k * ld + r]: O^T += V^T P^T, A the V rows
  const float* a;
  int64_t ld;
  float operator()(int64_t k, int r) const { return a[k * ld + r]; }
};

// The in-place reads skip a packing copy (about one cycle per element: on short inputs as much
// as the products it feeds); each broadcast is still one load, so they run at the packed rate.
template <int W, int MR, int NV, bool kAccumulate, class A>
inline void mm_with(int64_t kdim, A a, const float* __restrict b, int64_t ldb,
                    float* __restrict c, int64_t ldc) {
  typedef typename simd::Vec<W>::F F;
  F acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = kAccumulate ? simd::load<W>(c + r * ldc + v * W) : F{};
#pragma GCC unroll 2
  for (int64_t k = 0; k < kdim; ++k) {
    F bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = simd::load<W>(b + k * ldb + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const F ar = simd::broadcast<W>(a(k, r));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) simd::store<W>(c + r * ldc + v * W, acc[r][v]);
}

template <int W, int MR, int NV, int AK, int AR, bool kAccumulate>
inline void mm(int64_t kdim, const float* __restrict a, const float* __restrict b, int64_t ldb,
               float* __restrict c, int64_t ldc) {
  mm_with<W, MR, NV, kAccumulate>(kdim, Strided<AK, AR>{a}, b, ldb, c, ldc);
}

}  // namespace attn_mm
}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
