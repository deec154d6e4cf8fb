// The one register-blocked micro-kernel every attention product uses.
//
//   C[r][n] (+)= sum_k A(k, r) * B[k][n]    for r < MR, n < NV * W
//
// A is read by broadcast at a[k * AK + r * AR] (compile-time strides, so one pointer and
// constant displacements address all MR rows); B rows are vector loads at b + k * ldb. The
// attention kernels keep every operand in a layout that makes one of these cheap:
//   S^T = K Q^T       A = K panel [d][MR keys]    B = (scale Q)^T [d][32 queries]
//   O  += P V         A = P^T [key][32 queries]   B = V rows [key][d]
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

template <int W, int MR, int NV, int AK, int AR, bool kAccumulate>
inline void mm(int64_t kdim, const float* __restrict a, const float* __restrict b, int64_t ldb,
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
      const F ar = simd::broadcast<W>(a[k * AK + r * AR]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) simd::store<W>(c + r * ldc + v * W, acc[r][v]);
}

}  // namespace attn_mm
}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
