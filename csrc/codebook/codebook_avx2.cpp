// AVX2 + FMA micro-kernel: a 6 x 16 tile of scores in 12 ymm accumulators (the classic
// Haswell/Zen GEMM shape: 12 accumulators + 2 code vectors + 1 broadcast = 15 registers),
// with the running argmin folded in straight from the registers.
// Compiled with -mavx2 -mfma; called only when the CPU reports both.
#include <immintrin.h>

#define IMGTX_CPU_NS avx2
#include "codebook/codebook_cpu_driver.h"

namespace imgtx {
namespace {

struct Avx2Kernel {
  static constexpr int MR = 6, NR = 16;

  // Adds dims [0, D) of the a (z) and b (code) slices to the MR x NR dot products: from zero
  // when `first`, else from `partial`. Unless `last`, stores them back to `partial`; on the
  // last dim block turns them into scores and folds them into the running argmin.
  static void tile(const float* a, const float* b, int64_t D, float* partial, bool first,
                   bool last, const float* norm, int32_t k0, float* best, float* second,
                   int32_t* index) {
    __m256 c[MR][2];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      c[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(partial + r * NR);
      c[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(partial + r * NR + 8);
    }
#pragma GCC unroll 4
    for (int64_t d = 0; d < D; ++d) {
      const __m256 b0 = _mm256_loadu_ps(b + d * NR);
      const __m256 b1 = _mm256_loadu_ps(b + d * NR + 8);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m256 ar = _mm256_broadcast_ss(a + d * MR + r);
        c[r][0] = _mm256_fmadd_ps(ar, b0, c[r][0]);
        c[r][1] = _mm256_fmadd_ps(ar, b1, c[r][1]);
      }
    }
    if (!last) {
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        _mm256_storeu_ps(partial + r * NR, c[r][0]);
        _mm256_storeu_ps(partial + r * NR + 8, c[r][1]);
      }
      return;
    }
    const __m256 minus2 = _mm256_set1_ps(-2.0f);
    const __m256 n0 = _mm256_loadu_ps(norm), n1 = _mm256_loadu_ps(norm + 8);
    const __m256i k_lo = _mm256_add_epi32(_mm256_set1_epi32(k0),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i k_hi = _mm256_add_epi32(k_lo, _mm256_set1_epi32(8));
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      fold(_mm256_fmadd_ps(c[r][0], minus2, n0), k_lo, best + r * NR, second + r * NR,
           index + r * NR);
      fold(_mm256_fmadd_ps(c[r][1], minus2, n1), k_hi, best + r * NR + 8, second + r * NR + 8,
           index + r * NR + 8);
    }
  }

  // Lane-wise: second = min(second, max(best, s)); if (s < best) best = s, index = k.
  // Strict '<' keeps the earliest (lowest) index on exact ties; NaN scores never win.
  static inline void fold(__m256 s, __m256i k, float* best, float* second, int32_t* index) {
    const __m256 bv = _mm256_loadu_ps(best);
    const __m256 lt = _mm256_cmp_ps(s, bv, _CMP_LT_OQ);
    _mm256_storeu_ps(second, _mm256_min_ps(_mm256_loadu_ps(second), _mm256_max_ps(bv, s)));
    _mm256_storeu_ps(best, _mm256_blendv_ps(bv, s, lt));
    const __m256i iv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(index),
                        _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(iv),
                                                             _mm256_castsi256_ps(k), lt)));
  }
};

}  // namespace

void codebook_lookup_cpu_avx2(const CodebookLookupParams& p, int num_threads) {
  avx2::codebook_lookup_driver<Avx2Kernel>(p, num_threads);
}

}  // namespace imgtx
