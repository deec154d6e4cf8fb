// AVX-512F micro-kernel: a 12 x 32 tile of scores in 24 zmm accumulators (+ 2 code vectors +
// 1 broadcast = 27 of 32 registers). Per dim step: 2 loads, 12 broadcasts, 24 FMAs, so the FMA
// pipes need only ~1.6 instructions per cycle; the AVX2 6 x 16 kernel needs ~3.3, which is
// what held it below the BLAS ceiling on Zen 4 (where 512-bit FMAs run at the same FLOP rate).
// Compiled with -mavx512f -mfma; called only when the CPU reports AVX-512F.
#include <immintrin.h>

#define IMGTX_CPU_NS avx512
#include "codebook/codebook_cpu_driver.h"

namespace imgtx {
namespace {

struct Avx512Kernel {
  static constexpr int MR = 12, NR = 32;

  // Same contract as Avx2Kernel::tile (codebook_avx2.cpp).
  static void tile(const float* a, const float* b, int64_t D, float* partial, bool first,
                   bool last, const float* norm, int32_t k0, float* best, float* second,
                   int32_t* index) {
    __m512 c[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      c[r][0] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + r * NR);
      c[r][1] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + r * NR + 16);
    }
#pragma GCC unroll 2
    for (int64_t d = 0; d < D; ++d) {
      const __m512 b0 = _mm512_loadu_ps(b + d * NR);
      const __m512 b1 = _mm512_loadu_ps(b + d * NR + 16);
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        const __m512 ar = _mm512_set1_ps(a[d * MR + r]);
        c[r][0] = _mm512_fmadd_ps(ar, b0, c[r][0]);
        c[r][1] = _mm512_fmadd_ps(ar, b1, c[r][1]);
      }
    }
    if (!last) {
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        _mm512_storeu_ps(partial + r * NR, c[r][0]);
        _mm512_storeu_ps(partial + r * NR + 16, c[r][1]);
      }
      return;
    }
    const __m512 minus2 = _mm512_set1_ps(-2.0f);
    const __m512 n0 = _mm512_loadu_ps(norm), n1 = _mm512_loadu_ps(norm + 16);
    const __m512i k_lo = _mm512_add_epi32(
        _mm512_set1_epi32(k0),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i k_hi = _mm512_add_epi32(k_lo, _mm512_set1_epi32(16));
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      fold(_mm512_fmadd_ps(c[r][0], minus2, n0), k_lo, best + r * NR, second + r * NR,
           index + r * NR);
      fold(_mm512_fmadd_ps(c[r][1], minus2, n1), k_hi, best + r * NR + 16,
           second + r * NR + 16, index + r * NR + 16);
    }
  }

  // Lane-wise: second = min(second, max(best, s)); if (s < best) best = s, index = k.
  // Strict '<' keeps the earliest (lowest) index on exact ties; NaN scores never win.
  static inline void fold(__m512 s, __m512i k, float* best, float* second, int32_t* index) {
    const __m512 bv = _mm512_loadu_ps(best);
    const __mmask16 lt = _mm512_cmp_ps_mask(s, bv, _CMP_LT_OQ);
    _mm512_storeu_ps(second, _mm512_min_ps(_mm512_loadu_ps(second), _mm512_max_ps(bv, s)));
    _mm512_mask_storeu_ps(best, lt, s);
    _mm512_mask_storeu_epi32(index, lt, k);
  }
};

}  // namespace

void codebook_lookup_cpu_avx512(const CodebookLookupParams& p, int num_threads) {
  avx512::codebook_lookup_driver<Avx512Kernel>(p, num_threads);
}

}  // namespace imgtx
